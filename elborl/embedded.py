"""The main job on the embedded default: prompts -> base model (cached) -> RL fine-tuning -> evaluation.

    python -m elborl.embedded [--params params.yaml] [--set KEY=VALUE ...] [--minutes M] [--skip-rl]   (or: elborl run)

It prints its plan and an expected duration first, then one progress line over the RL rounds and evaluations with
the time left, and ends with the table and the run report's path. Every phase resumes: the base model is cached by
its settings, the RL run by its settings too (a killed run continues at its first unpublished round), and the
final table compares the base model with the EMA policy. The RL run is the rounds run of `elborl.rounds` in one
process: the artifacts the pipeline's stages publish.
"""

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable
import argparse
import hashlib
import json
import sys
import time

import torch

from elborl.config import PARAMS_FILE, ParamsError, add_params_options, load_params, load_params_with_overrides
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import shapes_test_set, shapes_train_set, write_jsonl
from elborl.plots import plot_run
from elborl.pretrain import base_model_source, ensure_base_model
from elborl.report import write_run_report
from elborl.rewards import reward_from_params
from elborl.rounds import (HeldOut, RoundsProgress, RunContext, evaluation_uri, evaluations, round_metrics,
                           run_rounds, train_seconds)
from elborl.runtime import cpu_description, precision_choice, resolve_device, resolve_precision

# Seconds the main job's phases took at 2 threads on 2-core CPUs, by the rollouts' precision there (bfloat16 where
# the CPU computes it natively, else float32): the plan's first estimate, before this machine has run a round
# (docs/embedded-default.md#how-long-the-main-job-takes).
REFERENCE_SECONDS = {"bfloat16": {"round": 17.0, "evaluation": 60.0, "pretrain": 1500.0},
                     "float32": {"round": 41.0, "evaluation": 120.0, "pretrain": 1500.0}}
COPY_SECONDS = 5.0
DEFAULT_RL_MINUTES = 18.0


def prepare_prompts(params, out_dir: Path) -> tuple[list[dict], list[dict]]:
    test = shapes_test_set()
    train_set = shapes_train_set(params.prompts.train_per_task, params.prompts.train_seed,
                                 params.prompts.coloured_variants)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "test.jsonl", test)
    write_jsonl(out_dir / "train.jsonl", train_set)
    return test, train_set


def run_settings(base_path: Path, params) -> dict:
    """Everything that defines an RL run from a base model (as plain JSON values): runs agree iff these do."""
    settings = {"base": base_path.name, "prompts": asdict(params.prompts), "policy": asdict(params.policy),
                "rl": asdict(params.rl), "rewards": asdict(params.rewards), "evaluate": asdict(params.evaluate),
                "eval_every": params.eval_every, "device": resolve_device(params.runtime.device).type}
    return json.loads(json.dumps(settings))


def run_key(base_path: Path, params) -> str:
    blob = json.dumps(run_settings(base_path, params), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fine_tune(model, train_set, test, params, run_dir: Path, max_train_seconds: float | None = None,
              base_evaluation: Callable[[], tuple] | None = None,
              progress: bool | RoundsProgress = True, artifact_log=None,
              identity: dict | None = None) -> tuple[RunContext, str, dict]:
    """RL from the base model (`model`, placed) as a rounds run at `run_dir`, with held-out evaluations of the
    EMA policy every `params.eval_every` rounds and after the last one (`base_evaluation()`, when given, returns
    the base model's, which is then not recomputed); `artifact_log` takes the line per artifact published
    (default: printed); `identity`: what the run records as its identity besides its policy and RL settings
    (run.json). Returns the run, its final evaluation's URI and that evaluation's summary."""
    rl = params.rl
    likelihood = f"{rl.weighting} ELBO" if rl.estimator == "elbo" else "trajectory log-prob"
    print(f"RL fine-tuning ({rl.recipe or 'no recipe'}): {rl.objective} + {likelihood} + {rl.steps}-step "
          f"{rl.sampler}, {rl.epochs} rounds -> {run_dir}")
    ctx = RunContext(str(run_dir), params, backbone=model, train_metas=train_set, artifact_log=artifact_log,
                     identity=identity)
    evaluate_fn = lambda backbone: evaluate(backbone, test, params.evaluate, progress=False)  # noqa: E731
    if isinstance(progress, JobProgress):
        evaluate_fn = progress.timed(evaluate_fn)
    held_out = HeldOut(evaluate_fn, params.eval_every, base_evaluation)
    with reward_from_params(params.rewards) as reward:
        done = run_rounds(ctx, reward, held_out=held_out, max_train_seconds=max_train_seconds, progress=progress)
    final = evaluation_uri(ctx.run, done)
    return ctx, final, ctx.store.read_manifest(final)["meta"]["summary"]


class JobProgress(RoundsProgress):
    """The main job's one progress line over its RL rounds and held-out evaluations, with the time left to its
    end: rounds to go × the mean wall seconds of a round here + evaluations to go × the seconds of the last one
    (the base model's at first). After the first round it prints when the job should end."""

    def __init__(self, eval_every: int, evaluation_seconds: float, clock=time.perf_counter):
        super().__init__()
        self.eval_every, self.evaluation_seconds, self.clock = eval_every, evaluation_seconds, clock

    def start(self, done: int, total: int, spent: float, max_train_seconds: float | None) -> None:
        from tqdm.auto import tqdm

        self.total, self.spent, self.budget = total, spent, max_train_seconds
        self.wall, self.trained, self.mark = [], [], self.clock()
        self.bar = tqdm(initial=done, total=total, desc="RL", unit="round",
                        bar_format="{desc} {n_fmt}/{total_fmt} rounds |{bar}| {elapsed}{postfix}")

    def timed(self, evaluate_fn: Callable) -> Callable:
        """`evaluate_fn`, timing each call (the next estimate's evaluation cost; not counted as a round's time)."""
        def timed_evaluate(backbone):
            start = self.clock()
            result = evaluate_fn(backbone)
            self.evaluation_seconds = self.clock() - start
            self.mark = self.clock()
            return result
        return timed_evaluate

    def round_done(self, done: int, row: dict) -> None:
        now = self.clock()
        self.wall.append(now - self.mark)
        self.trained.append(train_seconds(row))
        self.spent += self.trained[-1]
        self.mark = now
        self.bar.update(1)
        self.bar.set_postfix_str(self._postfix(done, row["reward_mean"]))
        if len(self.wall) == 1:
            left = self.seconds_left(done)
            self.bar.write(f"the first round took {self.wall[0]:.0f} s here: the job should end in about "
                           f"{format_duration(left)}, around {time.strftime('%H:%M', time.localtime(time.time() + left))}")

    def _postfix(self, done: int, reward: float) -> str:
        return f"reward {reward:.3f}, about {format_duration(self.seconds_left(done))} left"

    def last_round(self, done: int) -> int:
        """The round count the run should end at: its total, or under a budget where the training seconds per
        round so far say the budget runs out (a round is only stopped after it ends)."""
        if self.budget is None or not self.trained:
            return self.total
        per_round = sum(self.trained) / len(self.trained)
        return min(self.total, done + max(0, -int(-(self.budget - self.spent) // per_round)))

    def seconds_left(self, done: int) -> float:
        end = self.last_round(done)
        per_round = sum(self.wall) / len(self.wall)
        return (end - done) * per_round + evaluations_to_go(done, end, self.eval_every) * self.evaluation_seconds


def evaluations_to_go(done: int, end: int, every: int) -> int:
    """Held-out evaluations still to run once round `done` has ended, for a run ending at `end` rounds: those at
    every `every`-th round from `done` on, and a final one unless the last of those is at the end."""
    periodic = end // every - max(done - 1, 0) // every if every else 0
    return periodic + (0 if every and end % every == 0 else 1)


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def plan(params, test, train_set, base_source: str, threads: int, rl_minutes: float | None, skip_rl: bool) -> str:
    """What the main job will do and how long that should take here, from reference timings for the precision
    this machine's CPU (or GPU) computes in; refined by the progress line once a round has run."""
    device = resolve_device(params.runtime.device).type
    rl = params.rl
    precision = resolve_precision(rl.rollout_precision, device)
    reference = REFERENCE_SECONDS[precision]
    where = cpu_description() if device == "cpu" else device
    base = {"cache": "reuse the cached copy", "shipped": "copy the shipped weights (checksums verified)",
            "pretrain": f"pretrain it ({params.pretrain.steps} steps; no shipped weights for these settings)"}
    images = len(test) * params.evaluate.images_per_prompt
    seconds = {"cache": 0.0, "shipped": COPY_SECONDS, "pretrain": reference["pretrain"]}[base_source]
    seconds += reference["evaluation"]
    lines = [f"main job on {where}, {threads} torch thread{'s' * (threads != 1)}:",
             f"  1. prompts: {len(test)} held-out test prompts, {len(train_set)} training prompts",
             f"  2. base model: {base[base_source]}",
             f"  3. evaluate the base model on {images} held-out images ({params.evaluate.images_per_prompt} per prompt)"]
    if not skip_rl:
        rounds = rl.epochs
        cap = ""
        if rl_minutes:
            rounds = min(rounds, int(rl_minutes * 60 // reference["round"]) + 1)
            cap = f", stopping after {rl_minutes:g} training minutes if that comes first"
        evaluation_count = evaluations_to_go(0, rounds, params.eval_every)
        seconds += rounds * reference["round"] + evaluation_count * reference["evaluation"]
        images_per_round = rl.prompts_per_epoch * rl.group_size
        lines += [f"  4. RL ({rl.recipe or 'no'} recipe): {rl.epochs} rounds of {images_per_round} images{cap}; "
                  f"the EMA policy evaluated every {params.eval_every} rounds and at the end",
                  "  5. the before/after table, the curves and the run report",
                  "  " + precision_choice(rl.rollout_precision, rl.update_precision, device)]
    if costs_as_reference(params) and threads == 2:
        lines.append(f"  expected: about {format_duration(seconds)} (measured on 2-core CPUs computing in {precision}, "
                     "2 threads); the progress line times this machine")
    else:
        lines.append("  expected: no reference timing for these settings; the progress line times them")
    return "\n".join(lines)


def costs_as_reference(params) -> bool:
    """Whether these settings cost what REFERENCE_SECONDS measured: the project's params.yaml workload (the
    model, the sampling and update work per round, the evaluations), whatever the seeds."""
    if not PARAMS_FILE.exists():
        return False
    reference = load_params(PARAMS_FILE)

    def workload(p):
        return (p.base_model, p.pretrain, p.evaluate, p.policy, replace(p.rl, seed=0), p.eval_every, p.runtime)
    return workload(params) == workload(reference)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`prog` names the command in usage lines: `elborl run` when run through elborl.cli."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--minutes", type=float, default=DEFAULT_RL_MINUTES,
                        help="stop RL after this many training minutes (rollout + reward + update, evaluations "
                        "excluded) even before rl.epochs rounds, so the job stays short on a CPU without native "
                        f"bfloat16; 0: every round (default: {DEFAULT_RL_MINUTES:g})")
    parser.add_argument("--skip-rl", action="store_true", help="only pretrain (or reuse) and evaluate the base model")
    return parser


def main(argv=None, prog: str | None = None) -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    job_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        params = load_params_with_overrides(args.params, args.set)
    except (FileNotFoundError, ParamsError) as error:  # a settings mistake: one line, not a traceback
        sys.exit(f"{parser.prog}: error: {error}")
    root = Path(params.artifacts)
    if args.minutes < 0:
        sys.exit(f"{parser.prog}: error: --minutes must be 0 (no limit) or more, not {args.minutes:g}")
    rl_minutes = args.minutes or None

    test, train_set = prepare_prompts(params, root / "prompts")
    source = base_model_source(params.base_model, params.pretrain, root / "base_model")
    print(plan(params, test, train_set, source, args.threads, rl_minutes, args.skip_rl) + "\n")
    print(f"prompts: {len(test)} test, {len(train_set)} train -> {root / 'prompts'}")
    model, base_path = ensure_base_model(params.base_model, params.pretrain, root / "base_model", runtime=params.runtime)

    start = time.perf_counter()
    base_summary, records, images = evaluate(model, test, params.evaluate)
    evaluation_seconds = time.perf_counter() - start
    written = {"base": write_evaluation(root / "eval" / "base", base_summary, records, images)}
    print(f"evaluated the base model on {len(records)} images in {evaluation_seconds:.0f} s")
    summaries = {"base": base_summary}

    if not args.skip_rl:
        run_dir = root / "runs" / run_key(base_path, params)
        progress = JobProgress(params.eval_every, evaluation_seconds)
        artifact_log = run_dir / "artifacts.log"  # one line per artifact: kept off the progress line
        print(f"published artifacts are listed in {artifact_log}")
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(artifact_log, "a") as log_file:
            try:
                ctx, final, summaries["fine-tuned"] = fine_tune(
                    model, train_set, test, params, run_dir, max_train_seconds=rl_minutes and rl_minutes * 60,
                    base_evaluation=lambda: (base_summary, records, images), progress=progress,
                    artifact_log=lambda line: print(line, file=log_file, flush=True),
                    identity=run_settings(base_path, params))
            except FloatingPointError as error:  # NonFiniteTrainingError: the run stopped at its last good round
                sys.exit(f"{parser.prog}: error: {error}")
        written["fine-tuned"] = {"scores": ctx.local(final) / "scores.json", "grid": ctx.local(final) / "grid.png"}
        curves = plot_run(round_metrics(ctx), evaluations(ctx), run_dir / "curves.png")
        report = write_run_report(ctx, run_dir / "report.html", base_model=str(base_path),
                                  prompts=str(root / "prompts"))

    print("\nshapes-GenEval (strict), held-out test prompts\n" + format_table(summaries))
    for name, paths in written.items():
        print(f"{name:>10}: scores {paths['scores']}  grid {paths['grid']}")
    if not args.skip_rl:
        print(f"    curves: {curves}\n       run: {run_dir} (round-*/ artifacts, evals/)")
        print(f"    report: {report} (open it in a browser)")
    print(f"the main job took {format_duration(time.perf_counter() - job_start)}")


if __name__ == "__main__":
    main()
