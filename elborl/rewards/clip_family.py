"""CLIP-family rewards: CLIPScore, PickScore, HPS v2.1 and the LAION aesthetic predictor.

Each is a callable (images uint8 N x H x W x 3, prompt metadata) -> float32 (N,), built from weights at a
local path or an `s3://` artifact (`elborl.store.local`). Nothing is downloaded from a hub:

| reward    | model                                                          | score per image                         |
|-----------|----------------------------------------------------------------|-----------------------------------------|
| clipscore | open_clip, `open_clip_config.json` + weights (HF-hub layout)   | 100 · max(cos(img, prompt), 0)          |
| pickscore | transformers `CLIPModel` + `CLIPProcessor` (PickScore_v1 is     | logit_scale.exp() · cos(img, prompt)    |
|           | CLIP-H; processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)     | (≈ 100 · cos for the released weights)  |
| hpsv2     | open_clip ViT-H-14 with the HPS v2.1 state dict                | cos(img, prompt) (as hpsv2's `score`)   |
| aesthetic | transformers CLIP ViT-L/14 image embedding, L2-normalised,      | MLP output (LAION's 1-10 scale)         |
|           | -> MLP 768-1024-128-64-16-1 (improved-aesthetic-predictor)     |                                         |

CLIPScore follows torchmetrics' convention (100 · max(cos, 0)); cos is between the L2-normalised image and
text embeddings. Prompt text is meta["prompt"].

Directory layouts (local or as a published artifact):
- open_clip (clipscore, hpsv2): `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}, as in HF-hub open_clip
  repos) and one weights file (open_clip_model.safetensors preferred; .pt/.pth/.bin locally). Without the
  config, `model_name` names a built-in open_clip architecture ("ViT-H-14" for HPS). A weights file alone
  (HPS_v2.1_compressed.pt) works too. Checkpoints holding {"state_dict": ...} are unwrapped.
- pickscore: a `save_pretrained` CLIPModel directory; the processor from `processor_path`, else the same
  directory when it has a processor config, else its `processor/` subfolder.
- aesthetic: `path/clip/` (a CLIPModel or CLIPVisionModelWithProjection directory with its
  image-processor config) and the head's weights file at `path/` (aesthetic_head.safetensors, or LAION's
  sac+logos+ava1-l14-linearMSE.pth); `clip_path`/`head_path` override either.

The `build_tiny_*` functions at the end write random-weight miniatures in these layouts (tests, no GPU, no hub).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from elborl.rewards.weights import default_device, find_weights, load_state_dict
from elborl.store import local

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "HPS_v2.1_compressed.pt",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
AESTHETIC_HEAD_WEIGHTS = ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth")
CLIP_MAX_TOKENS = 77
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the hub's / transformers 5's save


def _has_processor(directory: Path) -> bool:
    return any((directory / name).is_file() for name in PROCESSOR_FILES)


def _prompts(metas: list[dict], n: int) -> list[str]:
    if len(metas) != n:
        raise ValueError(f"{n} images but {len(metas)} prompts")
    return [m["prompt"] for m in metas]


def _pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in images]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --- open_clip models -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_root_logger():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def load_open_clip(path: str | os.PathLike, model_name: str | None = None, device=None,
                   cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer, preprocess) for an open_clip model at a local path or s3:// artifact (layouts above)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fetched = local(path, cache_dir)
    config_dir = fetched if fetched.is_dir() else fetched.parent
    if (config_dir / OPEN_CLIP_CONFIG).is_file():
        name = f"local-dir:{config_dir}"
    elif model_name is not None:
        name = model_name
    else:
        raise FileNotFoundError(f"{fetched}: no {OPEN_CLIP_CONFIG}; pass model_name (a built-in open_clip architecture)")
    with _quiet_root_logger():  # open_clip warns "initialized randomly" before we load the weights
        model = open_clip.create_model(name, pretrained=None, load_weights=False)
    weights = find_weights(fetched, OPEN_CLIP_WEIGHTS)
    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    tokenizer = open_clip.get_tokenizer(name)
    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    return model.to(default_device(device)).eval(), tokenizer, preprocess


class OpenClipSimilarity:
    """cos(image, prompt) of an open_clip model; kind "clipscore" maps it to 100 · max(cos, 0), "hpsv2" keeps it."""

    def __init__(self, path, model_name: str | None = None, device=None, batch_size: int = 16,
                 cache_dir=None, kind: str = "clipscore"):
        self.model, self.tokenizer, self.preprocess = load_open_clip(path, model_name, device, cache_dir)
        self.device = next(self.model.parameters()).device
        self.batch_size, self.kind = batch_size, kind

    def cosine(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        import torch

        prompts = _prompts(metas, len(images))
        out = []
        with torch.inference_mode():
            for part in _chunks(len(images), self.batch_size):
                pixels = torch.stack([self.preprocess(im) for im in _pil(images[part])]).to(self.device)
                tokens = self.tokenizer(prompts[part]).to(self.device)
                image_f = self.model.encode_image(pixels, normalize=True)
                text_f = self.model.encode_text(tokens, normalize=True)
                out.append((image_f * text_f).sum(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        cos = self.cosine(images, metas)
        if self.kind == "clipscore":
            return (100.0 * np.maximum(cos, 0.0)).astype(np.float32)
        return cos


def clipscore_reward(path, model_name: str | None = None, **kwargs) -> OpenClipSimilarity:
    """CLIPScore = 100 · max(cos, 0) with an open_clip model (e.g. ViT-L-14 in the HF-hub open_clip layout)."""
    return OpenClipSimilarity(path, model_name, kind="clipscore", **kwargs)


def hpsv2_reward(path, model_name: str = "ViT-H-14", **kwargs) -> OpenClipSimilarity:
    """HPS v2.1 = cos(image, prompt) of open_clip ViT-H-14 carrying the HPS v2.1 state dict."""
    return OpenClipSimilarity(path, model_name, kind="hpsv2", **kwargs)


# --- transformers CLIP models -----------------------------------------------------------------------
class PickScoreReward:
    """PickScore = logit_scale.exp() · cos(image, prompt) of a transformers CLIPModel (PickScore_v1)."""

    def __init__(self, path, processor_path=None, device=None, batch_size: int = 16, cache_dir=None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        model_dir = local(path, cache_dir)
        if processor_path is not None:
            processor_dir = local(processor_path, cache_dir)
        else:
            processor_dir = model_dir if _has_processor(model_dir) else model_dir / "processor"
        if not _has_processor(processor_dir):
            raise FileNotFoundError(f"PickScore: no processor ({' or '.join(PROCESSOR_FILES)}) at {processor_dir}; "
                                    "pass processor_path (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)")
        self.model = CLIPModel.from_pretrained(model_dir).to(default_device(device)).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_dir)
        self.device, self.batch_size, self._torch = next(self.model.parameters()).device, batch_size, torch

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        torch = self._torch
        prompts = _prompts(metas, len(images))
        out = []
        with torch.inference_mode():
            for part in _chunks(len(images), self.batch_size):
                pixels = self.processor(images=_pil(images[part]), return_tensors="pt")["pixel_values"]
                text = self.processor(text=prompts[part], padding=True, truncation=True, max_length=CLIP_MAX_TOKENS,
                                      return_tensors="pt")
                result = self.model(input_ids=text["input_ids"].to(self.device),
                                    attention_mask=text["attention_mask"].to(self.device),
                                    pixel_values=pixels.to(self.device))
                cos = (result.image_embeds * result.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
                out.append((self.model.logit_scale.exp() * cos).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def pickscore_reward(path, processor_path=None, **kwargs) -> PickScoreReward:
    return PickScoreReward(path, processor_path, **kwargs)


def aesthetic_head(input_dim: int = 768):
    """LAION improved-aesthetic-predictor's MLP (its state-dict keys: layers.{0,2,4,6,7}.weight/bias)."""
    from torch import nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_size = input_dim
            self.layers = nn.Sequential(
                nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, embedding):
            return self.layers(embedding)

    return AestheticMLP()


def _vision_model(directory: Path):
    """The image tower + projection of a CLIPModel directory (or a CLIPVisionModelWithProjection one)."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    from transformers.utils import logging as hf_logging

    kwargs = {}
    if json.loads((directory / "config.json").read_text()).get("model_type") == "clip":
        full = CLIPConfig.from_pretrained(directory)
        kwargs["config"] = CLIPVisionConfig(**{**full.vision_config.to_dict(), "projection_dim": full.projection_dim})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are expected to be left out: no report of them
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(directory, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        raise ValueError(f"{directory}: CLIP image tower weights missing: {sorted(info['missing_keys'])[:5]}")
    return model


class AestheticReward:
    """LAION aesthetic score: MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt unused)."""

    def __init__(self, path=None, clip_path=None, head_path=None, device=None, batch_size: int = 16, cache_dir=None):
        import torch
        from transformers import CLIPImageProcessor

        if path is None and (clip_path is None or head_path is None):
            raise ValueError("aesthetic reward: pass path (holding clip/ and the head weights) or clip_path and head_path")
        root = local(path, cache_dir) if path is not None else None
        clip_dir = local(clip_path, cache_dir) if clip_path is not None else root / "clip"
        head_file = find_weights(local(head_path, cache_dir) if head_path is not None else root, AESTHETIC_HEAD_WEIGHTS)
        device = default_device(device)
        self.clip = _vision_model(clip_dir).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir)
        state = load_state_dict(head_file)
        if "layers.0.weight" not in state:
            raise ValueError(f"{head_file}: not an aesthetic-predictor head (no layers.0.weight)")
        self.head = aesthetic_head(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.to(device).eval()
        self.device, self.batch_size, self._torch = device, batch_size, torch

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for part in _chunks(len(images), self.batch_size):
                pixels = self.processor(images=_pil(images[part]), return_tensors="pt")["pixel_values"]
                embedding = self.clip(pixel_values=pixels.to(self.device)).image_embeds
                embedding = embedding / embedding.norm(dim=-1, keepdim=True)
                out.append(self.head(embedding).squeeze(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def aesthetic_reward(path=None, **kwargs) -> AestheticReward:
    return AestheticReward(path, **kwargs)


# --- tiny random-weight models in the real layouts (tests) -------------------------------------------
def write_clip_bpe_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """CLIP's real BPE vocabulary (vocab.json, merges.txt) rebuilt from the merges shipped inside open_clip."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


TINY_WIDTH, TINY_EMBED, TINY_IMAGE = 32, 16, 32


def build_tiny_hf_clip(directory: str | os.PathLike, seed: int = 0, with_processor: bool = True):
    """A random 1-layer transformers CLIPModel (+ CLIPProcessor with CLIP's real tokenizer), saved to directory."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    tower = dict(hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=CLIP_MAX_TOKENS, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407, **tower),
        vision_config=dict(image_size=TINY_IMAGE, patch_size=16, **tower),
        projection_dim=TINY_EMBED)
    model = CLIPModel(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    if with_processor:
        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = write_clip_bpe_files(tmp)
            tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_MAX_TOKENS)
        image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                             crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return model


def build_tiny_open_clip(directory: str | os.PathLike, seed: int = 0, weights_name: str = "open_clip_model.safetensors",
                         write_config: bool = True):
    """A random tiny open_clip CLIP in the HF-hub layout (open_clip_config.json + weights); returns its model_cfg.

    weights_name ending in .pt/.pth saves a torch checkpoint {"state_dict": ...} (the HPS v2.1 file's form).
    """
    import open_clip
    import torch

    model_cfg = {
        "embed_dim": TINY_EMBED,
        "vision_cfg": {"image_size": TINY_IMAGE, "layers": 1, "width": TINY_WIDTH, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": CLIP_MAX_TOKENS, "vocab_size": 49408, "width": TINY_WIDTH, "heads": 2,
                     "layers": 1},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / OPEN_CLIP_CONFIG
    config_file.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=1))
    torch.manual_seed(seed)
    with _quiet_root_logger():
        model = open_clip.create_model(f"local-dir:{directory}", pretrained=None, load_weights=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(directory / weights_name))
    else:
        torch.save({"state_dict": state, "epoch": 1}, directory / weights_name)
    if not write_config:
        config_file.unlink()
    return model_cfg


def build_tiny_aesthetic(directory: str | os.PathLike, seed: int = 0, head_name: str = "aesthetic_head.safetensors"):
    """`directory/clip/` (tiny CLIPModel + image processor) and a random head over its embedding size."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    build_tiny_hf_clip(directory / "clip", seed, with_processor=True)
    torch.manual_seed(seed + 1)
    head = aesthetic_head(TINY_EMBED)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if head_name.endswith(".safetensors"):
        save_file(state, str(directory / head_name))
    else:
        torch.save(state, directory / head_name)
