"""Benchmark: what one pretraining step of the embedded base model costs, and whether stock switches make it cheaper.

    .venv/bin/python bench/step_cost.py [--steps 30] [--compile] [--set base_model.channels=[32,64,128] ...]

Times the configured pretraining step (`elborl.pretrain.PretrainingRun.step`, what pretraining runs
`pretrain.steps` times: a batch of rendered images, the flow-matching forward, its backward, gradient clipping,
AdamW, the lr schedule, the EMA) on `pretrain.threads` threads, first in
parts, then whole under each variant: float32 (what pretraining runs), bfloat16 autocast, channels-last memory
format, both, scaled-dot-product attention forced to its math kernel, and with `--compile` torch.compile of the
UNet (its compilation, minutes on 2 cores, is not timed). Each variant prints seconds per step and the full
pretraining's minutes projected from them. Run it on an idle machine: the numbers are wall-clock.
"""

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from elborl.config import load_params_with_overrides
from elborl.pretrain import FORWARD_PART, PretrainingRun


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
    """Pretraining's own step (`elborl.pretrain.PretrainingRun`) with a variant's switches applied: the model's
    memory format and compilation here, autocast and the attention kernel around the step's forward."""

    def __init__(self, params, variant: Variant = VARIANTS[0]):
        self.variant, self.steps_done = variant, 0
        self.run = PretrainingRun(params.base_model, params.pretrain)
        self.model = self.run.model
        if variant.channels_last:
            self.model.denoiser.to(memory_format=torch.channels_last)
        if variant.compiled:
            self.model.denoiser.forward = torch.compile(self.model.denoiser.forward)

    def step(self, parts: dict[str, float] | None = None) -> None:
        """One step; adds each part's seconds to `parts` when given."""
        self.run.step(self.steps_done, clock=lambda part: self._timed(part, parts))
        self.steps_done += 1

    @contextmanager
    def _timed(self, part: str, parts: dict[str, float] | None):
        with ExitStack() as switches:
            if part == FORWARD_PART:
                if self.variant.math_attention:
                    switches.enter_context(sdpa_kernel(SDPBackend.MATH))
                switches.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant.bfloat16))
            start = time.perf_counter()
            yield
            if parts is not None:
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - start

    def warm_up(self, steps: int = 5) -> None:
        for _ in range(steps):
            self.step()

    def seconds_per_step(self, steps: int) -> float:
        self.warm_up()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


def parts_table(params, steps: int) -> str:
    timer, parts = StepTimer(params), {}
    timer.warm_up()
    for _ in range(steps):
        timer.step(parts)
    total = sum(parts.values())
    rows = [f"| {name} | {1000 * s / steps:.1f} | {s / total:.0%} |" for name, s in parts.items()]
    return "\n".join(["| part of a float32 step | ms | share |", "|---|---|---|", *rows,
                      f"| **step** | **{1000 * total / steps:.1f}** | 100% |"])


def variants_table(params, steps: int, variants) -> str:
    seconds = {v.name: StepTimer(params, v).seconds_per_step(steps) for v in variants}
    reference = seconds[variants[0].name]
    rows = [f"| {name} | {s:.3f} | {s / reference:.2f} | {s * params.pretrain.steps / 60:.1f} |"
            for name, s in seconds.items()]
    header = f"| variant | s / step | vs float32 | pretraining of {params.pretrain.steps} steps, min |"
    return "\n".join([header, "|---|---|---|---|", *rows])


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
    print(parts_table(params, args.steps) + "\n")
    print(variants_table(params, args.steps, variants))


if __name__ == "__main__":
    main()
