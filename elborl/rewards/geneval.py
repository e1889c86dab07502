"""GenEval's dense partial-credit reward (METHOD.md §8) over any detector behind the scorer."""

import numpy as np

from elborl.geneval.scoring import GenEvalScorer


class GenEvalReward:
    """The dense partial credit of each image, or (strict) 1.0 where GenEval's strict verdict is correct, else 0."""

    def __init__(self, scorer: GenEvalScorer, strict: bool = False):
        self.scorer, self.strict = scorer, strict

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        scores = self.scorer.score(images, metas)
        return np.array([float(s.correct) if self.strict else s.reward for s in scores], dtype=np.float32)


def shapes_geneval_reward(strict: bool = False) -> GenEvalReward:
    from elborl.evaluate import shapes_scorer

    return GenEvalReward(shapes_scorer(), strict)


def shapes_geneval_strict_reward() -> GenEvalReward:
    """The held-out score's own verdict as a reward (1 or 0), to add to the dense one (params.yaml rewards.weights)."""
    return shapes_geneval_reward(strict=True)


# Names looked for in `path` (a local directory or an s3:// artifact of the store, e.g. params.yaml's
# rewards.paths.geneval; artifacts hold safetensors only: `python -m elborl.geneval.mask2former IN.pth OUT`).
DETECTOR_FILES = ("mask2former.safetensors", "mask2former.pth")
CLIP_FILES = ("open_clip_model.safetensors",)


def _weights_in(path, names, cache_dir):
    """The first of `names` in the directory or store artifact `path` (fetched once, elborl.store.local)."""
    from elborl.store import local

    directory = local(path, cache_dir)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"none of {', '.join(names)} in {path}")


def mask2former_geneval_reward(
    detector_weights=None,
    clip_weights=None,
    device: str = "cpu",
    *,
    path=None,
    clip_model: str = "ViT-L-14",
    test_scale=None,
    cache_dir=None,
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_per_class: int = 16,
) -> GenEvalReward:
    """GenEval's reward on real images: Mask2Former Swin-S + CLIP ViT-L/14 colours + GenEval's rules.

    `detector_weights`: local path or s3:// URI of GenEval's Mask2Former checkpoint
    (mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth, loaded with
    weights_only=True, or its state dict as .safetensors). `clip_weights`: local path or s3:// URI
    of open_clip ViT-L-14 OpenAI weights (open_clip_model.safetensors of timm/vit_large_patch14_clip_224.openai).
    `path`: instead of the two, a local directory or an s3:// artifact of the store holding
    mask2former.safetensors (or, locally, mask2former.pth) and open_clip_model.safetensors.
    The string "random" keeps random weights (tests and smoke runs only). Missing packages raise ImportError naming the `geneval` extra; missing
    weights raise ValueError / FileNotFoundError naming the files GenEval uses.
    """
    from elborl.geneval.clip_colors import CLIP_WEIGHTS_HINT, ClipColorClassifier
    from elborl.geneval.mask2former import GENEVAL_CHECKPOINT, GENEVAL_CHECKPOINT_URL, Mask2FormerDetector, import_mmdet

    import_mmdet()  # the missing-extra error comes first, before any weights are looked at
    detector_hint = f"GenEval uses {GENEVAL_CHECKPOINT} ({GENEVAL_CHECKPOINT_URL})"
    if path is not None:
        try:
            detector_weights = detector_weights or _weights_in(path, DETECTOR_FILES, cache_dir)
            clip_weights = clip_weights or _weights_in(path, CLIP_FILES, cache_dir)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"geneval reward weights: {error}. {detector_hint}; {CLIP_WEIGHTS_HINT}") from None
    if detector_weights is None:
        raise ValueError(
            f"the geneval reward needs detector_weights (or path=): a local path or s3:// URI of the Mask2Former "
            f"Swin-S COCO checkpoint; {detector_hint}"
        )
    if clip_weights is None:
        raise ValueError(f"the geneval reward needs clip_weights (or path=). {CLIP_WEIGHTS_HINT}")
    detector = Mask2FormerDetector(
        None if detector_weights == "random" else detector_weights, device=device, test_scale=test_scale, cache_dir=cache_dir
    )
    colors = ClipColorClassifier.from_weights(
        None if clip_weights == "random" else clip_weights, model_name=clip_model, device=device, cache_dir=cache_dir
    )
    scorer = GenEvalScorer(detector, colors, score_threshold, counting_threshold, max_per_class)
    return GenEvalReward(scorer)
