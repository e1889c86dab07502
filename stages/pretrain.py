"""Stage: the base model, published at --out: the embedded one pretrained by flow matching on rendered shapes, or
(--take) an SD3 model in diffusers' format, such as Stable Diffusion 3.5 Medium.

The shapes model is cached locally by its settings (a second run reuses it). Settings whose weights ship in the
package (elborl/base_models/) are copied from there unless --rebuild. Pretraining runs on params.yaml's
pretrain.threads, not --threads: the thread count changes the weights (elborl/pretrain.py). Every base model
carries pretrain_log.json (its pretraining losses; empty for a taken model) for the report."""

import json
import shutil
from pathlib import Path

from elborl.pretrain import ensure_base_model, ship_base_model
from elborl.store import MANIFEST, ArtifactStore
from stages._common import run_stage, stage_parser

TINY_SD3 = "tiny-sd3"


def main(args, params) -> None:
    def write(directory):
        if args.take:
            take_base_model(args.take, directory)
            return
        _, path = ensure_base_model(params.base_model, params.pretrain, args.cache, rebuild=args.rebuild or args.ship)
        if args.ship:
            print(f"shipped: {ship_base_model(path)}")
        # a copy of the shipped weights carries their manifest; the published artifact gets its own
        shutil.copytree(path, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))

    ArtifactStore().publish(args.out, write, {"stage": "pretrain", "taken": args.take})


def take_base_model(source: str, directory: Path) -> None:
    """Fills `directory` with the SD3 model `source` names: `tiny-sd3` (random weights from small configs with
    SD3.5 Medium's structure), a published artifact (local or s3://, fetched and checked against its manifest),
    or a local diffusers directory."""
    store = ArtifactStore()
    if source == TINY_SD3:
        from elborl.models.sd3 import tiny_sd3

        tiny_sd3(seed=0).save_pretrained(directory)
    elif store.exists(source):
        fetched = directory / "fetched"
        store.get_artifact(source, fetched)
        for item in fetched.iterdir():
            if item.name != MANIFEST:
                item.rename(directory / item.name)
        shutil.rmtree(fetched)
    elif Path(source).is_dir():
        shutil.copytree(source, directory, dirs_exist_ok=True)
    else:
        raise FileNotFoundError(f"--take {source}: neither {TINY_SD3!r}, a published artifact nor a directory")
    if not (directory / "model_index.json").exists():
        raise ValueError(f"--take {source}: not a diffusers model (no model_index.json)")
    (directory / "pretrain_log.json").write_text(json.dumps({"taken": source, "losses": []}))


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--out", required=True, help="artifact URI (local path or s3://) of the base model")
    parser.add_argument("--cache", default="artifacts/base_model", help="local cache of pretrained models")
    parser.add_argument("--rebuild", action="store_true",
                        help="pretrain even when the cache or the package holds weights for these settings")
    parser.add_argument("--take", default=None, metavar="MODEL",
                        help="publish this SD3 model instead of the shapes one: a diffusers directory or a published "
                        f"artifact (local or s3://), e.g. Stable Diffusion 3.5 Medium; `{TINY_SD3}`: the tiny SD3 "
                        "from configs with random weights (the production code path at test scale)")
    parser.add_argument("--ship", action="store_true",
                        help="pretrain (as --rebuild) and replace the shipped weights for these settings (maintainers)")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser())
