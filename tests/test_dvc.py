"""The DVC pipeline (dvc.yaml) on a tiny configuration, in temporary git repositories holding copies of the
project's pipeline and code: `dvc repro` end to end, a no-op second run, a forced run reproducing the same bytes,
an experiment with `-S`, and `dvc push`/`pull` through a real local S3 server (tests/s3server.py)."""

from pathlib import Path
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from test_embedded_job import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("prepare_prompts", "pretrain", "train", "evaluate_base", "evaluate_final", "report")


def timed(rel: str) -> bool:
    """Files that record wall-clock seconds (or hash such files: manifests; the run report plots training minutes
    and says when it was written), and the saved global torch RNG state (not the same from run to run, and not used
    by any result); everything else is reproduced exactly."""
    name = rel.rsplit("/", 1)[-1]
    return (rel in ("pipeline/base_model/pretrain_log.json", "pipeline/train_metrics.jsonl", "pipeline/report.html")
            or name == "manifest.json"
            or (rel.startswith("pipeline/run/") and name in ("metrics.json", "rng.safetensors")))


def run(repo: Path, *command: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # stages run from the repository's own copy of the code
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "dvc"), *args, **kwargs)


def snapshot(repo: Path, exact: bool = True) -> dict[str, str]:
    """sha256 of every file under pipeline/ (exact=False: but the `timed` ones)."""
    files = {}
    for path in sorted((repo / "pipeline").rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if not path.is_file() or (not exact and timed(rel)):
            continue
        files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def tiny_params() -> dict:
    """The project's params.yaml (DVC needs every section a stage names) with TINY_PARAMS laid over it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY_PARAMS.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    return params


def make_repo(repo: Path, params: dict | None = None, pretrain_flags: str = "") -> Path:
    """A fresh git repository with the project's pipeline, code, DVC config and a tiny params.yaml (or `params`),
    the pretrain stage given `pretrain_flags`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("elborl", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("scripts/dvc_remote.sh", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    dvc_yaml = (ROOT / "dvc.yaml").read_text()
    assert "threads: 2" in dvc_yaml
    assert 'pretrain_flags: ""' in dvc_yaml
    dvc_yaml = dvc_yaml.replace("threads: 2", "threads: 1")  # one CPU thread in tests
    (repo / "dvc.yaml").write_text(dvc_yaml.replace('pretrain_flags: ""', f'pretrain_flags: "{pretrain_flags}"'))
    (repo / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


def copy_repo(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A repository after its first `dvc repro`, results committed (dvc.lock, metrics, plot CSVs)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc") / "repo")
    first = dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "dvc repro")
    return repo, first.stdout


def test_repro_runs_end_to_end_then_is_a_noop_and_a_forced_run_reproduces_the_same_bytes(reproduced, tmp_path):
    source, first = reproduced
    for name in STAGES:
        assert f"Running stage '{name}'" in first, first
    repo = copy_repo(source, tmp_path / "repo")
    metrics = json.loads((repo / "pipeline/metrics.json").read_text())
    tasks = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert set(metrics) == {"base", "fine_tuned", "delta", "train", "pretrain"}
    assert metrics["pretrain"]["steps"] == TINY_PARAMS["pretrain"]["steps"] and metrics["pretrain"]["loss_last"] > 0
    assert tasks | {"overall"} <= set(metrics["base"]) and set(metrics["base"]) == set(metrics["fine_tuned"])
    assert metrics["train"]["rounds"] == TINY_PARAMS["rl"]["epochs"]
    assert (repo / "pipeline/run/round-00001/update/manifest.json").exists()  # the last round: rl.epochs - 1
    final = json.loads((repo / "pipeline/eval/final/manifest.json").read_text())
    assert final["meta"]["policy_state"] == "pipeline/run/round-00001/update"
    train_csv = (repo / "pipeline/plots/train.csv").read_text().splitlines()
    assert train_csv[0].startswith("round,reward_mean") and len(train_csv) == 1 + TINY_PARAMS["rl"]["epochs"]
    assert len((repo / "pipeline/plots/heldout.csv").read_text().splitlines()) == 1 + len(tasks) + 1
    for png in ("training.png", "heldout.png"):
        assert (repo / "pipeline/plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (repo / "pipeline/report.html").read_text()  # the run report: base vs final on the same seeds
    assert "<th>held-out score (strict)</th>" in report and "pipeline/base_model (files sha256" in report
    assert not (repo / "pipeline/.pretrain-cache").exists()
    shown = dvc(repo, "metrics", "show", "--json").stdout
    assert '"fine_tuned"' in shown and '"overall"' in shown
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]  # per-round curves, as DVC renders them
    for title, field in (("training reward", "reward_mean"), ("KL to the reference (reward-hacking monitor)", "kl")):
        values = plots[title][0]["content"]["data"]["values"]
        assert [int(v["round"]) for v in values] == list(range(TINY_PARAMS["rl"]["epochs"]))
        assert all(float(v[field]) >= 0 for v in values), values

    again = dvc(repo, "repro")  # a copy (new inodes and mtimes) of an up-to-date workspace is still up to date
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date." in again.stdout
    status = dvc(repo, "status", "--json")
    assert json.loads(status.stdout) == {}

    before, metrics_bytes = snapshot(repo, exact=False), (repo / "pipeline/metrics.json").read_bytes()
    forced = dvc(repo, "repro", "--force")
    for name in STAGES:
        assert f"Running stage '{name}'" in forced.stdout
    assert "reusing" not in forced.stdout  # pretrained again, not taken from a cache
    assert (repo / "pipeline/metrics.json").read_bytes() == metrics_bytes
    after = snapshot(repo, exact=False)
    for weights in ("base_model/unet/diffusion_pytorch_model.safetensors", "eval/final/grid.png",
                    "run/round-00001/rollout/samples.safetensors", "run/round-00001/update/policy.safetensors"):
        assert f"pipeline/{weights}" in before
    assert after == before, sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def test_an_experiment_with_a_changed_parameter_reruns_only_what_depends_on_it(reproduced, tmp_path):
    repo = copy_repo(reproduced[0], tmp_path / "repo")
    result = dvc(repo, "exp", "run", "-S", "rl.lr=5e-4", "-n", "lr-5e-4")
    for name in ("prepare_prompts", "pretrain", "evaluate_base"):
        assert f"Running stage '{name}'" not in result.stdout, result.stdout
    for name in ("train", "evaluate_final", "report"):
        assert f"Running stage '{name}'" in result.stdout, result.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["rl"]["lr"] == 5e-4  # applied to the workspace

    shown = dvc(repo, "exp", "show", "--json").stdout
    experiments = [rev for entry in json.loads(shown) for exp in entry.get("experiments") or []
                   for rev in exp["revs"] if rev.get("name") == "lr-5e-4"]
    assert len(experiments) == 1, shown[:3000]
    data = experiments[0]["data"]
    assert data["params"]["params.yaml"]["data"]["rl"]["lr"] == 5e-4
    assert data["metrics"]["pipeline/metrics.json"]["data"]["train"]["rounds"] == TINY_PARAMS["rl"]["epochs"]
    assert "lr-5e-4" in dvc(repo, "exp", "show", "--no-pager", "--md").stdout


def test_push_to_s3_then_pull_into_a_fresh_clone_and_into_an_emptied_cache(reproduced, s3_env, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket()
    monkeypatch.setenv("ELBORL_DVC_REMOTE", f"s3://{bucket}/dvc")
    repo = copy_repo(reproduced[0], tmp_path / "repo")
    expected = snapshot(repo)

    run(repo, "bash", "scripts/dvc_remote.sh")
    local_config = (repo / ".dvc/config.local").read_text()
    assert f"s3://{bucket}/dvc" in local_config and s3_env.endpoint_url in local_config
    assert s3_env.secret_key not in local_config and s3_env.access_key not in local_config
    assert "s3://" not in (repo / ".dvc/config").read_text()  # the committed config names no remote
    dvc(repo, "push")
    listed = s3_env.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert listed["KeyCount"] > 0

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "pipeline/base_model").exists()
    run(clone, "bash", "scripts/dvc_remote.sh")
    dvc(clone, "pull")
    assert snapshot(clone) == expected
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    assert "Running stage" not in dvc(clone, "repro").stdout

    for out in ("prompts", "base_model", "run", "train_metrics.jsonl", "eval/base", "eval/final", "plots/training.png",
                "plots/heldout.png", "report.html"):  # every DVC-cached output (metrics.json and the CSVs: git)
        path = repo / "pipeline" / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    dvc(repo, "pull")
    assert snapshot(repo) == expected


def test_repro_runs_the_tiny_sd3_through_every_stage(tmp_path):
    """The production code path (an SD3 MMDiT in latent space, LoRA on its attention) through `dvc repro`: the
    pretrain stage takes the tiny SD3 instead of pretraining, every later stage runs on it unchanged."""
    from test_sd3_pipeline import SETTINGS

    params = tiny_params()
    for key, value in SETTINGS.items():
        params[key] = {**params[key], **value}
    params["rl"]["recipe"] = ""  # the tiny settings as given, no preset laid over them
    repo = make_repo(tmp_path / "repo", params, pretrain_flags="--take tiny-sd3")
    first = dvc(repo, "repro").stdout
    for name in STAGES:
        assert f"Running stage '{name}'" in first, first
    base = repo / "pipeline/base_model"
    assert (base / "model_index.json").exists() and (base / "transformer").is_dir()
    assert json.loads((base / "pretrain_log.json").read_text())["taken"] == "tiny-sd3"
    final = json.loads((repo / "pipeline/eval/final/manifest.json").read_text())
    assert final["meta"]["policy_state"] == "pipeline/run/round-00001/update"
    metrics = json.loads((repo / "pipeline/metrics.json").read_text())
    assert metrics["train"]["rounds"] == 2 and "pretrain" not in metrics
    assert "pipeline/base_model (files sha256" in (repo / "pipeline/report.html").read_text()
