"""A policy's training state as safetensors + JSON (no pickle): policy weights, optimizer, RNG state.

A round's update artifact holds one (elborl/rounds.py); the artifact store publishes it whole or not at all.
"""

from pathlib import Path
import json

import torch
from safetensors.torch import load_file, save_file

from elborl.policy import Policy


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_state(directory: str | Path, policy: Policy, optimizer, extra: dict | None = None) -> None:
    """Policy weights, optimizer and RNG state into an existing directory (safetensors + state.json)."""
    directory = Path(directory)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, directory / "policy.safetensors")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, directory / "optimizer.safetensors")
    save_file({"torch_rng": torch.get_rng_state()}, directory / "rng.safetensors")
    (directory / "state.json").write_text(json.dumps({"optimizer": opt_meta, **(extra or {})}))


def read_state(directory: str | Path, policy: Policy, optimizer=None) -> dict:
    """Restores what `write_state` wrote (the optimizer only when given); returns state.json's contents."""
    directory = Path(directory)
    policy.load_state_dict(load_file(directory / "policy.safetensors"))
    state = json.loads((directory / "state.json").read_text())
    if optimizer is not None:
        _load_optimizer(optimizer, load_file(directory / "optimizer.safetensors"), state["optimizer"])
    torch.set_rng_state(load_file(directory / "rng.safetensors")["torch_rng"])
    return state
