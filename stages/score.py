"""Stage: round R's rewards for its rollout images (needs no diffusion model; runs in the reward container).

The reward is params.yaml's `rewards:` section (or --reward NAME alone), computed in-process, or with --reward-url
by a reward service (python -m elborl.rewards.service, token from $ELBORL_REWARD_TOKEN), e.g. in the GenEval
container. Publishes <run>/round-R/score/rewards.json."""

from elborl.rewards import reward_from_params
from elborl.rounds import RunContext, score_stage
from stages._common import add_reward_options, run_stage, stage_parser

DATA_PARALLEL = True  # several processes share the stage's work (elborl/distributed.py)


def main(args, params) -> None:
    ctx = RunContext(args.run, params, cache=args.cache)
    with reward_from_params(params.rewards, url=args.reward_url, only=args.reward) as reward:
        score_stage(ctx, args.round, reward)


def build_parser(prog: str | None = None):
    parser = stage_parser(__doc__, prog)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--round", type=int, required=True)
    add_reward_options(parser)
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser(), data_parallel=DATA_PARALLEL)
