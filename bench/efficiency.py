"""Benchmark: methods head to head on the shapes world; held-out strict shapes-GenEval against training wall-clock.

    .venv/bin/python bench/efficiency.py --minutes 15 [--recipes elbo flow_grpo nft] [--seeds 0 1] [--set KEY=VALUE ...]
    .venv/bin/python bench/efficiency.py --smoke --out /tmp/efficiency-smoke     # tiny, seconds: the wiring only

Every run (recipe x seed, params.yaml `recipes:`) starts from the same base model with the same RL seed and trains
for the same budget, one after another in this process (same CPU, --threads torch threads); the summary says which
runs it trained and which it read back from earlier calls. Writes into --out:
curves.csv (every held-out evaluation of every run), efficiency.png (held-out overall and training reward vs
minutes; thick = mean over seeds, thin = each seed) and summary.md (per method: base, final, best, time to fixed
thresholds and to gains over base; each baseline's time over the reference method's, beside the paper's ratios),
and prints the summary. Finished runs under --out/runs are reused and a killed benchmark continues where it was.
"""

from dataclasses import replace
from pathlib import Path
import argparse

from elborl.benchmark import (CURVE_COLUMNS, RunResult, add_budget_options, budget_from_args, curve_rows,
                              format_minutes, format_score, load_bench_params, markdown_table, mean_curve,
                              prepare_bench, provenance, run_or_reuse, thresholds, time_ratio, time_to_threshold)
from elborl.plots import plot_efficiency, write_csv

# METHOD.md §7: GPU hours to GenEval 0.95 on SD3.5-M, relative to the ELBO method.
PAPER_SPEEDUP = {"flow_grpo": 4.6, "nft": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override for every run, e.g. rl.lr=1e-3")
    parser.add_argument("--recipes", nargs="+", default=["elbo", "flow_grpo", "nft"], help="params.yaml recipes")
    parser.add_argument("--reference", default="elbo", help="the method the baselines' times are divided by")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="RL seeds (rl.seed), the same per method")
    parser.add_argument("--eval-every", type=int, default=None, help="epochs between held-out evaluations "
                        "(default: params.yaml eval_every); times to a threshold are resolved to this interval")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[0.35, 0.40, 0.45],
                        help="held-out overall scores to time")
    parser.add_argument("--gains", nargs="*", type=float, default=[0.05, 0.10, 0.15], help="gains over base to time")
    add_budget_options(parser, "artifacts/bench/efficiency")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    out = Path(args.out)
    budget = budget_from_args(args.minutes, args.epochs, args.smoke, default_minutes=15)

    def params_for(overrides: list[str]):
        params = load_bench_params(args.params, [*args.set, *overrides], args.smoke, out)
        return params if args.eval_every is None else replace(params, eval_every=args.eval_every)

    plan = [(recipe, seed, params_for([f"rl.recipe={recipe}", f"rl.seed={seed}"]))
            for recipe in args.recipes for seed in args.seeds]  # every setting is checked before anything trains
    bench = prepare_bench(params_for([]), args.threads)
    runs: dict[str, dict[int, RunResult]] = {}
    for index, (recipe, seed, params) in enumerate(plan, 1):
        label = f"[{index}/{len(plan)}] {recipe} seed {seed}"
        print(f"\n{label}: {budget}, {args.threads} threads")
        run = run_or_reuse(bench, params, out / "runs" / recipe / f"seed{seed}", budget, label)
        print(f"{label}: held-out {run.base:.3f} -> {run.final['overall']:.3f} after {run.epochs} epochs, "
              f"{format_minutes(run.train_seconds)} of training")
        runs.setdefault(recipe, {})[seed] = run

    write_csv(out / "curves.csv", CURVE_COLUMNS,
              [row for recipe, by_seed in runs.items() for seed, run in by_seed.items()
               for row in curve_rows(recipe, seed, run)])
    plot_efficiency(*method_curves(runs), out / "efficiency.png")
    summary = efficiency_summary(runs, args.reference, args.thresholds, args.gains,
                                 header=settings_line(args, budget, bench, runs))
    (out / "summary.md").write_text(summary + "\n")
    print(f"\n{summary}\n\nwritten: {out / 'curves.csv'}, {out / 'efficiency.png'}, {out / 'summary.md'}")
    return summary


def method_curves(runs: dict[str, dict[int, RunResult]]):
    """Per method: (per-seed curves, mean curve) of the held-out overall and of the training reward."""
    held_out, reward = {}, {}
    for method, by_seed in runs.items():
        per_seed = [run.held_out_curve() for run in by_seed.values()]
        held_out[method] = (per_seed, mean_curve(per_seed))
        per_seed = [run.reward_curve() for run in by_seed.values()]
        reward[method] = (per_seed, mean_curve(per_seed))
    return held_out, reward


def settings_line(args, budget, bench, runs) -> str:
    evaluation = f"{len(bench.test)} test prompts × {bench.params.evaluate.images_per_prompt} images"
    all_runs = [run for by_seed in runs.values() for run in by_seed.values()]
    return (f"Budget {budget} per run (rollout + reward + update; held-out evaluations excluded), seeds "
            f"{args.seeds}, {provenance(all_runs, args.threads)}; base model "
            f"`{bench.base_path}`; held-out: {evaluation}, every {bench.params.eval_every} epochs (0: none) and at "
            f"the end (a time to a threshold is that of the first evaluation reaching it); overrides "
            f"{args.set or 'none'}" + ("; **smoke run: tiny model, numbers mean nothing**" if args.smoke else ""))


def efficiency_summary(runs: dict[str, dict[int, RunResult]], reference: str, absolute: list[float],
                       gains: list[float], header: str = "") -> str:
    """summary.md: per-method table (mean over seeds) and each baseline's time to a threshold over the reference's."""
    held_out, _ = method_curves(runs)
    all_runs = [run for by_seed in runs.values() for run in by_seed.values()]
    base = sum(run.base for run in all_runs) / len(all_runs)  # one base model and one evaluation of it: all equal
    levels = thresholds(base, absolute, gains)
    times = {method: [time_to_threshold(held_out[method][1], score) for _, score in levels] for method in runs}

    def mean(method, value):
        return sum(value(run) for run in runs[method].values()) / len(runs[method])

    budgets = {method: mean(method, lambda run: run.train_seconds) for method in runs}

    rows = []
    for method in runs:
        curve = held_out[method][1]
        rows.append([method, str(len(runs[method])), format_score(mean(method, lambda r: r.base)),
                     format_score(mean(method, lambda r: r.final["overall"])), format_score(max(s for _, s in curve)),
                     format_minutes(budgets[method]), f"{mean(method, lambda r: r.epochs):.0f}",
                     f"{mean(method, lambda r: r.seconds_per_epoch or 0):.1f}", *map(format_minutes, times[method])])
    parts = ["# Efficiency: held-out strict shapes-GenEval vs training wall-clock", header,
             "## Per method (mean over seeds; best: the best point of the mean curve; times to a threshold: on the "
             "mean curve)",
             markdown_table(["method", "seeds", "base", "final", "best", "trained", "epochs", "s/epoch",
                             *(name for name, _ in levels)], rows)]
    baselines = [m for m in runs if m != reference]
    if reference in runs and baselines:
        header_cells = [f"{m} / {reference}" + (f" (paper {PAPER_SPEEDUP[m]:g}×)" if m in PAPER_SPEEDUP else "")
                        for m in baselines]
        ratio_rows = []
        for i, (name, _) in enumerate(levels):
            cells = []
            for m in baselines:
                ratio = time_ratio(times[m][i], times[reference][i], budgets[m], budgets[reference])
                cells.append("—" if ratio is None else str(ratio))
            ratio_rows.append([name, *cells])
        parts += [f"## Time to threshold, each baseline over {reference} (> or <: a bound, one of them did not reach "
                  "it within its budget; —: neither did, or the base model already does)",
                  markdown_table(["threshold", *header_cells], ratio_rows),
                  "Paper (SD3.5-M, GPU hours to GenEval 0.95, METHOD.md §7): Flow-GRPO 4.6×, DiffusionNFT 2× the "
                  "ELBO method's."]
    return "\n\n".join(p for p in parts if p)


if __name__ == "__main__":
    main()
