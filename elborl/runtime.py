"""What the hardware in hand computes natively, and the precision chosen from it.

bfloat16 autocast is a speed-up only where the device has bfloat16 arithmetic: CUDA GPUs, and CPUs with
AVX-512 BF16 or AMX. Elsewhere PyTorch emulates it, and a forward pass of the shapes base model took 33.0 s
instead of 1.26 s in float32 on a 2-core AVX2 CPU (batch 32). So `auto` picks bfloat16 only where it is native.
"""

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


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


def model_device_type() -> str:
    """Where the diffusion models run: every backbone is built and trained on the CPU (no accelerator placement)."""
    return "cpu"


def precision_choice(rollout_precision: str, update_precision: str, device_type: str) -> str:
    """One line saying which precisions a run uses and why, for its log."""
    where = cpu_description() if device_type == "cpu" else device_type
    native = "native" if native_bfloat16(device_type) else "not native"
    return f"precision: rollouts {rollout_precision}, updates {update_precision} (bfloat16 is {native} on {where})"
