"""`elborl`: one command for the main job, each pipeline stage and the reward service.

    elborl run [--set rl.epochs=5 ...]                   the main job (python -m elborl.embedded)
    elborl <stage> --help                                a stage's own options (python -m stages.<stage>)

A subcommand is its module's own parser and main, so `elborl prepare-prompts ...` and
`python -m stages.prepare_prompts ...` take the same arguments. Only the chosen subcommand's module is imported,
so `elborl --help` answers without loading torch.
"""

from dataclasses import dataclass
import argparse
import importlib
import sys


@dataclass(frozen=True)
class Command:
    module: str
    summary: str

    @property
    def is_stage(self) -> bool:
        return self.module.startswith("stages.")

    def run(self, argv: list[str], prog: str) -> None:
        module = importlib.import_module(self.module)
        if self.is_stage:  # a stage's main takes parsed arguments and settings; run_stage reads and checks both
            from stages._common import run_stage

            run_stage(module.main, module.build_parser(prog), argv, getattr(module, "DATA_PARALLEL", False))
        else:
            module.main(argv, prog)


COMMANDS = {
    "run": Command("elborl.embedded", "the main job: prompts, base model, RL fine-tuning, before/after evaluation"),
    "prepare-prompts": Command("stages.prepare_prompts", "stage: write the test and training prompt sets"),
    "pretrain": Command("stages.pretrain", "stage: pretrain (or reuse) the embedded base model and publish it"),
    "train": Command("stages.train", "stage: a whole RL run, rounds of rollout, score and update"),
    "rollout": Command("stages.rollout", "stage: one round's rollout, images from the current policy"),
    "score": Command("stages.score", "stage: one round's rewards for its rollout images"),
    "update": Command("stages.update", "stage: one round's policy update on its samples and rewards"),
    "evaluate": Command("stages.evaluate", "stage: sample and score held-out prompts (table and grid)"),
    "report": Command("stages.report", "stage: base vs fine-tuned metrics JSON and plots"),
    "reward-service": Command("elborl.rewards.service", "serve rewards over HTTP for a score stage elsewhere"),
}


def command_list() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elborl", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ELBO-RL: RL fine-tuning of text-to-image flow models.",
        epilog=f"commands:\n{command_list()}\n\n`elborl COMMAND --help` explains a command. The main job and every "
        "stage take\n--params FILE and --set KEY=VALUE (repeatable), e.g. --set rl.lr=1e-3 --set rl.epochs=5.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's own arguments")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:  # a bare `elborl`: show what there is rather than a terse usage error
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    COMMANDS[args.command].run(args.args, prog=f"elborl {args.command}")


if __name__ == "__main__":
    main()
