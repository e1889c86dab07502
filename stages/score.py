"""Stage: round R's rewards for its rollout images (needs no diffusion model; runs in the reward container).

The reward is computed in-process, or with --reward-url by a reward service (python -m elborl.rewards.service,
token from $ELBORL_REWARD_TOKEN), e.g. in the GenEval container. Publishes <run>/round-R/score/rewards.json."""

from elborl.rewards import REWARDS, make_reward
from elborl.rounds import RunContext, score_stage
from stages._common import run_stage, stage_parser


def main(args, params) -> None:
    ctx = RunContext(args.run, params, cache=args.cache)
    if args.reward_url is None:
        score_stage(ctx, args.round, make_reward(args.reward))
        return
    from elborl.rewards.service import RewardClient, RewardServiceError

    with RewardClient(args.reward_url, args.reward) as reward:
        try:
            score_stage(ctx, args.round, reward)
        except RewardServiceError as error:
            raise ValueError(str(error)) from error  # one line, as every stage reports bad input


def build_parser():
    parser = stage_parser(__doc__)
    parser.add_argument("--run", required=True, help="the run's prefix (local path or s3://)")
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--reward", default="shapes_geneval", choices=sorted(REWARDS))
    parser.add_argument("--reward-url", default=None,
                        help="score through the reward service at this URL (token from $ELBORL_REWARD_TOKEN)")
    parser.add_argument("--cache", default=None, help="local cache for s3:// artifacts")
    return parser


if __name__ == "__main__":
    run_stage(main, build_parser())
