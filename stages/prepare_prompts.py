"""Stage: write the shapes world's fixed test prompts and its training prompts as GenEval JSONL."""

from pathlib import Path

from elborl.embedded import prepare_prompts
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    test, train = prepare_prompts(params, Path(args.out))
    print(f"wrote {len(test)} test and {len(train)} train prompts to {args.out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="directory for test.jsonl and train.jsonl")
    run_stage(main, parser)
