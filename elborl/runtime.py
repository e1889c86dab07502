"""What the hardware in hand computes natively, and the precision chosen from it.

bfloat16 autocast is a speed-up only where the device has bfloat16 arithmetic: CUDA GPUs, and CPUs with
AVX-512 BF16 or AMX. Elsewhere PyTorch emulates it, and a forward pass of the shapes base model took 33.0 s
instead of 1.26 s in float32 on a 2-core AVX2 CPU (batch 32). So `auto` picks bfloat16 only where it is native.
"""

from typing import Annotated
import os
import re

import torch
from pydantic import Field

from elborl.settings import Bool, Rule, Str, section

PRECISIONS = ("auto", "float32", "bfloat16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(value: str) -> None:
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a device; expected auto, cpu, cuda or cuda:N")


@section("runtime")
class RuntimeConfig:
    """Where and how the diffusion model runs; `place` applies it when a backbone loads. Results depend on it
    (float arithmetic differs between devices), so a run records it with its settings. Pretraining the embedded
    base model stays on the CPU (its threads are part of its identity)."""

    device: Annotated[Str, Rule("auto, cpu, cuda or cuda:N", _device), Field(description=(
        "auto: the first CUDA GPU if torch sees one, else the CPU; or cpu, cuda, cuda:N. In a launched multi-GPU "
        "job, cuda and auto take the GPU of the process's LOCAL_RANK."
    ))] = "auto"
    tf32: Annotated[Bool, Field(description=(
        "TensorFloat-32 matmuls and convolutions on CUDA (the paper's recipe trains float32 with TF32)."
    ))] = True
    gradient_checkpointing: Annotated[Bool, Field(description=(
        "Recompute the denoiser's activations during backward: much less memory for SD3.5-M-sized updates, about "
        "a third more compute; the gradient is the same up to float rounding."
    ))] = False

    def validate(self) -> None:
        """Nothing ties these settings together; each is checked on construction and assignment."""


def resolve_device(device: str) -> torch.device:
    """`device` as a torch device on this machine (`auto`: CUDA if present, else CPU); asking for a GPU this
    machine does not have is an error naming the setting."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and "LOCAL_RANK" in os.environ:
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process of a launched job
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ValueError(f"runtime.device: {device} asked for, but torch sees {count} CUDA GPU(s) here; "
                             "use runtime.device=auto or cpu")
    return resolved


def device_present(device: str) -> bool:
    """Whether this machine has `device` (settings may name a GPU for stages that run elsewhere)."""
    try:
        resolve_device(device)
    except ValueError:
        return False
    return True


def place(backbone, runtime: RuntimeConfig | None):
    """The one place a backbone gets its device and runtime options: moved to `runtime.device`, TF32 set for CUDA,
    gradient checkpointing on its denoiser when asked. Returns the backbone (untouched when `runtime` is None).
    The loaders (`elborl.models.load_backbone`, `elborl.pretrain.ensure_base_model`) call it."""
    if runtime is None:
        return backbone
    runtime.validate()
    device = resolve_device(runtime.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = runtime.tf32
        torch.backends.cudnn.allow_tf32 = runtime.tf32
    if runtime.gradient_checkpointing:
        denoiser = backbone.denoiser
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"runtime.gradient_checkpointing: {type(denoiser).__name__} does not support it")
        denoiser.enable_gradient_checkpointing()
    return backbone.to(device)


def native_bfloat16(device_type: str) -> bool:
    """Whether `device_type` ("cpu", "cuda") computes bfloat16 in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` -> bfloat16 where `device_type` computes it natively, else float32; an explicit choice stays."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16(device_type) else "float32"


def cpu_description() -> str:
    """The CPU's name and the capability PyTorch dispatches to, e.g. 'AMD EPYC (AVX2)'."""
    name = torch.cpu.get_capabilities().get("cpu_name", "CPU")
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def precision_choice(rollout_precision: str, update_precision: str, device_type: str) -> str:
    """One line saying which precisions a run uses and why, for its log."""
    where = cpu_description() if device_type == "cpu" else device_type
    native = "native" if native_bfloat16(device_type) else "not native"
    return f"precision: rollouts {rollout_precision}, updates {update_precision} (bfloat16 is {native} on {where})"
