"""Prefect orchestration (flows/, prefect.yaml) against a real Prefect server (prefect_test_harness).

The training flow runs two rounds of a tiny configuration end to end (and gives exactly the one-process
rounds' weights), runs each stage as a job in container mode, resumes after a SIGKILL mid-round without
redoing finished rounds, does not retry a non-transient failure; a served deployment picks up a run of its
schedule; prefect.yaml registers with `prefect deploy`; the campaign flow chains every stage.
"""

from datetime import datetime, timedelta, timezone
from pathlib import Path
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flows/ lives in the checkout (entrypoints are file paths), not in the package

import flows  # noqa: E402  - sets the offline Prefect settings before Prefect is imported
from flows.common import StageJobError, is_transient, stage_argv, stage_command, VERSION  # noqa: E402

from conftest import TINY  # noqa: E402
from test_embedded_job import TINY_PARAMS  # noqa: E402
from test_rl_loop import METAS  # noqa: E402

THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


# --- the Prefect server and the tiny inputs ------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """params.yaml (the tiny configuration) and the tiny base model and prompts, published as artifacts."""
    from elborl.geneval.prompts import shapes_test_set, write_jsonl
    from elborl.models.shapes_model import ShapesFlowModel
    from elborl.store import ArtifactStore

    root = tmp_path_factory.mktemp("flows")
    params = {**TINY_PARAMS, "prompts": {"train_per_task": 3}, "artifacts": str(root / "artifacts")}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    ShapesFlowModel.from_config(TINY, seed=0).save_pretrained(root / "src" / "base")
    (root / "src" / "prompts").mkdir()
    write_jsonl(root / "src" / "prompts" / "train.jsonl", [{**m, "include": []} for m in METAS])
    write_jsonl(root / "src" / "prompts" / "test.jsonl", shapes_test_set()[::6])  # 12 prompts, 2 per task
    store = ArtifactStore()
    store.put_artifact(root / "src" / "base", str(root / "store" / "base"))
    store.put_artifact(root / "src" / "prompts", str(root / "store" / "prompts"))
    return {"root": root, "params": str(root / "params.yaml"), "base": str(root / "store" / "base"),
            "prompts": str(root / "store" / "prompts")}


def train(inputs, run: str, **kwargs):
    from flows.training import train_rounds

    return train_rounds(str(inputs["root"] / "store" / run), inputs["base"], inputs["prompts"], inputs["params"],
                        threads=1, **kwargs)


def registered_reward(monkeypatch, name: str, fail=None) -> list:
    """Registers `name`: shapes-GenEval that records each call and raises `fail(call_number)` when that is set."""
    from elborl import rewards
    from elborl.rewards import make_reward

    calls = []

    def build():
        base = make_reward("shapes_geneval")

        def reward(images, metas):
            calls.append(len(images))
            error = fail(len(calls)) if fail else None
            if error is not None:
                raise error
            return base(images, metas)

        return reward

    monkeypatch.setitem(rewards.REWARDS, name, build)
    return calls


def weights_digest(update_dir: Path) -> dict:
    """sha256 of the policy and optimizer state an update published (the manifest's own record)."""
    files = json.loads((update_dir / "manifest.json").read_text())["files"]
    return {f["path"]: f["sha256"] for f in files if f["path"] in ("policy.safetensors", "optimizer.safetensors")}


def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


# --- no server needed ----------------------------------------------------------------------------------------
def test_a_stage_is_one_command_line_in_every_mode():
    argv = stage_argv("score", "p.yaml", 1, run="s3://b/run", round=3, reward="shapes_geneval")
    assert argv == ["--params", "p.yaml", "--threads", "1", "--run", "s3://b/run", "--round", "3",
                    "--reward", "shapes_geneval"]
    assert stage_argv("score", "p.yaml", 1, run="r", round=0, reward_url="http://127.0.0.1:8765")[-2:] == [
        "--reward-url", "http://127.0.0.1:8765"]
    assert stage_command("score", argv)[1:3] == ["-m", "stages.score"]
    docker = stage_command("score", argv, "docker run --rm --gpus all elborl-{stage}:{version}")
    assert docker == ["docker", "run", "--rm", "--gpus", "all", f"elborl-score:{VERSION}", *argv]
    with pytest.raises(ValueError, match="unknown option"):
        stage_argv("score", "p.yaml", base_model="x")


def test_only_transient_failures_are_retried():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from elborl.store import ArtifactNotFoundError, ChecksumError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    transient = [ConnectionResetError(), TimeoutError(), EndpointConnectionError(endpoint_url="http://s3"),
                 client_error("SlowDown", 503), client_error("InternalError", 500), StageJobError("killed", True)]
    permanent = [ValueError("bad setting"), FileNotFoundError("x"), ArtifactNotFoundError("x"), ChecksumError("x"),
                 client_error("AccessDenied", 403), client_error("NoSuchBucket", 404), RuntimeError("bug"),
                 StageJobError("bad input", False)]
    assert all(is_transient(e) for e in transient)
    assert not any(is_transient(e) for e in permanent)


# --- the training flow -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rounds(prefect_server, inputs):
    """Two rounds in process mode, the first score failing once with a connection error (retried)."""
    monkeypatch = pytest.MonkeyPatch()
    calls = registered_reward(monkeypatch, "flaky", lambda n: ConnectionResetError("S3 went away") if n == 1 else None)
    started = time.perf_counter()
    state = train(inputs, "a", rounds=2, reward="flaky", return_state=True)
    seconds = time.perf_counter() - started
    monkeypatch.undo()
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id, "calls": calls,
            "seconds": seconds, "run": inputs["root"] / "store" / "a"}


def test_training_flow_runs_two_rounds_end_to_end(two_rounds, inputs):
    from prefect.artifacts import Artifact

    from elborl.config import load_params
    from elborl.rewards import make_reward
    from elborl.rounds import RunContext, run_rounds

    result, run = two_rounds["result"], two_rounds["run"]
    assert result["resumed_at"] == 0 and result["rounds_completed"] == 2
    assert len(two_rounds["calls"]) == 3  # round 0's score failed once and was retried, round 1 scored once
    for r in range(2):
        for stage in ("rollout", "score", "update"):
            assert (run / f"round-{r:05d}" / stage / "manifest.json").exists()

    print(f"\ntraining flow, 2 tiny rounds in {two_rounds['seconds']:.1f} s; orchestration overhead per round:")
    for row in result["overhead"]:
        print("  ", row)
        assert row["compute_s"] > 0 and row["wall_s"] >= row["compute_s"] and row["overhead_s"] >= 0
    assert [row["round"] for row in result["overhead"]] == [0, 1]

    # the flow's rounds are exactly the one-process rounds of elborl.rounds
    straight = RunContext(str(inputs["root"] / "store" / "straight"), load_params(inputs["params"]), inputs["base"],
                          inputs["prompts"])
    run_rounds(straight, make_reward("shapes_geneval"), rounds=2, progress=False)
    for r in range(2):
        assert weights_digest(run / f"round-{r:05d}" / "update") == \
            weights_digest(inputs["root"] / "store" / "straight" / f"round-{r:05d}" / "update")

    # logged to Prefect, with the retry; overhead and metrics published as table artifacts
    logs = "\n".join(flow_logs(two_rounds["flow_run_id"]))
    assert "python -m stages.rollout" in logs and "round 1:" in logs and "overhead" in logs
    assert "ConnectionResetError: S3 went away -> transient, retrying" in logs
    overhead = Artifact.get("train-overhead")
    assert overhead.type == "table" and [row["round"] for row in json.loads(overhead.data)] == [0, 1]
    assert [row["epoch"] for row in json.loads(Artifact.get("train-metrics").data)] == [0, 1]
    # the run report beside the run, linked and summarised as artifacts
    assert result["report"] == str(run / "report.html") and (run / "report.html").exists()
    assert (run / "report.html").as_uri() in Artifact.get("run-report").data  # a markdown link
    assert "| training reward |" in Artifact.get("run-report-summary").data


def test_container_mode_runs_each_stage_as_a_job_with_the_same_result(two_rounds, inputs):
    result = train(inputs, "container", rounds=1, mode="container")
    run = inputs["root"] / "store" / "container"
    assert result["rounds_completed"] == 1 and (run / "round-00000" / "update" / "manifest.json").exists()
    print(f"\ncontainer mode (a subprocess per stage): {result['overhead'][0]}")
    # a stage job and an in-process stage publish the same weights
    assert weights_digest(run / "round-00000" / "update") == weights_digest(two_rounds["run"] / "round-00000" / "update")


def test_a_killed_flow_resumes_at_the_next_round_without_redoing_finished_ones(two_rounds, prefect_server, inputs,
                                                                              monkeypatch):
    from elborl.config import load_params
    from elborl.rounds import RunContext

    run = inputs["root"] / "store" / "killed"
    # the flow in its own process, SIGKILLed while round 1 (the second round) is scoring
    script = textwrap.dedent(f"""
        import os, signal
        import flows
        from elborl import rewards
        def dies_in_round_1():
            base, calls = rewards.make_reward("shapes_geneval"), []
            def reward(images, metas):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return base(images, metas)
            return reward
        rewards.REWARDS["dies"] = dies_in_round_1
        from flows.training import main
        main(["--run", {str(run)!r}, "--base-model", {inputs['base']!r}, "--prompts", {inputs['prompts']!r},
              "--params", {inputs['params']!r}, "--rounds", "2", "--reward", "dies", "--threads", "1"])
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**THREADS, "PREFECT_API_URL": prefect_server})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ctx = RunContext(str(run), load_params(inputs["params"]))
    assert ctx.completed_rounds() == 1
    assert (run / "round-00001/rollout/manifest.json").exists() and not (run / "round-00001/score").exists()
    finished = {p: p.stat().st_mtime_ns for p in run.glob("round-*/*/manifest.json")}

    calls = registered_reward(monkeypatch, "counted")
    state = train(inputs, "killed", rounds=2, reward="counted", return_state=True)
    result = state.result()
    assert result["resumed_at"] == 1 and result["rounds_completed"] == 2
    assert len(calls) == 1  # only round 1 was scored again; round 0 and round 1's rollout were not redone
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())
    logs = "\n".join(flow_logs(state.state_details.flow_run_id))
    assert "1 round(s) already published, resuming at round 1" in logs
    assert "round 1 rollout (already published, skipped)" in logs
    # killed and resumed, the run ends where the uninterrupted one did
    assert weights_digest(run / "round-00001" / "update") == weights_digest(two_rounds["run"] / "round-00001" / "update")


def test_the_score_task_can_call_a_reward_service(prefect_server, inputs, monkeypatch):
    from elborl.rewards import make_reward
    from elborl.rewards.service import RewardService, ServiceConfig, create_app, serve_in_background
    from elborl.rounds import _read_rollout, read_images

    token = "flow-test-token-0123"
    service = RewardService(ServiceConfig(("shapes_geneval",), token=token))
    monkeypatch.setenv("ELBORL_REWARD_TOKEN", token)  # the token travels in the environment only
    with serve_in_background(create_app(service)) as url:
        state = train(inputs, "served", rounds=1, reward_url=url, return_state=True)
    service.close()
    assert state.result()["rounds_completed"] == 1
    round_dir = inputs["root"] / "store" / "served" / "round-00000"
    ro, rows = _read_rollout(round_dir / "rollout")
    assert service.stats["scored_images"] == len(rows)  # scored by the service, the same as in process
    rewards = json.loads((round_dir / "score" / "rewards.json").read_text())["rewards"]
    assert rewards == make_reward("shapes_geneval")(read_images(round_dir / "rollout", len(rows)), ro.metas).tolist()
    logs = "\n".join(flow_logs(state.state_details.flow_run_id))
    assert f"--reward-url {url}" in logs and token not in logs


def test_a_non_transient_failure_fails_the_flow_without_retry(prefect_server, inputs, monkeypatch):
    calls = registered_reward(monkeypatch, "broken", lambda n: ValueError("reward misconfigured"))
    state = train(inputs, "broken", rounds=1, reward="broken", return_state=True)
    assert state.is_failed() and len(calls) == 1
    assert "ValueError: reward misconfigured -> not transient, no retry" in "\n".join(
        flow_logs(state.state_details.flow_run_id))


# --- deployments ------------------------------------------------------------------------------------------------
def test_a_served_deployment_picks_up_a_run_of_its_schedule(prefect_server, inputs):
    """`serve` registers a cron-scheduled deployment; the run its schedule produces is picked up and completes.

    The ephemeral test server runs no scheduler service, so the test asks the server to schedule the
    deployment (POST /deployments/{id}/schedule, the scheduler's own function) over the last minute."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    run = inputs["root"] / "store" / "served"
    script = textwrap.dedent(f"""
        from prefect import serve
        from flows.training import train_rounds
        serve(train_rounds.to_deployment(name="tiny-every-minute", cron="* * * * *", parameters=dict(
            run={str(run)!r}, base_model={inputs['base']!r}, prompts={inputs['prompts']!r},
            params_path={inputs['params']!r}, rounds=1, threads=1)))
    """)
    env = {**THREADS, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    deployment = client.read_deployment_by_name("train-rounds/tiny-every-minute")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert server.poll() is None and time.monotonic() < deadline, "serve did not register"
                    time.sleep(0.5)
            assert deployment.schedules and deployment.schedules[0].schedule.cron == "* * * * *"
            now = datetime.now(timezone.utc)
            client.request("POST", "/deployments/{id}/schedule", path_params={"id": deployment.id},
                           json={"start_time": (now - timedelta(seconds=60)).isoformat(), "end_time": now.isoformat(),
                                 "max_runs": 1})
            deadline = time.monotonic() + 150
            while True:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                if runs and runs[0].state.is_final():
                    break
                assert server.poll() is None and time.monotonic() < deadline, f"no run completed: {runs}"
                time.sleep(1)
        assert len(runs) == 1 and runs[0].auto_scheduled and runs[0].state.is_completed(), runs[0].state
        assert (run / "round-00000" / "update" / "manifest.json").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def load_prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def rendered_job(template: dict, job_variables: dict) -> dict:
    """A work pool's job configuration with a deployment's job variables filled in (as its worker renders it)."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **job_variables})


def test_prefect_yaml_deployments_resolve_to_flows_with_valid_parameters():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = load_prefect_yaml()
    pools = {"elborl-local": "process", "elborl-docker-gpu": "docker", "elborl-k8s-gpu": "kubernetes"}
    templates = {"docker": json.loads((ROOT / "containers/work-pools/docker-gpu.json").read_text()),
                 "kubernetes": json.loads((ROOT / "containers/work-pools/kubernetes-gpu.json").read_text())}
    seen = set()
    for deployment in config["deployments"]:
        name = deployment["name"]
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        flow.validate_parameters(deployment["parameters"])  # every parameter exists and has the right type
        assert deployment["schedules"] and all(CronSchedule(cron=s["cron"], timezone=s["timezone"])
                                                for s in deployment["schedules"]), name
        kind = pools[deployment["work_pool"]["name"]]
        seen.add(kind)
        variables = deployment["work_pool"].get("job_variables", {})
        if kind == "process":
            continue
        assert set(variables) <= set(templates[kind]["variables"]["properties"]), name  # the pool knows them
        assert variables["image"].endswith(f"elborl-base:{VERSION}"), name
        assert deployment["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
        job = rendered_job(templates[kind], variables)  # what the pool's worker receives
        if kind == "docker":
            assert job["image"] == variables["image"] and job["volumes"] == variables["volumes"]
            assert job["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]], name
        else:
            container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
            assert container["image"] == variables["image"] and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert seen == {"process", "docker", "kubernetes"}
    assert {"train-rounds", "evaluate-models", "campaign"} <= {
        load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name for d in config["deployments"]}


def test_prefect_deploy_registers_every_deployment_with_its_schedule(prefect_server):
    """`prefect deploy --all` against the server, with the three work pools created from their templates; the
    server checks each deployment's job variables against its pool's template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        for name, kind, template in (("elborl-local", "process", None),
                                     ("elborl-docker-gpu", "docker", "containers/work-pools/docker-gpu.json"),
                                     ("elborl-k8s-gpu", "kubernetes", "containers/work-pools/kubernetes-gpu.json")):
            pool = WorkPoolCreate(name=name, type=kind,
                                  **({"base_job_template": json.loads((ROOT / template).read_text())} if template else {}))
            client.create_work_pool(pool, overwrite=True)
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**THREADS, "PREFECT_API_URL": prefect_server})
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    with get_client(sync_client=True) as client:
        for spec in load_prefect_yaml()["deployments"]:
            flow_name = {"campaign.py": "campaign", "training.py": "train-rounds", "evaluation.py": "evaluate-models"}[
                spec["entrypoint"].split("/")[1].split(":")[0]]
            deployment = client.read_deployment_by_name(f"{flow_name}/{spec['name']}")
            assert deployment.work_pool_name == spec["work_pool"]["name"]
            assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in spec["schedules"]]
            assert deployment.parameters == spec["parameters"]


# --- the campaign ---------------------------------------------------------------------------------------------
def test_campaign_chains_prepare_pretrain_train_evaluate_and_publishes_metrics(prefect_server, inputs):
    from prefect.artifacts import Artifact

    from flows.campaign import campaign

    root = inputs["root"] / "campaign"
    result = campaign(root=str(root), params_path=inputs["params"], rounds=1, threads=1,
                      pretrain_cache=str(inputs["root"] / "pretrain-cache"))
    for artifact in ("prompts", "base", "runs/run/round-00000/update", "eval/run/base", "eval/run/round-00000"):
        assert (root / artifact / "manifest.json").exists(), artifact
    assert set(result["scores"]) == {"base", "round-00000"} and result["training"]["rounds_completed"] == 1
    scores = json.loads(Artifact.get("eval-scores").data)
    assert [row["task"] for row in scores][-2:] == ["overall", "mean_reward"] and set(scores[0]) == {
        "task", "base", "round-00000"}
    assert "data:image/png;base64," in Artifact.get("eval-grids").data
    assert "overall" in Artifact.get("campaign-summary").data
    assert [row["epoch"] for row in json.loads(Artifact.get("campaign-training-curve").data)] == [0]
    # the run report compares the base model with the final policy
    assert result["report"] == str(root / "runs" / "run" / "report.html")
    assert "| held-out score (strict) |" in Artifact.get("run-report-summary").data
    assert "<h2>Samples on the same prompts and seeds</h2>" in Path(result["report"]).read_text()


def test_campaign_runs_the_tiny_sd3_with_every_stage_as_its_own_job(prefect_server, inputs, tmp_path):
    """The production code path (SD3 in latent space) through the Prefect campaign, each stage a job of two
    data-parallel processes: the multi-GPU deployment's launcher (`accelerate launch --multi_gpu ...
    -m stages.{stage}` in prefect.yaml), here torchrun over gloo."""
    from elborl.store import ArtifactStore
    from flows.campaign import campaign
    from stages.pretrain import TINY_SD3, take_base_model
    from test_sd3_pipeline import SETTINGS

    (tmp_path / "sd3").mkdir()
    take_base_model(TINY_SD3, tmp_path / "sd3")
    base = str(tmp_path / "store" / "sd3")
    ArtifactStore().put_artifact(tmp_path / "sd3", base)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(SETTINGS))
    root = tmp_path / "campaign"
    launcher = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone --nproc_per_node 2 -m -- " \
               "stages.{stage}"
    result = campaign(root=str(root), params_path=str(params), rounds=1, threads=1, base_model=base, mode="container",
                      prompts=inputs["prompts"], launcher=launcher)
    assert result["base_model"] == base and result["prompts"] == inputs["prompts"] and not (root / "prompts").exists()
    assert result["training"]["rounds_completed"] == 1
    assert (root / "runs/run/round-00000/update/manifest.json").exists()
    assert set(result["scores"]) == {"base", "round-00000"}
    tests = len((Path(inputs["prompts"]) / "test.jsonl").read_text().splitlines())
    for name in ("base", "round-00000"):  # both processes' shares of the images, gathered
        assert len((root / "eval/run" / name / "images.jsonl").read_text().splitlines()) == tests, name
