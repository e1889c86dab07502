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
