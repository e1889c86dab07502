"""Faults injected: a run SIGKILLed at random points of rollout, score, update and publish, then resumed.

Each trial runs two RL rounds (the tiny configuration, artifacts on the real S3 server) in a forked process
that kills itself at one point drawn at random: the c-th call of the sampler (rollout), of the reward (score), of
the optimizer's step (update) or of an S3 upload (publish, between the files of an artifact and its manifest),
or the parent kills it after a random delay. After the kill, every artifact that is visible (has a manifest)
verifies in full and the completed rounds are contiguous; a second process resumes the run, republishes
nothing, and ends with the weights of an uninterrupted run, bit for bit.

ELBORL_FAULT_TRIALS (default 20) and ELBORL_FAULT_SEED (default: drawn, printed) choose the trials.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from elborl.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("ELBORL_FAULT_TRIALS", "20"))
KINDS = ("rollout", "score", "update", "publish", "time")
ROUNDS = 2

def install_kill_points(kill_at: dict | None) -> tuple[dict, Callable]:
    """Counts this process's calls of the sampler (rollout), the optimizer's step (update) and S3 uploads (publish)
    and SIGKILLs it on `kill_at` = {"kind": ..., "call": c}; returns the counts and `counted(kind, function)`, which
    makes `function` a kill point of that kind too (the reward: score)."""
    import boto3.s3.transfer
    import torch

    from elborl import rl

    calls = {}

    def counted(kind, function):
        def wrapper(*args, **kwargs):
            calls[kind] = calls.get(kind, 0) + 1
            if kill_at and kill_at["kind"] == kind and calls[kind] == kill_at["call"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    rl.sample = counted("rollout", rl.sample)
    torch.optim.AdamW.step = counted("update", torch.optim.AdamW.step)
    boto3.s3.transfer.S3Transfer.upload_file = counted("publish", boto3.s3.transfer.S3Transfer.upload_file)
    return calls, counted


def _run(run: str, inputs: dict, cache: Path, kill_at: dict | None, counts_out: Path | None) -> None:
    """Two rounds of the run at `run`, in a forked process (the imports are the parent's), with the kill points
    of `install_kill_points`; `counts_out` receives the calls of each kind."""
    from elborl.config import Params
    from elborl.rounds import RunContext, run_rounds
    from test_rl_loop import brightness, small_config
    from test_rounds import POLICY

    calls, counted = install_kill_points(kill_at)
    ctx = RunContext(run, Params(policy=POLICY, rl=small_config(epochs=ROUNDS)), inputs["base"], inputs["prompts"],
                     cache=cache, log=lambda line: None)
    run_rounds(ctx, counted("score", brightness), rounds=ROUNDS, progress=False)
    if counts_out is not None:
        counts_out.write_text(json.dumps(calls))


def _child(run: str, inputs: dict, cache: Path, kill_at: dict | None = None, delay: float | None = None,
           counts_out: Path | None = None) -> int:
    """Runs `_run` in a forked process (killed by this one after `delay` seconds if given); its exit code."""
    process = multiprocessing.get_context("fork").Process(target=_run, args=(run, inputs, cache, kill_at, counts_out))
    process.start()
    process.join(timeout=delay if delay is not None else 600)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL if delay is not None else signal.SIGTERM)
        process.join()
    return process.exitcode


def _manifests(client, bucket: str, prefix: str) -> dict[str, str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", []) if o["Key"].endswith("/manifest.json")}


def _weights(client, bucket: str, run: str) -> dict:
    key = f"{run}/round-{ROUNDS - 1:05d}/update/manifest.json"
    files = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["files"]
    return {f["path"]: f["sha256"] for f in files}


def _check_visible(store: ArtifactStore, bucket: str, manifests: dict, scratch: Path) -> list[str]:
    """Every visible artifact verifies in full; the rounds completed are contiguous. Returns the stages seen."""
    stages = []
    for key in sorted(manifests):
        artifact = key.removesuffix("/manifest.json")
        store.get_artifact(f"s3://{bucket}/{artifact}", scratch / artifact.replace("/", "_"))  # checksums
        stages.append(artifact.split("/", 2)[-1])
    updates = sorted(int(s.split("/")[0].removeprefix("round-")) for s in stages if s.endswith("/update"))
    assert updates == list(range(len(updates))), f"rounds completed out of order: {updates}"
    return stages


def test_random_sigkills_resume_to_the_uninterrupted_weights_with_nothing_lost_or_redone(s3_env, tmp_path):
    from test_rounds import published_inputs

    seed = int(os.environ.get("ELBORL_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    print(f"\nfault trials: {TRIALS}, seed {seed} (ELBORL_FAULT_SEED={seed} replays them)")
    draw = random.Random(seed)
    bucket = s3_env.create_bucket()
    client, store = s3_env.client(), ArtifactStore()
    base, prompts = published_inputs(tmp_path, f"s3://{bucket}")
    inputs = {"base": base, "prompts": prompts}

    start = time.perf_counter()
    assert _child(f"s3://{bucket}/reference", inputs, tmp_path / "cache", counts_out=tmp_path / "counts.json") == 0
    seconds = time.perf_counter() - start
    counts = json.loads((tmp_path / "counts.json").read_text())
    expected = _weights(client, bucket, "reference")
    print(f"uninterrupted run: {seconds:.1f} s, calls {counts}")

    rows = []
    for trial in range(TRIALS):
        kind = KINDS[trial % len(KINDS)] if trial < len(KINDS) else draw.choice(KINDS)
        run, cache = f"trial-{trial:02d}", tmp_path / f"cache-{trial}"
        if kind == "time":
            kill_at, delay = None, draw.uniform(0.0, seconds)
            point = f"{delay:.1f} s"
        else:
            kill_at, delay = {"kind": kind, "call": draw.randint(1, counts[kind])}, None
            point = kill_at["call"]
        code = _child(f"s3://{bucket}/{run}", inputs, cache, kill_at, delay)
        before = _manifests(client, bucket, f"{run}/")
        seen = _check_visible(store, bucket, before, tmp_path / f"verified-{trial}")
        assert _child(f"s3://{bucket}/{run}", inputs, cache) == 0, f"trial {trial} ({kind} {point}) did not resume"
        after = _manifests(client, bucket, f"{run}/")
        assert all(after[key] == etag for key, etag in before.items()), f"trial {trial}: a stage was republished"
        assert len(after) == 3 * ROUNDS, f"trial {trial}: {sorted(after)}"
        identical = _weights(client, bucket, run) == expected
        rows.append((trial, kind, point, code, len(seen), identical))
        assert identical, f"trial {trial} ({kind} {point}): the resumed run ended with other weights"

    print("trial  kill point        exit  artifacts visible  resumed to the same weights")
    for trial, kind, point, code, visible, identical in rows:
        print(f"{trial:>5}  {kind:<8} {point!s:>8}  {code:>4}  {visible:>17}  {identical}")
    killed_runs = sum(code == -signal.SIGKILL for *_, code, _, _ in rows)
    print(f"{len(rows)} trials ({killed_runs} killed mid-run), all resumed bit-identical; 0 rounds lost, "
          f"0 republished, 0 half-published artifacts visible")
    assert killed_runs >= TRIALS * 0.8  # most kill points fall inside the run (a delay may outlast it)


# --- the S3 server crashes -------------------------------------------------------------------------------------
MiB = 1024 * 1024


def _restart_after(gateway, seconds: float, outages: list) -> None:
    """Kills the gateway now and starts it again `seconds` later, in the background."""
    started = time.perf_counter()
    gateway.kill()

    def restart():
        time.sleep(seconds)
        gateway.start()
        outages.append(time.perf_counter() - started)

    threading.Thread(target=restart, daemon=True).start()


def _kill_once_after(store: ArtifactStore, operation: str, gateway, seconds: float, outages: list) -> None:
    """Kills the server right after the first `operation` call (e.g. the first part of a multipart upload)."""
    def handler(**_):
        if not outages and not getattr(handler, "fired", False):
            handler.fired = True
            _restart_after(gateway, seconds, outages)

    store.s3.meta.events.register(f"after-call.s3.{operation}", handler)


def test_the_s3_server_killed_mid_upload_and_mid_download_is_retried_and_nothing_partial_is_seen(tmp_path,
                                                                                                 monkeypatch):
    import torch
    from safetensors.torch import save_file

    from s3server import run_restartable_s3_server

    source = tmp_path / "source"
    source.mkdir()
    save_file({"w": torch.rand(6 * MiB, generator=torch.Generator().manual_seed(0))},
              source / "weights.safetensors")  # 24 MiB: five parts of 5 MiB
    (source / "config.json").write_text('{"layers": 2}')
    with run_restartable_s3_server(tmp_path / "s3") as (server, gateway):
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        bucket = server.create_bucket()
        uri = f"s3://{bucket}/model"

        # killed after the first part went up, back 2 s later: botocore's retries with backoff finish the upload
        uploads, outages = ArtifactStore(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB), []
        _kill_once_after(uploads, "UploadPart", gateway, 2.0, outages)
        start = time.perf_counter()
        manifest = uploads.put_artifact(source, uri)
        upload_seconds = time.perf_counter() - start
        assert len(outages) == 1, "the server was not killed mid-upload"

        # killed as the first ranged GET answered (its body cut off): the download is retried and verified
        downloads, outages = ArtifactStore(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB), []
        _kill_once_after(downloads, "GetObject", gateway, 2.0, outages)
        start = time.perf_counter()
        downloads.get_artifact(uri, tmp_path / "fetched")  # checks every file against the manifest
        download_seconds = time.perf_counter() - start
        assert len(outages) == 1, "the server was not killed mid-download"
        assert (tmp_path / "fetched/weights.safetensors").read_bytes() == (source / "weights.safetensors").read_bytes()
        assert [f["path"] for f in manifest["files"]] == ["config.json", "weights.safetensors"]

        # down for longer than the retries last: a clear failure, and the artifact never becomes visible
        patient = ArtifactStore(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=2)
        gateway.kill()
        with pytest.raises(Exception, match=r"(?i)connect|endpoint"):
            patient.put_artifact(source, f"s3://{bucket}/never")
        gateway.start()
        assert not patient.exists(f"s3://{bucket}/never")
    print(f"\nS3 server killed mid multipart upload: published in {upload_seconds:.1f} s; mid download: fetched and "
          f"verified in {download_seconds:.1f} s; down past 2 attempts: refused, nothing visible")


# --- the reward service crashes ----------------------------------------------------------------------------------
def _serve_rewards(port: int, token: str, *options: str) -> subprocess.Popen:
    service = subprocess.Popen([sys.executable, "-m", "elborl.rewards.service", "--port", str(port), "--rewards",
                                "shapes_geneval", "--preload", "--threads", "1", *options], cwd=ROOT,
                               env={**os.environ, "ELBORL_REWARD_TOKEN": token}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return service
        except OSError:
            assert service.poll() is None and time.monotonic() < deadline, "the reward service did not start"
            time.sleep(0.2)


@pytest.mark.parametrize("fault", ["killed", "too slow"])
def test_the_reward_service_failing_mid_round_fails_the_score_stage_cleanly_and_the_round_resumes(fault, tmp_path,
                                                                                                 monkeypatch):
    """Killed: connections refused. Too slow: every request outlasts the service's deadline (a 1 ms
    --request-timeout stands in for a reward stuck on a slow GPU), answered 503 with Retry-After."""
    import numpy as np

    from elborl.geneval.prompts import shapes_test_set
    from elborl.rewards import make_reward
    from elborl.shapes.render import render_batch
    from stages._common import run_stage
    from stages.score import build_parser, main
    from s3server import free_port
    from test_reward_service import rollout_directory

    metas = shapes_test_set()[:12]
    images = render_batch(metas, seed=3)
    run = tmp_path / "run"
    ArtifactStore().put_artifact(rollout_directory(tmp_path / "rollout", images, metas), run / "round-00000" / "rollout",
                                 {"stage": "rollout"})

    token, port = secrets.token_urlsafe(16), free_port()
    monkeypatch.setenv("ELBORL_REWARD_TOKEN", token)
    argv = ["--params", str(ROOT / "params.yaml"), "--threads", "1", "--run", str(run), "--round", "0",
            "--reward-url", f"http://127.0.0.1:{port}"]
    service = _serve_rewards(port, token, *(["--request-timeout", "0.001"] if fault == "too slow" else []))
    if fault == "killed":
        service.kill()  # the service crashes before the round's images reach it
        service.wait()
    start = time.perf_counter()
    try:
        with pytest.raises(SystemExit) as raised:
            run_stage(main, build_parser(), argv)
    finally:
        service.kill()
        service.wait()
    waited = time.perf_counter() - start
    message = str(raised.value.code)
    assert "failed after 6 attempts" in message and "\n" not in message and token not in message
    assert ("deadline" in message) == (fault == "too slow"), message
    assert not (run / "round-00000" / "score").exists()  # nothing published: the round is still to be scored

    service = _serve_rewards(port, token)  # back: the same stage scores the round
    try:
        run_stage(main, build_parser(), argv)
    finally:
        service.kill()
        service.wait()
    rewards = json.loads((run / "round-00000" / "score" / "rewards.json").read_text())["rewards"]
    assert np.array_equal(np.array(rewards, dtype=np.float32), make_reward("shapes_geneval")(images, metas))
    print(f"\nreward service {fault}: the score stage gave up after {waited:.1f} s of retries, published nothing; "
          f"served again, the round scored as in-process")


# --- the Prefect flow killed at random points ------------------------------------------------------------------
FLOW_CHILD = """
import json, os, sys
import flows
sys.path.insert(0, "tests")
from test_faults import install_kill_points
from elborl import rewards
calls, counted = install_kill_points(json.loads(os.environ["KILL_AT"]))
rewards.REWARDS["counted"] = lambda: counted("score", rewards.make_reward("shapes_geneval"))
from flows.training import main
main(sys.argv[1:] + ["--reward", "counted", "--rounds", "2", "--threads", "1"])
if os.environ.get("COUNTS_OUT"):
    open(os.environ["COUNTS_OUT"], "w").write(json.dumps(calls))
"""


def test_the_prefect_flow_killed_at_random_points_resumes_to_the_uninterrupted_weights(s3_env, prefect_server,
                                                                                      tmp_path):
    import yaml

    from test_embedded_job import TINY_PARAMS
    from test_rounds import published_inputs

    seed = int(os.environ.get("ELBORL_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    draw = random.Random(seed)
    bucket = s3_env.create_bucket()
    client = s3_env.client()
    base, prompts = published_inputs(tmp_path, f"s3://{bucket}")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    env = {**os.environ, **s3_env.env(), "PREFECT_API_URL": prefect_server, "OMP_NUM_THREADS": "1"}

    def flow(run: str, kill_at=None, counts_out=None) -> int:
        argv = ["--run", f"s3://{bucket}/{run}", "--base-model", base, "--prompts", prompts, "--params", str(params),
                "--cache", str(tmp_path / f"cache-{run}")]
        done = subprocess.run([sys.executable, "-c", FLOW_CHILD, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**env, "KILL_AT": json.dumps(kill_at), "COUNTS_OUT": counts_out or ""})
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
        return done.returncode

    assert flow("reference", counts_out=str(tmp_path / "counts.json")) == 0
    counts = json.loads((tmp_path / "counts.json").read_text())
    expected = _weights(client, bucket, "reference")
    rows = []
    for trial, kind in enumerate(("rollout", "score", "update", "publish")):
        run, call = f"flow-{trial}", draw.randint(1, counts[kind])
        assert flow(run, {"kind": kind, "call": call}) == -signal.SIGKILL
        before = _manifests(client, bucket, f"{run}/")
        _check_visible(ArtifactStore(), bucket, before, tmp_path / f"verified-{run}")
        assert flow(run) == 0
        after = _manifests(client, bucket, f"{run}/")
        assert all(after[key] == etag for key, etag in before.items()), f"{run}: a stage was republished"
        assert len(after) == 3 * ROUNDS and _weights(client, bucket, run) == expected, f"{run} ({kind} {call})"
        rows.append((kind, call, len(before)))
    print(f"\nPrefect flow killed (seed {seed}): " + "; ".join(f"{kind} call {call}, {visible} artifacts visible"
                                                          for kind, call, visible in rows)
          + " -> each resumed bit-identical, nothing republished")
