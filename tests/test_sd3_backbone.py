"""The SD3 backbone (elborl.models.sd3) behind the same interface and RL loop as the shapes model.

Everything runs on a tiny random SD3 built from configs (no downloads); s3:// loading runs against the real
local S3 server of tests/s3server.py.
"""

import shutil

import numpy as np
import pytest
import torch

from elborl.models.sd3 import SD3FlowModel, SD3PromptEmbedding, tiny_sd3
from elborl.policy import CURRENT, SD3_LORA_TARGETS, Policy, PolicyConfig
from elborl.rl import RLConfig
from elborl.rounds import round_metrics
from elborl.sampling import sample

from test_rl_loop import tiny_run, trained_policy

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green diamond"]


def brightness(images, metas):
    return images.astype("float32").mean(axis=(1, 2, 3)) / 255


@pytest.fixture(scope="module")
def model() -> SD3FlowModel:
    torch.set_num_threads(1)
    return tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sd3")
    model.save_pretrained(directory)
    return directory


def velocities(model, prompts=PROMPTS, t=0.6):
    x = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.velocity(x, torch.tensor(t), model.encode_prompts(prompts))


def test_prompt_embedding_indexes_and_concatenates(model):
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
    # two CLIP widths (16 + 32) padded to the joint width 64; 16 CLIP tokens + 4 (zero) T5 tokens
    assert cond.prompt_embeds.shape == (3, 16 + 4, 64) and cond.pooled_projections.shape == (3, 48)
    assert torch.equal(cond.prompt_embeds[:, 16:], torch.zeros(3, 4, 64))
    picked = cond[torch.tensor([2, 0, 2])]
    assert torch.equal(picked.prompt_embeds, cond.prompt_embeds[[2, 0, 2]])
    assert torch.equal(picked.pooled_projections, cond.pooled_projections[[2, 0, 2]])
    assert len(cond[1]) == 1 and len(cond[[0, 1]]) == 2
    both = SD3PromptEmbedding.cat([cond[:1], cond[1:]])
    assert torch.equal(both.prompt_embeds, cond.prompt_embeds)
    assert torch.equal(both.pooled_projections, cond.pooled_projections)
    # the pooled text differs per prompt (the tiny CLIPs pool at the tokenizer's end token)
    assert not torch.allclose(cond.pooled_projections[0], cond.pooled_projections[1])


def test_velocity_shape_and_scalar_or_per_row_time(model):
    x = torch.randn(3, *model.sample_shape)
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        scalar = model.velocity(x, torch.tensor(0.3), cond)
        rows = model.velocity(x, torch.full((3,), 0.3), cond)
    assert scalar.shape == x.shape == (3, 16, 8, 8) and model.sample_shape == (16, 8, 8)
    assert torch.equal(scalar, rows) and scalar.abs().mean() > 0


def test_save_and_load_round_trip_gives_identical_velocities(model, saved):
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                 "scheduler", "model_index.json", "elborl_sd3.json"):
        assert (saved / name).exists(), name
    loaded = SD3FlowModel.from_pretrained(saved).eval()
    assert loaded.text_encoder_3 is None and loaded.resolution == model.resolution == 16
    assert loaded.max_sequence_length == model.max_sequence_length
    assert torch.equal(velocities(model), velocities(loaded))
    x0 = torch.randn(2, *model.sample_shape)
    assert np.array_equal(model.to_images(x0), loaded.to_images(x0))


def test_loading_an_incomplete_directory_names_what_is_missing(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"missing vae/, tokenizer_2/"):
        SD3FlowModel.from_pretrained(broken)
    shutil.copytree(broken / "text_encoder", broken / "text_encoder_3")  # T5 without its tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer_3/"):
        SD3FlowModel.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SD3FlowModel.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("sampler", ["dpm2", "euler"])
def test_sampling_and_decoding(model, sampler):
    x0 = sample(model, PROMPTS[:2], [3, 4], sampler, steps=3)
    assert x0.shape == (2, 16, 8, 8) and torch.isfinite(x0).all()
    images = model.to_images(x0)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    # a sample depends on its own seed only, not on its batch
    alone = sample(model, PROMPTS[1:2], [4], sampler, steps=3)
    assert torch.allclose(alone, x0[1:], atol=1e-5)


def test_classifier_free_guidance_uses_the_embedding_cat(model):
    plain = sample(model, PROMPTS[:2], [5, 6], "dpm2", steps=3, guidance=1.0)
    guided = sample(model, PROMPTS[:2], [5, 6], "dpm2", steps=3, guidance=4.5)
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain)
    assert model.to_images(guided).shape == (2, 16, 16, 3)


def test_policy_lora_and_one_full_rl_epoch(tmp_path):
    torch.set_num_threads(1)
    policy_config = PolicyConfig(lora_rank=4, lora_alpha=8, lora_targets=SD3_LORA_TARGETS)
    policy = Policy(tiny_sd3(seed=0), policy_config)
    names = [n for n, _ in policy.trainable_named_parameters()]
    for target in SD3_LORA_TARGETS:  # all 8 projections of the recipe carry the trained adapter
        assert any(f".{target}.lora_A.{CURRENT}." in n for n in names), target
        assert any(f".{target}.lora_B.{CURRENT}." in n for n in names), target
    assert not any(".attn2." in n for n in names)  # SD3.5's second (dual) attention is not a recipe target
    config = RLConfig(prompts_per_epoch=2, group_size=2, steps=3, micro_batch=8, lr=1e-2, epochs=1)
    assert all(not p.any() for n, p in policy.trainable_named_parameters() if ".lora_B." in n)  # B starts at 0
    ctx = tiny_run(tmp_path, config, brightness, policy_config, tiny_sd3(seed=0))
    rows = round_metrics(ctx)
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert rows[0]["delta_abs_max"] == 0.0 and rows[0]["ratio_min"] == 1.0 == rows[0]["ratio_max"]
    assert rows[0]["grad_norm"] > 0 and 0 <= rows[0]["reward_mean"] <= 1
    assert (tmp_path / "round-00000" / "update" / "policy.safetensors").exists()
    assert any(p.any() for n, p in trained_policy(ctx).trainable_named_parameters() if ".lora_B." in n)


# --- s3:// ------------------------------------------------------------------------------------------
def test_loading_from_s3_mirrors_the_prefix_into_the_cache(model, saved, tmp_path, s3_env):
    """A snapshot uploaded file by file (as `aws s3 sync` would, no manifest) to a real local S3 server."""
    client = s3_env.client()
    bucket = s3_env.create_bucket("models")
    for path in sorted(p for p in saved.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"sd3/tiny/{path.relative_to(saved)}")
    cache = tmp_path / "cache"
    loaded = SD3FlowModel.from_pretrained(f"s3://{bucket}/sd3/tiny", cache_dir=cache)
    assert (cache / "s3" / bucket / "sd3" / "tiny" / "transformer").is_dir()
    assert torch.equal(velocities(model), velocities(loaded.eval()))
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    SD3FlowModel.from_pretrained(f"s3://{bucket}/sd3/tiny/", cache_dir=cache)  # cached: nothing downloaded again
    assert mtimes == {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{bucket}/elsewhere"):
        SD3FlowModel.from_pretrained(f"s3://{bucket}/elsewhere", cache_dir=cache)
