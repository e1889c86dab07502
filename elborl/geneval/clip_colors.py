"""GenEval's colour classifier: CLIP ViT-L/14 zero-shot over ten colours (METHOD.md §8).

For each detection: its mask composited over gray #999999 (the rest of the image hidden), cropped
to its box, classified among GenEval's ten colours. Each colour's text embedding is the mean of the
L2-normalised embeddings of three prompts, renormalised ("a photo of a {c} {obj}",
"a photo of a {c}-colored {obj}", "a photo of a {c} object" -- always "a", as GenEval writes them);
the answer is the colour whose embedding has the highest cosine with the crop's.

Production weights: open_clip's ViT-L-14 with OpenAI's weights (GenEval's `pretrained="openai"`),
e.g. `open_clip_model.safetensors` of the Hugging Face repo `timm/vit_large_patch14_clip_224.openai`,
from a local path or s3://. OpenAI's CLIP was trained with QuickGELU, which open_clip enables for
the "openai" tag only, so it is forced here (`quick_gelu=True`). Files load without running pickled
code (.safetensors, or .bin/.pth through `torch.load(weights_only=True)`); OpenAI's original
TorchScript `ViT-L-14.pt` is not accepted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from elborl.geneval.prompts import GENEVAL_COLORS
from elborl.geneval.types import Detection

logger = logging.getLogger(__name__)

COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
BACKGROUND = (0x99, 0x99, 0x99)  # GenEval's bgcolor "#999"
CLIP_MODEL = "ViT-L-14"
CLIP_WEIGHTS_HINT = (
    "GenEval uses open_clip ViT-L-14 with OpenAI's weights (pretrained='openai'); pass a local path or s3:// URI "
    "of open_clip_model.safetensors from the Hugging Face repo timm/vit_large_patch14_clip_224.openai"
)


def color_prompts(class_name: str, colors: Sequence[str] = GENEVAL_COLORS, templates=COLOR_TEMPLATES) -> list[list[str]]:
    """Per colour, its prompts (one per template)."""
    return [[template.format(c=color, obj=class_name) for template in templates] for color in colors]


def composite_crop(image: np.ndarray, mask: np.ndarray | None, box, background=BACKGROUND) -> Image.Image:
    """The detection as GenEval's colour classifier sees it: mask over `background`, cropped to the box.

    The box is rounded to whole pixels as PIL's crop rounds it (GenEval crops with PIL). A box with
    no area (an empty mask's) leaves the composite uncropped.
    """
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (picture.height, picture.width):
            raise ValueError(f"mask shape {mask.shape} differs from the image's {(picture.height, picture.width)}")
        blank = Image.new("RGB", picture.size, tuple(background))
        picture = Image.composite(picture, blank, Image.fromarray(mask))
    x0, y0, x1, y1 = (float(v) for v in box)
    if round(x1) <= round(x0) or round(y1) <= round(y0):
        return picture
    return picture.crop((x0, y0, x1, y1))


class ClipColorClassifier:
    """Names one of GenEval's colours per detection; the colour classifier of `GenEvalScorer`.

    `model`: an open_clip CLIP (`encode_image`, `encode_text`); `tokenizer`: its tokenizer;
    `preprocess`: its evaluation image transform (PIL -> tensor). `from_weights` builds them.
    """

    def __init__(self, model, tokenizer, preprocess, device: str = "cpu", colors: Sequence[str] = GENEVAL_COLORS,
                 templates=COLOR_TEMPLATES, background=BACKGROUND, batch_size: int = 16):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.colors = tuple(colors)
        self.templates = tuple(templates)
        self.background = tuple(background)
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None, model_name: str = CLIP_MODEL, device: str = "cpu",
                     quick_gelu: bool = True, cache_dir: str | os.PathLike | None = None, **kwargs) -> "ClipColorClassifier":
        """open_clip `model_name` with weights from a local path or s3:// URI; None keeps random weights (tests)."""
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
        if weights is None:
            logger.warning("CLIP %s with random weights (tests only)", model_name)
        else:
            load_clip_weights(model, weights, model_name, cache_dir)
        image_size = model.visual.image_size
        preprocess = open_clip.image_transform(image_size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
        return cls(model, open_clip.get_tokenizer(model_name), preprocess, device=device, **kwargs)

    @torch.no_grad()
    def text_weights(self, class_name: str) -> torch.Tensor:
        """colours x dim: each colour's template-averaged, renormalised text embedding (cached per class)."""
        if class_name not in self._text:
            prompts = [p for per_color in color_prompts(class_name, self.colors, self.templates) for p in per_color]
            embeddings = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
            mean = F.normalize(embeddings, dim=-1).view(len(self.colors), len(self.templates), -1).mean(dim=1)
            self._text[class_name] = mean / mean.norm(dim=-1, keepdim=True)
        return self._text[class_name]

    def crops(self, image: np.ndarray, detections: Sequence[Detection]) -> list[Image.Image]:
        return [composite_crop(image, d.mask, d.box, self.background) for d in detections]

    @torch.no_grad()
    def logits(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> torch.Tensor:
        """detections x colours: 100 x cosine between each crop and each colour, as CLIP zero-shot scores."""
        weights = self.text_weights(class_name)
        crops = self.crops(image, detections)
        rows = []
        for start in range(0, len(crops), self.batch_size):
            batch = torch.stack([self.preprocess(crop) for crop in crops[start:start + self.batch_size]]).to(self.device)
            features = F.normalize(self.model.encode_image(batch).float(), dim=-1)
            rows.append(100.0 * features @ weights.T)
        return torch.cat(rows) if rows else torch.zeros(0, len(self.colors))

    def __call__(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]:
        if not detections:
            return []
        return [self.colors[int(i)] for i in self.logits(image, detections, class_name).argmax(dim=1)]


def load_clip_weights(model, weights: str | os.PathLike, model_name: str = CLIP_MODEL,
                      cache_dir: str | os.PathLike | None = None) -> None:
    """Loads an open_clip state dict from a local file or s3:// URI, without running pickled code."""
    import open_clip

    from elborl.store import local

    try:
        fetched = local(weights, cache_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"CLIP weights not found: {error}. {CLIP_WEIGHTS_HINT}") from None
    try:
        open_clip.load_checkpoint(model, str(fetched), strict=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with what is expected
        raise ValueError(f"{fetched}: not loadable as {model_name} weights ({error}). {CLIP_WEIGHTS_HINT}") from error
