"""What every stage CLI shares: the params file, thread count and one clear line on bad input.
Stages publish and fetch through `elborl.store.ArtifactStore` (`publish`, `local_artifact`)."""

import argparse
import sys

import torch
from botocore.exceptions import BotoCoreError, ClientError

from elborl.config import load_params
from elborl.rewards import REWARDS
from elborl.rewards.service import RewardServiceError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def add_reward_options(parser: argparse.ArgumentParser) -> None:
    """The training reward's options (score and train stages): params.yaml's `rewards:` unless overridden."""
    parser.add_argument("--reward", default=None, choices=sorted(REWARDS),
                        help="train on this reward alone (default: the rewards section of the params file)")
    parser.add_argument("--reward-url", default=None,
                        help="compute the rewards with the reward service at this URL (token from $ELBORL_REWARD_TOKEN)")


def run_stage(main, parser: argparse.ArgumentParser, argv=None) -> None:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        main(args, load_params(args.params))
    except (FileNotFoundError, FileExistsError, ValueError, BotoCoreError, ClientError, RewardServiceError) as error:
        sys.exit(f"{parser.prog}: error: {error}")
