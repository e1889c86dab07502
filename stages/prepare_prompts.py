"""Stage: the shapes world's fixed test prompts and its training prompts as GenEval JSONL, one artifact."""

from elborl.geneval.prompts import shapes_test_set, shapes_train_set, write_jsonl
from elborl.store import ArtifactStore
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    def write(directory):
        test = shapes_test_set()
        train = shapes_train_set(params.prompts.train_per_task, params.prompts.train_seed,
                                 params.prompts.coloured_variants)
        write_jsonl(directory / "test.jsonl", test)
        write_jsonl(directory / "train.jsonl", train)
        print(f"{len(test)} test and {len(train)} train prompts")

    ArtifactStore().publish(args.out, write, {"stage": "prepare_prompts"})


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) for test.jsonl and train.jsonl")
    run_stage(main, parser)
