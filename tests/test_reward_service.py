"""The reward service (elborl/rewards/service.py): a real uvicorn server on a loopback port of this process.

Under 8 concurrent clients it returns exactly the in-process rewards; it refuses a missing or wrong token, an
oversized request, a non-image payload and malformed requests with clear 4xx errors; images larger than the reward
uses and truncated images are refused at once, and a reward past the request deadline is a 503 the service
recovers from; the client retries 503, connection errors and 429 (back-pressure) but not other 4xx; the score
stage scores through it.
"""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file

from elborl.geneval.prompts import shapes_test_set
from elborl.rewards import make_reward
from elborl.rewards.service import (RewardClient, RewardService, RewardServiceError, ServiceConfig, create_app,
                                    encode_png, main as service_main, parse_request, serve_in_background)
from elborl.shapes.render import render_batch
from elborl.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
REWARD = "shapes_geneval"
LIMITS = dict(max_request_bytes=96 * 1024, max_images=32, max_pixels=48 * 48)


@pytest.fixture(scope="module")
def in_process():
    return make_reward(REWARD)


def client_batches(n_clients: int = 8):
    """Per client: different images and metadata whose rewards spread over [0, 1] (renders scored against their
    own prompt, against another prompt, and noise)."""
    metas = shapes_test_set()
    batches = []
    for k in range(n_clients):
        images = render_batch(metas, seed=100 + k)
        shifted = metas[5 * k:] + metas[:5 * k]
        noise = np.random.default_rng(k).integers(0, 256, (4, *images.shape[1:]), dtype=np.uint8)
        batches.append((np.concatenate([images[:20], images[20:], noise]), metas[:20] + shifted[20:] + metas[:4]))
    return batches


class Faults:
    """ASGI wrapper: counts scoring requests and answers the first `fail` of them with 503."""

    def __init__(self, app, fail: int = 0):
        self.app, self.fail, self.calls = app, fail, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            self.calls += 1
            if self.calls <= self.fail:
                from starlette.responses import JSONResponse

                body = {"error": {"status": 503, "code": "unavailable", "message": "injected fault"}}
                await JSONResponse(body, status_code=503, headers={"Retry-After": "0"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def start(config: ServiceConfig, fail: int = 0):
    service = RewardService(config)
    app = Faults(create_app(service, preload=True), fail)
    return service, app, serve_in_background(app)


@pytest.fixture(scope="module")
def server():
    service, app, running = start(ServiceConfig((REWARD,), token=TOKEN, **LIMITS))
    with running as url:
        yield url, service, app


@pytest.fixture(scope="module")
def default_server():
    """A service with the default limits: a 4000x4000 image is under its max_pixels."""
    service, _, running = start(ServiceConfig((REWARD,), token=TOKEN))
    with running as url:
        yield url, service


@pytest.fixture
def truncated_images_padded(monkeypatch):
    """Pillow pads a truncated image with black instead of failing, as it does once any library sets this flag."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


def post(url, body, token=TOKEN, content_type="application/json", reward=REWARD):
    """POSTs `body`: bytes or an iterator of bytes as they are (an iterator goes chunked), anything else as JSON."""
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if not isinstance(body, bytes) and not hasattr(body, "__next__"):
        body = json.dumps(body)
    return httpx.post(f"{url}/v1/score/{reward}", content=body, headers=headers, timeout=30)


def assert_error(response, status: int, code: str, *words: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]
    return error["message"]


def png(array) -> str:
    return encode_png(np.asarray(array, dtype=np.uint8))


def timed_post(url, body, **kwargs):
    start = time.perf_counter()
    response = post(url, body, **kwargs)
    return response, time.perf_counter() - start


def truncated_png(side: int, keep: int = 100) -> str:
    """The first `keep` bytes of a black side x side PNG: a whole header, then the pixel data cut short."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[:keep]).decode()


def small_request(n: int = 2):
    images = render_batch(shapes_test_set()[:n], seed=0)
    return {"images": [png(image) for image in images], "metadata": shapes_test_set()[:n]}


# ---------------------------------------------------------------------------------------------------------------


def test_eight_concurrent_clients_get_exactly_the_in_process_rewards(server, in_process):
    url, service, _ = server
    batches = client_batches(8)
    expected = [in_process(images, metas) for images, metas in batches]
    assert len(np.unique(np.concatenate(expected))) > 5  # not all 1.0: partial credit, failures, noise
    start = threading.Barrier(8)

    def score(k):
        images, metas = batches[k]
        with RewardClient(url, REWARD, token=TOKEN, max_batch=16, max_in_flight=2, timeout=30) as client:
            start.wait()
            return client(images, metas)

    before = service.stats["scored_images"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(score, range(8)))
    for got, want in zip(results, expected):
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert service.stats["scored_images"] - before == sum(len(images) for images, _ in batches)


def test_health_needs_no_token_and_reports_the_loaded_rewards(server):
    url, _, _ = server
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["rewards"] == {REWARD: {"loaded": True}} and health["auth"] is True
    assert TOKEN not in json.dumps(health)


def test_missing_or_wrong_token_is_401(server):
    url, _, _ = server
    for token, code in ((None, "missing_token"), ("wrong-token", "invalid_token")):
        response = post(url, small_request(), token=token)
        assert_error(response, 401, code, "token")
        assert response.headers["www-authenticate"].startswith("Bearer")
    for header in (f"Basic {TOKEN}", "Bearer", TOKEN):
        response = httpx.post(f"{url}/v1/score/{REWARD}", json=small_request(), headers={"Authorization": header})
        assert_error(response, 401, "missing_token", "Bearer")
    # the token is checked before anything else: an unauthenticated client learns nothing about the request
    assert_error(post(url, b"not json", token=None, content_type="text/plain"), 401, "missing_token")


def test_oversized_requests_are_413_before_anything_is_scored(server):
    url, service, _ = server
    scored = service.stats["scored_images"]
    # declared by Content-Length: refused without reading the body
    assert_error(post(url, b"x" * (1 << 20)), 413, "request_too_large", "1.0 MiB", "limit")
    # streamed without a length (chunked): refused once the count passes the limit
    chunks = (b"x" * 8192 for _ in range(64))
    assert_error(post(url, chunks), 413, "request_too_large", "limit")
    # too many images, each small
    request = small_request(1)
    many = {"images": request["images"] * 33, "metadata": request["metadata"] * 33}
    assert_error(post(url, many), 413, "too_many_images", "33 images", "32")
    # an image over the pixel limit is refused from its header (decompression bombs never get decoded)
    big = {"images": [png(np.zeros((64, 64, 3)))], "metadata": request["metadata"]}
    assert_error(post(url, big), 413, "image_too_large", "64x64")
    assert service.stats["scored_images"] == scored


def test_non_image_payloads_are_415(server):
    url, _, _ = server
    meta = shapes_test_set()[:1]
    text = base64.b64encode(b"this is not an image").decode()
    assert_error(post(url, {"images": [text], "metadata": meta}), 415, "unsupported_image", "image 0",
                 "not a PNG or JPEG")
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")  # an image, but not an allowed format
    request = small_request(1)
    request = {"images": request["images"] + [base64.b64encode(gif.getvalue()).decode()], "metadata": meta * 2}
    assert_error(post(url, request), 415, "unsupported_image", "image 1")
    assert_error(post(url, b"\x89PNG raw bytes", content_type="image/png"), 415, "unsupported_media_type",
                 "application/json")


def test_malformed_requests_are_400_or_422_with_the_reason(server):
    url, _, _ = server
    good = small_request(2)
    assert_error(post(url, b'{"images": ['), 400, "bad_json", "not valid JSON")
    assert_error(post(url, [1, 2]), 422, "bad_request_shape", '"images"', '"metadata"')
    assert_error(post(url, {"images": good["images"]}), 422, "bad_request_shape")
    assert_error(post(url, {**good, "extra": 1}), 422, "bad_request_shape")
    assert_error(post(url, {**good, "metadata": good["metadata"][:1]}), 422, "length_mismatch", "2 images", "1 metadata")
    assert_error(post(url, {**good, "metadata": ["a photo", "of a cat"]}), 422, "bad_metadata", "JSON objects")
    assert_error(post(url, {**good, "images": [1, 2]}), 422, "bad_images", "base64")
    assert_error(post(url, {"images": [], "metadata": []}), 422, "empty_batch")
    assert_error(post(url, {**good, "images": ["!!not base64!!", good["images"][1]]}), 400, "bad_base64", "image 0")
    mixed = {**good, "images": [good["images"][0], png(np.zeros((16, 16, 3)))]}
    assert_error(post(url, mixed), 422, "mixed_sizes", "image 1", "16x16")
    truncated = base64.b64encode(base64.b64decode(good["images"][0])[:60]).decode()
    assert_error(post(url, {**good, "images": [good["images"][0], truncated]}), 400, "bad_image", "image 1")
    assert_error(post(url, good, reward="clip_score"), 404, "unknown_reward", "clip_score")


def test_a_truncated_png_claiming_4000x4000_is_refused_at_once(default_server, truncated_images_padded):
    url, service = default_server
    scored = service.stats["scored_images"]
    request = {"images": [truncated_png(4000)], "metadata": shapes_test_set()[:1]}
    response, seconds = timed_post(url, request)
    assert seconds < 2.0
    assert_error(response, 413, "image_too_large", "4000x4000", "limit of 32 pixels a side")
    assert post(url, small_request(1)).status_code == 200
    assert service.stats["scored_images"] == scored + 1


def test_an_image_larger_than_the_reward_uses_is_refused_naming_size_and_limit(default_server):
    url, _ = default_server
    request = {"images": [png(np.full((64, 48, 3), 232))], "metadata": shapes_test_set()[:1]}
    assert_error(post(url, request), 413, "image_too_large", "image 0 is 48x64", "limit of 32 pixels a side")
    assert ServiceConfig((REWARD,), None).side_limit("clipscore") == 2048  # rewards that resize take SD3.5's sizes
    wider = ServiceConfig((REWARD,), None, max_side=64)  # a shapes model trained at 64 pixels
    images, _ = parse_request(json.dumps(request).encode(), wider, wider.side_limit(REWARD))
    assert images.shape == (1, 64, 48, 3)
    for bad in (dict(max_side=0), dict(request_timeout=0.0), dict(request_timeout=float("nan"))):
        with pytest.raises(ValueError):
            ServiceConfig((REWARD,), None, **bad)


def test_a_truncated_or_corrupt_png_is_refused_even_where_pillow_would_pad_it(default_server,
                                                                              truncated_images_padded):
    url, service = default_server
    scored = service.stats["scored_images"]
    meta = shapes_test_set()[:1]
    data = base64.b64decode(small_request(1)["images"][0])
    cut = base64.b64encode(data[:len(data) // 2]).decode()
    assert_error(post(url, {"images": [cut], "metadata": meta}), 400, "bad_image", "image 0", "truncated")
    flipped = bytearray(data)
    flipped[60] ^= 0xFF  # inside the pixel data (IDAT), whose CRC no longer matches
    flipped = base64.b64encode(bytes(flipped)).decode()
    assert_error(post(url, {"images": [flipped], "metadata": meta}), 400, "bad_image", "image 0", "corrupt")
    assert service.stats["scored_images"] == scored


class SlowReward:
    """Scores 0.5 at once, or after sleeping the seconds that the first metadata object names under "sleep"."""

    def __init__(self):
        self.finished = threading.Event()

    def __call__(self, images, metas):
        if "sleep" in metas[0]:
            time.sleep(metas[0]["sleep"])
            self.finished.set()
        return np.full(len(images), 0.5, dtype=np.float32)


def test_a_reward_past_the_request_deadline_is_a_503_and_the_service_recovers():
    slow = SlowReward()
    service, _, running = start(ServiceConfig(("slow",), token=TOKEN, request_timeout=0.5, factory=lambda _: slow))
    request = small_request(1)
    with running as url:
        stuck, seconds = timed_post(url, {**request, "metadata": [{"sleep": 2.0}]}, reward="slow")
        assert_error(stuck, 503, "deadline_exceeded", "deadline of 0.5 s")
        assert seconds < 1.5 and stuck.headers["retry-after"] == "1"
        # the stuck call runs on (a thread cannot be stopped): the next request waits at most its own deadline
        queued, seconds = timed_post(url, request, reward="slow")
        assert_error(queued, 503, "deadline_exceeded")
        assert seconds < 1.5 and httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        assert slow.finished.wait(10)
        response = post(url, request, reward="slow")
        assert response.status_code == 200 and response.json()["rewards"] == [0.5]
    assert service.stats["timed_out"] == 2 and service.stats["scored_images"] == 1


def test_the_client_does_not_retry_4xx_and_never_shows_the_token(server):
    url, _, app = server
    images, metas = client_batches(1)[0]
    calls = app.calls
    with RewardClient(url, REWARD, token="not-the-token", retries=5, backoff=0.01) as client:
        with pytest.raises(RewardServiceError) as raised:
            client(images[:4], metas[:4])
        assert "not-the-token" not in repr(client) and "not-the-token" not in str(raised.value)
    assert raised.value.status == 401 and "invalid bearer token" in str(raised.value)
    assert app.calls - calls == 1
    with RewardClient(url, REWARD, token=TOKEN) as client, pytest.raises(ValueError, match="metadata"):
        client(images[:4], metas[:3])


def test_the_client_retries_a_503_and_connection_errors_then_gives_up(in_process):
    images, metas = client_batches(1)[0]
    service, app, running = start(ServiceConfig((REWARD,), token=TOKEN, **LIMITS), fail=1)
    with running as url:
        with RewardClient(url, REWARD, token=TOKEN, max_batch=64, retries=2, backoff=0.01) as client:
            assert np.array_equal(client(images[:30], metas[:30]), in_process(images[:30], metas[:30]))
        assert app.calls == 2  # the injected 503, then the retry
    # the server is gone: connection refused, retried, then one clear error
    with RewardClient(url, REWARD, token=TOKEN, retries=2, backoff=0.01, timeout=5) as client:
        with pytest.raises(RewardServiceError, match="failed after 3 attempts: ConnectError") as raised:
            client(images[:2], metas[:2])
    assert raised.value.status is None


def test_back_pressure_a_queue_of_one_still_scores_every_request_correctly(in_process):
    batches = client_batches(8)
    config = ServiceConfig((REWARD,), token=TOKEN, max_pending=1, retry_after=0.02, **LIMITS)
    service, _, running = start(config)
    with running as url, RewardClient(url, REWARD, token=TOKEN, max_batch=8, max_in_flight=4, retries=200,
                                      backoff=0.005, max_backoff=0.05) as shared:
        with ThreadPoolExecutor(8) as pool:  # one client shared by 8 threads: at most 4 requests in flight
            results = list(pool.map(lambda batch: shared(*batch), batches))
    for got, (images, metas) in zip(results, batches):
        assert np.array_equal(got, in_process(images, metas))
    assert service.stats["rejected_busy"] > 0  # the server did push back
    assert service.stats["scored_images"] == sum(len(images) for images, _ in batches)


def rollout_directory(directory: Path, images: np.ndarray, metas: list[dict]) -> Path:
    """A rollout artifact's files for `images` and their prompts (one group each), as the score stage reads them."""
    (directory / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / "images" / f"{i:05d}.png")
    sampler = {"sampler": "euler", "steps": 1, "shift": 1.0, "guidance": 1.0}
    (directory / "samples.jsonl").write_text("".join(json.dumps({**m, "group": i, "seed": i, **sampler}) + "\n"
                                                     for i, m in enumerate(metas)))
    save_file({"x0": torch.zeros(len(metas), 3, 32, 32)}, directory / "samples.safetensors")
    return directory


def test_the_score_stage_scores_through_the_service(server, in_process, tmp_path, monkeypatch):
    from stages.score import build_parser, main
    from stages._common import run_stage

    url, _, _ = server
    metas = shapes_test_set()[:24]
    images = render_batch(metas, seed=7)
    images[::3] = render_batch(metas[1::3], seed=8)  # every third image shows another prompt: rewards vary
    rollout = rollout_directory(tmp_path / "rollout", images, metas)
    run = tmp_path / "run"
    ArtifactStore().put_artifact(rollout, run / "round-00000" / "rollout", {"stage": "rollout"})

    monkeypatch.setenv("ELBORL_REWARD_TOKEN", TOKEN)
    run_stage(main, build_parser(), ["--params", str(ROOT / "params.yaml"), "--threads", "1", "--run", str(run),
                                     "--round", "0", "--reward-url", url])
    rewards = json.loads((run / "round-00000" / "score" / "rewards.json").read_text())["rewards"]
    assert np.array_equal(np.array(rewards, dtype=np.float32), in_process(images, metas))
    assert len(set(rewards)) > 1

    monkeypatch.setenv("ELBORL_REWARD_TOKEN", "wrong")
    other = tmp_path / "other-run"
    ArtifactStore().put_artifact(rollout, other / "round-00000" / "rollout", {"stage": "rollout"})
    with pytest.raises(SystemExit) as raised:
        run_stage(main, build_parser(), ["--params", str(ROOT / "params.yaml"), "--threads", "1", "--run", str(other),
                                         "--round", "0", "--reward-url", url])
    assert "401 invalid bearer token" in str(raised.value.code) and "wrong" not in str(raised.value.code)
    assert not (other / "round-00000" / "score").exists()


def test_the_cli_refuses_to_serve_without_a_token_or_unauthenticated_off_loopback(monkeypatch, capsys):
    monkeypatch.delenv("ELBORL_REWARD_TOKEN", raising=False)
    with pytest.raises(SystemExit) as raised:
        service_main(["--rewards", REWARD])
    assert "no bearer token" in str(raised.value.code) and "ELBORL_REWARD_TOKEN" in str(raised.value.code)
    with pytest.raises(SystemExit) as raised:
        service_main(["--rewards", REWARD, "--insecure-no-auth", "--host", "0.0.0.0"])
    assert "only allowed on a loopback address" in str(raised.value.code)
    monkeypatch.setenv("ELBORL_REWARD_TOKEN", TOKEN)
    with pytest.raises(SystemExit) as raised:
        service_main(["--rewards", "no_such_reward"])
    assert "unknown reward" in str(raised.value.code) and TOKEN not in str(raised.value.code)


def test_the_service_builds_rewards_with_the_weights_params_name(tmp_path):
    from elborl.rewards.service import params_factory

    params = tmp_path / "params.yaml"
    params.write_text("rewards:\n  weights: {shapes_geneval: 1.0}\n  paths: {clipscore: " + str(tmp_path / "missing") + "}\n")
    factory = params_factory(str(params))
    assert callable(factory("jpeg_compressibility"))
    with pytest.raises(Exception, match="missing"):
        factory("clipscore")  # the path from rewards.paths reaches the loader
