"""Benchmark: the reward service (elborl/rewards/service.py) under N concurrent clients, on loopback only.

    .venv/bin/python bench/reward_service_load.py [--clients 1,2,4,8,16] [--seconds 5] [--reward shapes|clip|both]
                                                  [--batch 8] [--max-pending 8] [--server process|thread]
                                                  [--json-out FILE]

Starts the service on 127.0.0.1 (by default as its own process, `python -m elborl.rewards.service`, as a container
runs it; `--server thread` serves it from this process with `serve_in_background`, as the tests do: that checks the
wiring, but its numbers are not the service's, as the clients share the server's interpreter) with `shapes_geneval`
and a CLIP-family reward built from a tiny random open_clip model (`clip_family.build_tiny_open_clip`, the tests'
miniature: nothing downloaded): `hpsv2` by default, the same open_clip code as `clipscore` but the raw cosine, where
clipscore's 100 * max(cos, 0) is 0 for most images under random weights and would compare little.

For each reward and each client count, that many threads post requests of `--batch` images for `--seconds`, each
client one request at a time (a 429 waits its Retry-After, as RewardClient does). Printed per row: requests/s and
images/s scored, p50/p99 latency of the scored requests, 429s (back-pressure: `max_pending` requests already in the
service) and errors, and whether every returned score equals the in-process reward's score of the same images:
exactly for shapes_geneval (the same deterministic code on the same pixels; images travel as lossless PNG), within
a tolerance for the CLIP rewards (rtol 1e-5, atol 1e-6 on hpsv2's cosine, 1e-4 on clipscore's 0-100 scale): the
same float32 model on the same pixels, but a float32 sum may be reduced in another order under another thread count,
batch layout or device (the service process picks CUDA where there is one). Then, per reward, the first client count
at which the service answered 429. The numbers are wall-clock: run it on an idle machine.
"""

from pathlib import Path
import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elborl.geneval.prompts import shapes_test_set  # noqa: E402
from elborl.rewards.service import API_PREFIX, TOKEN_ENV, encode_png  # noqa: E402
from elborl.shapes.render import render_batch  # noqa: E402

CLIP_REWARDS = ("hpsv2", "clipscore")  # built from the tiny open_clip model
# Scores a client gets must equal the in-process reward's: exactly, or within (rtol, atol) (see the docstring).
TOLERANCE = {"shapes_geneval": None, "hpsv2": (1e-5, 1e-6), "clipscore": (1e-5, 1e-4)}


def client_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated client counts, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"client counts must be positive, got {text!r}")
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Workload:
    """Per reward and client: one request body of `batch` images (different for every client) and the in-process
    rewards of those images."""

    def __init__(self, reward: str, batch: int, clients: int, clip_size: int, in_process):
        metas = shapes_test_set()
        self.reward, self.batch, self.bodies, self.expected = reward, batch, [], []
        for k in range(clients):
            index = [(5 * k + i) % len(metas) for i in range(batch)]
            chosen = [metas[i] for i in index]
            images = render_batch(chosen, seed=100 + k)
            images[1::3] = render_batch([metas[(i + 7) % len(metas)] for i in index[1::3]], seed=200 + k)  # mismatches
            if reward in CLIP_REWARDS:  # sent larger than the tiny CLIP's 32 px input, which it resizes to
                scale = max(1, clip_size // images.shape[1])
                images = images.repeat(scale, axis=1).repeat(scale, axis=2)
            self.bodies.append(json.dumps({"images": [encode_png(image) for image in images],
                                           "metadata": chosen}).encode())
            self.expected.append(np.asarray(in_process(images, chosen), dtype=np.float32))


class ClientResult:
    def __init__(self):
        self.latencies, self.ok, self.rejected, self.errors, self.error_kinds = [], 0, 0, 0, {}
        self.mismatches, self.exact, self.max_abs_diff, self.finished = 0, True, 0.0, None

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def run_client(url: str, token: str, workload: Workload, k: int, start: threading.Barrier, deadline: list,
               result: ClientResult) -> None:
    import httpx

    endpoint = f"{url}{API_PREFIX}{workload.reward}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    body, expected, tolerance = workload.bodies[k], workload.expected[k], TOLERANCE[workload.reward]
    with httpx.Client(timeout=httpx.Timeout(60.0), trust_env=False,
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as http:
        start.wait()
        while time.perf_counter() < deadline[0]:
            sent = time.perf_counter()
            try:
                response = http.post(endpoint, content=body, headers=headers)
            except httpx.TransportError as error:
                result.error(type(error).__name__)
                time.sleep(0.05)
                continue
            seconds = time.perf_counter() - sent
            if response.status_code == 200:
                values = response.json()["rewards"]
                got = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
                result.latencies.append(seconds)
                result.ok += 1
                if got.shape != expected.shape:
                    result.mismatches += 1
                    continue
                same = np.array_equal(got, expected, equal_nan=True)
                result.exact &= same
                result.max_abs_diff = max(result.max_abs_diff, float(np.nanmax(np.abs(got - expected), initial=0)))
                if not same and (tolerance is None or not np.allclose(got, expected, *tolerance, equal_nan=True)):
                    result.mismatches += 1
            elif response.status_code == 429:
                result.rejected += 1
                wait = float(response.headers.get("retry-after", "1"))
                time.sleep(max(0.0, min(wait, deadline[0] - time.perf_counter())))
            else:
                result.error(str(response.status_code))
    result.finished = time.perf_counter()


def health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=10, trust_env=False).json()


def measure(url: str, token: str, workload: Workload, clients: int, seconds: float) -> dict:
    """`clients` threads posting for `seconds`; throughput over the time until the last one finished."""
    before = health(url)["stats"]
    results = [ClientResult() for _ in range(clients)]
    start, deadline = threading.Barrier(clients + 1), [float("inf")]
    threads = [threading.Thread(target=run_client, args=(url, token, workload, k, start, deadline, results[k]),
                                daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = max((r.finished or time.perf_counter()) for r in results) - began
    after = health(url)["stats"]
    latencies = np.array([s for r in results for s in r.latencies])
    ok = sum(r.ok for r in results)
    kinds = {}
    for r in results:
        for kind, n in r.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return {"reward": workload.reward, "clients": clients, "seconds": round(elapsed, 3), "batch": workload.batch,
            "requests": ok, "images": ok * workload.batch, "requests_per_s": ok / elapsed,
            "images_per_s": ok * workload.batch / elapsed,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3) if ok else None,
            "p99_ms": float(np.percentile(latencies, 99) * 1e3) if ok else None,
            "rejected_429": sum(r.rejected for r in results),
            "ok_per_client": [min(r.ok for r in results), max(r.ok for r in results)],  # fairness: [min, max]
            "server_rejected_busy": after["rejected_busy"] - before["rejected_busy"],
            "errors": sum(r.errors for r in results), "error_kinds": kinds,
            "scores_checked": ok, "score_mismatches": sum(r.mismatches for r in results),
            "scores_exact": all(r.exact for r in results) and ok > 0,
            "max_abs_diff": max(r.max_abs_diff for r in results)}


def tiny_clip(directory: Path) -> Path:
    from elborl.rewards import clip_family

    clip_family.build_tiny_open_clip(directory / "clip", seed=0)
    return directory / "clip"


def in_process_rewards(names: list[str], clip_path: Path | None) -> dict:
    from elborl.rewards import make_reward

    return {name: make_reward(name, **({"path": str(clip_path), "device": "cpu"} if name in CLIP_REWARDS else {}))
            for name in names}


class ServiceProcess:
    """`python -m elborl.rewards.service` on a free loopback port, the token in its environment."""

    def __init__(self, names, token, clip_path, directory: Path, max_pending: int, retry_after: float, threads: int):
        params = directory / "params.yaml"
        paths = "{" + ", ".join(f"{name}: {json.dumps(str(clip_path))}" for name in names if name in CLIP_REWARDS) + "}"
        params.write_text(f"rewards:\n  weights: {{shapes_geneval: 1.0}}\n  paths: {paths}\n")
        self.port, self.log = free_port(), directory / "service.log"
        env = dict(os.environ, **{TOKEN_ENV: token, "OMP_NUM_THREADS": str(threads)})
        command = [sys.executable, "-m", "elborl.rewards.service", "--host", "127.0.0.1", "--port", str(self.port),
                   "--rewards", ",".join(names), "--params", str(params), "--preload", "--threads", str(threads),
                   "--max-pending", str(max_pending), "--retry-after", f"{retry_after:g}", "--log-level", "warning"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 300.0) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the reward service exited ({self.process.returncode}): "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if health(self.url)["status"] == "ok":
                    return self.url
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the reward service did not start within {timeout:g} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def print_table(rows: list[dict], onset: dict, max_pending: int) -> None:
    print("| reward | clients | requests/s | images/s | p50 ms | p99 ms | 429s | errors | scored per client "
          "(min-max) | scores vs in-process |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["score_mismatches"]:
            scores = f"MISMATCH in {row['score_mismatches']} of {row['scores_checked']}"
        elif not row["scores_checked"]:
            scores = "none scored"
        elif row["scores_exact"]:
            scores = f"exact ({row['scores_checked']})"
        else:
            scores = f"within tolerance ({row['scores_checked']}, max |diff| {row['max_abs_diff']:.1e})"
        ms = ["—" if row[k] is None else f"{row[k]:.1f}" for k in ("p50_ms", "p99_ms")]
        print(f"| {row['reward']} | {row['clients']} | {row['requests_per_s']:.1f} | {row['images_per_s']:.1f} | "
              f"{ms[0]} | {ms[1]} | {row['rejected_429']} | {row['errors']} | "
              f"{row['ok_per_client'][0]}-{row['ok_per_client'][1]} | {scores} |")
    for reward, clients in onset.items():
        where = f"at {clients} clients" if clients is not None else "at none of the client counts run"
        print(f"{reward}: 429 back-pressure starts {where} (max_pending {max_pending})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=client_counts, default=client_counts("1,2,4,8,16"),
                        help="comma-separated numbers of concurrent clients (default 1,2,4,8,16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per client count and reward (5)")
    parser.add_argument("--reward", choices=("shapes", "clip", "both"), default="both")
    parser.add_argument("--clip-reward", choices=CLIP_REWARDS, default="hpsv2",
                        help="the CLIP-family reward of --reward clip/both (default hpsv2: see above)")
    parser.add_argument("--batch", type=int, default=8, help="images per request (8)")
    parser.add_argument("--clip-size", type=int, default=64, help="side of the images sent to the CLIP reward (64)")
    parser.add_argument("--max-pending", type=int, default=8, help="the service's max_pending (its default: 8)")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the service's Retry-After seconds (1)")
    parser.add_argument("--server", choices=("process", "thread"), default="process",
                        help="the service as its own process (default) or on a thread of this one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the rewards (1)")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.batch < 1 or args.max_pending < 1 or args.clip_size < 1:
        parser.error("--seconds, --batch, --max-pending and --clip-size must be positive")
    import torch

    torch.set_num_threads(args.threads)
    rewards = {"shapes": "shapes_geneval", "clip": args.clip_reward}
    names = list(rewards.values()) if args.reward == "both" else [rewards[args.reward]]
    token = secrets.token_urlsafe(24)
    load = os.getloadavg()
    print(f"reward service load: {', '.join(names)}; clients {args.clients}, {args.seconds:g} s each, "
          f"{args.batch} images per request, max_pending {args.max_pending}, server: {args.server}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="reward-load-") as tmp:
        tmp = Path(tmp)
        clip_path = tiny_clip(tmp) if set(names) & set(CLIP_REWARDS) else None
        in_process = in_process_rewards(names, clip_path)
        workloads = {name: Workload(name, args.batch, max(args.clients), args.clip_size, in_process[name])
                     for name in names}
        with serving(args, names, token, clip_path, tmp) as url:
            rows = []
            for name in names:
                measure(url, token, workloads[name], 1, min(0.5, args.seconds))  # warm-up: first calls, caches
                for clients in args.clients:
                    rows.append(measure(url, token, workloads[name], clients, args.seconds))
    onset = {name: next((r["clients"] for r in rows if r["reward"] == name and r["rejected_429"]), None)
             for name in names}
    report = {"config": {"clients": args.clients, "seconds": args.seconds, "batch": args.batch,
                         "max_pending": args.max_pending, "retry_after": args.retry_after, "server": args.server,
                         "threads": args.threads, "clip_size": args.clip_size, "cpus": os.cpu_count(),
                         "load_average_at_start": load[0]},
              "tolerance": {name: TOLERANCE[name] and list(TOLERANCE[name]) for name in names},  # [rtol, atol]
              "rows": rows, "backpressure_starts_at": onset,
              "scores_match": all(r["score_mismatches"] == 0 and r["scores_checked"] > 0 for r in rows)}
    print_table(rows, onset, args.max_pending)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    return report


class serving:
    """The service's base URL for a `with` block: its own process, or a thread of this one."""

    def __init__(self, args, names, token, clip_path, directory):
        self.args, self.names, self.token, self.clip_path, self.directory = args, names, token, clip_path, directory

    def __enter__(self) -> str:
        args = self.args
        if args.server == "process":
            self.process = ServiceProcess(self.names, self.token, self.clip_path, self.directory, args.max_pending,
                                          args.retry_after, args.threads)
            try:
                return self.process.wait()
            except BaseException:
                self.process.stop()
                raise
        from elborl.rewards.service import RewardService, ServiceConfig, create_app, serve_in_background

        rewards = in_process_rewards(self.names, self.clip_path)  # the service's own instances
        service = RewardService(ServiceConfig(tuple(self.names), token=self.token, max_pending=args.max_pending,
                                              retry_after=args.retry_after, factory=rewards.__getitem__))
        self.running = serve_in_background(create_app(service, preload=True))
        return self.running.__enter__()

    def __exit__(self, *exc):
        if self.args.server == "process":
            self.process.stop()
        else:
            self.running.__exit__(*exc)


if __name__ == "__main__":
    main()
