"""Stable Diffusion 3 / 3.5 as a velocity backbone (the production model: SD3.5 Medium).

The pieces are diffusers' and transformers' own: `SD3Transformer2DModel` is the `denoiser` (the velocity
network the policy trains with LoRA), `AutoencoderKL` maps latents to pixels, two CLIP text encoders with
projection (and optionally T5) encode the prompt. Prompt encoding is delegated to
`StableDiffusion3Pipeline.encode_prompt`, held over the same component objects, so the text conditioning is
exactly what diffusers' pipeline feeds the transformer (CLIP penultimate states side by side, padded to the
T5 width, T5 tokens appended -- zeros when T5 is absent -- and the two pooled projections concatenated).

Samples `x0` live in the VAE's latent space, in the scaled coordinates the transformer sees
(`(z - shift_factor) * scaling_factor`); `to_images` undoes that and decodes.

`SD3FlowModel.from_pretrained` reads a local diffusers-format directory (what
`StableDiffusion3Pipeline.save_pretrained` writes) or an `s3://bucket/prefix` URI (a published artifact, verified,
or a snapshot uploaded as plain objects), fetched once into the local cache by `elborl.store.local`. `tiny_sd3()` builds a randomly initialised miniature with the same structure for tests.
"""

from dataclasses import dataclass
from pathlib import Path
import json
import logging

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from elborl.sampling import to_uint8
from elborl.store import local

logger = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")
SETTINGS_FILE = "elborl_sd3.json"  # our own settings beside the diffusers layout (resolution, text length)
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' default for the T5 tokens


@dataclass
class SD3PromptEmbedding:
    """What the SD3 transformer is conditioned on: token states B x L x D and pooled projections B x P."""

    prompt_embeds: torch.Tensor
    pooled_projections: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index) -> "SD3PromptEmbedding":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch dimension
        elif isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        if torch.is_tensor(index):
            index = index.to(self.prompt_embeds.device)
        return SD3PromptEmbedding(self.prompt_embeds[index], self.pooled_projections[index])

    @staticmethod
    def cat(parts: list["SD3PromptEmbedding"]) -> "SD3PromptEmbedding":
        return SD3PromptEmbedding(torch.cat([p.prompt_embeds for p in parts]),
                                  torch.cat([p.pooled_projections for p in parts]))

    def to(self, *args, **kwargs) -> "SD3PromptEmbedding":
        return SD3PromptEmbedding(self.prompt_embeds.to(*args, **kwargs), self.pooled_projections.to(*args, **kwargs))


class SD3TransformerBackbone(torch.nn.Module):
    """The transformer half of the backbone interface, over `self.denoiser` (an SD3Transformer2DModel) and
    `self.latent_size`: the sample shape, the device and the velocity. Subclasses add `encode_prompts`."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.denoiser.config.in_channels, self.latent_size, self.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: SD3PromptEmbedding) -> torch.Tensor:
        """v(x_t, t, c); t in [0, 1] (1 = noise) is fed to the transformer on its 0..1000 timestep scale."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        dtype = self.denoiser.dtype
        out = self.denoiser(
            hidden_states=x_t.to(dtype), timestep=(t * 1000).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype), pooled_projections=cond.pooled_projections.to(dtype),
        ).sample
        return out.to(x_t.dtype)


class SD3FlowModel(SD3TransformerBackbone):
    """The backbone interface of `elborl.models` over Stable Diffusion 3 components.

    resolution: image side in pixels (latent side = resolution / VAE scale factor); by default the
    transformer's native `sample_size` times the VAE scale factor (1024 for SD3.5 Medium; the recipe trains
    at 512). max_sequence_length: T5 tokens (also when T5 is absent: the pipeline then appends zeros).
    """

    def __init__(self, transformer: SD3Transformer2DModel, vae: AutoencoderKL,
                 text_encoder: CLIPTextModelWithProjection, tokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, scheduler=None,
                 resolution: int | None = None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 decode_batch_size: int = 8):
        super().__init__()
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 come together: pass both or neither")
        self.denoiser, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.scheduler = scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or transformer.config.sample_size * self.vae_scale_factor)
        if self.resolution % (self.vae_scale_factor * transformer.config.patch_size):
            raise ValueError(f"resolution {self.resolution} must be a multiple of "
                             f"{self.vae_scale_factor * transformer.config.patch_size} (VAE factor x patch size)")
        self.max_sequence_length = int(max_sequence_length)
        self.decode_batch_size = int(decode_batch_size)
        # Not an nn.Module: a plain attribute, so the components are registered once (above) and the
        # pipeline only lends its encode_prompt.
        self.__dict__["_pipeline"] = None

    # --- the diffusers pipeline over the same component objects ------------------------------------
    @property
    def pipeline(self) -> StableDiffusion3Pipeline:
        """Rebuilt when a component was replaced (e.g. a full-fine-tune policy swapping `denoiser`)."""
        parts = dict(transformer=self.denoiser, scheduler=self.scheduler, vae=self.vae,
                     text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                     text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        pipe = self.__dict__["_pipeline"]
        if pipe is None or any(getattr(pipe, k, None) is not v for k, v in parts.items()):
            pipe = StableDiffusion3Pipeline(**parts)
            pipe.set_progress_bar_config(disable=True)
            self.__dict__["_pipeline"] = pipe
        return pipe

    # --- the backbone interface ---------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def encode_prompts(self, prompts: list[str]) -> SD3PromptEmbedding:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.text_encoder.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return SD3PromptEmbedding(prompt_embeds.to(self.device), pooled.to(self.device))

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (the transformer's coordinates) to pixels in [-1, 1], N x 3 x H x W, in small batches."""
        config = self.vae.config
        shift = config.shift_factor if config.shift_factor is not None else 0.0
        out = []
        for chunk in x0.split(self.decode_batch_size):
            z = chunk.to(device=self.vae.device, dtype=self.vae.dtype) / config.scaling_factor + shift
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out)

    def to_images(self, x0: torch.Tensor) -> np.ndarray:
        """Final samples (latents) as uint8 images N x H x W x 3."""
        return to_uint8(self.decode(x0))

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' pipeline layout, plus elborl_sd3.json with the resolution and text length."""
        directory = Path(directory)
        self.pipeline.save_pretrained(directory)
        (directory / SETTINGS_FILE).write_text(json.dumps(
            {"resolution": self.resolution, "max_sequence_length": self.max_sequence_length}, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int | None = None,
                        max_sequence_length: int | None = None, load_t5: bool = True,
                        torch_dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
                        **kwargs) -> "SD3FlowModel":
        """A local diffusers-format directory or `s3://bucket/prefix` (downloaded to the cache first).

        resolution / max_sequence_length: override the saved settings (elborl_sd3.json) or the defaults.
        load_t5=False skips text_encoder_3 even when present (T5 tokens then become zeros, as in diffusers).
        """
        path_str = str(path)
        directory = local(path_str, cache_dir) if path_str.startswith("s3://") else Path(path_str)
        check_pretrained_directory(directory)
        settings = json.loads((directory / SETTINGS_FILE).read_text()) if (directory / SETTINGS_FILE).exists() else {}
        resolution = resolution or settings.get("resolution")
        max_sequence_length = max_sequence_length or settings.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)

        diffusers_dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        transformers_dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        transformer = SD3Transformer2DModel.from_pretrained(directory / "transformer", **diffusers_dtype)
        vae = AutoencoderKL.from_pretrained(directory / "vae", **diffusers_dtype)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder", **transformers_dtype)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder_2", **transformers_dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        tokenizer_2 = AutoTokenizer.from_pretrained(directory / "tokenizer_2")
        text_encoder_3 = tokenizer_3 = None
        if load_t5 and (directory / "text_encoder_3").is_dir():
            from transformers import T5EncoderModel

            text_encoder_3 = T5EncoderModel.from_pretrained(directory / "text_encoder_3", **transformers_dtype)
            tokenizer_3 = AutoTokenizer.from_pretrained(directory / "tokenizer_3")
        scheduler = (FlowMatchEulerDiscreteScheduler.from_pretrained(directory / "scheduler")
                     if (directory / "scheduler").is_dir() else None)
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                   tokenizer_3, scheduler, resolution=resolution, max_sequence_length=max_sequence_length, **kwargs)


def check_pretrained_directory(directory: Path) -> None:
    """Raises FileNotFoundError naming every missing subfolder of the diffusers SD3 layout."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected a diffusers-format SD3 pipeline)")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (directory / name).is_dir()]
    present_t5 = [name for name in T5_SUBFOLDERS if (directory / name).is_dir()]
    if len(present_t5) == 1:
        missing += [name for name in T5_SUBFOLDERS if name not in present_t5]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a complete diffusers SD3 pipeline: missing {', '.join(m + '/' for m in missing)} "
            f"(expected {', '.join(REQUIRED_SUBFOLDERS)}; optional text_encoder_3 + tokenizer_3, scheduler)")


# --- a tiny random SD3 for tests ------------------------------------------------------------------
TINY_SPECIALS = ("<unk>", "<pad>", "<bos>", "<eos>")


def build_word_tokenizer(words, max_length: int = 16) -> PreTrainedTokenizerFast:
    """Word-level tokenizer, ids a pure function of the word list; <bos>/<eos> get the last ids (as in CLIP,
    whose pooling looks for the end token: the encoder config's eos_token_id must be the tokenizer's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = [*sorted(set(words) - set(TINY_SPECIALS)), *TINY_SPECIALS]
    ids = {w: i for i, w in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)


def _tiny_words() -> list[str]:
    from elborl.models.tokenizer import vocabulary_words
    from elborl.shapes.world import SHAPES_VOCABULARY

    return vocabulary_words(SHAPES_VOCABULARY)


TINY_CLIP_WIDTHS = (16, 32)  # hidden = projection size of text_encoder, text_encoder_2
TINY_JOINT_ATTENTION_DIM = 64  # the "T5 width": >= the two CLIP widths side by side (48), as 4096 >= 2048
TINY_MAX_TOKENS = 16


def tiny_sd3(seed: int = 0, sample_size: int = 8, max_sequence_length: int = 4) -> SD3FlowModel:
    """Random weights from small configs with SD3.5 Medium's structure (dual attention in the first block,
    RMS q/k norm, 16 latent channels, patch 2, two CLIPs, no T5); images are 2 * sample_size pixels."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(_tiny_words(), TINY_MAX_TOKENS)
    encoders = []
    for width in TINY_CLIP_WIDTHS:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_MAX_TOKENS,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)).eval())
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TINY_JOINT_ATTENTION_DIM,
        caption_projection_dim=32, pooled_projection_dim=sum(TINY_CLIP_WIDTHS), pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=2 * sample_size,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    return SD3FlowModel(transformer, vae.eval(), encoders[0], tokenizer, encoders[1], tokenizer,
                        max_sequence_length=max_sequence_length).eval()
