"""bench/reevaluate.py: a finished run's checkpoint comes back with its EMA or its current weights, and bad input
is refused before any evaluation."""

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, load_bench
from test_rl_loop import small_config, tiny_run, trained_policy
from elborl.models.shapes_model import ShapesFlowModel


def trainable(policy):
    return {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}


def test_the_run_policy_has_the_runs_current_and_ema_weights(tmp_path):
    bench = load_bench("reevaluate")
    config = small_config(epochs=2, ema_decay=0.5)
    trained = trained_policy(tiny_run(tmp_path, config))
    params = SimpleNamespace(policy=trained.config, rl=config)
    loaded, state = bench.load_run_policy(tmp_path, ShapesFlowModel.from_config(TINY, seed=0), params)
    assert state["epoch"] == 2
    current, ema = trainable(trained), trained.ema
    assert any(not torch.equal(current[n], ema[n]) for n in current)  # so the two checks below tell them apart
    with bench.evaluated_weights(loaded, "current"):
        assert all(torch.equal(p, current[n]) for n, p in trainable(loaded).items())
    with bench.evaluated_weights(loaded, "ema"):
        assert all(torch.equal(p, ema[n]) for n, p in trainable(loaded).items())
    assert all(torch.equal(p, current[n]) for n, p in trainable(loaded).items())  # θ is back after the EMA
    with pytest.raises(ValueError, match="weights must be ema or current"):
        bench.evaluated_weights(loaded, "old")


def test_runs_without_a_published_round_and_bad_counts_are_refused(tmp_path, capsys):
    bench = load_bench("reevaluate")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])
    assert f"no published round in {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path), "--images-per-prompt", "0"])
    assert "--images-per-prompt must be >= 1" in capsys.readouterr().err


def test_a_run_from_another_base_model_is_refused_before_anything_runs(tmp_path, capsys):
    bench = load_bench("reevaluate")
    run = tmp_path / "run"
    tiny_run(run, small_config(epochs=1))
    (run / "bench_settings.json").write_text('{"base": "not-this-base"}')
    assert bench.runs_on_other_bases([str(run)], "not-this-base") == []
    assert bench.runs_on_other_bases([str(run)], "another") == [f"{run} (base not-this-base)"]
    # main() names the run and the fix; it stops before prepare_bench could pretrain or evaluate anything
    with pytest.raises(SystemExit):
        bench.main([str(run), "--set", f"artifacts={tmp_path / 'artifacts'}"])
    err = capsys.readouterr().err
    assert "started from another base model" in err and "--set" in err
    assert not (tmp_path / "artifacts").exists()


def test_an_earlier_round_is_loaded_by_epoch_and_a_missing_one_refused(tmp_path, capsys):
    bench = load_bench("reevaluate")
    config = small_config(epochs=2)
    trained = trained_policy(tiny_run(tmp_path, config))
    params = SimpleNamespace(policy=trained.config, rl=config)
    base = ShapesFlowModel.from_config(TINY, seed=0)
    first, state = bench.load_run_policy(tmp_path, base, params, epoch=1)
    last, _ = bench.load_run_policy(tmp_path, base, params)
    assert state["epoch"] == 1
    assert trainable(last).keys() == trainable(trained).keys()
    assert all(torch.equal(p, trainable(trained)[n]) for n, p in trainable(last).items())
    assert any(not torch.equal(p, trainable(last)[n]) for n, p in trainable(first).items())
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path), "--epoch", "7"])
    assert f"fewer than 7 published rounds in {tmp_path}" in capsys.readouterr().err


def test_each_score_has_its_interval_and_each_run_its_paired_gain_over_base():
    bench = load_bench("reevaluate")
    prompts = [(f"p{i}", tag) for i, tag in enumerate(["counting", "colors", "position"] * 10)]

    def records(rate_of_prompt):
        return [{"prompt": p, "tag": tag, "seed": seed, "correct": seed < 4 * rate_of_prompt(i)}
                for i, (p, tag) in enumerate(prompts) for seed in range(4)]

    base = records(lambda i: 0.25)  # 1 of 4 images right on every prompt
    better = records(lambda i: 0.75)  # 3 of 4
    lines = bench.uncertainty_lines({"base": ({"overall": 0.25}, base), "run": ({"overall": 0.75}, better)})
    base_line, run_line = lines.splitlines()
    assert base_line.startswith("base: overall 0.250 (0.250-0.250)")  # every prompt alike: no spread
    assert run_line.startswith("run: overall 0.750 (0.750-0.750), gain over base +0.500 (+0.500 to +0.500)")
    noisy = records(lambda i: (i % 4) / 4)
    low, high = map(float, bench.uncertainty_lines({"noisy": ({"overall": 0.375}, noisy)})
                    .split("(")[1].rstrip(")").split("-"))
    assert low < 0.375 < high
