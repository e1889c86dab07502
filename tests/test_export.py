"""elborl.export: the EMA LoRA in diffusers' format loads into a fresh StableDiffusion3Pipeline and gives the EMA
policy's velocity exactly (rank and alpha carried by the adapter metadata); the model card; the refusals."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY
from elborl import export
from elborl.export import CARD_FILE, WEIGHTS_FILE, export_lora
from elborl.models.sd3 import SD3FlowModel, tiny_sd3
from elborl.models.shapes_model import ShapesFlowModel
from elborl.policy import SD3_LORA_TARGETS, Policy, PolicyConfig

RANK, ALPHA = 4, 16  # alpha != rank: a loader that drops alpha scales the update by 1 instead of 4
PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
CARD = {
    "Prompt set": "shapes colour binding, 48 train / 12 test prompts",
    "Rewards": ["detector: colour binding", "CLIP score"],
    "Metrics": {"base": {"overall": 0.412, "colors": 0.5}, "fine-tuned": {"overall": 0.638, "colors": 0.75}},
    "Lineage": {"run": "s3://runs/colour-binding-7", "epochs": 30, "ema_decay": 0.9},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The base weights, saved before any adapter is attached."""
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("base")
    tiny_sd3(seed=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def policy(base_dir):
    """A LoRA policy whose EMA differs from its initial adapter, from its current weights and from the base."""
    policy = Policy(SD3FlowModel.from_pretrained(base_dir).eval(),
                    PolicyConfig(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=SD3_LORA_TARGETS))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in policy.trainable_named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        policy.update_ema(0.5)
        for _, p in policy.trainable_named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return policy


@pytest.fixture(scope="module")
def exported(policy, tmp_path_factory):
    return export_lora(policy, tmp_path_factory.mktemp("exports") / "run7", CARD, base_model="s3://models/tiny-sd3")


@pytest.fixture(scope="module")
def inputs(policy):
    x = torch.randn(len(PROMPTS), *policy.backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, torch.tensor(0.6), policy.backbone.encode_prompts(PROMPTS)


def velocity(model, inputs):
    with torch.no_grad():
        return model.velocity(*inputs)


def fresh_with_lora(base_dir, lora) -> SD3FlowModel:
    """The base from disk with `lora` (an export directory or a state dict) loaded the way a user would."""
    model = SD3FlowModel.from_pretrained(base_dir).eval()
    model.pipeline.load_lora_weights(lora)
    return model


def test_diffusers_loads_the_ema_velocity(policy, exported, base_dir, inputs):
    assert sorted(p.name for p in exported.iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    base = velocity(SD3FlowModel.from_pretrained(base_dir).eval(), inputs)
    loaded = velocity(fresh_with_lora(base_dir, exported), inputs)
    with policy.ema_weights():
        ema = velocity(policy.backbone, inputs)
    current = velocity(policy.backbone, inputs)
    torch.testing.assert_close(loaded, ema, atol=1e-6, rtol=0)
    assert (loaded - current).abs().max() > 1e-2  # the EMA, not the current weights
    assert (loaded - base).abs().max() > 1e-2  # the adapter is applied at all


def test_alpha_comes_from_the_adapter_metadata(exported, base_dir, inputs, policy):
    with safe_open(exported / WEIGHTS_FILE, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA
    assert set(metadata["transformer.target_modules"]) == set(SD3_LORA_TARGETS)
    assert keys and all(k.startswith("transformer.") and ".lora_" in k and ".current." not in k for k in keys)

    with_metadata = fresh_with_lora(base_dir, exported)
    assert with_metadata.denoiser.peft_config["default_0"].lora_alpha == ALPHA
    # the same tensors without the metadata: diffusers infers alpha = rank, a 4x smaller update
    without = fresh_with_lora(base_dir, load_file(exported / WEIGHTS_FILE))
    assert without.denoiser.peft_config["default_0"].lora_alpha == RANK
    with policy.ema_weights():
        ema = velocity(policy.backbone, inputs)
    torch.testing.assert_close(velocity(with_metadata, inputs), ema, atol=1e-6, rtol=0)
    assert (velocity(without, inputs) - ema).abs().max() > 1e-2


def test_the_policy_is_left_as_it_was(policy, exported):
    before = {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}
    export_lora(policy, exported.parent / "again", {})
    assert all(torch.equal(p, before[n]) for n, p in policy.trainable_named_parameters())
    assert all(p.requires_grad for _, p in policy.trainable_named_parameters())


def test_model_card_has_the_sections_and_lora_settings(exported):
    text = (exported / CARD_FILE).read_text()
    assert text.startswith("---\nbase_model: \"s3://models/tiny-sd3\"\n")
    for title in ("## Base model", "## LoRA", "## Usage", *(f"## {t}" for t in CARD)):
        assert title in text, title
    assert "| rank | 4 |" in text and "| lora_alpha | 16 |" in text and "| scale (alpha / rank) | 4 |" in text
    assert ", ".join(SD3_LORA_TARGETS) in text
    assert "| num_layers | 2 |" in text and "SD3Transformer2DModel" in text
    assert CARD["Prompt set"] in text and "- CLIP score" in text
    assert "|  | overall | colors |" in text and "| fine-tuned | 0.638 | 0.75 |" in text
    assert "| run | s3://runs/colour-binding-7 |" in text and "| epochs | 30 |" in text


def test_render_value_shapes():
    assert export.render_value([{"a": 1, "b": 2.0}, {"a": 3}]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 |  |"
    assert export.render_value({"x": {"y": {"z": 1}}}) == "### x\n\n|  | z |\n|---|---|\n| y | 1 |"
    assert export.render_value("a | b") == "a | b" and export.render_value(0.123456) == "0.1235"


def test_refuses_full_fine_tuning():
    policy = Policy(tiny_sd3(seed=0), PolicyConfig(finetune="full"))
    with pytest.raises(ValueError, match="full fine-tuning has no adapter.*save_pretrained"):
        export.check_exportable(policy)


def test_refuses_the_shapes_backbone(tmp_path):
    policy = Policy(ShapesFlowModel.from_config(TINY, seed=0), PolicyConfig())
    with pytest.raises(ValueError, match="ShapesFlowModel backbone.*not a diffusers|only the SD3 backbone"):
        export_lora(policy, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_existing_export_needs_overwrite(policy, tmp_path):
    target = export_lora(policy, tmp_path / "out", {"Note": "first"})
    with pytest.raises(ValueError, match="already holds an export.*overwrite=True"):
        export_lora(policy, target, {"Note": "second"})
    assert "first" in (target / CARD_FILE).read_text()
    export_lora(policy, target, {"Note": "second"}, overwrite=True)
    assert "second" in (target / CARD_FILE).read_text() and "first" not in (target / CARD_FILE).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired directories left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no export"):
        export_lora(policy, other, {}, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_failed_export_is_never_visible(policy, tmp_path, monkeypatch):
    target = export_lora(policy, tmp_path / "out", {"Note": "first"})

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_lora(policy, target, {"Note": "second"}, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_lora(policy, tmp_path / "new", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "first" in (target / CARD_FILE).read_text()
