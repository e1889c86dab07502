"""bench/gpu_throughput.py in its --smoke configuration (a tiny transformer on the CPU): the wiring a lent GPU
runs at SD3.5-Medium size."""

import json

import pytest

from conftest import load_bench

gpu_throughput = load_bench("gpu_throughput")


def test_the_throughput_benchmark_times_rollout_and_update_with_and_without_checkpointing(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    gpu_throughput.main(["--smoke", "--prompts", "1", "--group-size", "2", "--peak-tflops", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [row["gradient_checkpointing"] for row in report["rows"]] == [False, True]
    assert report["update_tflops_per_term"] > 0 and report["precision"] == "float32"
    for row in report["rows"]:
        assert row["rollout_images_per_s"] > 0 and row["update_terms_per_s"] == 2 * row["update_samples_per_s"]
        assert row["update_mfu"] == pytest.approx(row["update_terms_per_s"] * report["update_tflops_per_term"])
    assert "| on |" in capsys.readouterr().out


def test_the_sd35_medium_config_builds_the_published_size():
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # shapes only: no memory, no time
        model = SD3Transformer2DModel(**gpu_throughput.SD35_MEDIUM)
    parameters = sum(p.numel() for p in model.parameters())
    assert 2.2e9 < parameters < 2.6e9, parameters  # SD3.5 Medium's MMDiT: about 2.5B
