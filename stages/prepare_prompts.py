"""Stage: the shapes world's fixed test prompts and its training prompts as GenEval JSONL, one artifact."""

from elborl.embedded import prepare_prompts
from elborl.store import ArtifactStore
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    def write(directory):
        test, train = prepare_prompts(params, directory)
        print(f"{len(test)} test and {len(train)} train prompts")

    ArtifactStore().publish(args.out, write, {"stage": "prepare_prompts"})


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) for test.jsonl and train.jsonl")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser())
