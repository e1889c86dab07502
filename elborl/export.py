"""A trained policy's EMA LoRA in diffusers' format, with a model card.

    export_lora(policy, "exports/run7", card={"Prompts": ..., "Rewards": ..., "Metrics": ..., "Lineage": ...},
                base_model="s3://models/sd3.5-medium")

writes `pytorch_lora_weights.safetensors` (the EMA of the "current" adapter, keys `transformer.…lora_A.weight`,
with the adapter's peft `LoraConfig` in the file's `lora_adapter_metadata`, as diffusers' own
`StableDiffusion3Pipeline.save_lora_weights` writes it) and `README.md`. A user then gets the EMA policy's
velocity with

    pipe = StableDiffusion3Pipeline.from_pretrained(BASE)
    pipe.load_lora_weights("exports/run7")

Without the metadata diffusers would infer `lora_alpha = rank` from the weights and scale the update by 1
instead of alpha / rank. The export is assembled in a hidden sibling directory and renamed into place last, so
a half-written export is never visible under its name.
"""

from pathlib import Path
import json
import os
import shutil

import torch
from diffusers import StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from elborl.policy import CURRENT, Policy

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: load_lora_weights' default
CARD_FILE = "README.md"


# --- what may be exported --------------------------------------------------------------------------
def check_exportable(policy: Policy) -> None:
    """ValueError unless the policy is a LoRA over the SD3 backbone (a diffusers StableDiffusion3Pipeline)."""
    from elborl.models.sd3 import SD3FlowModel

    if not isinstance(policy.backbone, SD3FlowModel):
        raise ValueError(
            f"cannot export a LoRA for a {type(policy.backbone).__name__} backbone: only the SD3 backbone "
            "(elborl.models.sd3.SD3FlowModel) is a diffusers StableDiffusion3Pipeline that load_lora_weights can "
            "load into. For this backbone keep the run's checkpoint (elborl.checkpoint) and restore it with "
            "Policy.load_state_dict on the same base model, evaluating under policy.ema_weights()")
    if policy.config.finetune != "lora":
        raise ValueError(
            f"cannot export a LoRA from a policy with finetune={policy.config.finetune!r}: full fine-tuning has no "
            "adapter. Save the whole fine-tuned model instead (inside policy.ema_weights(), "
            "policy.backbone.save_pretrained(directory))")


# --- the LoRA file ---------------------------------------------------------------------------------
def ema_lora_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """The EMA weights of the "current" adapter in peft's saved naming (`….lora_A.weight`, no adapter name),
    on the CPU; the policy's own weights are not touched."""
    net = policy.net
    state = {name: tensor for name, tensor in net.state_dict().items() if f".{CURRENT}." in name}
    missing = sorted(set(state) - set(policy.ema))
    if missing:
        raise ValueError(f"the policy's EMA lacks {len(missing)} adapter tensors, e.g. {missing[0]}")
    state.update(policy.ema)
    lora = get_peft_model_state_dict(net, state_dict=state, adapter_name=CURRENT)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in lora.items()}


def lora_adapter_metadata(policy: Policy) -> dict:
    """The "current" adapter's peft LoraConfig as a dict (rank, lora_alpha, target_modules, ...): what
    diffusers' `load_lora_weights` builds the adapter from."""
    return policy.net.peft_config[CURRENT].to_dict()


def write_lora_weights(policy: Policy, directory: str | Path) -> Path:
    """`directory/pytorch_lora_weights.safetensors` through diffusers' own writer (prefix + metadata)."""
    StableDiffusion3Pipeline.save_lora_weights(
        directory, transformer_lora_layers=ema_lora_state_dict(policy),
        transformer_lora_adapter_metadata=lora_adapter_metadata(policy), weight_name=WEIGHTS_FILE)
    return Path(directory) / WEIGHTS_FILE


# --- the model card --------------------------------------------------------------------------------
def base_model_name(policy: Policy, base_model: str | None = None) -> str:
    """The caller's name for the base, else where the transformer was loaded from, else "unknown"."""
    return str(base_model or policy.backbone.denoiser.config.get("_name_or_path") or "unknown")


def base_architecture(policy: Policy) -> dict:
    """The transformer's shape, enough to tell the bases apart (e.g. SD3.5 Medium from Large)."""
    config = policy.backbone.denoiser.config
    return {"class": type(policy.backbone.denoiser).__name__, "num_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads, "attention_head_dim": config.attention_head_dim,
            "in_channels": config.in_channels, "sample_size": config.sample_size,
            "resolution": policy.backbone.resolution}


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def render_value(value, level: int = 3) -> str:
    """Markdown for one card entry: text as is, a scalar, a list of scalars as bullets, a list of dicts or a
    dict of dicts as a table, a dict of scalars as a key/value table, anything deeper as subsections."""
    if isinstance(value, str):
        return value.strip()
    if _scalar(value):
        return _cell(value)
    if isinstance(value, dict):
        if all(_scalar(v) for v in value.values()):
            return _table(["", "value"], [[k, v] for k, v in value.items()])
        if all(isinstance(v, dict) and all(_scalar(x) for x in v.values()) for v in value.values()):
            columns = list(dict.fromkeys(c for v in value.values() for c in v))
            return _table(["", *columns], [[k, *(v.get(c, "") for c in columns)] for k, v in value.items()])
        return "\n\n".join(f"{'#' * level} {k}\n\n{render_value(v, level + 1)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(c for v in value for c in v))
            return _table(columns, [[v.get(c, "") for c in columns] for v in value])
        return "\n".join(f"- {render_value(v, level + 1)}" for v in value)
    return _cell(value)


def render_sections(card: dict) -> str:
    """Each entry of `card` as a `## title` section."""
    return "\n\n".join(f"## {title}\n\n{render_value(body)}" for title, body in card.items())


def model_card(policy: Policy, card: dict | None = None, base_model: str | None = None) -> str:
    """README.md: front matter for the Hub, base model identity, the LoRA settings, how to load, then `card`."""
    base = base_model_name(policy, base_model)
    config = policy.config
    front = "\n".join(["---", f"base_model: {json.dumps(base)}", "library_name: diffusers",
                       "tags: [lora, text-to-image, stable-diffusion-3, elborl]", "---"])
    lora = {"rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "scale (alpha / rank)": config.lora_alpha / config.lora_rank,
            "target_modules": ", ".join(config.lora_targets), "weights": "EMA of the trained adapter"}
    usage = ("```python\nfrom diffusers import StableDiffusion3Pipeline\n\n"
             f"pipe = StableDiffusion3Pipeline.from_pretrained({json.dumps(base)})\n"
             "pipe.load_lora_weights(EXPORT_DIR)  # rank and alpha come from the file's adapter metadata\n```")
    sections = {"Base model": {"name": base, **base_architecture(policy)}, "LoRA": lora, "Usage": usage,
                **(card or {})}
    return f"{front}\n\n# ELBO-RL LoRA\n\n{render_sections(sections)}\n"


# --- the export ------------------------------------------------------------------------------------
def holds_export(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).exists()


def _check_target(directory: Path, overwrite: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if holds_export(directory):
        if not overwrite:
            raise ValueError(f"{directory} already holds an export ({WEIGHTS_FILE}); pass overwrite=True to replace it")
    elif any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty and holds no export: refusing to replace it")


def export_lora(policy: Policy, directory: str | Path, card: dict | None = None, *, base_model: str | None = None,
                overwrite: bool = False) -> Path:
    """Writes the EMA LoRA (diffusers format, with adapter metadata) and README.md into `directory`, atomically.

    card: model-card sections, title -> text / value / list / dict (prompt set, rewards, metrics, lineage, ...).
    base_model: how a user finds the base weights (repository id or URI); default the transformer's
    `_name_or_path`. overwrite: replace an existing export (a non-empty directory without one is never replaced).
    """
    check_exportable(policy)
    directory = Path(directory)
    _check_target(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    retired = directory.parent / f".{directory.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write_lora_weights(policy, staging)
        (staging / CARD_FILE).write_text(model_card(policy, card, base_model))
        if directory.exists():
            directory.rename(retired)
        try:
            staging.rename(directory)
        except BaseException:
            if retired.exists():
                retired.rename(directory)  # the previous export stays in place
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    return directory
