"""Evaluation: sample a prompt set (4 images per prompt, as GenEval does), score it, draw a grid."""

from dataclasses import dataclass
from pathlib import Path
import json

import numpy as np
from PIL import Image, ImageDraw

from elborl.geneval.scoring import GenEvalScorer, summarize
from elborl.geneval.types import TASKS
from elborl.sampling import sample
from elborl.shapes.detector import PaletteColorClassifier, ShapesDetector


@dataclass
class EvalConfig:
    images_per_prompt: int = 4
    sampler: str = "euler"
    steps: int = 20
    guidance: float = 1.0
    shift: float = 3.0
    seed: int = 1_000_000  # evaluation seeds never overlap rollout seeds
    batch_size: int = 128


def shapes_scorer() -> GenEvalScorer:
    return GenEvalScorer(ShapesDetector(), PaletteColorClassifier())


def evaluate(model, metas: list[dict], config: EvalConfig = EvalConfig(), scorer=None, progress=True):
    """Returns (summary dict, per-image records, uint8 images)."""
    scorer = scorer or shapes_scorer()
    expanded = [m for m in metas for _ in range(config.images_per_prompt)]
    seeds = [config.seed + i for i in range(len(expanded))]
    x0 = sample(model, [m["prompt"] for m in expanded], seeds, config.sampler, config.steps, config.shift,
                config.guidance, config.batch_size, progress)
    images = model.to_images(x0)
    scores = scorer.score(images, expanded)
    summary = summarize([m["tag"] for m in expanded], [s.correct for s in scores])
    summary["mean_reward"] = float(np.mean([s.reward for s in scores]))
    records = [{"prompt": m["prompt"], "tag": m["tag"], "seed": seed, "correct": s.correct,
                "reward": s.reward, "reasons": s.reasons} for m, seed, s in zip(expanded, seeds, scores)]
    return summary, records, images


def write_evaluation(out_dir: str | Path, summary: dict, records: list[dict], images: np.ndarray) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=1))
    with open(out_dir / "images.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    grid_image(images, records).save(out_dir / "grid.png")
    return {"scores": out_dir / "scores.json", "grid": out_dir / "grid.png"}


def grid_image(images: np.ndarray, records: list[dict], prompts_per_task: int = 3, scale: int = 3) -> Image.Image:
    """Rows of one prompt's images with the prompt written beside them; green frame = GenEval-correct."""
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        rows.setdefault(r["prompt"], []).append(i)
    chosen = []
    for task in TASKS:
        task_prompts = [p for p in rows if records[rows[p][0]]["tag"] == task]
        chosen += task_prompts[:prompts_per_task]
    cell, text_width = images.shape[1] * scale + 4, 300
    columns = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (text_width + columns * cell, max(1, len(chosen)) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for row, prompt in enumerate(chosen):
        draw.text((4, row * cell + cell // 2 - 6), prompt.removeprefix("a photo of "), fill="black")
        for col, i in enumerate(rows[prompt]):
            x, y = text_width + col * cell, row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(40, 170, 60) if records[i]["correct"] else (200, 40, 40))
            tile = Image.fromarray(images[i]).resize((cell - 4, cell - 4), Image.NEAREST)
            canvas.paste(tile, (x + 2, y + 2))
    return canvas


def format_table(summaries: dict[str, dict]) -> str:
    """A per-task table, one column per named summary (e.g. base, fine-tuned)."""
    names = list(summaries)
    lines = [f"{'task':<15}" + "".join(f"{n:>12}" for n in names)]
    for task in (*TASKS, "overall"):
        values = [s["overall"] if task == "overall" else s["tasks"].get(task) for s in summaries.values()]
        lines.append(f"{task:<15}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in values))
    return "\n".join(lines)
