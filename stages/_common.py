"""What every stage CLI shares: the params file, thread count, and one clear line on bad input."""

import argparse
import sys

import torch

from elborl.config import load_params


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def run_stage(main, parser: argparse.ArgumentParser, argv=None) -> None:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        main(args, load_params(args.params))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"{parser.prog}: error: {error}")
