"""The main job on the embedded default: prompts -> base model (cached) -> RL fine-tuning -> evaluation.

    python -m elborl.embedded [--params params.yaml] [--set KEY=VALUE ...] [--skip-rl]     (or: elborl run ...)

Every phase resumes: the base model is cached by its settings, the RL run by its settings too (a killed run
continues at its first unpublished round), and the final table compares the base model with the EMA policy.
The RL run is the rounds run of `elborl.rounds` in one process: the artifacts the pipeline's stages publish.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Callable
import argparse
import hashlib
import json
import sys
import time

import torch

from elborl.config import ParamsError, add_params_options, load_params_with_overrides
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import shapes_test_set, shapes_train_set, write_jsonl
from elborl.plots import plot_run
from elborl.pretrain import ensure_base_model
from elborl.report import write_run_report
from elborl.rewards import reward_from_params
from elborl.rounds import HeldOut, RunContext, evaluation_uri, evaluations, round_metrics, run_rounds
from elborl.runtime import resolve_device


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
              base_evaluation: Callable[[], tuple] | None = None) -> tuple[RunContext, str, dict]:
    """RL from the base model (`model`, placed) as a rounds run at `run_dir`, with held-out evaluations of the
    EMA policy every `params.eval_every` rounds and after the last one (`base_evaluation()`, when given, returns
    the base model's, which is then not recomputed). Returns the run, its final evaluation's URI and that evaluation's summary."""
    rl = params.rl
    likelihood = f"{rl.weighting} ELBO" if rl.estimator == "elbo" else "trajectory log-prob"
    print(f"RL fine-tuning ({rl.recipe or 'no recipe'}): {rl.objective} + {likelihood} + {rl.steps}-step "
          f"{rl.sampler}, {rl.epochs} rounds -> {run_dir}")
    ctx = RunContext(str(run_dir), params, backbone=model, train_metas=train_set)
    held_out = HeldOut(lambda backbone: evaluate(backbone, test, params.evaluate, progress=False),
                       params.eval_every, base_evaluation)
    with reward_from_params(params.rewards) as reward:
        done = run_rounds(ctx, reward, held_out=held_out, max_train_seconds=max_train_seconds)
    final = evaluation_uri(ctx.run, done)
    return ctx, final, ctx.store.read_manifest(final)["meta"]["summary"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`prog` names the command in usage lines: `elborl run` when run through elborl.cli."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-rl", action="store_true", help="only pretrain (or reuse) and evaluate the base model")
    return parser


def main(argv=None, prog: str | None = None) -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        params = load_params_with_overrides(args.params, args.set)
    except (FileNotFoundError, ParamsError) as error:  # a settings mistake: one line, not a traceback
        sys.exit(f"{parser.prog}: error: {error}")
    root = Path(params.artifacts)

    test, train_set = prepare_prompts(params, root / "prompts")
    print(f"prompts: {len(test)} test, {len(train_set)} train -> {root / 'prompts'}")
    model, base_path = ensure_base_model(params.base_model, params.pretrain, root / "base_model", runtime=params.runtime)

    start = time.time()
    base_summary, records, images = evaluate(model, test, params.evaluate)
    written = {"base": write_evaluation(root / "eval" / "base", base_summary, records, images)}
    print(f"evaluated the base model on {len(records)} images in {time.time() - start:.0f} s")
    summaries = {"base": base_summary}

    if not args.skip_rl:
        run_dir = root / "runs" / run_key(base_path, params)
        ctx, final, summaries["fine-tuned"] = fine_tune(model, train_set, test, params, run_dir,
                                                        base_evaluation=lambda: (base_summary, records, images))
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


if __name__ == "__main__":
    main()
