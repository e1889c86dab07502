"""The policies kept during training (METHOD.md §4) over one velocity backbone.

- current θ: trained; old θ_old: rollouts are sampled from it; reference: the base weights; EMA of θ: evaluation.
With LoRA (peft) the current and old policies are two adapters on one copy of the base weights and the
reference is the adapters switched off. Full fine-tuning (small models only) keeps the old and reference
networks as separate copies.
"""

from contextlib import contextmanager
from typing import Annotated
import copy
import warnings

import torch
from peft import LoraConfig
from pydantic import Field

from elborl.sampling import guided_velocity
from elborl.settings import Int, OneOf, Str, section

CURRENT, OLD, REFERENCE = "current", "old", "reference"
FINETUNE_MODES = ("lora", "full")
# METHOD.md §5: attention projections of SD3's joint blocks. The shapes UNet has the first four.
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# PolicyConfig.lora_targets' default (its description says why)
SHAPES_LORA_TARGETS = UNET_LORA_TARGETS + ("conv1", "conv2", "time_emb_proj", "linear_1", "linear_2")


@section("policy")
class PolicyConfig:
    """The policies (docs/method.md, "The policies"): with LoRA, current and old are two adapters on one copy of
    the base weights and the reference is the adapters switched off; full fine-tuning keeps copies."""

    finetune: Annotated[Str, OneOf(FINETUNE_MODES, "mode"), Field(description=(
        "lora: LoRA adapters on `lora_targets`; full: every weight of the denoiser (small models only)."
    ))] = "lora"
    lora_rank: Annotated[Int, Field(gt=0, description="The adapters' rank r.")] = 8
    lora_alpha: Annotated[Int, Field(gt=0, description="The adapters' α (their update is scaled by α / r).")] = 16
    lora_targets: Annotated[tuple[Str, ...], Field(min_length=1, description=(
        "The denoiser's module names that get adapters. The default: the shapes UNet's attention projections plus "
        "its ResNet convs, their time-embedding projections and the pooled-text/time embedding MLPs, 296k trainable "
        "parameters instead of attention-only 96k; in this small UNet most of the computation is outside "
        "attention, and attention-only adapters did not raise the held-out score "
        "(docs/experiments/2026-11-30-rl-recipe-sweep.md). SD3's: the 8 attention projections of its joint blocks "
        "(configs/sd35m-geneval.yaml)."
    ))] = SHAPES_LORA_TARGETS
    seed: Annotated[Int, Field(ge=0, description=(
        "The LoRA initialisation: a stage in another process must rebuild the same initial policy."
    ))] = 0


class Policy:
    """`velocity(which, x_t, t, cond)` for which in (current, old, reference); the backbone's denoiser is trained."""

    def __init__(self, backbone, config: PolicyConfig = PolicyConfig()):
        if config.finetune not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode {config.finetune!r}; expected one of {FINETUNE_MODES}")
        self.backbone, self.config = backbone, config
        self.net = backbone.denoiser
        backbone.requires_grad_(False)
        if config.finetune == "lora":
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                              target_modules=list(config.lora_targets))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.net.add_adapter(lora, adapter_name=CURRENT)
                with warnings.catch_warnings():  # peft warns on a model's second adapter: two are the design here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    self.net.add_adapter(copy.deepcopy(lora), adapter_name=OLD)
            self._copies = {}
        else:
            self._copies = {OLD: copy.deepcopy(self.net), REFERENCE: copy.deepcopy(self.net)}
            self.net.requires_grad_(True)
        self._activate(CURRENT)
        self.load_old_from_current()
        self.ema = {name: p.detach().clone() for name, p in self.trainable_named_parameters()}

    # --- which weights -------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.config.finetune == "full":
            return list(self.net.named_parameters())
        return [(n, p) for n, p in self.net.named_parameters() if f".{CURRENT}." in n]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def _old_named_tensors(self) -> dict[str, torch.Tensor]:
        if self.config.finetune == "full":
            return dict(self._copies[OLD].named_parameters())
        return {n.replace(f".{OLD}.", f".{CURRENT}."): p for n, p in self.net.named_parameters() if f".{OLD}." in n}

    def _activate(self, which: str) -> None:
        """Switch the adapters; peft flips requires_grad with the active adapter, so current is reset last."""
        if self.config.finetune == "full":
            return
        if which == REFERENCE:
            self.net.disable_adapters()
            return
        self.net.enable_adapters()
        self.net.set_adapter(which)
        for _, p in self.trainable_named_parameters():
            p.requires_grad_(True)
        for p in self._old_named_tensors().values():
            p.requires_grad_(False)

    @contextmanager
    def weights(self, which: str):
        """Inside the block `self.backbone.velocity` is the chosen policy's; current is restored after."""
        if which not in (CURRENT, OLD, REFERENCE):
            raise ValueError(f"unknown policy {which!r}")
        if self.config.finetune == "full" and which != CURRENT:
            original = self.backbone.denoiser
            self.backbone.denoiser = self._copies[which]
            try:
                yield
            finally:
                self.backbone.denoiser = original
            return
        self._activate(which)
        try:
            yield
        finally:
            self._activate(CURRENT)

    def velocity(self, which: str, x_t, t, cond, null_cond=None, guidance: float = 1.0,
                 detach_null: bool = False) -> torch.Tensor:
        """The velocity of policy `which`, at CFG guidance `guidance` (1 = the conditional velocity alone)."""
        with self.weights(which):
            return guided_velocity(self.backbone, x_t, t, cond, null_cond, guidance, detach_null)

    # --- updates of the kept policies ----------------------------------------------------------
    @torch.no_grad()
    def load_old_from_current(self) -> None:
        self.soft_update_old(0.0)

    @torch.no_grad()
    def soft_update_old(self, decay: float) -> None:
        """θ_old ← d θ_old + (1 − d) θ (METHOD.md §4)."""
        old = self._old_named_tensors()
        for name, p in self.trainable_named_parameters():
            old[name].lerp_(p, 1 - decay) if decay else old[name].copy_(p)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for name, p in self.trainable_named_parameters():
            self.ema[name].lerp_(p, 1 - decay)

    @contextmanager
    def ema_weights(self):
        """Current θ temporarily replaced by its EMA (for evaluation)."""
        params = dict(self.trainable_named_parameters())
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"current/{n}": p.detach().clone() for n, p in self.trainable_named_parameters()}
        state.update({f"old/{n}": p.detach().clone() for n, p in self._old_named_tensors().items()})
        state.update({f"ema/{n}": t.clone() for n, t in self.ema.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        old = self._old_named_tensors()
        for name, p in self.trainable_named_parameters():
            p.copy_(state[f"current/{name}"])
            old[name].copy_(state[f"old/{name}"])
            self.ema[name].copy_(state[f"ema/{name}"])
