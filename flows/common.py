"""What the flows share: one command line per stage, run in-process or as a (container) job, with retries
on transient failures and logs in Prefect.

A stage is described once, by `stage_argv(stage, ...)`: the arguments of `python -m stages.<stage>`.

* mode="process": the stage runs in the flow's own process (the fast path on one machine; the round stages
  reuse one policy per run). The same command line is logged, so any stage can be replayed by hand.
* mode="container": the stage runs as its own job, `launcher` + the arguments. The default launcher is the
  local interpreter (`python -m stages.<stage>`, a subprocess); any command template works, with `{stage}`
  and `{version}` filled in, e.g. `docker run --rm --gpus all -v /data:/data elborl-{stage}:{version}`
  (each stage image's entrypoint is `python -m stages.<stage>`, containers/*.Dockerfile). Under a docker or
  kubernetes work pool (prefect.yaml) the flow itself runs in the job image and launches the same commands.

Stage artifacts are published through `elborl.store` (manifest last) and skipped when already published, so a
retried or re-run task never redoes finished work.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
import os
import re
import runpy
import shlex
import subprocess
import sys
import time

from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

MODES = ("process", "container")
ROUND_STAGES = ("rollout", "score", "update")

# The options each stage CLI takes besides --params and --threads (stages/*.py), in CLI order.
STAGE_OPTIONS = {
    "prepare_prompts": ("out",),
    "pretrain": ("out", "cache"),
    "rollout": ("run", "round", "base_model", "prompts", "cache"),
    "score": ("run", "round", "reward", "reward_url", "cache"),
    "update": ("run", "round", "base_model", "cache"),
    "evaluate": ("model", "policy_state", "prompts", "prompt_set", "prompt_file", "metrics", "out", "name", "cache"),
}

DEFAULT_LAUNCHER = shlex.quote(sys.executable) + " -m stages.{stage}"

try:
    VERSION = version("elborl")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    VERSION = "0.0.0"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# --- one command line per stage ----------------------------------------------------------------------
def stage_argv(stage: str, params_path: str, threads: int | None = None, **options) -> list[str]:
    """The arguments of `python -m stages.<stage>` (None-valued options left out; --threads defaults to this
    process's torch threads)."""
    if stage not in STAGE_OPTIONS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_OPTIONS)}")
    unknown = sorted(set(options) - set(STAGE_OPTIONS[stage]))
    if unknown:
        raise ValueError(f"stage {stage}: unknown option(s) {unknown}; expected some of {STAGE_OPTIONS[stage]}")
    import torch

    argv = ["--params", str(params_path), "--threads", str(threads or torch.get_num_threads())]
    for name in STAGE_OPTIONS[stage]:
        if options.get(name) is not None:
            argv += ["--" + name.replace("_", "-"), str(options[name])]
    return argv


def stage_command(stage: str, argv: list[str], launcher: str | None = None) -> list[str]:
    """The job's full command: the launcher (a template with {stage} and {version}) followed by the arguments."""
    template = (launcher or DEFAULT_LAUNCHER).replace("{stage}", stage).replace("{version}", VERSION)
    return shlex.split(template) + list(argv)  # plain replacement: JSON braces in a template stay as they are


def display_command(stage: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", f"stages.{stage}", *argv])


def run_cli_in_process(stage: str, argv: list[str]) -> None:
    """Runs `python -m stages.<stage> ARGV` in this process: the stage's own parser, defaults and error handling."""
    saved = sys.argv
    sys.argv = [f"stages.{stage}", *argv]
    try:
        runpy.run_module(f"stages.{stage}", run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (None, 0):
            message = str(exit.code)
            raise StageJobError(message, transient=bool(_TRANSIENT_STDERR.search(message))) from None
    finally:
        sys.argv = saved


# --- transient failures --------------------------------------------------------------------------------
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# What a stage CLI prints when the store's S3 endpoint is unreachable or failing (botocore's messages).
_TRANSIENT_STDERR = re.compile(
    r"Could not connect to the endpoint URL|Connection was closed|Connect timeout|Read timeout|Connection reset|"
    r"Max retries exceeded|\((InternalError|ServiceUnavailable|SlowDown|RequestTimeout|Throttling|50[0234])\)")


class StageJobError(RuntimeError):
    """A stage job exited with an error; `transient` says whether running it again may succeed."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def is_transient(error: BaseException) -> bool:
    """Network and server-side failures (worth a retry), not bad settings, missing inputs or bugs."""
    if isinstance(error, StageJobError):
        return error.transient
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        response = error.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _TRANSIENT_CODES or status >= 500
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(error, (OSError, TimeoutError))  # ConnectionError, BrokenPipeError, ...


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a failed task only when its exception is transient."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception as raised:  # noqa: BLE001 - whatever the result store raised is the failure
            error = raised
    transient = isinstance(error, BaseException) and is_transient(error)
    get_run_logger().warning(f"{task_run.name}: {type(error).__name__}: {error} -> "
                             f"{'transient, retrying' if transient else 'not transient, no retry'}")
    return transient


TASK_OPTIONS = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


# --- running a stage as a job ---------------------------------------------------------------------------
def run_job(command: list[str], logger, env: dict | None = None) -> float:
    """Runs a stage job, its output going to the Prefect log; returns its wall time in seconds."""
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    for line in process.stdout.splitlines():
        logger.info(line)
    lines = [line for line in process.stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    if process.returncode != 0:
        tail = "\n".join(lines[-20:])
        killed = process.returncode < 0 or process.returncode in (137, 143)  # signal: OOM killer, preemption
        transient = killed or bool(_TRANSIENT_STDERR.search(process.stderr))
        raise StageJobError(f"{shlex.join(command[:4])} ... exited with {process.returncode}:\n{tail}", transient)
    for line in lines:
        logger.debug(line)
    return time.perf_counter() - start


def published_seconds(store, uri: str) -> float:
    """The compute seconds a stage recorded in its artifact's manifest (0 when it recorded none)."""
    return float(store.read_manifest(uri).get("meta", {}).get("seconds", 0.0))


@task(name="stage", task_run_name="{stage}", log_prints=True, **TASK_OPTIONS)
def stage_task(stage: str, params_path: str, mode: str = "process", launcher: str | None = None,
               threads: int | None = None, **options) -> dict:
    """A non-round stage (prepare_prompts, pretrain, evaluate): returns its output URI and timings."""
    from elborl.store import ArtifactStore

    check_mode(mode)
    logger = get_run_logger()
    argv = stage_argv(stage, params_path, threads, **options)
    out = options.get("out")
    store = ArtifactStore()
    skipped = out is not None and store.exists(out)
    logger.info(("(already published) " if skipped else "") + display_command(stage, argv))
    start = time.perf_counter()
    if not skipped:
        if mode == "process":
            run_cli_in_process(stage, argv)
        else:
            run_job(stage_command(stage, argv, launcher), logger)
    return {"stage": stage, "uri": out, "skipped": skipped, "seconds": time.perf_counter() - start}


def resolve_path(path: str | os.PathLike) -> str:
    """Local paths made absolute (jobs may run elsewhere); URIs (s3://, file://) unchanged."""
    text = os.fspath(path)
    return text if "://" in text else str(Path(text).resolve())


# --- the run report -------------------------------------------------------------------------------------------
def run_report_path(ctx) -> Path:
    """Where a flow writes a run's report: beside a local run, else in the run context's local cache (named after
    the run's URI)."""
    if "://" not in ctx.run:
        return Path(ctx.run) / "report.html"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ctx.run.split("://", 1)[1]).strip("_")
    return Path(ctx.cache) / "reports" / f"{name}.html"


def publish_run_report(ctx, before: str | None = None, after: str | None = None) -> Path | None:
    """Writes the run report (elborl/report.py; `before`/`after`: evaluation artifacts to compare, default the
    run's own first and last) and publishes it as Prefect artifacts: `run-report`, a link to the page, and
    `run-report-summary`, its headline, chart and lineage in markdown. None when the run has nothing published."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from elborl.report import collect, summary_markdown, write_page

    try:
        data = collect(ctx, before, after)
    except FileNotFoundError as nothing:  # e.g. a flow asked for 0 rounds of a new run: nothing to report yet
        get_run_logger().warning(f"no run report: {nothing}")
        return None
    page = write_page(data, run_report_path(ctx)).resolve()
    create_link_artifact(page.as_uri(), link_text=f"run report of {ctx.run}", key="run-report",
                         description="The run report: one self-contained HTML page (open it in a browser).")
    create_markdown_artifact(summary_markdown(data, page), key="run-report-summary",
                             description=f"How the run `{ctx.run}` went.")
    get_run_logger().info(f"run report: {page}")
    return page
