"""Stage: pretrain the embedded base model by flow matching on rendered shapes (cached by settings)."""

from elborl.pretrain import ensure_base_model
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    _, path = ensure_base_model(params.base_model, params.pretrain, args.cache)
    print(f"base model at {path}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--cache", default="artifacts/base_model", help="cache directory of pretrained models")
    run_stage(main, parser)
