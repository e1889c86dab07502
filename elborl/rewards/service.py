"""Rewards over HTTP: a reward service for a separate container, and a client that is a drop-in reward callable.

GenEval's Mask2Former stack (mmdet/mmcv) conflicts with the training environment, so the score stage can call a
reward in-process (`make_reward(name)`) or over HTTP in another container (`RewardClient`); both return the same
float32 rewards for the same images and metadata.

Wire format (JSON only; nothing is ever unpickled):

    POST /v1/score/{reward}                   Authorization: Bearer <token>    Content-Type: application/json
        {"images":   ["<base64 PNG or JPEG>", ...],      N images of one size, decoded to RGB uint8
         "metadata": [{...prompt metadata...}, ...]}     N JSON objects, one per image
    200 {"reward": "shapes_geneval", "rewards": [0.5, ...], "seconds": 0.01}   (non-finite rewards are null)
    4xx/5xx {"error": {"status": 413, "code": "request_too_large", "message": "..."}}

    GET /healthz                              no auth: {"status": "ok", "rewards": {name: {"loaded": bool}}, ...}

Status codes: 400 malformed JSON/base64 or a truncated, corrupt or undecodable image, 401 missing or wrong token,
404 a reward this service does not serve, 408 a body not received in time, 413 a body over `max_request_bytes`
(checked from Content-Length before reading, and counted while streaming), too many images or pixels, an image
side over what the reward uses (`max_side`), 415 a body that is not JSON or an image that is not PNG/JPEG,
422 well-formed JSON of the wrong shape (lengths, types, image sizes) or metadata the reward cannot use (it
raised LookupError, TypeError, ValueError or ArithmeticError: a missing key, a wrong type), 429 the service's queue
is full (with Retry-After), 500 the reward failed otherwise, 503 the reward did not finish within `request_timeout`
(with Retry-After).

The server binds 127.0.0.1 unless told otherwise and requires a bearer token (ELBORL_REWARD_TOKEN or
--token-file) unless `--insecure-no-auth` is given on a loopback host. Each reward is built once per process
(lazily, through `make_reward`) and called from one worker thread of its own, so rewards need not be thread-safe;
at most `max_pending` requests are admitted at a time (bounding memory), the rest get 429.

    python -m elborl.rewards.service --host 127.0.0.1 --port 8765 --rewards shapes_geneval[,...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from elborl.shapes.world import IMAGE_SIZE as SHAPES_IMAGE_SIZE

log = logging.getLogger("elborl.reward_service")

TOKEN_ENV = "ELBORL_REWARD_TOKEN"
DEFAULT_PORT = 8765
API_PREFIX = "/v1/score/"
IMAGE_FORMATS = ("PNG", "JPEG")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MiB = 1 << 20

# The longest image side each reward is given (413 above it, from the header, before any decoding).
# Refused rather than downscaled: the service promises the in-process reward's value for the images sent, and a
# resized image scores differently (the shapes detector measures shapes in pixels, jpeg the image as sent), while
# every client sends images at its model's size (32 for the shapes model, 512 or 1024 for SD3.5), so a larger
# image is a mistake or an attack. The shapes detector is made for the 32x32 world and its cost grows faster than
# the pixel count (a 46 KB PNG of 4000x4000 takes it about 45 s, 512x512 noise minutes). The other
# rewards resize to their model's input (CLIP 224, Mask2Former 1333x800, RapidOCR its own) or, for jpeg, encode the
# image once; 2048 holds SD3.5's images with room and bounds each decode to 12 MiB. `max_side` overrides the table
# for every reward (e.g. a shapes model trained at another size).
REWARD_MAX_SIDE = {"shapes_geneval": SHAPES_IMAGE_SIZE, "shapes_geneval_strict": SHAPES_IMAGE_SIZE}
DEFAULT_MAX_SIDE = 2048


# =============================================================================================================
# Server


@dataclass
class ServiceConfig:
    rewards: tuple[str, ...]
    token: str | None = field(repr=False)  # None: no authentication (loopback only; see check_bind); never shown
    max_request_bytes: int = 64 * MiB
    max_images: int = 256  # per request
    max_pixels: int = 4096 * 4096  # per image, checked from the header before decoding (decompression bombs)
    max_batch_pixels: int = 1 << 27  # per request, all images together (bounds the decoded array: 384 MiB)
    max_pending: int = 8  # requests admitted at once (reading, decoding, queued or scoring); more get 429
    retry_after: float = 1.0  # seconds, sent with 429
    body_timeout: float = 60.0  # seconds to receive a whole request body
    max_side: int | None = None  # longest image side for every reward; None: each reward's own (REWARD_MAX_SIDE)
    # seconds a request may wait for its reward's worker and be scored; under RewardClient's default timeout
    # (120 s), so a client gets this service's 503 rather than a timeout of its own
    request_timeout: float = 100.0
    factory: object = field(default=None, repr=False)  # name -> reward callable; default make_reward

    def __post_init__(self):
        self.rewards = tuple(self.rewards)
        if not self.rewards:
            raise ValueError("the service needs at least one reward")
        for name in ("max_request_bytes", "max_images", "max_pixels", "max_batch_pixels", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError("max_side must be positive (or None: each reward's own)")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise ValueError(f"request_timeout must be a positive number of seconds, got {self.request_timeout}")

    def side_limit(self, reward: str) -> int:
        """The longest image side accepted for `reward`."""
        return self.max_side or REWARD_MAX_SIDE.get(reward, DEFAULT_MAX_SIDE)


class ServiceError(Exception):
    """An error answered to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(error: ServiceError):
    from starlette.responses import JSONResponse

    body = {"error": {"status": error.status, "code": error.code, "message": error.message}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def decode_image(data: bytes, index: int, max_pixels: int, max_side: int) -> Image.Image:
    """A PNG or JPEG opened lazily (header only); anything else is a 415, a too-large header a 413, a truncated or
    corrupt PNG a 400."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ServiceError(415, "unsupported_image", f"image {index} is not a PNG or JPEG image "
                           f"({len(data)} bytes starting {data[:8]!r})") from None
    except Image.DecompressionBombError as error:
        raise ServiceError(413, "image_too_large", f"image {index}: {error}") from None
    except Exception as error:  # a PNG/JPEG signature with a broken header
        raise ServiceError(400, "bad_image", f"image {index} could not be read: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ServiceError(413, "image_too_large",
                           f"image {index} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if max(width, height) > max_side:
        raise ServiceError(413, "image_too_large", f"image {index} is {width}x{height}, over the limit of {max_side} "
                           f"pixels a side for this reward (max_side, --max-side)")
    check_complete(image, data, index)
    return image


def check_complete(image: Image.Image, data: bytes, index: int) -> None:
    """Refuses (400) a PNG whose chunks are cut short or fail their CRC, before anything is decompressed.

    The full decode in `parse_request` refuses truncated data too, but only while Pillow's process-wide
    LOAD_TRUNCATED_IMAGES is off: a library that turns it on makes Pillow pad a truncated image with black and
    hand it on as if whole. verify() reads the chunks whatever that flag says. JPEG has no such check in Pillow;
    its truncation is found by the decode.
    """
    if image.format != "PNG":
        return
    try:
        Image.open(io.BytesIO(data), formats=("PNG",)).verify()  # a copy: a verified image cannot be loaded
    except Exception as error:
        raise ServiceError(400, "bad_image", f"image {index} is truncated or corrupt: {error}") from None


def parse_request(body: bytes, config: ServiceConfig, max_side: int) -> tuple[np.ndarray, list[dict]]:
    """The request body as (images uint8 N x H x W x 3, metadata); raises ServiceError with a clear message."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise ServiceError(400, "bad_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or set(payload) != {"images", "metadata"}:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ServiceError(422, "bad_request_shape",
                           f'expected a JSON object with exactly the keys "images" and "metadata", got {keys}')
    encoded, metas = payload["images"], payload["metadata"]
    if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
        raise ServiceError(422, "bad_images", '"images" must be a list of base64 strings')
    if not isinstance(metas, list) or not all(isinstance(meta, dict) for meta in metas):
        raise ServiceError(422, "bad_metadata", '"metadata" must be a list of JSON objects, one per image')
    if len(encoded) != len(metas):
        raise ServiceError(422, "length_mismatch", f"{len(encoded)} images but {len(metas)} metadata objects")
    if not encoded:
        raise ServiceError(422, "empty_batch", "the request holds no images")
    if len(encoded) > config.max_images:
        raise ServiceError(413, "too_many_images",
                           f"{len(encoded)} images, over the limit of {config.max_images} per request")
    opened, total, size = [], 0, None
    for index, text in enumerate(encoded):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ServiceError(400, "bad_base64", f"image {index} is not valid base64: {error}") from None
        image = decode_image(data, index, config.max_pixels, max_side)
        if size is None:
            size = image.size
        elif image.size != size:
            raise ServiceError(422, "mixed_sizes", f"image {index} is {image.size[0]}x{image.size[1]}, "
                               f"image 0 is {size[0]}x{size[1]}; one request holds images of one size")
        total += size[0] * size[1]
        if total > config.max_batch_pixels:
            raise ServiceError(413, "too_many_pixels",
                               f"the images hold over {config.max_batch_pixels} pixels; send fewer per request")
        opened.append(image)
    images = np.empty((len(opened), size[1], size[0], 3), dtype=np.uint8)
    for index, image in enumerate(opened):
        try:
            images[index] = np.asarray(image.convert("RGB"))
        except Exception as error:  # truncated or corrupt data behind a valid header
            raise ServiceError(400, "bad_image", f"image {index} could not be decoded: {error}") from None
    return images, metas


class RewardService:
    """Rewards by name, each built once (lazily) and called from its own single worker thread.

    Requests for a reward take its lock before they are handed to its worker, and the lock is released only when
    the call returns, so the worker's own queue never holds more than the call it runs.
    """

    def __init__(self, config: ServiceConfig):
        from elborl.rewards import REWARDS

        if config.factory is None:
            unknown = [name for name in config.rewards if name not in REWARDS]
            if unknown:
                raise ValueError(f"unknown reward(s) {unknown}; expected names from {sorted(REWARDS)}")
        self.config = config
        self._factory = config.factory
        self._rewards: dict[str, object] = {}
        self._workers = {name: ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}") for name in config.rewards}
        self._turns = {name: asyncio.Lock() for name in config.rewards}  # held from a call's start to its return
        self.pending = 0  # touched only on the event loop
        self.stats = {"requests": 0, "scored_images": 0, "rejected_busy": 0, "errors": 0, "timed_out": 0}

    # runs on the reward's worker thread
    def _reward(self, name: str):
        if name not in self._rewards:
            start = time.perf_counter()
            if self._factory is None:
                from elborl.rewards import make_reward

                self._rewards[name] = make_reward(name)
            else:
                self._rewards[name] = self._factory(name)
            log.info("reward %s loaded in %.1f s", name, time.perf_counter() - start)
        return self._rewards[name]

    def _call(self, name: str, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        reward = self._reward(name)
        try:
            values = reward(images, metas)
        except (LookupError, TypeError, ValueError, ArithmeticError) as error:
            # The images passed every check, so this is the reward refusing the metadata (a missing key, a wrong
            # type, a count of 0): the same on every try, so a 422 the client does not retry, not a 500 it does.
            log.info("reward %s refused a request of %d images: %s: %s", name, len(images), type(error).__name__,
                     error)
            raise ServiceError(422, "bad_reward_input", f"reward {name} cannot score this request's metadata: "
                               f"{type(error).__name__}: {error}") from None
        rewards = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(rewards) != len(images):
            raise RuntimeError(f"reward {name} returned {len(rewards)} values for {len(images)} images")
        return rewards

    async def load(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._workers[name], self._reward, name)

    async def score(self, name: str, images: np.ndarray, metas: list[dict], timeout: float) -> np.ndarray:
        """The rewards, or a 503 ServiceError once `timeout` seconds have passed, waiting for the worker included.

        A thread cannot be stopped: past the deadline the call runs on, and this reward's next requests wait for it
        (each up to its own deadline, none queued in the executor). What bounds that call is what was checked before
        it (images per request, image side, complete data); the deadline gives the client a clear answer instead
        of a hang, and keeps requests from piling up behind an overrunning call.
        """
        turn, timer = self._turns[name], asyncio.timeout(timeout)
        try:
            async with timer:
                await turn.acquire()
                call = asyncio.get_running_loop().run_in_executor(self._workers[name], self._call, name, images, metas)
                call.add_done_callback(lambda _: turn.release())
                return await asyncio.shield(call)  # the deadline cancels the wait, not the call
        except TimeoutError:
            if not timer.expired():
                raise  # the reward's own TimeoutError
        self.stats["timed_out"] += 1
        log.warning("reward %s: a request of %d images passed its deadline of %g s", name, len(images), timeout)
        raise ServiceError(503, "deadline_exceeded", f"reward {name} did not score the request within the deadline "
                           f"of {timeout:g} s (request_timeout); retry later",
                           {"Retry-After": f"{self.config.retry_after:g}"})

    def loaded(self) -> dict:
        return {name: {"loaded": name in self._rewards} for name in self.config.rewards}

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True, cancel_futures=True)


def _check_token(request, token: str | None) -> None:
    if token is None:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="elborl-rewards"'}
    header = request.headers.get("authorization")
    if not header:
        raise ServiceError(401, "missing_token", "missing bearer token (Authorization: Bearer <token>)", challenge)
    scheme, _, provided = header.partition(" ")
    if scheme.lower() != "bearer" or not provided.strip():
        raise ServiceError(401, "missing_token", "the Authorization header is not 'Bearer <token>'", challenge)
    if not hmac.compare_digest(provided.strip().encode("latin-1"), token.encode("utf-8")):
        raise ServiceError(401, "invalid_token", "invalid bearer token", challenge)


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The body, refused (413) from its Content-Length before reading, and again while streaming past `limit`."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            length = int(length)
        except ValueError:
            raise ServiceError(400, "bad_content_length", f"invalid Content-Length {length!r}") from None
        if length > limit:
            raise ServiceError(413, "request_too_large",
                               f"the request body is {_size(length)}, over the limit of {_size(limit)}")
    from starlette.requests import ClientDisconnect

    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ServiceError(413, "request_too_large",
                                       f"the request body is over the limit of {_size(limit)}")
    except TimeoutError:
        raise ServiceError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ServiceError(400, "client_disconnected", "the client went away before sending the whole body") from None
    return bytes(body)


def create_app(service: RewardService, preload: bool = False):
    """The ASGI app (Starlette) serving `service`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    config = service.config

    async def healthz(request):
        return JSONResponse({"status": "ok", "rewards": service.loaded(), "pending": service.pending,
                             "max_pending": config.max_pending, "max_images": config.max_images,
                             "max_request_bytes": config.max_request_bytes, "auth": config.token is not None,
                             "max_side": {name: config.side_limit(name) for name in config.rewards},
                             "request_timeout": config.request_timeout,
                             "stats": service.stats})

    async def score(request):
        name = request.path_params["reward"]
        try:
            _check_token(request, config.token)
            if name not in config.rewards:
                raise ServiceError(404, "unknown_reward", f"this service serves {list(config.rewards)}, not {name!r}")
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise ServiceError(415, "unsupported_media_type",
                                   f"expected Content-Type application/json, got {content_type or 'none'!r}")
            if service.pending >= config.max_pending:
                service.stats["rejected_busy"] += 1
                raise ServiceError(429, "busy", f"{service.pending} requests in progress (limit "
                                   f"{config.max_pending}); retry later",
                                   {"Retry-After": f"{config.retry_after:g}"})
        except ServiceError as error:
            if error.status != 429:
                service.stats["errors"] += 1
            return _error_response(error)
        service.pending += 1
        service.stats["requests"] += 1
        try:
            body = await _read_body(request, config.max_request_bytes, config.body_timeout)
            images, metas = await run_in_threadpool(parse_request, body, config, config.side_limit(name))
            del body
            start = time.perf_counter()
            try:
                rewards = await service.score(name, images, metas, config.request_timeout)
            except ServiceError:
                raise
            except Exception as error:
                log.exception("reward %s failed on %d images", name, len(images))
                raise ServiceError(500, "reward_failed", f"reward {name} failed: {type(error).__name__}: {error}")
            service.stats["scored_images"] += len(rewards)
            values = [float(v) if math.isfinite(v) else None for v in rewards.tolist()]
            return JSONResponse({"reward": name, "rewards": values, "seconds": time.perf_counter() - start})
        except ServiceError as error:
            service.stats["errors"] += 1
            return _error_response(error)
        finally:
            service.pending -= 1

    async def http_error(request, error: HTTPException):
        return _error_response(ServiceError(error.status_code, "http_error", str(error.detail)))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if preload:
            for name in config.rewards:
                await service.load(name)
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                             Route(API_PREFIX + "{reward}", score, methods=["POST"])],
                     exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """No token is allowed only when asked for explicitly, and only on a loopback address."""
    if token is not None and not token.strip():
        raise ValueError(f"{TOKEN_ENV} is empty")
    if token is None and not insecure_no_auth:
        raise ValueError(f"no bearer token: set {TOKEN_ENV} (or --token-file), or pass --insecure-no-auth "
                         "to serve without authentication on a loopback address")
    if token is None and not is_loopback(host):
        raise ValueError(f"--insecure-no-auth is only allowed on a loopback address, not {host!r}")


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0):
    """Runs `app` with uvicorn on a thread of this process; yields its base URL (port 0: a free port)."""
    import uvicorn

    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP (else ~40 ms per request)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-service")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the reward service did not start")
        time.sleep(0.01)
    bound = sock.getsockname()
    try:
        yield f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# =============================================================================================================
# Client


class RewardServiceError(RuntimeError):
    """The service refused a request (status set) or could not be reached after the retries (status None)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_text(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json()["error"]
        return f"{error['message']}", error.get("code")
    except Exception:
        return response.text[:200] or response.reason_phrase, None


def encode_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class RewardClient:
    """A reward callable (images uint8 N x H x W x 3, metadata) -> float32 rewards, computed by a reward service.

    Images travel as lossless PNG, so the rewards equal the in-process reward's. A call is split into requests
    of at most `max_batch` images, at most `max_in_flight` of them in flight at once (across every thread using
    this client). Connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff
    and jitter, waiting at least the server's Retry-After; other 4xx fail at once with the server's message.
    The token (default: $ELBORL_REWARD_TOKEN) is sent only in the Authorization header and never logged.
    """

    def __init__(self, url: str, reward: str = "shapes_geneval", token: str | None = None, timeout: float = 120.0,
                 retries: int = 5, max_batch: int = 64, max_in_flight: int = 2, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_retry_after: float = 120.0):
        if max_batch < 1 or max_in_flight < 1 or retries < 0:
            raise ValueError("max_batch and max_in_flight must be positive, retries non-negative")
        self.url, self.reward = url.rstrip("/"), reward
        self.endpoint = f"{self.url}{API_PREFIX}{reward}"
        self.retries, self.max_batch, self.max_in_flight = retries, max_batch, max_in_flight
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._random = random.Random()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  limits=httpx.Limits(max_connections=max_in_flight,
                                                      max_keepalive_connections=max_in_flight))

    def __repr__(self) -> str:  # no token
        return f"RewardClient({self.endpoint!r}, max_batch={self.max_batch}, max_in_flight={self.max_in_flight})"

    def health(self) -> dict:
        response = self._http.get(f"{self.url}/healthz")
        response.raise_for_status()
        return response.json()

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images N x H x W x 3, got {images.dtype} {images.shape}")
        if len(metas) != len(images):
            raise ValueError(f"{len(images)} images but {len(metas)} metadata objects")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float32)
        starts = range(0, len(images), self.max_batch)
        if len(starts) == 1:
            return self._score(images, list(metas))
        with ThreadPoolExecutor(min(self.max_in_flight, len(starts)), thread_name_prefix="reward-client") as pool:
            parts = pool.map(lambda s: self._score(images[s:s + self.max_batch], list(metas[s:s + self.max_batch])),
                             starts)
            return np.concatenate(list(parts))

    def _score(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        body = json.dumps({"images": [encode_png(image) for image in images], "metadata": metas},
                          allow_nan=False).encode()
        failure, status = "", None
        for attempt in range(self.retries + 1):
            wait = 0.0
            try:
                with self._slots:
                    response = self._http.post(self.endpoint, content=body, headers=self._headers)
            except httpx.TransportError as error:
                failure, status = f"{type(error).__name__}: {error}", None
            else:
                if response.status_code == 200:
                    values = response.json()["rewards"]
                    if len(values) != len(images):
                        raise RewardServiceError(f"{self.endpoint}: {len(values)} rewards for {len(images)} images")
                    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)
                message, code = _error_text(response)
                failure, status = f"{response.status_code} {message}", response.status_code
                if status not in RETRY_STATUSES:
                    raise RewardServiceError(f"reward service {self.endpoint}: {failure}", status, code)
                wait = min(_retry_after(response) or 0.0, self.max_retry_after)
            if attempt < self.retries:
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * self._random.uniform(0.5, 1.0)
                log.info("reward service %s: %s; retry %d/%d in %.2f s", self.endpoint, failure, attempt + 1,
                         self.retries, max(wait, delay))
                time.sleep(max(wait, delay))
        raise RewardServiceError(f"reward service {self.endpoint}: failed after {self.retries + 1} attempts: {failure}",
                                 status)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# =============================================================================================================
# CLI


def params_factory(params_path: str):
    """name -> reward built with its weights from the params file's rewards.paths (validated at startup)."""
    from elborl.config import load_params
    from elborl.rewards import configured_reward

    rewards_config = load_params(params_path).rewards
    return lambda name: configured_reward(name, rewards_config)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`prog` names the command in usage lines: `elborl reward-service` when run through elborl.cli."""
    parser = argparse.ArgumentParser(prog=prog or "python -m elborl.rewards.service",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=f"The bearer token is read from ${TOKEN_ENV} (or --token-file), never "
                                     "from the command line.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--rewards", default="shapes_geneval", help="comma-separated reward names to serve")
    parser.add_argument("--token-file", default=None, help=f"file holding the bearer token (instead of ${TOKEN_ENV})")
    parser.add_argument("--insecure-no-auth", action="store_true", help="serve without a token (loopback only)")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (64)")
    parser.add_argument("--max-images", type=int, default=256, help="most images per request (256)")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="most pixels per image (4096*4096)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="longest image side for every reward (default: each reward's own, e.g. 32 for the "
                        f"shapes rewards, {DEFAULT_MAX_SIDE} for the others)")
    parser.add_argument("--request-timeout", type=float, default=100.0,
                        help="seconds a request may wait for and use its reward before a 503 (100)")
    parser.add_argument("--max-pending", type=int, default=8, help="requests admitted at once; more get 429 (8)")
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds sent in Retry-After with 429 (1)")
    parser.add_argument("--preload", action="store_true", help="build the rewards at startup, not on first use")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the rewards")
    parser.add_argument("--params", default=None,
                        help="params.yaml whose rewards.paths give the rewards' model weights (local or s3://)")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv=None, prog: str | None = None) -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        else:
            token = os.environ.get(TOKEN_ENV)
        if args.insecure_no_auth and token is not None:
            log.warning("--insecure-no-auth given: the token is ignored")
            token = None
        check_bind(args.host, token, args.insecure_no_auth)
        config = ServiceConfig(rewards=tuple(r.strip() for r in args.rewards.split(",") if r.strip()), token=token,
                               max_request_bytes=int(args.max_request_mb * MiB), max_images=args.max_images,
                               max_pixels=args.max_pixels, max_pending=args.max_pending, retry_after=args.retry_after,
                               max_side=args.max_side, request_timeout=args.request_timeout,
                               factory=params_factory(args.params) if args.params else None)
        service = RewardService(config)
    except (OSError, ValueError) as error:
        sys.exit(f"{parser.prog}: error: {error}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    log.info("serving rewards %s on %s:%d (%s)", list(config.rewards), args.host, args.port,
             "bearer token required" if token else "NO AUTHENTICATION")
    uvicorn.run(create_app(service, preload=args.preload), host=args.host, port=args.port,
                log_level=args.log_level.lower(), timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
