"""bench/step_cost.py: its step is pretraining's step (it trains), its variants switch what they name, and it prints
a row per variant."""

import torch

from conftest import load_bench
from elborl.config import load_params_with_overrides
from elborl.pretrain import pretrain

TINY = ["base_model.channels=[32,32]", "base_model.text_width=32", "base_model.text_layers=1",
        "pretrain.batch_size=2", "pretrain.threads=1"]


def test_a_step_times_every_part_and_trains_the_model():
    bench = load_bench("step_cost")
    timer = bench.StepTimer(load_params_with_overrides("params.yaml", TINY))
    before = [p.detach().clone() for p in timer.model.parameters()]
    parts = {}
    timer.step(parts)
    assert list(parts) == ["data", "forward (text encoder, UNet, loss)", "backward", "clip + AdamW + EMA"]
    assert all(s > 0 for s in parts.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, timer.model.parameters()))


def test_the_timed_step_is_pretrainings_step():
    bench = load_bench("step_cost")
    params = load_params_with_overrides("params.yaml", TINY + ["pretrain.steps=3"])
    timer = bench.StepTimer(params)
    for _ in range(3):
        timer.step()
    ema, _ = pretrain(params.base_model, params.pretrain, progress=False, log=lambda *_: None)
    timed = timer.run.ema.state_dict()
    assert all(torch.equal(v, timed[k]) for k, v in ema.state_dict().items())


def test_channels_last_and_bfloat16_variants_do_what_they_say():
    bench = load_bench("step_cost")
    params = load_params_with_overrides("params.yaml", TINY)
    variant = next(v for v in bench.VARIANTS if v.bfloat16 and v.channels_last)
    timer = bench.StepTimer(params, variant)
    conv = timer.model.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []
    hook = timer.model.denoiser.conv_in.register_forward_hook(lambda m, i, out: seen.append(out))
    timer.step()
    hook.remove()
    assert [out.dtype for out in seen] == [torch.bfloat16]
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # the convolutions run channels-last
    assert timer.model.denoiser.conv_in.weight.dtype == torch.float32  # autocast, not a bfloat16 model


def test_main_prints_the_parts_and_a_row_per_variant(capsys):
    bench = load_bench("step_cost")
    bench.main(["--steps", "1"] + [arg for kv in TINY for arg in ("--set", kv)])
    out = capsys.readouterr().out
    assert "| **step** |" in out
    for variant in bench.VARIANTS:
        assert f"| {variant.name} |" in out
