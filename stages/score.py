"""Stage: round R's rewards for its rollout images (needs no diffusion model; runs in the reward container).

Publishes <run>/round-R/score/rewards.json."""

from elborl.rewards import REWARDS, make_reward
from elborl.rounds import RunContext, score_stage
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    ctx = RunContext(args.run, params, cache=args.cache)
    score_stage(ctx, args.round, make_reward(args.reward))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--reward", default="shapes_geneval", choices=sorted(REWARDS))
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    run_stage(main, parser)
