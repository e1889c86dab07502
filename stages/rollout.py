"""Stage: round R's rollout — G images per training prompt from the policy round R-1 left (rl.sampler: ODE or SDE).

Publishes <run>/round-R/rollout: images, final samples, and each sample's prompt, seed and sampler."""

from elborl.rounds import RunContext, rollout_stage
from stages._common import run_stage, stage_parser

DATA_PARALLEL = True  # several processes share the stage's work (elborl/distributed.py)


def main(args, params) -> None:
    ctx = RunContext(args.run, params, args.base_model, args.prompts, cache=args.cache)
    rollout_stage(ctx, args.round)


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--base-model", required=True, help="artifact URI of the base model")
    parser.add_argument("--prompts", required=True, help="artifact URI holding train.jsonl")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser(), data_parallel=DATA_PARALLEL)
