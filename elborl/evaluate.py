"""Evaluation: sample a prompt set (4 images per prompt, as GenEval does), score it, draw a grid.

`evaluate` gives GenEval's strict score (a `correct` verdict per image); `evaluate_metrics` any set of metrics
(reward callables) per task. Both sample through `sample_images` and write through `write_evaluation`."""

from pathlib import Path
from typing import Annotated
import json

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from elborl.distributed import SINGLE, Processes
from elborl.geneval.scoring import GenEvalScorer, summarize
from elborl.sampling import ODE_SAMPLERS, sample
from elborl.settings import Float, Int, OneOf, Str, section
from elborl.shapes.detector import PaletteColorClassifier, ShapesDetector


SCORERS = ("shapes", "geneval")


@section("evaluate")
class EvalConfig:
    """The held-out evaluation (docs/embedded-default.md, "Evaluation"): `images_per_prompt` images of every test
    prompt, one seed each, scored by GenEval's strict verdict."""

    images_per_prompt: Annotated[Int, Field(gt=0, description="Images per prompt (GenEval draws 4).")] = 4
    sampler: Annotated[Str, OneOf(ODE_SAMPLERS, "sampler"), Field(description="The ODE sampler.")] = "euler"
    steps: Annotated[Int, Field(gt=0, description="Sampler steps.")] = 20
    guidance: Annotated[Float, Field(ge=0, allow_inf_nan=False, description=(
        "Classifier-free guidance; 1.0 = CFG off (docs/experiments/2026-12-04-guidance.md)."
    ))] = 1.0
    shift: Annotated[Float, Field(gt=0, description="The time-schedule shift of the sampler.")] = 3.0
    seed: Annotated[Int, Field(ge=0, description=(
        "The first image's seed, then one more per image; far above rollout seeds, so the two never overlap."
    ))] = 1_000_000
    batch_size: Annotated[Int, Field(gt=0, description="Images per forward pass: memory and speed, not results.")] = 128
    scorer: Annotated[Str, OneOf(SCORERS, "scorer"), Field(description=(
        "Who gives the strict verdicts: `shapes` (the shapes world's detector) or `geneval` (GenEval's own "
        "Mask2Former and CLIP colours on real images; weights from rewards.paths.geneval)."
    ))] = "shapes"


def shapes_scorer() -> GenEvalScorer:
    return GenEvalScorer(ShapesDetector(), PaletteColorClassifier())


def held_out_scorer(config: EvalConfig, rewards) -> GenEvalScorer:
    """The scorer `config.scorer` names; GenEval's is built as the `geneval` reward is (its weights from the
    rewards section's paths)."""
    if config.scorer == "shapes":
        return shapes_scorer()
    from elborl.rewards import configured_reward

    if "geneval" not in rewards.paths:
        raise ValueError("evaluate.scorer: geneval needs the location of GenEval's detector and CLIP weights: "
                         "rewards.paths.geneval (a local directory or an s3:// artifact)")
    return configured_reward("geneval", rewards).scorer


def sample_images(model, metas: list[dict], config: EvalConfig = EvalConfig(), progress=True,
                  share: slice = slice(None)):
    """`images_per_prompt` images of every prompt, one seed each, or the `share` of them given (the same images,
    each image having its own seed): (metadata per image, seeds, uint8 images)."""
    expanded = [m for m in metas for _ in range(config.images_per_prompt)]
    seeds = [config.seed + i for i in range(len(expanded))]
    expanded, seeds = expanded[share], seeds[share]
    if not expanded:  # a process with no share (fewer images than processes)
        return [], [], None
    x0 = sample(model, [m["prompt"] for m in expanded], seeds, config.sampler, config.steps, config.shift,
                config.guidance, config.batch_size, progress)
    return expanded, seeds, model.to_images(x0)


def evaluate(model, metas: list[dict], config: EvalConfig = EvalConfig(), scorer=None, progress=True,
             processes: Processes = SINGLE):
    """GenEval's strict score (default: the shapes scorer). Returns (summary dict, per-image records, uint8 images).

    Under data parallelism each process samples and scores its share of the images; every process returns the
    summary and all records, the main process alone the images (None elsewhere)."""
    scorer = scorer or shapes_scorer()
    share = processes.even_share(len(metas) * config.images_per_prompt)
    expanded, seeds, images = sample_images(model, metas, config, progress and processes.is_main, share)
    scores = scorer.score(images, expanded) if expanded else []
    records = [{"prompt": m["prompt"], "tag": m["tag"], "seed": seed, "correct": s.correct,
                "reward": s.reward, "reasons": s.reasons} for m, seed, s in zip(expanded, seeds, scores)]
    records, images = _gathered(processes, records, images)
    summary = summarize([r["tag"] for r in records], [r["correct"] for r in records])
    summary["mean_reward"] = float(np.mean([r["reward"] for r in records]))
    return summary, records, images


def evaluate_metrics(model, metas: list[dict], config: EvalConfig, metrics: dict, progress=True,
                     processes: Processes = SINGLE):
    """Any metrics (reward callables by name, e.g. `make_reward("clipscore", path=...)`) on a prompt set.

    Returns (summary, per-image records, uint8 images); the summary holds, per metric, its mean per task
    (meta["tag"], in order of first appearance) and overall, the unweighted mean of the task means (GenEval's
    convention: a task counts once whatever its size): {"metrics": {name: {"tasks": {tag: mean}, "overall": x}},
    "n_images": N}. Data parallel as `evaluate` is.
    """
    share = processes.even_share(len(metas) * config.images_per_prompt)
    expanded, seeds, images = sample_images(model, metas, config, progress and processes.is_main, share)
    records = [{"prompt": m["prompt"], "tag": m["tag"], "seed": seed} for m, seed in zip(expanded, seeds)]
    for name, metric in metrics.items():
        values = np.asarray(metric(images, expanded) if expanded else [], dtype=np.float64).reshape(-1)
        if values.shape != (len(expanded),):
            raise ValueError(f"metric {name!r} returned {values.size} values for {len(expanded)} images")
        for record, value in zip(records, values):
            record[name] = float(value)
    records, images = _gathered(processes, records, images)
    tags = np.array([r["tag"] for r in records])
    summary = {"metrics": {}, "n_images": len(records)}
    for name in metrics:
        values = np.array([r[name] for r in records])
        tasks = {str(tag): float(values[tags == tag].mean()) for tag in dict.fromkeys(tags)}
        summary["metrics"][name] = {"tasks": tasks, "overall": float(np.mean(list(tasks.values())))}
    return summary, records, images


def _gathered(processes: Processes, records: list[dict], images: np.ndarray | None):
    """Every process's records (on every process) and images (on the main process, None elsewhere), in order."""
    if processes.world == 1:
        return records, images
    records = [record for part in processes.gather_objects(records) for record in part]
    parts = processes.gather_to_main(images)
    return records, (np.concatenate([p for p in parts if p is not None]) if parts is not None else None)


def write_evaluation(out_dir: str | Path, summary: dict, records: list[dict], images: np.ndarray) -> dict:
    """scores.json (the summary), scores.md (its per-task table), images.jsonl (per image) and grid.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=1))
    columns = summary.get("metrics", {"geneval_strict": summary})
    (out_dir / "scores.md").write_text(format_table(columns, markdown=True) + "\n")
    with open(out_dir / "images.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    grid_image(images, records).save(out_dir / "grid.png")
    return {"scores": out_dir / "scores.json", "table": out_dir / "scores.md", "grid": out_dir / "grid.png"}


FRAMES = {True: (40, 170, 60), False: (200, 40, 40), None: (170, 170, 170)}  # GenEval-correct, wrong, no verdict
GRID_TEXT_WIDTH = 300  # the prompt column left of a grid's images


def grid_image(images: np.ndarray, records: list[dict], prompts_per_task: int = 3, scale: int = 3) -> Image.Image:
    """Rows of one prompt's images with the prompt written beside them, the first `prompts_per_task` prompts of
    every task (tag); frame green = GenEval-correct, red = not, grey = no verdict (other metrics)."""
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        rows.setdefault(r["prompt"], []).append(i)
    chosen = []
    for task in dict.fromkeys(r["tag"] for r in records):
        task_prompts = [p for p in rows if records[rows[p][0]]["tag"] == task]
        chosen += task_prompts[:prompts_per_task]
    cell, text_width = images.shape[1] * scale + 4, GRID_TEXT_WIDTH
    columns = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (text_width + columns * cell, max(1, len(chosen)) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for row, prompt in enumerate(chosen):
        text = prompt.removeprefix("a photo of ")
        draw.text((4, row * cell + cell // 2 - 6), text if len(text) <= 48 else text[:45] + "...", fill="black")
        for col, i in enumerate(rows[prompt]):
            x, y = text_width + col * cell, row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=FRAMES[records[i].get("correct")])
            tile = Image.fromarray(images[i]).resize((cell - 4, cell - 4), Image.NEAREST)
            canvas.paste(tile, (x + 2, y + 2))
    return canvas


def before_after(before: Image.Image, after: Image.Image, titles: tuple[str, str]) -> Image.Image:
    """Two grids of the same prompts side by side (the second without its prompt column), titled above."""
    return side_by_side([before, after], list(titles))


def side_by_side(grids: list[Image.Image], titles: list[str]) -> Image.Image:
    """Grids of the same prompts side by side, each titled above; only the first keeps its prompt column."""
    if len({g.height for g in grids}) > 1:
        raise ValueError(f"grids of different prompts: {[g.height for g in grids]} px high")
    gap, title_height = 16, 24
    panels = [grids[0]] + [g.crop((GRID_TEXT_WIDTH, 0, g.width, g.height)) for g in grids[1:]]
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, title_height + grids[0].height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for index, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(panel, (x, title_height))
        draw.text((x + (GRID_TEXT_WIDTH if index == 0 else 0) + 4, 6), title, fill="black")
        x += panel.width + gap
    return canvas


def format_table(summaries: dict[str, dict], markdown: bool = False) -> str:
    """A per-task table, one column per named summary ({"tasks": {task: score}, "overall": score}: e.g. base and
    fine-tuned, or one per metric); rows are the tasks in order of first appearance, then overall."""
    names = list(summaries)
    tasks = dict.fromkeys(task for s in summaries.values() for task in s["tasks"])
    rows = [(task, [s["tasks"].get(task) for s in summaries.values()]) for task in tasks]
    rows.append(("overall", [s["overall"] for s in summaries.values()]))

    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    if markdown:
        return "\n".join(["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                          *(f"| {task} | " + " | ".join(map(cell, values)) + " |" for task, values in rows)])
    widths = [max(12, len(n) + 2) for n in names]
    return "\n".join([f"{'task':<15}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)),
                      *(f"{task:<15}" + "".join(f"{cell(v):>{w}}" for v, w in zip(values, widths))
                        for task, values in rows)])
