"""bench/efficiency.py, bench/ablation.py and bench/rl_curve.py: the table arithmetic on hand-made curves, the
design-space cells, run reuse, and the benchmarks end to end in their --smoke configuration (tiny model, seconds)."""

from pathlib import Path
import csv
import json

from PIL import Image
import numpy as np
import pytest

from conftest import ROOT, load_bench
from elborl.benchmark import (DONE_FILE, LEGACY_SETTINGS_FILE, RECORD_FILE, Bench, Budget, Ratio, RunResult, budget_from_args,
                              collect_run, load_bench_params, mean_curve, run_or_reuse, thresholds,
                              time_ratio, time_to_threshold)
from elborl.config import settings_differences
from elborl.embedded import run_settings
from elborl.evaluate import GRID_TEXT_WIDTH, grid_image
from elborl.geneval.types import TASKS
from elborl.runtime import resolve_precision
from elborl.rounds import RUN_FILE

PARAMS = str(ROOT / "params.yaml")


efficiency, ablation, rl_curve = load_bench("efficiency"), load_bench("ablation"), load_bench("rl_curve")


# ------------------------------------------------------------------------------------------- pure arithmetic

CURVE = [(0.0, 0.285), (60.0, 0.30), (120.0, 0.335), (180.0, 0.42), (240.0, 0.41)]


def test_time_to_threshold_is_the_first_evaluation_at_or_above_it():
    assert time_to_threshold(CURVE, 0.30) == 60.0
    assert time_to_threshold(CURVE, 0.285 + 0.05) == 120.0  # 0.335 - 0.285 = 0.04999...: still reached
    assert time_to_threshold(CURVE, 0.40) == 180.0  # first crossing, whatever comes after
    assert time_to_threshold(CURVE, 0.43) is None
    assert time_to_threshold(CURVE, 0.20) == 0.0  # the base model already scores it
    assert time_to_threshold([], 0.1) is None


def test_time_ratio_exact_and_bounds():
    assert time_ratio(300.0, 100.0, 900.0, 900.0) == Ratio("=", 3.0)
    assert time_ratio(None, 100.0, 900.0, 800.0) == Ratio(">", 9.0)  # the baseline needs more than its 900 s
    assert time_ratio(200.0, None, 900.0, 800.0) == Ratio("<", 0.25)  # the method needs more than its 800 s
    assert time_ratio(None, None, 900.0, 900.0) is None
    assert time_ratio(0.0, 0.0, 900.0, 900.0) is None  # reached before training: no ratio
    assert str(Ratio("=", 4.6)) == "4.60×" and str(Ratio(">", 2.0)) == "> 2.00×"


def test_mean_curve_averages_point_by_point_up_to_the_shortest_seed():
    seeds = [[(0.0, 0.2), (10.0, 0.4), (20.0, 0.5)], [(0.0, 0.2), (14.0, 0.6)]]
    assert [pytest.approx(point) for point in mean_curve(seeds)] == [(0.0, 0.2), (12.0, 0.5)]
    assert mean_curve([]) == []


def test_thresholds_are_fixed_scores_then_gains_over_base():
    levels = thresholds(0.3, [0.35], [0.05, 0.10])
    assert [name for name, _ in levels] == ["≥ 0.350", "base +0.05", "base +0.10"]
    assert [score for _, score in levels] == pytest.approx([0.35, 0.35, 0.40])


def test_budget_is_minutes_or_epochs():
    assert budget_from_args(None, None, smoke=False, default_minutes=15) == Budget(minutes=15)
    assert budget_from_args(None, None, smoke=True, default_minutes=15).epochs == 2
    assert budget_from_args(3.0, 5, smoke=False, default_minutes=15) == Budget(epochs=5)
    assert Budget(minutes=2).max_train_seconds == 120 and Budget(epochs=3).max_train_seconds is None
    with pytest.raises(ValueError):
        Budget()


def hand_made_run(label: str, scores: list[float], seconds_per_eval: float, epochs_per_eval: int = 10) -> RunResult:
    evals = [{"epoch": i * epochs_per_eval, "train_seconds": i * seconds_per_eval, "overall": s,
              "tasks": {t: s for t in TASKS}} for i, s in enumerate(scores)]
    epochs = (len(scores) - 1) * epochs_per_eval
    seconds_per_epoch = seconds_per_eval / epochs_per_eval
    metrics = [{"epoch": e, "train_seconds": (e + 1) * seconds_per_epoch, "reward_mean": 0.5} for e in range(epochs)]
    return RunResult(label, Path(label), evals, metrics)


def test_efficiency_summary_on_hand_made_runs():
    runs = {  # same base 0.30; elbo reaches +0.10 at 2 min, flow_grpo at 6 min, nft never (budget 8 min)
        "elbo": {0: hand_made_run("elbo", [0.30, 0.36, 0.40, 0.45, 0.46], 60.0)},
        "flow_grpo": {0: hand_made_run("flow_grpo", [0.30, 0.31, 0.33, 0.35, 0.36, 0.38, 0.40, 0.41], 60.0)},
        "nft": {0: hand_made_run("nft", [0.30, 0.32, 0.34, 0.35, 0.36], 120.0)},
    }
    summary = efficiency.efficiency_summary(runs, "elbo", absolute=[0.45], gains=[0.10])
    lines = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    # method | seeds | base | final | best | trained | epochs | s/epoch | ≥ 0.450 | base +0.10
    assert lines["elbo"].split(" | ")[1:] == ["1", "0.300", "0.460", "0.460", "4.0 min", "40", "6.0",
                                              "3.0 min", "2.0 min |"]
    assert lines["flow_grpo"].endswith("| not reached | 6.0 min |")
    assert lines["nft"].endswith("| not reached | not reached |")
    # ratios: flow_grpo never reached 0.45 in its 7 min (> 7/3), took 3x as long to +0.10; nft reached neither
    assert "flow_grpo / elbo (paper 4.6×)" in summary and "nft / elbo (paper 2×)" in summary
    assert lines["≥ 0.450"] == "| ≥ 0.450 | > 2.33× | > 2.67× |"
    assert lines["base +0.10"] == "| base +0.10 | 3.00× | > 4.00× |"


def test_efficiency_summary_uses_the_mean_over_seeds():
    runs = {"elbo": {0: hand_made_run("a", [0.30, 0.40], 60.0), 1: hand_made_run("b", [0.30, 0.30], 100.0)}}
    summary = efficiency.efficiency_summary(runs, "elbo", absolute=[0.35], gains=[])
    row = next(line for line in summary.splitlines() if line.startswith("| elbo"))
    assert row == "| elbo | 2 | 0.300 | 0.350 | 0.350 | 1.3 min | 10 | 8.0 | 1.3 min |"
    assert "over elbo" not in summary  # no baseline, no ratio table


# ------------------------------------------------------------------------------------------- the ablation cells

def test_design_cells_list_the_impossible_ones_with_the_reason():
    cells = ablation.design_cells(load_bench_params(PARAMS, []).rl)
    assert len(cells) == 16
    impossible = [c for c in cells if c.problem]
    assert {c.key for c in impossible} == {(o, "trajectory", "dpm2") for o in ablation.OBJECTIVES}
    assert all("trajectory needs the stored SDE trajectory" in c.problem for c in impossible)
    headline = next(c for c in cells if c.key == ("pepg", "elbo", "dpm2"))
    assert (headline.rl.objective, headline.rl.estimator, headline.rl.sampler) == ("pepg", "elbo", "dpm2")
    assert all(c.rl.advantage == ("std" if c.objective == "grpo" else "recipe") for c in cells)
    # the ELBO cells keep the recipe's precisions as this machine resolved them; trajectory cells need float32 for
    # their stored log-probs
    native = resolve_precision("auto", "cpu")
    assert headline.rl.rollout_precision == native == headline.rl.update_precision
    trajectory_cells = [c for c in cells if c.estimator == "trajectory"]
    assert all(c.rl.rollout_precision == "float32" == c.rl.update_precision for c in trajectory_cells)


# ------------------------------------------------------------------------------------------- run reuse

@pytest.mark.parametrize("recorded_in", [RUN_FILE, LEGACY_SETTINGS_FILE])
def test_a_run_directory_of_other_settings_is_refused(tmp_path, recorded_in):
    params = load_bench_params(PARAMS, [])
    bench = Bench(params, 1, [], [], None, Path("base-abc"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = load_bench_params(PARAMS, ["rl.lr=5e-4"])
    settings = {**run_settings(bench.base_path, other), "budget": {"minutes": 15, "epochs": None}, "threads": 1}
    (run_dir / recorded_in).write_text(json.dumps(settings))
    (run_dir / DONE_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"differ in \['rl.lr'\]"):
        run_or_reuse(bench, params, run_dir, Budget(minutes=15), "run")
    assert settings_differences({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 3}) == ["a.c", "d", "e"]
    # a setting added after a run was recorded matches at its default (what the code did then), not otherwise
    defaults = {"evaluate": {"scorer": "shapes"}}
    assert settings_differences({"evaluate": {}}, {"evaluate": {"scorer": "shapes"}}, defaults=defaults) == []
    assert settings_differences({"evaluate": {}}, {"evaluate": {"scorer": "geneval"}}, defaults=defaults) == \
        ["evaluate.scorer"]


class FineTuneCalled(Exception):
    pass


@pytest.mark.parametrize("train_prompts, expected", [("train", ["a training prompt"]), ("test", ["a test prompt"])])
def test_the_diagnostic_trains_on_the_held_out_prompts_and_says_so_in_its_settings(tmp_path, monkeypatch,
                                                                                     train_prompts, expected):
    import elborl.benchmark as benchmark
    params = load_bench_params(PARAMS, [])
    bench = Bench(params, 1, ["a test prompt"], ["a training prompt"], None, Path("base-abc"))
    bench._base_evaluation = ({"overall": 0.4}, [], None)
    trained_on = []

    def fine_tune(model, train_set, test, run_params, run_dir, **kwargs):
        trained_on.extend(train_set)
        raise FineTuneCalled

    monkeypatch.setattr(benchmark, "fine_tune", fine_tune)
    run_dir = tmp_path / train_prompts
    with pytest.raises(FineTuneCalled):
        run_or_reuse(bench, params, run_dir, Budget(minutes=15), "run", train_prompts)
    assert trained_on == expected
    settings = json.loads((run_dir / RUN_FILE).read_text())  # the run's identity, recorded before any work
    # the benchmark proper records no key (its earlier runs' settings still match); the diagnostic records "test"
    assert settings.get("train_prompts") == (None if train_prompts == "train" else "test")
    with pytest.raises(ValueError, match=r"differ in \['train_prompts'\]"):
        run_or_reuse(bench, params, run_dir, Budget(minutes=15), "run", "test" if train_prompts == "train" else "train")


def test_unknown_train_prompts_are_refused(tmp_path):
    bench = Bench(load_bench_params(PARAMS, []), 1, [], [], None, Path("base-abc"))
    with pytest.raises(ValueError, match="train_prompts must be one of"):
        run_or_reuse(bench, bench.params, tmp_path, Budget(minutes=15), "run", "all")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- end to end (--smoke)

def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_efficiency_smoke_run_writes_everything_and_reuses_finished_runs(tmp_path, capsys):
    argv = ["--smoke", "--params", PARAMS, "--out", str(tmp_path), "--threads", "1", "--epochs", "1"]
    efficiency.main(argv)
    rows = read_csv(tmp_path / "curves.csv")
    for method in ("elbo", "flow_grpo", "nft"):
        assert [r["epoch"] for r in rows if r["method"] == method] == ["0", "1"]  # the base model, then the run's
    assert set(rows[0]) == {"method", "seed", "epoch", "train_seconds", "overall", *TASKS}
    assert (tmp_path / "efficiency.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {m} | 1 |" in summary for m in ("elbo", "flow_grpo", "nft"))
    assert "flow_grpo / elbo (paper 4.6×)" in summary and "smoke run" in summary
    assert "3 runs: 3 trained now one after another in this process at 1 torch threads;" in summary

    capsys.readouterr()
    efficiency.main(argv)  # a second call trains nothing
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 3 and "RL fine-tuning" not in printed
    summary = (tmp_path / "summary.md").read_text()
    assert "3 runs: 3 read back from earlier runs (trained at [1] torch threads;" in summary
    assert len(collect_run(tmp_path / "runs" / "nft" / "seed0", "nft").metrics) == 1
    assert read_csv(tmp_path / "curves.csv") == rows

    # the kept records alone (run.json, done, record: no rounds, no weights) stand for the finished runs
    kept = tmp_path / "kept"
    for name in (RUN_FILE, DONE_FILE, RECORD_FILE):
        for source in (tmp_path / "runs").glob(f"*/*/{name}"):
            target = kept / "runs" / source.relative_to(tmp_path / "runs")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    assert sum(1 for _ in kept.rglob("*")) == 9 + 3 + 3 + 1  # 9 files, 3 run folders, 3 method folders, runs/
    efficiency.main([*argv[:4], str(kept), *argv[5:]])
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert read_csv(kept / "curves.csv") == rows
    assert json.loads((kept / "runs" / "nft" / "seed0" / RECORD_FILE).read_text())["machine"]


def test_ablation_smoke_run_lists_every_cell(tmp_path):
    ablation.main(["--smoke", "--params", PARAMS, "--out", str(tmp_path), "--threads", "1", "--epochs", "1",
                   "--objectives", "pepg"])
    rows = read_csv(tmp_path / "ablation.csv")
    assert [(r["objective"], r["estimator"], r["sampler"], r["status"]) for r in rows] == [
        (o, e, s, "impossible" if (e, s) == ("trajectory", "dpm2") else "run")
        for o in ("pepg",) for e in ("trajectory", "elbo") for s in ("sde", "dpm2")]
    assert all(r["epochs"] == "1" and float(r["train_seconds"]) > 0 for r in rows if r["status"] == "run")
    table = (tmp_path / "ablation.md").read_text()
    assert table.count("| impossible |") == 1 and "trajectory needs the stored SDE trajectory" in table
    assert "| base model |" in table and "the method (headline)" in table


def test_rl_curve_smoke_run_writes_curves_and_grids_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    rl_curve.main(["--smoke", "--params", PARAMS, "--out", str(out), "--threads", "1", "--epochs", "1"])
    printed = capsys.readouterr().out
    assert "time to +0.15:" in printed and "before_after.png" in printed
    assert [e["epoch"] for e in collect_run(out, "rl_curve").evals] == [0, 1]
    before, after = Image.open(out / "base" / "grid.png"), Image.open(out / "evals" / "00001" / "grid.png")
    both = Image.open(out / "before_after.png")
    assert both.height > before.height and both.width > before.width + after.width - GRID_TEXT_WIDTH


def test_trailing_mean_and_run_plot(tmp_path):
    from elborl.plots import plot_run, trailing_mean
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0], 10) == [2.0, 3.0]
    rows = [{"epoch": e, "reward_mean": 0.5 + 0.01 * e} for e in range(12)]
    evals = [{"epoch": 0, "train_seconds": 0, "overall": 0.4, "tasks": {"counting": 0.1}}]
    png = plot_run(rows, evals, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sde_noise_benchmark_compares_every_level_with_the_ode_on_the_same_prompts(tmp_path, capsys):
    sde_noise = load_bench("sde_noise")
    out = tmp_path / "sde"
    sde_noise.main(["--params", PARAMS, "--smoke", "--levels", "0.5", "--threads", "1", "--out", str(out)])
    rows = (out / "table.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["0", "0.5"]  # the ODE is always measured
    assert "—" in rows[2] and rows[3].count("(") == 4  # levels other than the ODE carry paired differences
    first = json.loads((out / "level-0.5-records.json").read_text())
    one_grid = grid_image(np.load(out / "level-0.5-images.npz")["images"][::2], first[::2], prompts_per_task=2)
    assert Image.open(out / "levels.png").width == 2 * one_grid.width - GRID_TEXT_WIDTH + 16  # both levels shown
    sde_noise.main(["--params", PARAMS, "--smoke", "--levels", "0.5", "--threads", "1", "--out", str(out)])
    assert json.loads((out / "level-0.5-records.json").read_text()) == first  # finished levels are read back
