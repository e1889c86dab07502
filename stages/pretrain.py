"""Stage: pretrain the embedded base model by flow matching on rendered shapes and publish it.

The model is cached locally by its settings (a second run reuses it) and published at --out. Pretraining runs on
params.yaml's pretrain.threads, not --threads: the thread count changes the weights (elborl/pretrain.py)."""

import shutil

from elborl.pretrain import ensure_base_model
from elborl.store import ArtifactStore
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    def write(directory):
        _, path = ensure_base_model(params.base_model, params.pretrain, args.cache)
        shutil.copytree(path, directory, dirs_exist_ok=True)

    ArtifactStore().publish(args.out, write, {"stage": "pretrain"})


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) of the base model")
    parser.add_argument("--cache", default="artifacts/base_model", help="local cache of pretrained models")
    run_stage(main, parser)
