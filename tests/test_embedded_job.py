"""The main job's wiring, end to end on a tiny configuration: prompts -> base model -> RL -> evaluation."""

import subprocess
import sys

import yaml

from elborl.rounds import RunContext, evaluations, round_metrics

TINY_PARAMS = {
    "base_model": {"channels": [32, 32], "text_width": 32, "text_layers": 1},
    "pretrain": {"steps": 3, "batch_size": 4, "warmup_steps": 1},
    "evaluate": {"images_per_prompt": 1, "steps": 2},
    "policy": {"lora_rank": 2, "lora_alpha": 4},
    "rl": {"prompts_per_epoch": 2, "group_size": 2, "steps": 2, "epochs": 2},
    "eval_every": 1,
}


def run_job(tmp_path):
    params = {**TINY_PARAMS, "artifacts": str(tmp_path / "artifacts")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "elborl.embedded", "--params", str(tmp_path / "params.yaml"),
                           "--threads", "1"], capture_output=True, text=True, timeout=600)


def test_main_job_runs_end_to_end_and_reuses_its_work(tmp_path):
    first = run_job(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "pretraining" in first.stdout and "fine-tuned" in first.stdout and "overall" in first.stdout
    artifacts = tmp_path / "artifacts"
    runs = list((artifacts / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "curves.png").stat().st_size > 0 and (runs[0] / "evals" / "00002" / "grid.png").exists()
    assert f"report: {runs[0] / 'report.html'}" in first.stdout and "<th>git commit</th>" in (
        runs[0] / "report.html").read_text()
    run = RunContext(str(runs[0]), None)
    assert [m["epoch"] for m in round_metrics(run)] == [0, 1]
    assert [e["epoch"] for e in evaluations(run)] == [0, 1, 2]  # before training and after each round
    published = sorted(p.relative_to(runs[0]).as_posix() for p in runs[0].glob("*/*/manifest.json"))

    second = run_job(tmp_path)  # everything cached or finished: nothing is trained again
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reusing" in second.stdout and "pretraining (" not in second.stdout
    assert sorted(p.relative_to(runs[0]).as_posix() for p in runs[0].glob("*/*/manifest.json")) == published
