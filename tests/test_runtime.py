"""Precision follows what the hardware computes natively: bfloat16 only where it is not emulated."""

import pytest
import torch

from elborl import runtime
from elborl.config import ParamsError, load_params, parse_params


def fake_cpu(monkeypatch, **flags):
    capabilities = {**torch.cpu.get_capabilities(), "avx512_bf16": False, "amx_bf16": False, **flags}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)


@pytest.mark.parametrize("flags, expected", [
    ({}, "float32"),                          # AVX2 only: bfloat16 is emulated, 26x slower
    ({"avx512_bf16": True}, "bfloat16"),
    ({"amx_bf16": True}, "bfloat16"),
])
def test_auto_picks_bfloat16_only_on_a_cpu_that_has_it(monkeypatch, flags, expected):
    fake_cpu(monkeypatch, **flags)
    assert runtime.resolve_precision("auto", "cpu") == expected
    assert runtime.resolve_precision("float32", "cpu") == "float32"  # an explicit choice stays
    assert runtime.resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        runtime.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("native", [False, True])
def test_the_elbo_recipe_records_the_precision_this_machine_runs(monkeypatch, native):
    fake_cpu(monkeypatch, avx512_bf16=native)
    rl = load_params("params.yaml").rl
    expected = "bfloat16" if native else "float32"
    assert (rl.recipe, rl.rollout_precision, rl.update_precision) == ("elbo", expected, expected)
    line = runtime.precision_choice(rl.rollout_precision, rl.update_precision, "cpu")
    assert f"rollouts {expected}" in line and ("not native" in line) != native


def test_auto_stays_float32_off_the_elbo_estimator_and_bfloat16_there_is_refused(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True)
    flow_grpo = parse_params({"rl": {"recipe": "flow_grpo", "rollout_precision": "auto", "update_precision": "auto"},
                              "recipes": load_recipes()}).rl
    assert flow_grpo.rollout_precision == "float32" == flow_grpo.update_precision
    with pytest.raises(ParamsError, match="bfloat16 rollouts need rl.estimator: elbo"):
        parse_params({"rl": {"recipe": "flow_grpo", "rollout_precision": "bfloat16"}, "recipes": load_recipes()})


def test_an_emulating_device_is_never_told_to_autocast(monkeypatch):
    fake_cpu(monkeypatch)
    assert not runtime.native_bfloat16("cpu")
    assert not runtime.native_bfloat16("mps")


def load_recipes():
    import yaml
    return yaml.safe_load(open("params.yaml"))["recipes"]


# ------------------------------------------------------------------------------------------- device placement

def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_cpu_without_a_gpu_and_asking_for_a_missing_gpu_names_the_setting(monkeypatch):
    no_gpu(monkeypatch)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"runtime.device: {device} asked for, but torch sees 0 CUDA GPU"):
            runtime.resolve_device(device)
        assert not runtime.device_present(device)


def test_auto_is_the_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="cuda:2 asked for, but torch sees 2"):
        runtime.resolve_device("cuda:2")


def test_settings_naming_a_gpu_this_machine_lacks_load_and_keep_auto_precision(monkeypatch):
    no_gpu(monkeypatch)
    params = parse_params({"runtime": {"device": "cuda"}, "rl": {"recipe": "elbo"},
                           "recipes": {"elbo": {"rollout_precision": "auto", "update_precision": "auto"}}})
    assert (params.runtime.device, params.rl.rollout_precision) == ("cuda", "auto")  # resolved where it runs
    with pytest.raises(ParamsError, match="runtime.device: 'gpu' is not a device"):
        parse_params({"runtime": {"device": "gpu"}})
    with pytest.raises(ParamsError, match=r"runtime: unknown key\(s\) \['dtype'\]"):
        parse_params({"runtime": {"dtype": "bf16"}})


def test_place_moves_the_backbone_and_checkpointing_keeps_the_gradient(monkeypatch):
    from elborl.models.shapes_model import ShapesFlowModel
    from conftest import TINY

    no_gpu(monkeypatch)

    def gradient(checkpointing: bool) -> torch.Tensor:
        model = runtime.place(ShapesFlowModel.from_config(TINY, seed=0),
                              runtime.RuntimeConfig(device="auto", gradient_checkpointing=checkpointing))
        assert model.device == torch.device("cpu") and model.denoiser.is_gradient_checkpointing == checkpointing
        model.denoiser.train()
        calls = []
        model.denoiser.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
        x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cond = model.encode_prompts(["a photo of a red circle", "a photo of two squares"])
        model.velocity(x, torch.tensor([0.9, 0.3]), cond).square().sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointed blocks run again in backward
        return torch.cat([p.grad.reshape(-1) for p in model.denoiser.parameters() if p.grad is not None])

    plain, checkpointed = gradient(False), gradient(True)
    assert torch.allclose(plain, checkpointed, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="runtime.device: 'tpu' is not a device"):
        runtime.place(ShapesFlowModel.from_config(TINY, seed=0), runtime.RuntimeConfig(device="tpu"))


def test_the_loader_applies_the_runtime_to_what_it_loads(tmp_path):
    """`load_backbone(directory, runtime)` places what it loads (here: gradient checkpointing switched on);
    without a runtime the model is as saved."""
    from conftest import TINY
    from elborl.models import load_backbone
    from elborl.models.shapes_model import ShapesFlowModel

    ShapesFlowModel.from_config(TINY, seed=0).save_pretrained(tmp_path / "model")
    placed = load_backbone(tmp_path / "model", runtime.RuntimeConfig(device="cpu", gradient_checkpointing=True))
    assert placed.denoiser.is_gradient_checkpointing and placed.device.type == "cpu"
    assert not load_backbone(tmp_path / "model").denoiser.is_gradient_checkpointing
