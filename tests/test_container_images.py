"""The built images run: every pipeline stage as its own container (containers/<stage>.Dockerfile) against the real
S3 server publishes the same bytes as the same stage run in-process, and the images hold no credentials, caches or
root user.

Needs a container engine and the images (containers/engine.sh, containers/build.sh). Without them these tests are
skipped, unless ELBORL_CONTAINER_TESTS=1, which makes a missing engine or image a failure (CI sets it where it
builds the images).
"""

from __future__ import annotations

import json
import os
import shutil
import re
import secrets
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_embedded_job import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
STAGES = ("prepare_prompts", "pretrain", "rollout", "score", "update", "evaluate")
REQUIRED = os.environ.get("ELBORL_CONTAINER_TESTS") == "1"


def _engine() -> str:
    engine = os.environ.get("ENGINE") or next((name for name in ("podman", "docker") if shutil.which(name)), None)
    if engine is None:
        (pytest.fail if REQUIRED else pytest.skip)("no container engine (containers/engine.sh installs podman)")
    return engine


def _image(engine: str, name: str) -> str:
    image = f"elborl-{name}:{VERSION}"
    if subprocess.run([engine, "image", "inspect", image], capture_output=True).returncode != 0:
        (pytest.fail if REQUIRED else pytest.skip)(f"image {image} is not built (containers/build.sh)")
    return image


def _chain(store: str, cache: Path) -> list[tuple[str, list[str], str]]:
    """(stage, arguments, the artifact it publishes) for one round of the pipeline with every artifact under `store`."""
    prompts, base, run = f"{store}/prompts", f"{store}/base", f"{store}/run"
    return [
        ("prepare_prompts", ["--out", prompts], prompts),
        ("pretrain", ["--out", base, "--cache", str(cache)], base),
        ("rollout", ["--run", run, "--round", "0", "--base-model", base, "--prompts", prompts],
         f"{run}/round-00000/rollout"),
        ("score", ["--run", run, "--round", "0"], f"{run}/round-00000/score"),
        ("update", ["--run", run, "--round", "0", "--base-model", base, "--cache", str(cache)],
         f"{run}/round-00000/update"),
        ("evaluate", ["--model", base, "--policy-state", f"{run}/round-00000/update", "--prompts", prompts,
                      "--out", f"{store}/eval", "--cache", str(cache)], f"{store}/eval"),
    ]


def _run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{' '.join(command[:8])} ...\n{result.stderr[-3000:]}"
    return time.perf_counter() - start


def _object_json(client, uri: str, name: str):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return json.loads(client.get_object(Bucket=bucket, Key=f"{key}/{name}")["Body"].read())


def _published(client, uri: str) -> dict:
    return _object_json(client, uri, "manifest.json")


def _without_times(value):
    """`value` without the wall-clock durations a stage records (keys naming seconds)."""
    if isinstance(value, dict):
        return {key: _without_times(item) for key, item in value.items() if "seconds" not in key}
    if isinstance(value, list):
        return [_without_times(item) for item in value]
    return value


def test_every_stage_container_publishes_the_bytes_of_the_stage_in_process(s3_server, tmp_path):
    engine = _engine()
    images = {stage: _image(engine, stage) for stage in STAGES}
    client = s3_server.client()
    client.create_bucket(Bucket="parity")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    # The stages' S3 credentials come from the caller's environment: `-e NAME` passes a name, never a value, so
    # none lands in a command line, an image or the engine's record of the container.
    env = {**os.environ, **s3_server.env()}
    passed = [flag for name in s3_server.env() for flag in ("-e", name)]

    rows = []
    in_process = _chain("s3://parity/in-process", tmp_path / "cache")
    in_container = _chain("s3://parity/container", Path("/tmp/elborl-cache"))
    for (stage, argv, uri), (_, container_argv, container_uri) in zip(in_process, in_container):
        local_seconds = _run([sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--threads", "1",
                              *argv], env)
        container_seconds = _run([engine, "run", "--rm", "--network", "host", *passed,
                                  "-v", f"{params}:/etc/elborl/params.yaml:ro", images[stage],
                                  "--params", "/etc/elborl/params.yaml", "--threads", "1", *container_argv], env)
        local, contained = _published(client, uri), _published(client, container_uri)
        assert [f["path"] for f in contained["files"]] == [f["path"] for f in local["files"]], stage
        differing = [ours["path"] for ours, theirs in zip(local["files"], contained["files"]) if ours != theirs]
        # only a record of wall-clock time may differ, and only in its times
        timed = [path for path in differing if path.endswith(".json") and _without_times(
            _object_json(client, uri, path)) == _without_times(_object_json(client, container_uri, path))]
        assert differing == timed, f"{stage}: the container published other bytes in {differing}"
        # the manifest's record of its inputs names the chain's own prefix
        relocated = json.loads(json.dumps(contained["meta"]).replace("s3://parity/container/", "s3://parity/in-process/"))
        assert _without_times(relocated) == _without_times(local["meta"]), stage
        rows.append((stage, len(local["files"]), timed, local_seconds, container_seconds))
    print("\nstage            files  in-process s  container s  differing only in wall-clock times")
    for stage, files, timed, local_seconds, container_seconds in rows:
        print(f"{stage:<16} {files:>5}  {local_seconds:>12.1f}  {container_seconds:>11.1f}  {', '.join(timed) or '-'}")
    assert sum(len(timed) for *_, timed, _, _ in rows) <= 1  # pretrain_log.json's "seconds"


# --- what the images hold --------------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"(?i)secret|token|passw|credential|access_key|api_key|private_key")
# Paths no layer may hold: credentials of the tools in the image, and the caches a build leaves behind.
FORBIDDEN_PATH = re.compile(
    r"(^|/)(\.aws|\.netrc|\.git-credentials|\.pypirc|\.docker/config\.json|\.ssh|\.huggingface|\.cache)(/|$)"
    r"|^var/lib/apt/lists/[^/]+_(Packages|Sources|Release|InRelease)(\.|$)|^var/cache/apt/archives/.+\.deb$"
    r"|^(root|home/[^/]+)/\.(python_history|bash_history|wget-hsts)$|^tmp/.+")


def _layer_paths(engine: str, images: list[str]):
    """(layer, path) of every file in every layer of `images` (shared layers once), from the engine's archive."""
    options = ["--multi-image-archive", "--format", "docker-archive"] if engine == "podman" else []
    with subprocess.Popen([engine, "save", *options, *images], stdout=subprocess.PIPE) as save:
        with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
            for member in archive:
                if not member.isfile() or not member.name.endswith(".tar"):
                    continue
                with tarfile.open(fileobj=archive.extractfile(member), mode="r|") as layer:
                    for entry in layer:
                        yield member.name, entry.name.removeprefix("./")
    assert save.returncode == 0, f"{engine} save failed"


def test_the_images_run_as_uid_1000_and_no_layer_holds_credentials_or_caches():
    engine = _engine()
    images = [_image(engine, name) for name in ("base", *STAGES)]
    for image in images:
        config = json.loads(subprocess.run([engine, "image", "inspect", image], capture_output=True, text=True,
                                           check=True).stdout)[0]["Config"]
        assert config["User"] == "1000:1000", f"{image}: USER {config.get('User')!r}"
        secret_env = [item for item in config.get("Env", []) if SECRET_NAME.search(item.partition("=")[0])]
        assert not secret_env, f"{image}: environment {secret_env}"
        history = subprocess.run([engine, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                                 capture_output=True, text=True, check=True).stdout
        assert not SECRET_NAME.search(history), f"{image}: a build step names a secret:\n{history}"
    whoami = subprocess.run([engine, "run", "--rm", "--entrypoint", "id", images[0], "-u"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert whoami == "1000"

    layers, offending = set(), []
    for layer, path in _layer_paths(engine, images):
        layers.add(layer)
        if FORBIDDEN_PATH.search(path):
            offending.append(f"{layer[:19]}: {path}")
    assert len(layers) >= 5, f"read {len(layers)} layers"
    assert not offending, "layers hold credentials or caches:\n" + "\n".join(offending[:40])


def test_the_score_image_serves_rewards_to_a_score_stage_in_another_container(s3_server, tmp_path):
    """The reward service in the score image, on a container network of its own, answers the score stage
    running in a second container over HTTP, with a token; the rewards equal the score stage's own."""
    engine = _engine()
    image = _image(engine, "score")
    client = s3_server.client()
    client.create_bucket(Bucket="service")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    token = secrets.token_urlsafe(24)
    env = {**os.environ, **s3_server.env(), "ELBORL_REWARD_TOKEN": token}
    local = ["--params", str(params), "--threads", "1"]
    runs = {"in-process": "s3://service/local-run", "container": "s3://service/container-run"}
    prompts, base = "s3://service/prompts", "s3://service/base"
    _run([sys.executable, "-m", "stages.prepare_prompts", *local, "--out", prompts], env)
    _run([sys.executable, "-m", "stages.pretrain", *local, "--out", base, "--cache", str(tmp_path / "cache")], env)
    for run in runs.values():
        _run([sys.executable, "-m", "stages.rollout", *local, "--run", run, "--round", "0", "--base-model", base,
              "--prompts", prompts], env)
    _run([sys.executable, "-m", "stages.score", *local, "--run", runs["in-process"], "--round", "0"], env)

    network, name = f"elborl-test-{secrets.token_hex(4)}", f"elborl-reward-{secrets.token_hex(4)}"
    subprocess.run([engine, "network", "create", network], check=True, capture_output=True)
    try:
        subprocess.run([engine, "run", "-d", "--rm", "--name", name, "--network", network, "-e", "ELBORL_REWARD_TOKEN",
                        "--entrypoint", "python", image, "-m", "elborl.rewards.service", "--host", "0.0.0.0",
                        "--port", "8765", "--rewards", "shapes_geneval", "--preload", "--threads", "1"],
                       check=True, capture_output=True, env=env)
        address = subprocess.run([engine, "inspect", "--format",
                                  f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', name],
                                 check=True, capture_output=True, text=True).stdout.strip()
        url = f"http://{address}:8765"
        deadline = time.monotonic() + 120
        while True:  # the service is up once it answers its health check (no token needed there)
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, subprocess.run([engine, "logs", name], capture_output=True,
                                                               text=True).stderr[-3000:]
            time.sleep(0.5)
        # the score stage in its own container (host network: S3 on loopback; the service on the container network)
        _run([engine, "run", "--rm", "--network", "host", *[f for n in (*s3_server.env(), "ELBORL_REWARD_TOKEN")
                                                         for f in ("-e", n)],
              "-v", f"{params}:/etc/elborl/params.yaml:ro", image, "--params", "/etc/elborl/params.yaml",
              "--threads", "1", "--run", runs["container"], "--round", "0", "--reward-url", url], env)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            health = json.loads(response.read())
        logs = subprocess.run([engine, "logs", name], capture_output=True, text=True)
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        subprocess.run([engine, "network", "rm", "-f", network], capture_output=True)

    rewards = {where: _object_json(client, f"{run}/round-00000/score", "rewards.json") for where, run in runs.items()}
    assert rewards["container"]["rewards"] == rewards["in-process"]["rewards"] and rewards["container"]["rewards"]
    # the container's rewards came from the service: it scored every image, behind the token, and logged no token
    assert health["auth"] and health["stats"]["scored_images"] == len(rewards["container"]["rewards"])
    assert health["stats"]["errors"] == 0 and token not in logs.stdout + logs.stderr
