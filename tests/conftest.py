from pathlib import Path
import importlib.util
import os

import pytest
import torch

from elborl.models.shapes_model import ShapesFlowModel, ShapesModelConfig
from s3server import S3ServerUnavailable, run_s3_server

TINY = ShapesModelConfig(channels=(32, 32), text_width=32, text_layers=1)
ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> ShapesFlowModel:
    return ShapesFlowModel.from_config(TINY, seed=0).eval()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the whole session (see tests/s3server.py); ELBORL_S3_SERVER=moto picks the emulator."""
    try:
        with run_s3_server(tmp_path_factory.mktemp("s3server"), os.environ.get("ELBORL_S3_SERVER", "auto")) as server:
            yield server
    except S3ServerUnavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Points the standard AWS environment at `s3_server`, shielded from the machine's own AWS config."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (SQLite in a temporary directory) for the session, offline: one for every
    module that asks (tests/test_flows.py, test_docker_pool.py, test_security.py)."""
    import sys

    sys.path.insert(0, str(ROOT))  # flows/ lives in the checkout
    import flows  # sets the offline Prefect settings before Prefect is imported

    for name, value in flows.OFFLINE_SETTINGS.items():
        os.environ.setdefault(name, value)
    from prefect.settings import (
        PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    offline = {PREFECT_HOME: os.environ["PREFECT_HOME"], PREFECT_SERVER_ANALYTICS_ENABLED: False,
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90}
    with temporary_settings(updates=offline), prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
