"""Benchmark: RL from the embedded base model on the shapes world; held-out strict shapes-GenEval vs CPU time.

    .venv/bin/python bench/rl_curve.py --minutes 15 [--set rl.lr=1e-3 --set policy.finetune=full ...]
    .venv/bin/python bench/rl_curve.py --epochs 30 --threads 1 --set rl.group_size=16 ...   # a sweep cell

Prints one row per evaluation (training minutes, overall, per task), the gain over the base model, and the
time to +0.15 / +0.25, and writes curves.png and the final EMA policy's grid (final/grid.png). Wall-clock counts
rollout + reward + update, not the held-out evaluations. A finished run of the same settings in --out is read
back, a killed one resumes (elborl/benchmark.py); bench/efficiency.py runs several methods this way.
"""

from pathlib import Path
import argparse
import json
import time

from elborl.benchmark import budget_from_args, eval_table, format_minutes, load_bench_params, prepare_bench, run_or_reuse, \
    time_to_threshold
from elborl.plots import plot_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. rl.lr=1e-3")
    parser.add_argument("--minutes", type=float, default=None, help="training wall-clock (default 15)")
    parser.add_argument("--epochs", type=int, default=None, help="a budget in epochs instead (sweeps run in parallel)")
    parser.add_argument("--out", default="artifacts/bench/rl_curve")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    params = load_bench_params(args.params, args.set)
    bench = prepare_bench(params, args.threads)
    out = Path(args.out)
    start = time.time()
    run = run_or_reuse(bench, params, out, budget_from_args(args.minutes, args.epochs, False, 15), "rl_curve")
    print(f"\nsettings: {json.dumps(args.set)}  wall {time.time() - start:.0f} s (incl. evaluations)")
    print(eval_table(run.evals))
    for gain in (0.15, 0.25):
        print(f"time to +{gain:.2f}: {format_minutes(time_to_threshold(run.held_out_curve(), run.base + gain))}")
    print(f"curves: {plot_run(out, out / 'curves.png')}")
    print(f"grid of the final EMA policy: {out / 'final' / 'grid.png'}")


if __name__ == "__main__":
    main()
