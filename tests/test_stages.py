"""The stage CLIs chained by hand on a tiny configuration, as DVC, Prefect or a container job chains them."""

import json
import subprocess
import sys

import yaml

from test_embedded_job import TINY_PARAMS


def stage(name, *args, params):
    result = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params), "--threads", "1",
                             *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_stages_chain_into_a_round_and_skip_what_is_published(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    store = tmp_path / "store"
    prompts, base, run = store / "prompts", store / "base", store / "run"
    stage("prepare_prompts", "--out", prompts, params=params)
    stage("pretrain", "--out", base, "--cache", tmp_path / "cache", params=params)
    stage("rollout", "--run", run, "--round", 0, "--base-model", base, "--prompts", prompts, params=params)
    stage("score", "--run", run, "--round", 0, params=params)
    stage("update", "--run", run, "--round", 0, "--base-model", base, params=params)
    out = stage("evaluate", "--model", base, "--policy-state", run / "round-00000/update", "--prompts", prompts,
                "--out", store / "eval", params=params)
    assert "overall" in out
    scores = json.loads((store / "eval/scores.json").read_text())
    assert set(scores["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert (store / "eval/scores.md").read_text().startswith("| task | geneval_strict |")

    # any metrics on a registered held-out set
    out = stage("evaluate", "--model", base, "--prompt-set", "shapes_geneval", "--metrics",
                "jpeg_compressibility,shapes_geneval", "--out", store / "eval-metrics", params=params)
    assert "jpeg_compressibility" in out and "overall" in out
    metrics = json.loads((store / "eval-metrics/scores.json").read_text())["metrics"]
    assert set(metrics) == {"jpeg_compressibility", "shapes_geneval"}
    assert set(metrics["shapes_geneval"]["tasks"]) == set(scores["tasks"]) and metrics["jpeg_compressibility"]["overall"] < 0
    for artifact in ("prompts", "base", "run/round-00000/rollout", "run/round-00000/score", "run/round-00000/update", "eval",
                     "eval-metrics"):
        assert (store / artifact / "manifest.json").exists(), artifact

    again = stage("rollout", "--run", run, "--round", 0, "--base-model", base, "--prompts", prompts, params=params)
    assert "already published, skipped" in again

    # the run report of a run made stage by stage (no held-out evaluation of its own)
    assert "run report:" in stage("report", "--run", run, "--html", tmp_path / "report.html", params=params)
    html = (tmp_path / "report.html").read_text()
    assert "<th>training reward</th>" in html and "<h2>Samples on the same prompts and seeds</h2>" not in html


def test_a_stage_with_a_missing_input_fails_in_one_line_and_publishes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    result = subprocess.run([sys.executable, "-m", "stages.score", "--params", str(params), "--run",
                             str(tmp_path / "run"), "--round", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no published artifact" in result.stderr and "round-00000/rollout" in result.stderr
    assert not (tmp_path / "run" / "round-00000" / "score").exists()
