"""Stage: a whole RL run in one job — rounds of rollout, score and update until rl.epochs; one process, or
several data parallel when launched by `accelerate launch` / `torchrun` (elborl/distributed.py).

The reward is params.yaml's `rewards:` section (or --reward NAME alone; --reward-url: through a reward service).
Resumes at the first round without a published update; writes the per-round metrics to --metrics (JSONL)."""

import json
from pathlib import Path

from elborl.rewards import reward_from_params
from elborl.rounds import RunContext, round_metrics, run_rounds
from stages._common import add_reward_options, run_stage, stage_parser

DATA_PARALLEL = True  # several processes share the stage's work (elborl/distributed.py)


def main(args, params) -> None:
    ctx = RunContext(args.run, params, args.base_model, args.prompts, cache=args.cache)
    with reward_from_params(params.rewards, url=args.reward_url, only=args.reward) as reward:
        done = run_rounds(ctx, reward, args.rounds)
    if not ctx.processes.is_main:  # a data-parallel job: the main process reports and writes
        return
    print(f"{ctx.run}: {done} rounds published")
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text("".join(json.dumps(row) + "\n" for row in round_metrics(ctx)))


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--base-model", required=True, help="artifact URI of the base model")
    parser.add_argument("--prompts", required=True, help="artifact URI holding train.jsonl")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to reach (default: rl.epochs)")
    add_reward_options(parser)
    parser.add_argument("--metrics", default=None, help="local JSONL file for the per-round metrics")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser(), data_parallel=DATA_PARALLEL)
