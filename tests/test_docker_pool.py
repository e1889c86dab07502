"""A Prefect docker work pool runs the training flow in the project's image, artifacts in the real S3 server.

A docker worker (prefect-docker) talks to podman's Docker-compatible socket; each flow run is a container from
elborl-base with the pool's template (containers/work-pools/docker-gpu.json), every stage a job inside it (mode
container). The worker and the flow's container are killed while round 1 is being scored, as when a node goes
away; a worker started again runs the deployment again, which resumes at round 1 without redoing or losing
anything, and the run ends with the weights of an uninterrupted one.

Needs podman and the base image (containers/engine.sh, containers/build.sh); skipped without them unless
ELBORL_CONTAINER_TESTS=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_container_images import REQUIRED, VERSION, _image
from test_flows import ROOT, flow_logs
from test_embedded_job import TINY_PARAMS
from test_rl_loop import METAS
from conftest import TINY

BUCKET = "pool"
POOL = "elborl-docker-test"


@pytest.fixture
def podman_socket(tmp_path):
    """`podman system service` on a socket of its own: the Docker API the worker's docker SDK speaks."""
    import shutil

    if shutil.which("podman") is None:
        (pytest.fail if REQUIRED else pytest.skip)("no podman (containers/engine.sh)")
    socket = tmp_path / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import docker

    deadline = time.monotonic() + 30
    while True:
        try:
            docker.DockerClient(base_url=f"unix://{socket}").ping()
            break
        except Exception:  # noqa: BLE001 - not listening yet
            assert service.poll() is None and time.monotonic() < deadline, service.stderr.read()
            time.sleep(0.3)
    yield f"unix://{socket}"
    for container in docker.DockerClient(base_url=f"unix://{socket}").containers.list(
            all=True, filters={"label": f"io.prefect.work-pool-name={POOL}"}):
        container.remove(force=True)  # the flow runs' containers (kept for inspection: auto_remove is off)
    service.terminate()
    service.wait(timeout=30)


def _published_inputs(s3_server, root: Path) -> dict:
    """The tiny base model and prompts published to S3, and params.yaml on the host (mounted into the job)."""
    from elborl.geneval.prompts import shapes_test_set, write_jsonl
    from elborl.models.shapes_model import ShapesFlowModel
    from elborl.store import ArtifactStore

    s3_server.client().create_bucket(Bucket=BUCKET)
    params = {**TINY_PARAMS, "prompts": {"train_per_task": 3}, "artifacts": "/tmp/elborl-artifacts"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    ShapesFlowModel.from_config(TINY, seed=0).save_pretrained(root / "base")
    (root / "prompts").mkdir()
    write_jsonl(root / "prompts" / "train.jsonl", [{**m, "include": []} for m in METAS])
    write_jsonl(root / "prompts" / "test.jsonl", shapes_test_set()[::6])
    store = ArtifactStore()
    store.put_artifact(root / "base", f"s3://{BUCKET}/base")
    store.put_artifact(root / "prompts", f"s3://{BUCKET}/prompts")
    return {"params": root / "params.yaml", "base": f"s3://{BUCKET}/base", "prompts": f"s3://{BUCKET}/prompts"}


def _deployment(client, inputs: dict, s3_env: dict) -> str:
    """The pool (the project's docker template) and a deployment of the training flow on it, as prefect.yaml's
    docker deployments are, without a GPU and with the host's network (the S3 and Prefect servers are local)."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "containers/work-pools/docker-gpu.json").read_text())
    client.create_work_pool(WorkPoolCreate(name=POOL, type="docker", base_job_template=template), overwrite=True)
    flow_id = client.create_flow_from_name("train-rounds")
    return client.create_deployment(
        flow_id=flow_id, name="tiny-two-rounds", entrypoint="flows/training.py:train_rounds", work_pool_name=POOL,
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}],
        job_variables={"image": f"elborl-base:{VERSION}", "image_pull_policy": "Never", "network_mode": "host",
                       "auto_remove": False, "volumes": [f"{inputs['params']}:/etc/elborl/params.yaml:ro"],
                       "env": {**s3_env, "OMP_NUM_THREADS": "1"}},
        parameters={"run": f"s3://{BUCKET}/run", "base_model": inputs["base"], "prompts": inputs["prompts"],
                    "params_path": "/etc/elborl/params.yaml", "rounds": 2, "mode": "container", "threads": 1})


def _start_worker(api_url: str, docker_host: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url, "DOCKER_HOST": docker_host,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "docker"],
                            cwd=ROOT, env=env, start_new_session=True, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _manifests(client) -> dict[str, str]:
    """{key: ETag} of every manifest under the run."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="run/")
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", []) if item["Key"].endswith("manifest.json")}


def _wait(condition, seconds: float, what: str, worker: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while not condition():
        assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _kill(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_a_docker_pool_runs_two_rounds_in_the_image_and_resumes_after_the_worker_is_killed(
        s3_env, prefect_server, podman_socket, tmp_path):
    import docker
    from prefect.client.orchestration import get_client

    from elborl.config import load_params
    from elborl.rewards import make_reward
    from elborl.rounds import RunContext, run_rounds

    _image("podman", "base")
    s3 = s3_env.client()
    inputs = _published_inputs(s3_env, tmp_path)
    engine = docker.DockerClient(base_url=podman_socket)
    log = tmp_path / "worker.log"
    with get_client(sync_client=True) as client:
        deployment_id = _deployment(client, inputs, s3_env.env())
        first = client.create_flow_run_from_deployment(deployment_id)
        worker = _start_worker(prefect_server, podman_socket, log)
        try:
            # killed while round 1 is being scored: round 1's rollout is out, its score not yet
            _wait(lambda: "run/round-00001/rollout/manifest.json" in _manifests(s3), 600, "round 1's rollout",
                  worker, log)
            _kill(worker)
            containers = engine.containers.list(filters={"label": f"io.prefect.flow-run-id={first.id}"})
            assert len(containers) == 1, containers
            containers[0].kill()
            before = _manifests(s3)
            assert "run/round-00000/update/manifest.json" in before
            assert "run/round-00001/score/manifest.json" not in before

            second = client.create_flow_run_from_deployment(deployment_id)
            worker = _start_worker(prefect_server, podman_socket, log)
            _wait(lambda: client.read_flow_run(second.id).state.is_final(), 600, "the second flow run", worker, log)
        finally:
            _kill(worker)
        state = client.read_flow_run(second.id).state
        assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
        container = engine.containers.list(all=True, filters={"label": f"io.prefect.flow-run-id={second.id}"})[0]
        assert container.attrs["Config"]["Image"].endswith(f"elborl-base:{VERSION}")
        assert container.attrs["Config"]["User"] == "1000:1000"

    after = _manifests(s3)
    assert all(after[key] == etag for key, etag in before.items()), "a finished stage was published again"
    assert {f"run/round-0000{r}/{stage}/manifest.json" for r in (0, 1) for stage in ("rollout", "score", "update")} \
        <= after.keys()
    logs = "\n".join(flow_logs(second.id))
    assert "1 round(s) already published, resuming at round 1" in logs
    assert "round 1 rollout (already published, skipped)" in logs and "python -m stages.score" in logs

    # nothing lost: the killed-and-resumed run ends with the weights of an uninterrupted one, in this process
    straight = f"s3://{BUCKET}/straight"
    run_rounds(RunContext(straight, load_params(inputs["params"]), inputs["base"], inputs["prompts"],
                          cache=tmp_path / "cache"), make_reward("shapes_geneval"), rounds=2, progress=False)

    def weights(run: str) -> dict:
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{run}/round-00001/update/manifest.json")["Body"].read())
        return {f["path"]: f["sha256"] for f in manifest["files"] if f["path"].endswith(".safetensors")}

    assert weights("run") == weights("straight") and weights("run")
    print(f"\ndocker pool: flow runs {first.id} (killed) and {second.id} (resumed) in elborl-base:{VERSION}")
