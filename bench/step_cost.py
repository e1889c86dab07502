"""Benchmark: what one pretraining step of the embedded base model costs, and whether stock switches make it cheaper.

    .venv/bin/python bench/step_cost.py [--steps 30] [--compile] [--set base_model.channels=[32,64,128] ...]

Times the configured pretraining step (a batch of rendered images, `flow_matching_loss`'s forward, its backward,
gradient clipping, AdamW, EMA: what `elborl.pretrain` runs `pretrain.steps` times) on `pretrain.threads` threads, first in
parts, then whole under each variant: float32 (what pretraining runs), bfloat16 autocast, channels-last memory
format, both, scaled-dot-product attention forced to its math kernel, and with `--compile` torch.compile of the
UNet (its compilation, minutes on 2 cores, is not timed). Each variant prints seconds per step and the full
pretraining's minutes projected from them. Run it on an idle machine: the numbers are wall-clock.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
import argparse
import copy
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from elborl.config import load_params_with_overrides
from elborl.models.shapes_model import ShapesFlowModel
from elborl.pretrain import RenderedPrompts, flow_matching_loss, training_times, update_ema


@dataclass(frozen=True)
class Variant:
    name: str
    bfloat16: bool = False
    channels_last: bool = False
    math_attention: bool = False
    compiled: bool = False


VARIANTS = (
    Variant("float32 (pretraining's)"),
    Variant("bfloat16 autocast", bfloat16=True),
    Variant("channels_last", channels_last=True),
    Variant("bfloat16 + channels_last", bfloat16=True, channels_last=True),
    Variant("math attention kernel", math_attention=True),
)


class StepTimer:
    """One pretraining step, split into its parts, with the variant's switches applied."""

    def __init__(self, params, variant: Variant = VARIANTS[0]):
        self.config, self.variant = params.pretrain, variant
        self.model = ShapesFlowModel.from_config(params.base_model, seed=self.config.seed)
        if variant.channels_last:
            self.model.denoiser.to(memory_format=torch.channels_last)
        if variant.compiled:
            self.model.denoiser.forward = torch.compile(self.model.denoiser.forward)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=0.0)
        self.data = RenderedPrompts(self.config.seed, colour_captions=self.config.colour_captions)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def step(self, parts: dict[str, float] | None = None) -> None:
        """One step; adds each part's seconds to `parts` when given."""
        clock = _Clock(parts)
        with clock("data"):
            prompts, x0 = self.data.batch(self.config.batch_size)
            t = training_times(len(prompts), self.config.time_shift, self.generator, self.config.time_sampling)
            if self.variant.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
        attention = sdpa_kernel(SDPBackend.MATH) if self.variant.math_attention else nullcontext()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant.bfloat16)
        with clock("forward (text encoder, UNet, loss)"), attention, autocast:
            loss = flow_matching_loss(self.model, x0, prompts, t, self.generator)
        with clock("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with clock("clip + AdamW + EMA"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            update_ema(self.ema, self.model, self.config.ema_decay)

    def warm_up(self, steps: int = 5) -> None:
        for _ in range(steps):
            self.step()

    def seconds_per_step(self, steps: int) -> float:
        self.warm_up()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


class _Clock:
    def __init__(self, parts: dict[str, float] | None):
        self.parts = parts

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.parts is not None:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def parts_table(params, steps: int) -> tuple[str, dict[str, float]]:
    timer, parts = StepTimer(params), {}
    timer.warm_up()
    for _ in range(steps):
        timer.step(parts)
    total = sum(parts.values())
    rows = [f"| {name} | {1000 * s / steps:.1f} | {s / total:.0%} |" for name, s in parts.items()]
    table = "\n".join(["| part of a float32 step | ms | share |", "|---|---|---|", *rows,
                       f"| **step** | **{1000 * total / steps:.1f}** | 100% |"])
    return table, {name: s / steps for name, s in parts.items()}


def variants_table(params, steps: int, variants) -> tuple[str, dict[str, float]]:
    seconds = {v.name: StepTimer(params, v).seconds_per_step(steps) for v in variants}
    reference = seconds[variants[0].name]
    rows = [f"| {name} | {s:.3f} | {s / reference:.2f} | {s * params.pretrain.steps / 60:.1f} |"
            for name, s in seconds.items()]
    header = f"| variant | s / step | vs float32 | pretraining of {params.pretrain.steps} steps, min |"
    return "\n".join([header, "|---|---|---|---|", *rows]), seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. pretrain.batch_size=16")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 5 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    params = load_params_with_overrides(args.params, args.set)
    torch.set_num_threads(params.pretrain.threads)
    variants = VARIANTS + ((Variant("torch.compile (UNet)", compiled=True),) if args.compile else ())
    print(f"pretraining step: batch {params.pretrain.batch_size}, {params.pretrain.threads} threads, "
          f"{args.steps} timed steps\n")
    print(parts_table(params, args.steps)[0] + "\n")
    print(variants_table(params, args.steps, variants)[0])


if __name__ == "__main__":
    main()
