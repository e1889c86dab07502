"""Benchmark: RL from the embedded base model on the shapes world; held-out strict shapes-GenEval vs CPU time.

    .venv/bin/python bench/rl_curve.py --minutes 15 [--set rl.lr=1e-3 --set policy.finetune=full ...]
    .venv/bin/python bench/rl_curve.py --epochs 30 --threads 1 --set rl.group_size=16 ...   # a sweep cell
    .venv/bin/python bench/rl_curve.py --smoke --out /tmp/rl-curve   # wiring only, seconds (model: /tmp/rl-curve.smoke)

Prints one row per evaluation (training minutes, overall, per task), the gain over the base model, and the
time to +0.15 / +0.25, and writes curves.png, the grid of the base model (base/), and beside the final EMA
policy's (the run's last evaluation, evals/NNNNN/) in before_after.png. Wall-clock counts
rollout + reward + update, not the held-out evaluations. A finished run of the same settings in --out is read
back, a killed one resumes (elborl/benchmark.py); bench/efficiency.py runs several methods this way.
"""

from pathlib import Path
import argparse
import json
import time

from PIL import Image

from elborl.benchmark import add_budget_options, budget_from_args, eval_table, format_minutes, load_bench_params, \
    prepare_bench, run_or_reuse, time_to_threshold, TRAIN_PROMPTS
from elborl.evaluate import before_after, write_evaluation
from elborl.plots import plot_run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. rl.lr=1e-3")
    parser.add_argument("--train-prompts", choices=TRAIN_PROMPTS, default="train",
                        help="test: a diagnostic, not the benchmark: train on the held-out prompts themselves (no "
                             "train/test generalisation gap)")
    add_budget_options(parser, "artifacts/bench/rl_curve")
    args = parser.parse_args(argv)
    out = Path(args.out)
    # --out is the run directory itself, so a smoke run keeps its tiny base model beside it, not inside
    params = load_bench_params(args.params, args.set, args.smoke, out.with_name(out.name + ".smoke"))
    bench = prepare_bench(params, args.threads)
    start = time.time()
    run = run_or_reuse(bench, params, out, budget_from_args(args.minutes, args.epochs, args.smoke, 15), "rl_curve",
                       args.train_prompts)
    if args.train_prompts == "test":
        print("\nDIAGNOSTIC: trained on the held-out prompts themselves; these scores are not the benchmark's")
    print(f"\nsettings: {json.dumps(args.set)}  wall {time.time() - start:.0f} s (incl. evaluations)")
    print(eval_table(run.evals))
    for gain in (0.15, 0.25):
        print(f"time to +{gain:.2f}: {format_minutes(time_to_threshold(run.held_out_curve(), run.base + gain))}")
    print(f"curves: {plot_run(run.metrics, run.evals, out / 'curves.png')}")
    base_grid, final_grid = write_evaluation(out / "base", *bench.base_evaluation())["grid"], run.final_evaluation / "grid.png"
    titles = (f"base model: {run.base:.3f}",
              f"after {format_minutes(run.train_seconds)} of RL (EMA policy): {run.final['overall']:.3f}")
    before_after(Image.open(base_grid), Image.open(final_grid), titles).save(out / "before_after.png")
    print(f"grids: {base_grid} (base), {final_grid} (final EMA policy), side by side in {out / 'before_after.png'}")


if __name__ == "__main__":
    main()
