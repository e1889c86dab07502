"""Reading reward-model weights once they are local: which file of a directory, and loading it safely.

Weights come from a local file or directory or from `s3://`, fetched once by the store's one resolver
(`elborl.store.local`: a published artifact is verified against its manifest, so weights cross S3 as
safetensors). Local paths may also hold torch pickles (.pt/.pth/.bin, e.g. the published HPS v2.1 and LAION
aesthetic checkpoints); those are read with `torch.load(weights_only=True)`, which refuses anything but tensors
and plain containers.
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def find_weights(path: Path, preferred: tuple[str, ...] = ()) -> Path:
    """`path` itself when it is a file, else the one weights file in the directory (a preferred name wins)."""
    if path.is_file():
        return path
    for name in preferred:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safetensors = [p for p in found if p.suffix == ".safetensors"]
    found = safetensors or found
    if len(found) != 1:
        what = "no weights file" if not found else f"several weights files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{path}: {what}; expected one of {', '.join(WEIGHT_SUFFIXES)}"
                                + (f" (preferred names: {', '.join(preferred)})" if preferred else ""))
    return found[0]


def load_state_dict(path: Path) -> dict:
    """Tensors from a safetensors file, or from a torch pickle read with weights_only=True.

    A checkpoint dict holding its weights under "state_dict" (HPS, Lightning) is unwrapped, and a
    DataParallel "module." prefix dropped.
    """
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def default_device(device=None):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
