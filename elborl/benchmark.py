"""RL benchmarks on the shapes world, in one place: bench/rl_curve.py (one run), bench/efficiency.py (methods
head to head against training wall-clock) and bench/ablation.py (the design-space table) all train through
`run_or_reuse` and read their tables from the small pure functions at the end (tested on hand-made curves).

Every run of a benchmark starts from the same base model (pretrained once, cached) and shares one held-out
evaluation of it; runs go one after another in one process, so they get the same CPU. A run directory records
its settings: a finished run of the same settings is read back instead of trained again, a killed one resumes
at its first unpublished round (elborl/rounds.py), and a directory holding a run of other settings is refused, never mixed.
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import copy
import json

import numpy as np
import torch

from elborl.config import Params, default_settings, load_params_with_overrides, settings_differences
from elborl.embedded import fine_tune, prepare_prompts, run_settings
from elborl.evaluate import evaluate
from elborl.geneval.types import TASKS
from elborl.pretrain import ensure_base_model
from elborl.rounds import RUN_FILE, RunContext, evaluation_uri, evaluations, round_metrics
from elborl.runtime import cpu_description

# --smoke: a tiny model, a few pretraining steps, tiny RL epochs and a 1-image, 2-step evaluation, so every
# benchmark runs end to end in seconds (CI); only the wiring is exercised, the numbers mean nothing.
SMOKE_OVERRIDES = [
    "base_model.channels=[32, 32]", "base_model.text_width=32", "base_model.text_layers=1",
    "pretrain.steps=3", "pretrain.batch_size=4", "pretrain.warmup_steps=1",
    "evaluate.images_per_prompt=1", "evaluate.steps=2",
    "policy.lora_rank=2", "policy.lora_alpha=4",
    "rl.prompts_per_epoch=2", "rl.group_size=2", "rl.steps=2",
    "eval_every=1",
]
SMOKE_EPOCHS = 2
UNBOUNDED_EPOCHS = 100_000  # under a minutes budget the clock ends the run


def load_bench_params(path: str | Path, overrides: list[str], smoke: bool = False, out: str | Path = ".") -> Params:
    """params.yaml with `key=value` overrides; `smoke` lays SMOKE_OVERRIDES under them and keeps the smoke
    run's artifacts (prompts, base-model cache) under `out`, away from the real ones."""
    smoke_overrides = [*SMOKE_OVERRIDES, f"artifacts={Path(out) / 'artifacts'}"] if smoke else []
    return load_params_with_overrides(path, [*smoke_overrides, *overrides])


@dataclass(frozen=True)
class Budget:
    """How long each run trains: minutes of training wall-clock (rollout + reward + update; held-out evaluations
    excluded) or a number of epochs. Exactly one is given."""

    minutes: float | None = None
    epochs: int | None = None

    def __post_init__(self):
        if (self.minutes is None) == (self.epochs is None):
            raise ValueError("a budget is minutes or epochs, exactly one of them")

    def apply(self, params: Params) -> Params:
        return replace(params, rl=replace(params.rl, epochs=self.epochs or UNBOUNDED_EPOCHS))

    @property
    def max_train_seconds(self) -> float | None:
        return None if self.minutes is None else self.minutes * 60

    def __str__(self) -> str:
        return f"{self.minutes:g} min of training" if self.minutes is not None else f"{self.epochs} epochs"


def add_budget_options(parser, out: str) -> None:
    """The options every multi-run benchmark shares: the budget per run, where runs go, threads, smoke mode."""
    parser.add_argument("--minutes", type=float, default=None, help="training wall-clock per run (default 15)")
    parser.add_argument("--epochs", type=int, default=None, help="a budget in epochs instead of minutes")
    parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and runs: checks the wiring in seconds")


def budget_from_args(minutes: float | None, epochs: int | None, smoke: bool, default_minutes: float) -> Budget:
    """--epochs wins over --minutes; --smoke without either trains SMOKE_EPOCHS epochs."""
    if epochs is not None:
        return Budget(epochs=epochs)
    if minutes is None and smoke:
        return Budget(epochs=SMOKE_EPOCHS)
    return Budget(minutes=default_minutes if minutes is None else minutes)


@dataclass
class Bench:
    """What every run of one benchmark shares: prompts, the base model (pristine: each run trains a copy) and
    its held-out evaluation, computed at most once. Runs may differ from `params` in `rl` only."""

    params: Params
    threads: int
    test: list[dict] = field(repr=False)
    train_set: list[dict] = field(repr=False)
    base_model: torch.nn.Module = field(repr=False)
    base_path: Path = Path()
    _base_evaluation: tuple | None = None

    def base_evaluation(self) -> tuple[dict, list[dict], np.ndarray]:
        """(summary, per-image records, images) of the base model on the held-out prompts."""
        if self._base_evaluation is None:
            print("evaluating the base model (held out) once for every run")
            self._base_evaluation = evaluate(self.base_model, self.test, self.params.evaluate, progress=False)
        return self._base_evaluation

    def base_summary(self) -> dict:
        return self.base_evaluation()[0]


def prepare_bench(params: Params, threads: int) -> Bench:
    torch.set_num_threads(threads)
    root = Path(params.artifacts)
    test, train_set = prepare_prompts(params, root / "prompts")
    model, path = ensure_base_model(params.base_model, params.pretrain, root / "base_model", runtime=params.runtime)
    return Bench(params, threads, test, train_set, model, path)


@dataclass
class RunResult:
    """One finished rounds run: its held-out evaluations (the first is the base model's, the last the final EMA
    policy's) and its per-round training rows (elborl.rounds.evaluations and round_metrics)."""

    label: str
    run_dir: Path
    evals: list[dict]
    metrics: list[dict]
    reused: bool = False

    @property
    def base(self) -> float:
        return self.evals[0]["overall"]

    @property
    def final(self) -> dict:
        return self.evals[-1]

    @property
    def train_seconds(self) -> float:
        return self.metrics[-1]["train_seconds"] if self.metrics else 0.0

    @property
    def epochs(self) -> int:
        return len(self.metrics)

    @property
    def seconds_per_epoch(self) -> float | None:
        return self.train_seconds / self.epochs if self.epochs else None

    @property
    def final_evaluation(self) -> Path:
        """The directory of the final policy's evaluation (scores.json, grid.png)."""
        return Path(evaluation_uri(str(self.run_dir), self.evals[-1]["epoch"]))

    def held_out_curve(self) -> list[tuple[float, float]]:
        return [(e["train_seconds"], e["overall"]) for e in self.evals]

    def reward_curve(self) -> list[tuple[float, float]]:
        return [(m["train_seconds"], m["reward_mean"]) for m in self.metrics]


DONE_FILE = "bench_done.json"
# Where runs of earlier versions recorded their settings (now run.json, the run's one identity): still read.
LEGACY_SETTINGS_FILE = "bench_settings.json"
# A finished run's record: its evaluations and per-round rows, and the machine it trained on. With run.json and
# the done file it is all a table needs (kilobytes, where the run is a hundred megabytes), so records can be
# kept in the repository and read back by a later sitting on another machine as finished runs.
RECORD_FILE = "bench_record.json"


TRAIN_PROMPTS = ("train", "test")


def run_or_reuse(bench: Bench, params: Params, run_dir: str | Path, budget: Budget, label: str,
                 train_prompts: str = "train") -> RunResult:
    """Trains one run from the base model for `budget` into `run_dir`, or reads back the finished run there.

    `train_prompts="test"` is a diagnostic, not the benchmark: RL on the held-out prompts themselves, which
    measures how far the policy moves on the prompts it is scored on, without the train/test generalisation gap.
    """
    if train_prompts not in TRAIN_PROMPTS:
        raise ValueError(f"train_prompts must be one of {TRAIN_PROMPTS}, got {train_prompts!r}")
    run_dir = Path(run_dir)
    identity = {**run_settings(bench.base_path, params), "budget": asdict(budget), "threads": bench.threads}
    if train_prompts != "train":  # absent for the benchmark proper, so its earlier runs' settings still match
        identity["train_prompts"] = train_prompts
    recorded = recorded_identity(run_dir)
    if recorded is not None:
        differences = settings_differences(recorded, identity, defaults=default_settings())
        if differences:
            raise ValueError(f"{run_dir} holds a run of other settings (they differ in {differences}): "
                             "pick another --out or remove that directory")
        if (run_dir / DONE_FILE).exists():
            print(f"{label}: reusing the finished run in {run_dir}")
            return collect_run(run_dir, label, reused=True)
        print(f"{label}: resuming the unfinished run in {run_dir}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files but no {RUN_FILE}: pick another --out or remove it")
    else:  # recorded before any work, so that a run killed at any point is recognised
        run_dir.mkdir(parents=True, exist_ok=True)
        RunContext(str(run_dir), params, identity=identity).check_settings()
    train_set = bench.test if train_prompts == "test" else bench.train_set
    fine_tune(copy.deepcopy(bench.base_model), train_set, bench.test, budget.apply(params), run_dir,
              max_train_seconds=budget.max_train_seconds, base_evaluation=bench.base_evaluation, identity=identity)
    result = collect_run(run_dir, label)
    (run_dir / RECORD_FILE).write_text(json.dumps({"machine": cpu_description(), "evals": result.evals,
                                                   "metrics": result.metrics}))
    (run_dir / DONE_FILE).write_text(json.dumps({"epochs": result.epochs, "train_seconds": result.train_seconds,
                                                 "final_overall": result.final["overall"]}))
    return result


def recorded_identity(run_dir: str | Path) -> dict | None:
    """What a benchmark run recorded about itself: its run.json (an earlier version's bench_settings.json, when it
    has one, holds the benchmark's part); None when nothing is recorded there."""
    for name in (LEGACY_SETTINGS_FILE, RUN_FILE):
        if (Path(run_dir) / name).exists():
            return json.loads((Path(run_dir) / name).read_text())
    return None


def provenance(runs: list[RunResult], threads: int) -> str:
    """How a table's runs shared the CPU, for its header: the runs trained by this call went one after another in
    this process; read-back runs ran earlier, possibly in parallel processes, with the threads they recorded."""
    fresh = sum(not run.reused for run in runs)
    reused_threads = sorted({(recorded_identity(run.run_dir) or {}).get("threads") for run in runs if run.reused},
                            key=str)
    parts = [f"{fresh} trained now one after another in this process at {threads} torch threads"] if fresh else []
    if len(runs) - fresh:
        parts.append(f"{len(runs) - fresh} read back from earlier runs (trained at {reused_threads} torch threads; "
                     "whether other processes shared the CPU then is not recorded)")
    return f"{len(runs)} runs: " + "; ".join(parts)


def collect_run(run_dir: str | Path, label: str, reused: bool = False) -> RunResult:
    """A run's evaluations and rows: from its record when it has one (it may hold nothing else), else its rounds."""
    record = Path(run_dir) / RECORD_FILE
    if record.exists():
        data = json.loads(record.read_text())
        return RunResult(label, Path(run_dir), data["evals"], data["metrics"], reused)
    ctx = RunContext(str(run_dir), None)
    return RunResult(label, Path(run_dir), evaluations(ctx), round_metrics(ctx), reused)


# --- the arithmetic of the tables (pure) ------------------------------------------------------------------
SCORE_TOLERANCE = 1e-9  # scores are averages of image fractions: base + 0.05 must match a score 0.05 above base


def time_to_threshold(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """Training seconds of the first evaluation scoring at least `threshold` (None: never within the run).
    Evaluations are points, so the time is resolved to the evaluation interval, not interpolated."""
    for seconds, score in curve:
        if score >= threshold - SCORE_TOLERANCE:
            return seconds
    return None


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over seeds of curves logged at the same epochs: point i averages every seed's i-th point (time and
    score), up to the shortest curve. Under a minutes budget seeds may end an epoch or two apart, so the last
    points averaged are each seed's final policy at nearly the same epoch."""
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [(sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves))
            for i in range(length)]


@dataclass(frozen=True)
class Ratio:
    """A baseline's time to a threshold over the reference method's: `=` exact, or a bound when one of them did
    not reach it within its budget (its whole budget then bounds its time from below)."""

    relation: str  # "=", ">" or "<"
    value: float

    def __str__(self) -> str:
        return f"{self.value:.2f}×" if self.relation == "=" else f"{self.relation} {self.value:.2f}×"


def time_ratio(baseline_time: float | None, method_time: float | None, baseline_budget: float,
               method_budget: float) -> Ratio | None:
    """baseline time / method time to the same threshold. None when neither reached it, or when the method
    reached it before training (time 0: the threshold is not above the base model)."""
    if method_time is not None and method_time <= 0:
        return None
    if baseline_time is not None and method_time is not None:
        return Ratio("=", baseline_time / method_time)
    if method_time is not None:  # the baseline needs more than its budget
        return Ratio(">", baseline_budget / method_time)
    if baseline_time is not None:  # the method needs more than its budget
        return Ratio("<", baseline_time / method_budget)
    return None


def thresholds(base: float, absolute: list[float], gains: list[float]) -> list[tuple[str, float]]:
    """(name, score) of the thresholds of the time-to-threshold columns: fixed scores, then gains over base."""
    return [(f"≥ {a:.3f}", a) for a in absolute] + [(f"base {g:+.2f}", base + g) for g in gains]


def format_minutes(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 60:.1f} min"


def format_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def eval_table(evals: list[dict]) -> str:
    """A run's held-out evaluations as text: training minutes, epoch, overall, gain over the first, each task."""
    base = evals[0]["overall"]
    lines = [f"{'minutes':>8} {'epoch':>6} {'overall':>8} {'gain':>7} " + " ".join(f"{t[:10]:>10}" for t in TASKS)]
    for e in evals:
        tasks = " ".join(f"{format_score(e['tasks'].get(t)):>10}" for t in TASKS)
        lines.append(f"{e['train_seconds'] / 60:>8.1f} {e['epoch']:>6} {e['overall']:>8.3f} "
                     f"{e['overall'] - base:>+7.3f} {tasks}")
    return "\n".join(lines)


def curve_rows(method: str, seed: int, run: RunResult) -> list[dict]:
    """A run's held-out evaluations as CSV rows: method, seed, epoch, train_seconds, overall, one column per task."""
    return [{"method": method, "seed": seed, "epoch": e["epoch"], "train_seconds": round(e["train_seconds"], 2),
             "overall": e["overall"], **{t: e["tasks"].get(t) for t in TASKS}} for e in run.evals]


CURVE_COLUMNS = ["method", "seed", "epoch", "train_seconds", "overall", *TASKS]
