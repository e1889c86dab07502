"""Evaluation of any set of metrics (elborl/evaluate.py) on a held-out prompt set, on the tiny untrained model."""

import json

import numpy as np
import pytest

from elborl.evaluate import GRID_TEXT_WIDTH, EvalConfig, before_after, evaluate, evaluate_metrics, grid_image, \
    write_evaluation
from elborl.prompt_sets import prompt_set
from elborl.rewards import make_reward

CONFIG = EvalConfig(images_per_prompt=2, steps=2)


def test_metrics_are_averaged_per_task_and_written_as_tables(tiny_model, tmp_path):
    metas = prompt_set("shapes_geneval")[::6]  # 11 prompts, every task
    metrics = {"shapes_geneval": make_reward("shapes_geneval"), "jpeg_compressibility": make_reward("jpeg_compressibility")}
    summary, records, images = evaluate_metrics(tiny_model, metas, CONFIG, metrics, progress=False)
    strict, strict_records, strict_images = evaluate(tiny_model, metas, CONFIG, progress=False)
    assert np.array_equal(images, strict_images)  # one sampler: the same seeds give the same images
    assert summary["n_images"] == len(records) == 2 * len(metas)
    dense = summary["metrics"]["shapes_geneval"]
    for task, mean in dense["tasks"].items():
        expected = np.mean([r["reward"] for r in strict_records if r["tag"] == task])
        assert np.isclose(mean, expected), task
    assert list(dense["tasks"]) == list(dict.fromkeys(m["tag"] for m in metas))
    assert np.isclose(dense["overall"], np.mean(list(dense["tasks"].values())))  # tasks count equally
    jpeg = [r["jpeg_compressibility"] for r in records]
    assert all(value < 0 for value in jpeg)

    written = write_evaluation(tmp_path, summary, records, images)
    assert json.loads(written["scores"].read_text()) == summary
    table = written["table"].read_text().splitlines()
    assert table[0] == "| task | shapes_geneval | jpeg_compressibility |" and table[-1].startswith("| overall |")
    assert len(table) == 2 + len(dense["tasks"]) + 1 and written["grid"].stat().st_size > 0


def test_a_drawbench_style_set_is_scored_per_category(tiny_model):
    summary, _, _ = evaluate_metrics(tiny_model, prompt_set("drawbench")[::2], EvalConfig(images_per_prompt=1, steps=2),
                                     {"jpeg_compressibility": make_reward("jpeg_compressibility")}, progress=False)
    tasks = summary["metrics"]["jpeg_compressibility"]["tasks"]
    assert len(tasks) == 10 and "misspellings" in tasks and all(np.isfinite(v) for v in tasks.values())


def test_before_after_puts_the_second_grid_beside_the_first_without_its_prompts():
    records = [{"prompt": "a photo of a red circle", "tag": "colors", "correct": c} for c in (True, False)]
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    before = grid_image(images, records)
    after = grid_image(images + 255, [{**r, "correct": True} for r in records])
    both = before_after(before, after, ("base", "tuned"))
    title, gap = both.height - before.height, both.width - before.width - (after.width - GRID_TEXT_WIDTH)
    assert title > 0 and gap > 0
    assert both.crop((0, title, before.width, both.height)).tobytes() == before.tobytes()
    right = both.crop((both.width - (after.width - GRID_TEXT_WIDTH), title, both.width, both.height))
    assert right.tobytes() == after.crop((GRID_TEXT_WIDTH, 0, after.width, after.height)).tobytes()
    four_prompts = [{**records[0], "prompt": p} for p in "abcd"]  # four rows instead of one
    with pytest.raises(ValueError, match="different prompts"):
        before_after(before, grid_image(np.zeros((4, 8, 8, 3), np.uint8), four_prompts), ("base", "tuned"))


def test_the_held_out_scorer_is_the_one_the_settings_name(monkeypatch):
    """`evaluate.scorer: geneval` builds GenEval's own scorer as the geneval reward is built, from
    rewards.paths.geneval; without that path the error names it. The default is the shapes world's."""
    from elborl import rewards
    from elborl.config import Params
    from elborl.evaluate import held_out_scorer
    from elborl.rewards import RewardsConfig
    from elborl.shapes.detector import ShapesDetector

    assert isinstance(held_out_scorer(EvalConfig(), RewardsConfig()).detector, ShapesDetector)
    with pytest.raises(ValueError, match=r"rewards\.paths\.geneval"):
        held_out_scorer(EvalConfig(scorer="geneval"), RewardsConfig())
    built = {}

    class Fake:
        def __init__(self, path):
            built["path"], self.scorer = path, "geneval's scorer"

    monkeypatch.setitem(rewards.REWARDS, "geneval", Fake)
    config = Params(rewards={"weights": {"geneval": 1.0}, "paths": {"geneval": "s3://models/geneval"}})
    assert held_out_scorer(EvalConfig(scorer="geneval"), config.rewards) == "geneval's scorer"
    assert built == {"path": "s3://models/geneval"}
    with pytest.raises(ValueError, match="scorer"):
        EvalConfig(scorer="clip")
