"""Data parallelism: two processes (torchrun over gloo on this CPU) train the tiny model to the weights one process
reaches with the same global batch, and a two-process job killed mid-round resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elborl.distributed import Processes
from elborl.rounds import RunContext, round_metrics

from test_rl_loop import small_config, tiny_run, trained_policy, without_seconds

HERE = Path(__file__).parent
# two prompts of three samples, each process sampling one group in one batch as one process does (micro-batches
# of a group): the same images to the bit; the update's micro-batches of 3 terms are dealt over both processes
SETTINGS = {"prompts_per_epoch": 2, "group_size": 3, "steps": 3, "micro_batch": 3, "lr": 1e-3, "kl_beta": 1e-3,
            "optimizer_steps_per_epoch": 2, "advantage": "std"}
TRAJECTORY = {**SETTINGS, "sampler": "sde", "estimator": "trajectory", "objective": "flow_grpo", "sde_noise": 0.5,
              "advantage": "std"}


def launch(run_dir: Path, rounds: int, settings: dict, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "data_parallel_run.py"), str(run_dir), str(rounds), json.dumps(settings),
                           *flags], capture_output=True, text=True, timeout=600, env=env)


def saved_policy(run_dir: Path, rounds: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run_dir / f"round-{rounds - 1:05d}" / "update" / "policy.safetensors")


@pytest.mark.parametrize("settings", [SETTINGS, TRAJECTORY], ids=["elbo", "flow_grpo"])
def test_two_processes_train_the_weights_of_one(tmp_path, settings):
    done = launch(tmp_path / "two", 2, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    one = tiny_run(tmp_path / "one", small_config(epochs=2, **settings))
    expected, got = trained_policy(one).state_dict(), saved_policy(tmp_path / "two", 2)
    assert expected.keys() == got.keys()
    # the same arithmetic up to the order of floating-point sums of gradients over processes: bit-identical on the
    # 2-core AVX2 CPU where this was written; the tolerance leaves room for other summation orders. (Images
    # sampled in batches of other sizes differ by ~1e-6, which Adam's first steps amplify to ~1e-4 in weights.)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    two = RunContext(str(tmp_path / "two"), None)
    for row_one, row_two in zip(without_seconds(round_metrics(one)), without_seconds(round_metrics(two)), strict=True):
        assert row_one.keys() == row_two.keys()
        for key, value in row_one.items():
            assert row_two[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_a_killed_two_process_job_resumes_exactly(tmp_path):
    straight = launch(tmp_path / "straight", 2, SETTINGS)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(tmp_path / "resumed", 2, SETTINGS, "--die-after-rollout")
    assert killed.returncode != 0
    resumed = RunContext(str(tmp_path / "resumed"), None)
    assert resumed.completed_rounds() == 1 and (tmp_path / "resumed/round-00001/rollout/manifest.json").exists()
    again = launch(tmp_path / "resumed", 2, SETTINGS)
    assert again.returncode == 0, again.stderr[-3000:]
    expected, got = saved_policy(tmp_path / "straight", 2), saved_policy(tmp_path / "resumed", 2)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_seconds(round_metrics(RunContext(str(tmp_path / "straight"), None))) == \
        without_seconds(round_metrics(resumed))


def test_groups_are_split_whole_and_uneven_splits_refused():
    first, second = Processes(0, 2), Processes(1, 2)
    assert list(first.group_share(4)) == [0, 1] and list(second.group_share(4)) == [2, 3]
    assert [first.owns_micro_batch(i) for i in range(3)] == [True, False, True]
    with pytest.raises(ValueError, match=r"prompts_per_epoch \(3\) must be a multiple of the number of processes"):
        first.check_groups(3)


def test_the_train_stage_runs_data_parallel_as_launched(tmp_path):
    """The production command's path (`accelerate launch -m stages.train`, here torchrun over gloo): published base
    model and prompts, a params file, two processes; the same weights as the stage in one process."""
    from test_rounds import published_inputs
    import yaml

    base, prompts = published_inputs(tmp_path, str(tmp_path / "store"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"policy": {"lora_rank": 4, "lora_alpha": 8}, "rl": {**SETTINGS, "epochs": 2}}))
    common = ["-m", "stages.train", "--params", str(params), "--base-model", base, "--prompts", prompts,
              "--reward", "jpeg_compressibility"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = HERE.parent
    # "--" ends torchrun's options: otherwise its argparse takes the stage's --run for an abbreviation of --run-path
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "--", *common[1:], "--run", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.jsonl")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--run", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=env, cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("2 rounds published") == 1  # one process reports
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 2
    expected, got = saved_policy(tmp_path / "one", 2), saved_policy(tmp_path / "two", 2)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_stage_takes_the_multi_process_launcher(tmp_path):
    """One launcher for every stage of a multi-GPU job: under two processes the prompts are prepared once (a stage
    that is not data parallel runs in the main process alone), and the held-out evaluation, each process sampling
    and scoring half of the images, publishes the scores, verdicts and grid one process publishes. Its sampling
    batches are the shares (batch_size = a share), so the images are the same to the bit."""
    from test_rounds import published_inputs
    import yaml

    base, _ = published_inputs(tmp_path, str(tmp_path / "store"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_processes = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "--"]

    def stage(launcher, name, params, *options):
        done = subprocess.run([*launcher, f"stages.{name}", "--params", str(params), "--threads", "1", *options],
                              capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    prompts = tmp_path / "store" / "shapes_prompts"
    out = stage(two_processes, "prepare_prompts", HERE.parent / "params.yaml", "--out", str(prompts))
    assert out.count(str(prompts)) >= 1 and (prompts / "manifest.json").exists()
    tests = len((prompts / "test.jsonl").read_text().splitlines())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"images_per_prompt": 1, "steps": 2, "batch_size": -(-tests // 2)}}))
    evaluate = ["--model", base, "--prompts", str(prompts)]
    two = stage(two_processes, "evaluate", params, *evaluate, "--out", str(tmp_path / "two"))
    stage([sys.executable, "-m"], "evaluate", params, *evaluate, "--out", str(tmp_path / "one"))
    assert two.count("overall") == 1  # the main process prints the table
    for name in ("scores.json", "images.jsonl", "grid.png"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert len((tmp_path / "two" / "images.jsonl").read_text().splitlines()) == tests


def test_shares_of_a_held_out_evaluation_cover_every_image_once():
    for items, world in [(61, 2), (7, 3), (2, 4), (0, 2)]:
        shares = [Processes(rank, world).even_share(items) for rank in range(world)]
        assert [i for share in shares for i in range(items)[share]] == list(range(items))
