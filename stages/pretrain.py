"""Stage: pretrain the embedded base model by flow matching on rendered shapes and publish it.

The model is cached locally by its settings (a second run reuses it) and published at --out. Settings whose
weights ship in the package (elborl/base_models/) are copied from there unless --rebuild. Pretraining runs on
params.yaml's pretrain.threads, not --threads: the thread count changes the weights (elborl/pretrain.py)."""

import shutil

from elborl.pretrain import ensure_base_model, ship_base_model
from elborl.store import MANIFEST, ArtifactStore
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    def write(directory):
        _, path = ensure_base_model(params.base_model, params.pretrain, args.cache, rebuild=args.rebuild or args.ship)
        if args.ship:
            print(f"shipped: {ship_base_model(path)}")
        # a copy of the shipped weights carries their manifest; the published artifact gets its own
        shutil.copytree(path, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))

    ArtifactStore().publish(args.out, write, {"stage": "pretrain"})


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) of the base model")
    parser.add_argument("--cache", default="artifacts/base_model", help="local cache of pretrained models")
    parser.add_argument("--rebuild", action="store_true",
                        help="pretrain even when the cache or the package holds weights for these settings")
    parser.add_argument("--ship", action="store_true",
                        help="pretrain (as --rebuild) and replace the shipped weights for these settings (maintainers)")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser())
