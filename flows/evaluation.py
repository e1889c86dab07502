"""The evaluation flow: the base model and/or a round's EMA policy on the held-out prompts (stages/evaluate.py).

Each evaluation is one `evaluate` stage publishing scores.json, images.jsonl and grid.png at
`<out>/<name>` (skipped when already published). The flow publishes the per-task scores as a Prefect table
artifact (`eval-scores`) and the grids as a markdown artifact (`eval-grids`): embedded as base64 PNG when
small, otherwise linked to their artifact URI.
"""

from __future__ import annotations

import base64
import json

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import check_mode, resolve_path, stage_task

MAX_EMBEDDED_PNG = 1_000_000  # bytes; larger grids are linked, not embedded


def scores_table(summaries: dict[str, dict]) -> list[dict]:
    """Rows of task -> score per evaluated model, then overall and the mean dense reward."""
    from elborl.geneval.types import TASKS

    def fmt(value):
        return None if value is None else round(float(value), 4)

    rows = [{"task": task, **{name: fmt(s["tasks"].get(task)) for name, s in summaries.items()}} for task in TASKS]
    rows.append({"task": "overall", **{name: fmt(s.get("overall")) for name, s in summaries.items()}})
    rows.append({"task": "mean_reward", **{name: fmt(s.get("mean_reward")) for name, s in summaries.items()}})
    return rows


def grids_markdown(grids: dict[str, tuple[str, bytes]]) -> str:
    """Markdown with each model's grid: a base64 data URI when small, else a link to the artifact URI."""
    parts = ["# Held-out evaluation grids", "", "Green frame = GenEval-correct.", ""]
    for name, (uri, png) in grids.items():
        parts.append(f"## {name}")
        if len(png) <= MAX_EMBEDDED_PNG:
            parts.append(f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})")
        else:
            parts.append(f"[{name} grid]({uri}/grid.png) ({len(png) / 1e6:.1f} MB, not embedded)")
        parts.append(f"\nartifact: `{uri}`\n")
    return "\n".join(parts)


@flow(name="evaluate-models", log_prints=True)
def evaluate_models(base_model: str, prompts: str, out: str, params_path: str = "params.yaml",
                    run: str | None = None, round: int | None = None, include_base: bool = True,
                    mode: str = "process", launcher: str | None = None, threads: int | None = None,
                    cache: str | None = None) -> dict:
    """Evaluates the base model (include_base) and the EMA policy of `run` after `round` (default: its last
    completed round); returns {name: summary} and publishes the `eval-scores` and `eval-grids` artifacts."""
    from elborl.rounds import RunContext, join, round_uri
    from elborl.store import ArtifactStore

    check_mode(mode)
    logger = get_run_logger()
    base_model, prompts, out, params_path = map(resolve_path, (base_model, prompts, out, params_path))
    cache = resolve_path(cache) if cache else None
    store = ArtifactStore()

    models = {}
    if include_base:
        models["base"] = None
    if run is not None:
        run = resolve_path(run)
        if round is None:
            round = RunContext(run, None, store=store).completed_rounds() - 1
        if round < 0:
            logger.warning(f"{run}: no completed round to evaluate")
        else:
            models[f"round-{round:05d}"] = round_uri(run, round, "update")
    if not models:
        raise ValueError("nothing to evaluate: include_base is off and no completed round was given")

    summaries, grids = {}, {}
    for name, policy_state in models.items():
        target = join(out, name)
        stage_task.with_options(task_run_name=f"evaluate-{name}")(
            "evaluate", params_path, mode, launcher, threads, model=base_model, policy_state=policy_state,
            prompts=prompts, out=target, name=name, cache=cache)
        directory = RunContext("", None, store=store, cache=cache).local(target)
        summaries[name] = json.loads((directory / "scores.json").read_text())
        grids[name] = (target, (directory / "grid.png").read_bytes())
        logger.info(f"{name}: overall {summaries[name]['overall']}")

    create_table_artifact(scores_table(summaries), key="eval-scores",
                          description=f"Held-out strict shapes-GenEval per task ({', '.join(summaries)}), from `{out}`.")
    create_markdown_artifact(grids_markdown(grids), key="eval-grids", description=f"Evaluation grids under `{out}`.")
    return summaries
