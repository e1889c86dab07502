"""Intervals of held-out scores: Wilson against scipy's own, bootstraps by their defining properties."""

import numpy as np
import pytest
from scipy.stats import binomtest

from elborl import stats
from elborl.geneval.types import TASKS


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (59, 70), (70, 70), (488, 976)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-6)


def records(rates: dict[str, float], prompts: int = 10, images: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tag": task, "prompt": f"{task} {p}", "correct": bool(rng.random() < rate)}
            for task, rate in rates.items() for p in range(prompts) for _ in range(images)]


def test_overall_is_the_unweighted_mean_of_tasks_and_its_interval_holds_it():
    rs = records({t: 0.5 for t in TASKS}) + records({"counting": 1.0}, prompts=30)
    per_task = [np.mean([r["correct"] for r in rs if r["tag"] == t]) for t in TASKS]
    assert stats.overall(rs) == pytest.approx(np.mean(per_task))
    low, high = stats.bootstrap_overall(rs)
    assert low < stats.overall(rs) < high


def test_more_prompts_narrow_the_interval():
    few = stats.bootstrap_overall(records({t: 0.5 for t in TASKS}, prompts=5))
    many = stats.bootstrap_overall(records({t: 0.5 for t in TASKS}, prompts=80))
    assert many[1] - many[0] < 0.5 * (few[1] - few[0])


def test_paired_difference_cancels_what_both_share():
    before = records({t: 0.5 for t in TASKS}, seed=1)
    assert stats.paired_difference(before, before) == {"difference": 0.0, "low": 0.0, "high": 0.0}
    after = [dict(r) for r in before]
    for r in after[::12]:  # a few images turn correct, nothing else changes
        r["correct"] = True
    paired = stats.paired_difference(after, before)
    unpaired = np.array(stats.bootstrap_overall(after)) - np.array(stats.bootstrap_overall(before))[::-1]
    assert 0 < paired["low"] <= paired["difference"] <= paired["high"]
    assert paired["high"] - paired["low"] < 0.5 * (unpaired[1] - unpaired[0])
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_difference(after, records({t: 0.5 for t in TASKS}, prompts=9))


def test_task_table_lists_tasks_in_genevals_order_then_overall():
    table = stats.task_table(records({t: 0.25 for t in reversed(TASKS)}))
    assert list(table) == [*TASKS, "overall"]
    score, low, high, n = table["counting"]
    assert low <= score <= high and n == 40


def test_a_paired_difference_of_a_dense_value_uses_that_value():
    before = [{"prompt": f"p{i}", "tag": "colors", "correct": False, "reward": 0.2} for i in range(6)]
    after = [{**r, "reward": 0.5} for r in before]
    diff = stats.paired_difference(after, before, key="reward")
    assert diff["difference"] == pytest.approx(0.3) and diff["low"] == pytest.approx(0.3)
    assert stats.paired_difference(after, before)["difference"] == 0.0  # the verdicts did not change


def test_bootstrap_mean_resamples_units_and_needs_two_of_them():
    values = np.random.default_rng(0).normal(0.5, 0.1, size=8)
    low, high = stats.bootstrap_mean(values)
    assert low < values.mean() < high and high - low < 4 * values.std() / np.sqrt(8)
    assert stats.bootstrap_mean(values) == (low, high)  # seeded
    assert all(np.isnan(stats.bootstrap_mean([0.3])))
