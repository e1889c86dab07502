"""GenEval's detector: Mask2Former Swin-S (COCO instance segmentation) through mmdet 3.3.

The model is built from the config that ships inside the mmdet wheel
(`mmdet/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py`), so nothing
is downloaded to build it. Weights come from a local file or an `s3://` URI (fetched once to a
cache); GenEval uses the mmdet v3 checkpoint `GENEVAL_CHECKPOINT`. `weights=None` keeps random
weights (tests only).

Checkpoints are loaded without running pickled code: `.safetensors` files directly, `.pth` files
with `torch.load(weights_only=True)`, which refuses any pickled global but tensors and plain
containers. mmengine checkpoints may carry numpy scalars/arrays in their `meta`; those (and only
those) numpy reconstructors are allow-listed on a second try. Anything else is refused with an
error that names it.

mmcv-lite (the `geneval` extra) has no compiled `mmcv._ext`, which `mmcv.ops` loads when mmdet is
imported. `install_mmcv_ext_stub` registers a stand-in before that import, only when the compiled
module is absent: its spec has no loader (so mmengine reports no compiled ops) and every op it is
asked for is a function that raises `NotImplementedError`. Mask2Former never calls one: its
multi-scale deformable attention falls back to mmcv's pure-PyTorch version (also on CUDA, which the
stub arranges) and its point sampling is `grid_sample`. Detectors that need NMS or RoIAlign still
need compiled mmcv (`pip install mmcv==2.1.0` built against the installed torch).
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import pickle
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from elborl.geneval.prompts import GENEVAL_CLASSES
from elborl.geneval.types import Detection

logger = logging.getLogger(__name__)

CONFIG = "mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
GENEVAL_CHECKPOINT = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"
GENEVAL_CHECKPOINT_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/"
    f"mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/{GENEVAL_CHECKPOINT}"
)
INSTALL_HINT = "install the geneval extra: pip install -e .[geneval] (mmdet==3.3.0, mmengine==0.10.7, mmcv-lite==2.1.0)"


class MissingExtraError(ImportError):
    """A package of the `geneval` extra is not installed."""


# --- mmcv._ext stand-in ------------------------------------------------------------------------
class _MissingOps(types.ModuleType):
    """`mmcv._ext` for mmcv-lite: any op name resolves to a function that raises when called."""

    def __init__(self):
        super().__init__("mmcv._ext", "stand-in for compiled mmcv ops (mmcv-lite has none); see elborl.geneval.mask2former")
        # No loader: importlib.util.find_spec / pkgutil.find_loader report no compiled mmcv.
        self.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
        self.requested: set[str] = set()  # op names mmcv looked up (at import: hasattr checks)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.requested.add(name)

        def missing_op(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv._ext.{name}: compiled mmcv ops are not installed (mmcv-lite); Mask2Former does not need "
                f"them, but this model does: install mmcv==2.1.0 compiled against torch {torch.__version__}"
            )

        missing_op.__name__ = missing_op.__qualname__ = name
        return missing_op


def install_mmcv_ext_stub() -> bool:
    """Registers the `mmcv._ext` stand-in if compiled mmcv ops are absent; True when the stand-in is in use.

    Must run before `mmcv.ops` (and so `mmdet.apis`) is first imported; idempotent.
    """
    existing = sys.modules.get("mmcv._ext")
    if existing is not None:
        return isinstance(existing, _MissingOps)
    importlib.import_module("mmcv")  # the parent package must be importable first
    if importlib.util.find_spec("mmcv._ext") is not None:
        return False  # compiled mmcv: use it
    if "mmcv.ops" in sys.modules:
        raise RuntimeError("mmcv.ops was imported before the mmcv._ext stand-in could be installed")
    sys.modules["mmcv._ext"] = _MissingOps()
    return True


def _use_pytorch_deformable_attention() -> None:
    """With the stand-in, mmcv's deformable attention must take its PyTorch path on CUDA too."""
    from mmcv.ops import multi_scale_deform_attn

    multi_scale_deform_attn.IS_CUDA_AVAILABLE = False


def import_mmdet():
    """Imports mmdet's inference API (installing the mmcv._ext stand-in first if needed)."""
    try:
        for package in ("mmcv", "mmengine", "mmdet"):
            importlib.import_module(package)
    except ImportError as error:
        raise MissingExtraError(f"GenEval's Mask2Former detector needs {error.name or error}: {INSTALL_HINT}") from error
    stubbed = install_mmcv_ext_stub()
    import mmdet.apis

    if stubbed:
        _use_pytorch_deformable_attention()
    return mmdet.apis


def config_path() -> Path:
    """The Mask2Former Swin-S COCO config inside the installed mmdet wheel."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: mmdet==3.3.0 ships it; {INSTALL_HINT}")
    return path


# --- weights -------------------------------------------------------------------------------------
def _numpy_globals() -> list:
    """numpy reconstructors that mmengine checkpoint metadata may use, under their numpy 1 and 2 names."""
    from numpy._core import multiarray

    allowed = [np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct]
    allowed += [(multiarray.scalar, "numpy.core.multiarray.scalar"),
                (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    allowed += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_)]
    return allowed


def load_checkpoint_weights_only(path: str | os.PathLike) -> dict:
    """The tensors of a `.safetensors` or `.pth` checkpoint, loaded without running pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # retried with numpy's reconstructors allowed, then reported
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
            reason = found.group(1).split(" Please use")[0].rstrip(".") if found else str(error).splitlines()[0]
            raise ValueError(
                f"{path}: refused to load with torch.load(weights_only=True): {reason}. Only tensors, plain containers and "
                f"numpy values are accepted; convert a checkpoint you trust to .safetensors (its state_dict) and "
                f"pass that file"
            ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Loads a Mask2Former Swin-S state dict; every parameter and buffer of the model must be in it."""
    state = load_checkpoint_weights_only(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of the model's tensors are missing (e.g. {', '.join(missing[:3])}); "
            f"expected the Mask2Former Swin-S COCO checkpoint GenEval uses, {GENEVAL_CHECKPOINT_URL}"
        )
    if unexpected:
        logger.warning("%s: %d tensors the model does not use (e.g. %s)", path, len(unexpected), unexpected[:3])


def resolve_weights(weights: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file for a local path or an s3:// URI (downloaded once to the cache)."""
    from elborl.store import local

    try:
        return local(weights, cache_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"Mask2Former weights not found: {error}. GenEval uses {GENEVAL_CHECKPOINT} ({GENEVAL_CHECKPOINT_URL}); "
            f"pass its local path or s3:// URI"
        ) from None


# --- the detector ------------------------------------------------------------------------------
def adapt_instances(pred_instances, class_names=GENEVAL_CLASSES) -> list[Detection]:
    """mmdet `InstanceData` (labels, scores, bboxes xyxy, masks bool H x W) -> Detections, most confident first."""
    labels = pred_instances.labels.detach().cpu().numpy()
    scores = pred_instances.scores.detach().float().cpu().numpy()
    boxes = pred_instances.bboxes.detach().float().cpu().numpy()
    masks = pred_instances.masks.detach().cpu().numpy().astype(bool)
    detections = [
        Detection(label=class_names[int(label)], score=float(score), box=tuple(float(v) for v in box), mask=mask)
        for label, score, box, mask in zip(labels, scores, boxes, masks)
    ]
    return sorted(detections, key=lambda d: d.score, reverse=True)


class Mask2FormerDetector:
    """image (uint8 H x W x 3, RGB) -> every Mask2Former instance as a Detection, most confident first.

    GenEval's thresholds and per-class cap are the scorer's job (`elborl.geneval.scoring`).
    `weights`: local path or s3:// URI of the checkpoint (.pth or .safetensors); None keeps random
    weights (tests). `test_scale`: overrides the config's test Resize scale (1333, 800) -- tests use
    a small one; GenEval keeps the config's.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None,
        device: str = "cpu",
        test_scale: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike | None = None,
        class_names=GENEVAL_CLASSES,
    ):
        apis = import_mmdet()
        from mmcv.transforms import Compose
        from mmengine.config import Config

        from mmdet.utils import get_test_pipeline_cfg

        config = Config.fromfile(str(config_path()))
        config.model.backbone.init_cfg = None  # no download of ImageNet Swin weights
        pipeline = copy.deepcopy(get_test_pipeline_cfg(config))
        pipeline[0].type = "mmdet.LoadImageFromNDArray"
        if test_scale is not None:
            for step in pipeline:
                if step.type in ("Resize", "mmdet.Resize"):
                    step.scale = tuple(test_scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "checkpoint is None, use COCO classes by default"
            model = apis.init_detector(config, checkpoint=None, palette="coco", device="cpu")
        if weights is None:
            logger.warning("Mask2Former with random weights (tests only)")
        else:
            local = resolve_weights(weights, cache_dir)
            load_weights(model, local)
        self.model = model.to(device).eval()
        self.pipeline = Compose(pipeline)
        self.class_names = tuple(class_names)
        self.weights = weights
        self._inference = apis.inference_detector

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return adapt_instances(self.predict(image).pred_instances, self.class_names)

    def predict(self, image: np.ndarray):
        """mmdet's DetDataSample for one RGB uint8 image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 H x W x 3 RGB image, got {image.dtype} {image.shape}")
        bgr = np.ascontiguousarray(image[..., ::-1])  # mmdet's pipeline expects mmcv's BGR order
        return self._inference(self.model, bgr, test_pipeline=self.pipeline)


def convert_to_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike) -> int:
    """Writes a checkpoint's tensors (loaded with weights_only=True) as .safetensors, the artifact store's format."""
    from safetensors.torch import save_file

    state = load_checkpoint_weights_only(checkpoint)
    save_file({key: value.contiguous() for key, value in state.items()}, str(out))
    return len(state)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Convert a Mask2Former .pth checkpoint to .safetensors "
                                     "(loaded with torch.load(weights_only=True); nothing pickled is executed).")
    parser.add_argument("checkpoint", help=f"e.g. {GENEVAL_CHECKPOINT}")
    parser.add_argument("out", help="e.g. mask2former.safetensors")
    args = parser.parse_args(argv)
    print(f"{convert_to_safetensors(args.checkpoint, args.out)} tensors written to {args.out}")


if __name__ == "__main__":
    main()
