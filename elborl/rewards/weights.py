"""Where reward-model weights come from: a local file or directory, or an `s3://` artifact.

An `s3://bucket/prefix` URI names an artifact published with `elborl.store` (manifest + sha256, safe
formats only, so weights cross S3 as safetensors); it is fetched once into
`$ELBORL_CACHE/rewards/<manifest digest>` (default `~/.cache/elborl/rewards/...`) by the store's
`local_artifact` and reused while the published manifest is unchanged. Local paths may also hold torch pickles (.pt/.pth/.bin, e.g. the
published HPS v2.1 and LAION aesthetic checkpoints); those are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def cache_root() -> Path:
    return Path(os.environ.get("ELBORL_CACHE", Path.home() / ".cache" / "elborl")) / "rewards"


def resolve(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for `path`: itself when local (must exist), the fetched artifact directory for s3://."""
    text = os.fspath(path)
    if not text.startswith("s3://"):
        local = Path(text[len("file://"):] if text.startswith("file://") else text)
        if not local.exists():
            raise FileNotFoundError(f"reward weights not found: {local}")
        return local
    from elborl.store import ArtifactStore

    return ArtifactStore().local_artifact(text, cache_dir if cache_dir is not None else cache_root())


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
