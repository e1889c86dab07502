"""The embedded base model: a small pixel-space text-to-image flow model built from stock components.

diffusers' `UNet2DConditionModel` predicts the velocity `v(x_t, t, c) ≈ eps - x0` directly on 32x32 RGB
pixels (no VAE: at this size a latent space would cost more than it saves), conditioned by cross-attention
on a tiny `CLIPTextModel` over a word-level tokenizer. All three save and load with `save_pretrained`.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated
import json

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from pydantic import Field
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from elborl.models.tokenizer import build_tokenizer
from elborl.sampling import to_uint8
from elborl.settings import Bool, Int, OneOf, Rule, Str, section
from elborl.shapes.world import IMAGE_SIZE, SHAPES_VOCABULARY, Vocabulary


RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")


def _group_norm_widths(channels: tuple[int, ...]) -> None:
    if any(c <= 0 or c % 32 for c in channels):
        raise ValueError(f"must be multiples of 32 (group norm), got {list(channels)}")


@section("base_model")
class ShapesModelConfig:
    """The embedded base model (docs/embedded-default.md, "The base model"): diffusers' UNet2DConditionModel
    predicting the velocity on RGB pixels, conditioned on a tiny CLIP text encoder over a word-level tokenizer. With
    `pretrain:` it makes the model's cache key."""

    image_size: Annotated[Int, Field(gt=0, description="The images' side in pixels (the shapes world draws 32).")] = (
        IMAGE_SIZE)
    channels: Annotated[tuple[Int, ...], Rule("multiples of 32 (group norm)", _group_norm_widths),
                        Field(min_length=1, description=(
        "The UNet's block widths, one block per resolution (the first without cross-attention)."
    ))] = (32, 64, 128)
    layers_per_block: Annotated[Int, Field(gt=0, description="ResNet layers per UNet block.")] = 1
    text_width: Annotated[Int, Field(gt=0, description="The text encoder's hidden size (4 attention heads).")] = 128
    text_layers: Annotated[Int, Field(gt=0, description="The text encoder's transformer layers.")] = 2
    max_tokens: Annotated[Int, Field(gt=0, description=(
        "The text encoder's positions: the longest prompt in tokens."
    ))] = 16
    pooled_text: Annotated[Bool, Field(description=(
        "Add the prompt's pooled (end-of-text) embedding to the time embedding, as SD3 does with its pooled CLIP "
        "vector: every ResNet block then sees the prompt, not only the cross-attention layers, and global "
        "attributes such as colour bind much more reliably."
    ))] = True
    resnet_time_scale_shift: Annotated[Str, OneOf(RESNET_TIME_SCALE_SHIFTS, "ResNet time-embedding mode"), Field(
        description=(
            "diffusers' `resnet_time_scale_shift`: default adds the time (+ pooled prompt) embedding to every ResNet "
            "block's features; scale_shift uses it as a per-channel gain and bias (FiLM, as in ADM), which did not "
            "help here (docs/experiments/2026-11-29-base-model-variants.md)."
        ))] = "default"


@dataclass
class PromptEmbedding:
    hidden: torch.Tensor  # B x L x D
    mask: torch.Tensor  # B x L, 1 for real tokens
    pooled: torch.Tensor  # B x D, the end-of-text token's hidden state

    def __getitem__(self, index) -> "PromptEmbedding":
        return PromptEmbedding(self.hidden[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(parts: list["PromptEmbedding"]) -> "PromptEmbedding":
        return PromptEmbedding(*(torch.cat([getattr(p, name) for p in parts]) for name in ("hidden", "mask", "pooled")))


class ShapesFlowModel(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer, config: ShapesModelConfig):
        super().__init__()
        # `denoiser` is the velocity network every backbone names the same way (the policy trains it).
        self.denoiser, self.text_encoder, self.tokenizer, self.config = unet, text_encoder, tokenizer, config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.denoiser.config.in_channels, self.config.image_size, self.config.image_size)

    @classmethod
    def from_config(cls, config: ShapesModelConfig = ShapesModelConfig(), vocab: Vocabulary = SHAPES_VOCABULARY, seed: int = 0):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(vocab, config.max_tokens)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=2 * config.text_width,
            num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=config.max_tokens,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        n = len(config.channels)
        unet = UNet2DConditionModel(
            sample_size=config.image_size, in_channels=3, out_channels=3,
            block_out_channels=config.channels, layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=config.text_width, attention_head_dim=32, norm_num_groups=32,
            # Self-attention over 16x16 = 256 pixels dominated CPU time (over 40%); at that resolution the
            # blocks attend to the prompt only, and full self-attention is kept at the coarsest level.
            only_cross_attention=(False,) + (True,) * (n - 2) + (False,),
            class_embed_type="projection" if config.pooled_text else None,
            projection_class_embeddings_input_dim=config.text_width if config.pooled_text else None,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
        )
        return cls(unet, CLIPTextModel(text_config), tokenizer, config)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbedding:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.config.max_tokens,
                                truncation=True, return_tensors="pt").to(self.device)
        out = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)
        return PromptEmbedding(out.last_hidden_state, tokens.attention_mask, out.pooler_output)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbedding) -> torch.Tensor:
        """v(x_t, t, c); t in [0, 1] (1 = noise) is fed to the UNet on its 0..1000 timestep scale."""
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        pooled = cond.pooled if self.config.pooled_text else None
        return self.denoiser(x_t, t * 1000, encoder_hidden_states=cond.hidden,
                             encoder_attention_mask=cond.mask, class_labels=pooled).sample

    def to_images(self, x0: torch.Tensor) -> np.ndarray:
        """Final samples (pixels in [-1, 1]) as uint8 images N x H x W x 3."""
        return to_uint8(x0)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.denoiser.save_pretrained(directory / "unet")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        (directory / "shapes_model.json").write_text(json.dumps(asdict(self.config), indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ShapesFlowModel":
        directory = Path(directory)
        if not (directory / "shapes_model.json").exists():
            raise FileNotFoundError(f"{directory} holds no shapes model (shapes_model.json missing)")
        raw = json.loads((directory / "shapes_model.json").read_text())
        config = ShapesModelConfig(**{**raw, "channels": tuple(raw["channels"])})
        return cls(UNet2DConditionModel.from_pretrained(directory / "unet"),
                   CLIPTextModel.from_pretrained(directory / "text_encoder"),
                   AutoTokenizer.from_pretrained(directory / "tokenizer"), config)
