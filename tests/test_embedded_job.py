"""The main job's wiring, end to end on a tiny configuration: prompts -> base model -> RL -> evaluation."""

from dataclasses import replace
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
    plan = first.stdout[:first.stdout.index("\nprompts: ")]  # the plan comes before any work
    assert "main job on" in plan and "pretrain it (3 steps" in plan and "RL (no recipe): 2 rounds of 4 images" in plan
    assert "no reference timing for these settings" in plan  # tiny: the reference is for params.yaml's workload
    assert "the first round took" in first.stdout and "about" in first.stderr  # the progress line and its estimate
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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_progress_line_estimates_rounds_and_evaluations_left():
    from elborl.embedded import JobProgress

    clock = FakeClock()
    progress = JobProgress(eval_every=5, evaluation_seconds=30.0, clock=clock)
    progress.start(0, 10, 0.0, None)
    evaluate = progress.timed(lambda backbone: clock.__setattr__("now", clock.now + 50.0))
    row = {"reward_mean": 0.5, "seconds_rollout": 8.0, "seconds_reward": 1.0, "seconds_update": 1.0}
    clock.now = 12.0
    progress.round_done(1, row)
    assert progress.seconds_left(1) == 9 * 12.0 + 2 * 30.0  # rounds 2..10, evaluations at 5 and 10
    for done in range(2, 6):
        clock.now += 12.0
        progress.round_done(done, row)
    evaluate(None)  # the evaluation at round 5 took 50 s: the next estimate uses it, the rounds' mean does not
    assert progress.seconds_left(5) == 5 * 12.0 + 1 * 50.0 + 50.0  # round 5's own (just run) is counted by done
    clock.now += 12.0
    progress.round_done(6, row)
    assert progress.seconds_left(6) == 4 * 12.0 + 1 * 50.0
    progress.close()


def test_under_a_budget_the_progress_line_ends_where_the_run_will():
    from elborl.embedded import JobProgress, evaluations_to_go

    clock = FakeClock()
    progress = JobProgress(eval_every=0, evaluation_seconds=5.0, clock=clock)
    progress.start(0, 100, 0.0, max_train_seconds=35.0)
    clock.now = 11.0
    progress.round_done(1, {"reward_mean": 0.5, "seconds_rollout": 10.0, "seconds_reward": 0.0, "seconds_update": 0.0})
    # run_rounds goes on while the training seconds are under the budget: rounds 2, 3 and 4 (40 s >= 35 s)
    assert progress.last_round(1) == 4 and progress.seconds_left(1) == 3 * 11.0 + 5.0
    progress.close()
    assert [evaluations_to_go(done, 60, 15) for done in (0, 15, 16, 60)] == [4, 4, 3, 1]
    assert evaluations_to_go(28, 28, 15) == 1 and evaluations_to_go(3, 5, 0) == 1


def test_the_plan_states_the_reference_duration_for_the_default_settings():
    from elborl.config import PARAMS_FILE, load_params
    from elborl.embedded import plan

    params = load_params(PARAMS_FILE)
    test, train_set = [{}] * 61, [{}] * 6000
    stated = plan(params, test, train_set, "shipped", 2, 18.0, skip_rl=False)
    assert "copy the shipped weights" in stated and "244 held-out images" in stated
    assert f"{params.rl.epochs} rounds of 64 images, stopping after 18 training minutes" in stated
    assert "expected: about" in stated and "min (measured on 2-core CPUs computing in" in stated
    assert "no reference timing" in plan(params, test, train_set, "shipped", 1, 18.0, skip_rl=False)  # 1 thread
    bigger = replace(params, rl=replace(params.rl, group_size=16))
    assert "no reference timing" in plan(bigger, test, train_set, "shipped", 2, 18.0, skip_rl=False)
    reseeded = replace(params, rl=replace(params.rl, seed=7))
    assert "expected: about" in plan(reseeded, test, train_set, "cache", 2, 18.0, skip_rl=False)
