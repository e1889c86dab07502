"""Benchmark: the paper's design-space table on the shapes world (METHOD.md §1): objective × likelihood estimator ×
rollout sampler.

    .venv/bin/python bench/ablation.py --minutes 15 [--objectives pepg grpo] [--samplers dpm2] [--set KEY=VALUE ...]
    .venv/bin/python bench/ablation.py --smoke --out /tmp/ablation-smoke     # tiny, seconds: the wiring only

A cell changes only rl.objective, rl.estimator and rl.sampler of params.yaml's rl settings (the `elbo` recipe by
default: adaptive ELBO weighting, 10 steps, CFG off; GRPO also takes its std-normalised advantages, §3; trajectory
cells sample and update in float32, which their stored log-probs need, whatever rl.rollout_precision and
rl.update_precision say). Every
cell trains from the same base model with the same seed for the same budget, one after another in this process,
and its final EMA policy is evaluated held out. A cell the loop cannot run is listed with the reason its
configuration check gives. Writes ablation.md and ablation.csv into --out and prints the table; finished runs
under --out/runs are reused and a killed benchmark continues where it was.
"""

from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
import argparse

from elborl.benchmark import (RunResult, add_budget_options, budget_from_args, format_score, load_bench_params,
                              markdown_table, prepare_bench, provenance, run_or_reuse)
from elborl.geneval.types import TASKS
from elborl.plots import write_csv
from elborl.rl import RLConfig

OBJECTIVES = ("epg", "pepg", "par", "grpo")
ESTIMATORS = ("trajectory", "elbo")
SAMPLERS = ("sde", "dpm2")  # the SDE of Flow-GRPO; the ODE is the 2nd-order DPM-Solver
SAMPLER_NAMES = {"sde": "SDE", "dpm2": "ODE (DPM-Solver-2)"}
OBJECTIVE_SETTINGS = {"grpo": {"advantage": "std"}}  # §3: GRPO divides by the global std (the others: recipe)
# METHOD.md §7: GenEval after training SD3.5-M, CFG off (the table's EPG/trajectory/SDE + CFG row: .95).
PAPER_GENEVAL = {("epg", "trajectory", "sde"): 0.92, ("epg", "elbo", "sde"): 0.90, ("epg", "elbo", "dpm2"): 0.96,
                 ("pepg", "elbo", "sde"): 0.96, ("pepg", "elbo", "dpm2"): 0.96, ("par", "elbo", "sde"): 0.94,
                 ("par", "elbo", "dpm2"): 0.96, ("grpo", "elbo", "dpm2"): 0.94}
HEADLINE = ("pepg", "elbo", "dpm2")  # the method's headline configuration (§3)
COLUMNS = ["objective", "estimator", "sampler", "status", "overall", "gain", *TASKS, "train_seconds", "epochs",
           "seconds_per_epoch", "paper_geneval", "note"]


@dataclass
class Cell:
    objective: str
    estimator: str
    sampler: str
    rl: RLConfig
    problem: str | None = None  # why the loop cannot run this combination (its configuration check's message)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.objective, self.estimator, self.sampler

    @property
    def name(self) -> str:
        return "-".join(self.key)


def design_cells(rl: RLConfig, objectives=OBJECTIVES, estimators=ESTIMATORS, samplers=SAMPLERS) -> list[Cell]:
    """Every combination, each with its rl settings; the invalid ones carry the reason instead of being dropped."""
    cells = []
    for objective, estimator, sampler in product(objectives, estimators, samplers):
        elbo = estimator == "elbo"
        cell_rl = replace(rl, objective=objective, estimator=estimator, sampler=sampler,
                          rollout_precision=rl.rollout_precision if elbo else "float32",
                          update_precision=rl.update_precision if elbo else "float32",
                          **OBJECTIVE_SETTINGS.get(objective, {}))
        try:
            cell_rl.validate()
            problem = None
        except ValueError as error:
            problem = str(error)
        cells.append(Cell(objective, estimator, sampler, cell_rl, problem))
    return cells


def cell_row(cell: Cell, run: RunResult | None) -> dict:
    row = {"objective": cell.objective, "estimator": cell.estimator, "sampler": cell.sampler,
           "paper_geneval": PAPER_GENEVAL.get(cell.key)}
    if run is None:
        return {**row, "status": "impossible", "note": cell.problem}
    final = run.final
    return {**row, "status": "run", "overall": final["overall"], "gain": final["overall"] - run.base,
            **{task: final["tasks"].get(task) for task in TASKS}, "train_seconds": round(run.train_seconds, 1),
            "epochs": run.epochs, "seconds_per_epoch": round(run.seconds_per_epoch or 0.0, 2),
            "note": "the method (headline)" if cell.key == HEADLINE else ""}


def ablation_markdown(rows: list[dict], base: dict | None, header: str = "") -> str:
    def cells(row):
        if row["status"] == "impossible":
            return ["impossible", "", *[""] * len(TASKS), "", "", ""]
        return [format_score(row["overall"]), f"{row['gain']:+.3f}", *(format_score(row[t]) for t in TASKS),
                f"{row['train_seconds']:.0f}", str(row["epochs"]), f"{row['seconds_per_epoch']:.1f}"]

    table_rows = [[row["objective"], row["estimator"], SAMPLER_NAMES[row["sampler"]], *cells(row),
                   format_score(row["paper_geneval"]), row["note"] or ""] for row in rows]
    if base is not None:
        table_rows.insert(0, ["base model", "", "", format_score(base["overall"]), "",
                              *(format_score(base["tasks"].get(t)) for t in TASKS), "", "", "", "", ""])
    table = markdown_table(["objective", "estimator", "sampler", "overall", "gain", *TASKS, "trained s", "epochs",
                            "s/epoch", "paper GenEval", "note"], table_rows)
    return "\n\n".join(p for p in ["# Ablation: objective × estimator × sampler (held-out strict shapes-GenEval, "
                                   "final EMA policy)", header, table] if p)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override for every cell, e.g. rl.lr=1e-3")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--seed", type=int, default=None, help="RL seed of every cell (default: params.yaml rl.seed)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="epochs between held-out evaluations (default 0: the base model and the final policy)")
    add_budget_options(parser, "artifacts/bench/ablation")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    out = Path(args.out)
    budget = budget_from_args(args.minutes, args.epochs, args.smoke, default_minutes=15)
    params = load_bench_params(args.params, args.set, args.smoke, out)
    params = replace(params, eval_every=args.eval_every)
    if args.seed is not None:
        params = replace(params, rl=replace(params.rl, seed=args.seed))
    cells = design_cells(params.rl, args.objectives, args.estimators, args.samplers)
    runnable = [cell for cell in cells if cell.problem is None]
    for cell in cells:
        if cell.problem:
            print(f"{cell.name}: impossible, {cell.problem}")
    bench = prepare_bench(params, args.threads)
    runs: dict[tuple, RunResult] = {}
    for index, cell in enumerate(runnable, 1):
        label = f"[{index}/{len(runnable)}] {cell.name}"
        print(f"\n{label}: {budget}, {args.threads} threads")
        runs[cell.key] = run_or_reuse(bench, replace(params, rl=cell.rl), out / "runs" / cell.name, budget, label)
        print(f"{label}: held-out {runs[cell.key].base:.3f} -> {runs[cell.key].final['overall']:.3f}")

    rows = [cell_row(cell, runs.get(cell.key)) for cell in cells]
    write_csv(out / "ablation.csv", COLUMNS, rows)
    base = next(iter(runs.values())).evals[0] if runs else None
    header = (f"Budget {budget} per cell (rollout + reward + update), seed {params.rl.seed}, "
              f"{provenance(list(runs.values()), args.threads)}, all from the same base model (`{bench.base_path}`); "
              f"the other rl settings are recipe `{params.rl.recipe or 'none'}`'s (guidance {params.rl.guidance:g}, "
              f"{params.rl.steps} steps); overrides {args.set or 'none'}. Paper: SD3.5-M GenEval (METHOD.md §7)."
              + (" **Smoke run: tiny model, numbers mean nothing.**" if args.smoke else ""))
    table = ablation_markdown(rows, base, header)
    (out / "ablation.md").write_text(table + "\n")
    print(f"\n{table}\n\nwritten: {out / 'ablation.md'}, {out / 'ablation.csv'}")
    return table


if __name__ == "__main__":
    main()
