"""Stage: round R's policy update — one epoch of the ELBO objective on the round's samples and rewards.

Publishes <run>/round-R/update: current/old/EMA weights, optimizer and RNG state, and the round's metrics."""

from elborl.rounds import RunContext, update_stage
from stages._common import run_stage, stage_parser

DATA_PARALLEL = True  # several processes share the stage's work (elborl/distributed.py)


def main(args, params) -> None:
    ctx = RunContext(args.run, params, args.base_model, cache=args.cache)
    update_stage(ctx, args.round)


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--base-model", required=True, help="artifact URI of the base model")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser(), data_parallel=DATA_PARALLEL)
