"""Pretraining the embedded base model by flow matching on rendered shapes.

x_t = (1 - t) x0 + t eps, target velocity eps - x0 (METHOD.md §0); t is logit-normal (SD3's choice),
optionally shifted toward noise like the sampling schedule.
"""

from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from elborl.geneval.prompts import describe_colours, enumerate_prompts
from elborl.geneval.types import TASKS
from elborl.models.shapes_model import ShapesFlowModel, ShapesModelConfig
from elborl.runtime import cpu_description, place
from elborl.sampling import from_uint8
from elborl.settings import Float, Int, OneOf, Rule, Str, section
from elborl.shapes.render import render
from elborl.shapes.world import SHAPES_VOCABULARY
from elborl.store import ArtifactStore


LR_SCHEDULES = ("constant", "cosine")
TIME_SAMPLINGS = ("logit_normal", "uniform")


def _task_mix(weights: dict) -> None:
    if weights and not any(weights.get(task, 1.0) > 0 for task in TASKS):
        raise ValueError(f"expected weights not all 0 (a task not named weighs 1), got {weights}")


@section("pretrain")
class PretrainConfig:
    """Pretraining the embedded base model by flow matching on rendered shapes (docs/embedded-default.md, "The base
    model"). With `base_model:` it makes the model's cache key: the weights shipped in elborl/base_models are
    found only for exactly these settings."""

    steps: Annotated[Int, Field(gt=0, description="Optimizer steps.")] = 2800
    batch_size: Annotated[Int, Field(gt=0, description="Rendered (prompt, image) pairs per step.")] = 8
    lr: Annotated[Float, Field(gt=0, allow_inf_nan=False, description="AdamW's peak learning rate.")] = 1e-3
    warmup_steps: Annotated[Int, Field(ge=0, description="Steps of linear learning-rate warm-up to `lr`.")] = 100
    ema_decay: Annotated[Float, Field(ge=0, le=1, description=(
        "The cap of the weights' EMA decay (warmed up as (1 + step) / (10 + step)); the EMA is the model saved."
    ))] = 0.99
    prompt_dropout: Annotated[Float, Field(ge=0, le=1, description=(
        "The share of empty prompts, so classifier-free guidance has an unconditional model."
    ))] = 0.1
    time_shift: Annotated[Float, Field(gt=0, description=(
        "Shifts the training times toward noise as the sampler's schedule shift does (1 = none)."
    ))] = 1.0
    time_sampling: Annotated[Str, OneOf(TIME_SAMPLINGS, "sampling"), Field(description=(
        "How training times t are drawn (before the shift): SD3's logit-normal, or uniform. Logit-normal rarely "
        "draws t > 0.9 (1.4%), where in 32x32 pixels an object's colour is decided, yet more high-t training "
        "(uniform or shifted times) scored worse held out; colour is bound by `colour_captions` instead "
        "(docs/experiments/2026-11-29-base-model-variants.md)."
    ))] = "logit_normal"
    task_weights: Annotated[
        dict[Annotated[Str, OneOf(TASKS, "task")], Annotated[Float, Field(ge=0, allow_inf_nan=False)]],
        Rule("weights not all 0", _task_mix), Field(description=(
            "The share of each GenEval task in the pretraining stream: {task: weight}, a task not named weighs 1; "
            "empty: all equal (docs/experiments/2026-11-29-base-model-variants.md)."
        ))] = field(default_factory=dict)
    colour_captions: Annotated[Float, Field(ge=0, le=1, description=(
        "The share of the colour-free prompts (single object, two objects, counting, position) recaptioned to name "
        "the colours drawn, as descriptive recaptioning does for real pretraining data: \"a photo of two circles\" "
        "-> \"a photo of two red circles\". Colour words then come with most images instead of a third of them "
        "(docs/experiments/2026-11-29-base-model-variants.md)."
    ))] = 0.5
    lr_schedule: Annotated[Str, OneOf(LR_SCHEDULES, "schedule"), Field(description=(
        "cosine anneals the learning rate to 5% of its peak by the last step: in a budget this short the model is "
        "far from converged, and annealing turns the last steps into fine convergence instead of noise."
    ))] = "cosine"
    seed: Annotated[Int, Field(ge=0, description="The seed of the model's initialisation, data and noise.")] = 0
    threads: Annotated[Int, Field(gt=0, description=(
        "CPU threads of pretraining, part of the model's identity: summation order depends on the thread count, so "
        "1 and 2 threads give different weights after the first step. Fixing it makes the base model the same on "
        "every machine of one CPU kind, whatever threads the caller runs with "
        "(docs/experiments/2026-11-30-pretraining-threads.md)."
    ))] = 2


class RenderedPrompts:
    """An endless stream of (prompt, rendered image) batches over all six tasks, tasks equally likely unless
    `task_weights` ({task: weight}, missing tasks weigh 1) says otherwise."""

    def __init__(self, seed: int, vocab=SHAPES_VOCABULARY, task_weights: dict | None = None,
                 colour_captions: float = 0.0):
        self.rng, self.vocab, self.colour_captions = np.random.default_rng(seed), vocab, colour_captions
        self.by_task = [enumerate_prompts(vocab, task) for task in TASKS]
        weights = np.array([float((task_weights or {}).get(task, 1.0)) for task in TASKS])
        self.task_probabilities = weights / weights.sum() if task_weights else None

    def _tasks(self, n: int) -> np.ndarray:
        if self.task_probabilities is None:
            return self.rng.integers(len(TASKS), size=n)
        return self.rng.choice(len(TASKS), size=n, p=self.task_probabilities)

    def batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        metas = []
        for task in self._tasks(n):
            records = self.by_task[task]
            meta = records[self.rng.integers(len(records))]
            if self.colour_captions and self.rng.random() < self.colour_captions:  # no draw when off: same stream
                colours = self.rng.choice(self.vocab.colors, size=len(meta["include"]))
                meta = describe_colours(meta, [str(c) for c in colours], self.vocab)
            metas.append(meta)
        images = np.stack([render(meta, self.rng)[0] for meta in metas])
        return [m["prompt"] for m in metas], from_uint8(images)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then constant or cosine-annealed to 5% of the peak at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def flow_matching_loss(model, x0, prompts, t, generator=None) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=generator)
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * eps
    v = model.velocity(x_t, t, model.encode_prompts(prompts))
    return (v - (eps - x0)).pow(2).mean()


def training_times(n: int, shift: float, generator, sampling: str = "logit_normal") -> torch.Tensor:
    """n flow-matching times in (0, 1): logit-normal or uniform draws u, shifted like the sampler's grid."""
    if sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    elif sampling == "uniform":
        u = torch.rand(n, generator=generator).clamp(1e-4, 1 - 1e-4)
    else:
        raise ValueError(f"unknown time sampling {sampling!r}; expected one of {TIME_SAMPLINGS}")
    return shift * u / (1 + (shift - 1) * u)


def pretrain(model_config: ShapesModelConfig, config: PretrainConfig, progress: bool = True, log=print,
             on_step=None):
    """Returns the EMA model (what gets saved and sampled) and a list of per-step losses.

    Runs on `config.threads` CPU threads and gives the caller its own thread count back. `on_step(step)` is
    called before each step (the timing benchmark uses it)."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(model_config, config, progress, log, on_step)
    finally:
        torch.set_num_threads(caller_threads)


FORWARD_PART = "forward (text encoder, UNet, loss)"  # the part of a step that autocast or a kernel choice changes


class PretrainingRun:
    """What pretraining holds between steps: the model, its EMA, the optimizer and lr schedule, the rendered data
    and the noise generator. `_pretrain` runs its `step` `config.steps` times; bench/step_cost.py times it."""

    def __init__(self, model_config: ShapesModelConfig, config: PretrainConfig):
        torch.manual_seed(config.seed)
        self.config = config
        self.model = ShapesFlowModel.from_config(model_config, seed=config.seed)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.data = RenderedPrompts(config.seed, task_weights=config.task_weights,
                                    colour_captions=config.colour_captions)
        self.generator = torch.Generator().manual_seed(config.seed)

    def step(self, step: int, clock=None) -> float:
        """One flow-matching step; returns its loss. `clock(part)`, when given, is a context manager around each
        part of the step (the step-cost benchmark times them with it)."""
        clock = clock or (lambda part: contextlib.nullcontext())
        config, generator = self.config, self.generator
        with clock("data"):
            prompts, x0 = self.data.batch(config.batch_size)
            drop = torch.rand(len(prompts), generator=generator) < config.prompt_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
            t = training_times(len(prompts), config.time_shift, generator, config.time_sampling)
        with clock(FORWARD_PART):
            loss = flow_matching_loss(self.model, x0, prompts, t, generator)
        with clock("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with clock("clip + AdamW + EMA"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            update_ema(self.ema, self.model, min(config.ema_decay, (1 + step) / (10 + step)))
        return loss.item()


def _pretrain(model_config: ShapesModelConfig, config: PretrainConfig, progress: bool, log, on_step):
    run = PretrainingRun(model_config, config)
    losses, start = [], time.time()
    bar = tqdm(range(config.steps), desc="pretraining base model", disable=not progress)
    for step in bar:
        if on_step is not None:
            on_step(step)
        losses.append(run.step(step))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    log(f"pretrained {config.steps} steps x {config.batch_size} images in {time.time() - start:.0f} s "
        f"(final loss {np.mean(losses[-50:]):.4f})")
    return run.ema, losses


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def cache_key(model_config: ShapesModelConfig, config: PretrainConfig) -> str:
    blob = json.dumps({"model": asdict(model_config), "pretrain": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Pretrained weights shipped in the package, one published artifact (elborl.store) per cache key: the default
# base model is then the same bits on every machine (pretraining on another CPU kind sums in another order and
# ends at another model) and a fresh clone skips pretraining. `python -m stages.pretrain --rebuild --ship`
# pretrains again and replaces them.
SHIPPED_BASE_MODELS = Path(__file__).parent / "base_models"


def base_model_source(model_config: ShapesModelConfig, config: PretrainConfig, cache_root: str | Path,
                      shipped_root: str | Path = SHIPPED_BASE_MODELS) -> str:
    """Where ensure_base_model will take these settings' base model from: "cache", "shipped" or "pretrain"."""
    key = cache_key(model_config, config)
    if (Path(cache_root) / key / "pretrain_log.json").exists():
        return "cache"
    return "shipped" if ArtifactStore().exists(Path(shipped_root) / key) else "pretrain"


def ensure_base_model(model_config: ShapesModelConfig, config: PretrainConfig, cache_root: str | Path,
                      progress: bool = True, log=print, runtime=None, rebuild: bool = False,
                      shipped_root: str | Path = SHIPPED_BASE_MODELS) -> tuple[ShapesFlowModel, Path]:
    """The pretrained base model for these settings, placed by `runtime` (a RuntimeConfig) when given: read from
    the cache, else copied from the shipped weights (checksums verified), else trained on the CPU and cached.
    `rebuild` pretrains even when the cache or the package holds the model, and replaces the cached copy.

    Every copy lands beside its final place and is renamed last, so a killed run never leaves a half-written
    model that a later run would take for finished.
    """
    key = cache_key(model_config, config)
    path = Path(cache_root) / key
    shipped, store = Path(shipped_root) / key, ArtifactStore()
    source = "pretrain" if rebuild else base_model_source(model_config, config, cache_root, shipped_root)
    if source == "cache":
        log(f"base model: reusing {path}")
    elif source == "shipped":
        log(f"base model: the shipped weights {shipped} -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.get_artifact(shipped, path)
        except FileExistsError:  # another process copied them meanwhile (the copy lands by a rename)
            pass
    else:
        log(f"base model: pretraining ({config.steps} steps of {config.batch_size}) -> {path}")
        _pretrain_into(model_config, config, path, progress, log)
    return place(ShapesFlowModel.from_pretrained(path), runtime), path


def _pretrain_into(model_config: ShapesModelConfig, config: PretrainConfig, path: Path, progress: bool, log) -> None:
    start = time.time()
    model, losses = pretrain(model_config, config, progress, log)
    staging = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / "pretrain_log.json").write_text(json.dumps(
        {"seconds": round(time.time() - start, 1), "losses": losses, "config": asdict(config)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # a rebuild replaces the cached model: set the old one aside, then swap
        retired = path.with_name(f"{path.name}.old-{os.getpid()}")
        path.rename(retired)
        shutil.rmtree(retired)
    staging.rename(path)


def ship_base_model(path: Path, shipped_root: str | Path = SHIPPED_BASE_MODELS) -> Path:
    """Publishes the cached base model at `path` as the package's shipped weights for its key (a rebuild
    replaces the shipped copy), with the machine that trained it in the manifest."""
    target = Path(shipped_root) / path.name
    shutil.rmtree(target, ignore_errors=True)
    ArtifactStore().put_artifact(path, target, {"trained_on": cpu_description(), "torch": torch.__version__})
    return target
