"""What every stage CLI shares: the params file and its --set overrides, thread count and one clear line on bad input.
Stages publish and fetch through `elborl.store.ArtifactStore` (`publish`, `local_artifact`)."""

import argparse
import sys

import torch
from botocore.exceptions import BotoCoreError, ClientError

from elborl.config import add_params_options, load_params_with_overrides
from elborl.distributed import Processes
from elborl.rewards import REWARDS
from elborl.rewards.service import RewardServiceError


def stage_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """`prog` names the command in usage lines: `elborl <stage>` when run through elborl.cli."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def add_reward_options(parser: argparse.ArgumentParser) -> None:
    """The training reward's options (score and train stages): params.yaml's `rewards:` unless overridden."""
    parser.add_argument("--reward", default=None, choices=sorted(REWARDS),
                        help="train on this reward alone (default: the rewards section of the params file)")
    parser.add_argument("--reward-url", default=None,
                        help="compute the rewards with the reward service at this URL (token from $ELBORL_REWARD_TOKEN)")


def run_stage(main, parser: argparse.ArgumentParser, argv=None, data_parallel: bool = False) -> None:
    """Parses the command line and runs `main(args, params)`, bad input ending in one line. A stage that is not
    `data_parallel`, launched with several processes (one launcher for every stage of a multi-GPU job), runs in
    the main process alone: the others leave at once."""
    args = parser.parse_args(argv)
    if not data_parallel and Processes.launched_rank() != 0:
        return
    torch.set_num_threads(args.threads)
    try:
        main(args, load_params_with_overrides(args.params, args.set))
    except (OSError, ValueError, BotoCoreError, ClientError, RewardServiceError,
            FloatingPointError) as error:  # OSError: a missing input, a full disk; FloatingPointError: NaN training
        sys.exit(f"{parser.prog}: error: {error}")
