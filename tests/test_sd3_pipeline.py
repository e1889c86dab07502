"""The production code path on the tiny SD3 (MMDiT + VAE + CLIP text encoders from configs, latent space): every
stage CLI in its own process over published artifacts, two rounds, then the held-out evaluation of the final EMA
policy; the stages' weights equal those of the same run in one process."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from elborl.config import load_params
from elborl.geneval.prompts import shapes_test_set, write_jsonl
from elborl.models.sd3 import tiny_sd3
from elborl.policy import SD3_LORA_TARGETS
from elborl.rewards import reward_from_params
from elborl.rounds import RunContext, round_uri, run_rounds
from elborl.store import ArtifactStore

from test_rl_loop import METAS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "policy": {"lora_rank": 4, "lora_alpha": 8, "lora_targets": list(SD3_LORA_TARGETS)},
    "rl": {"prompts_per_epoch": 2, "group_size": 2, "steps": 2, "micro_batch": 4, "epochs": 2, "lr": 1e-3,
           "advantage": "std"},
    "rewards": {"weights": {"jpeg_compressibility": 1.0}},
    "evaluate": {"images_per_prompt": 1, "steps": 2, "batch_size": 8},
}


def stage(name: str, *args: str, params: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params), "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"stages.{name}: {done.stderr[-3000:]}"
    return done


def test_every_stage_runs_the_tiny_sd3_in_its_own_process(tmp_path):
    torch.set_num_threads(1)
    model = tiny_sd3(seed=0)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "prompts").mkdir()
    write_jsonl(tmp_path / "prompts" / "train.jsonl", [{**m, "include": []} for m in METAS])
    write_jsonl(tmp_path / "prompts" / "test.jsonl", shapes_test_set()[:2])
    store, root = ArtifactStore(), tmp_path / "store"
    base, prompts = str(root / "base"), str(root / "prompts")
    store.put_artifact(tmp_path / "base", base)
    store.put_artifact(tmp_path / "prompts", prompts)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(SETTINGS))

    run = str(root / "run")
    for r in range(2):
        stage("rollout", "--run", run, "--round", str(r), "--base-model", base, "--prompts", prompts, params=params)
        stage("score", "--run", run, "--round", str(r), params=params)
        stage("update", "--run", run, "--round", str(r), "--base-model", base, params=params)
    evaluated = stage("evaluate", "--model", base, "--run", run, "--prompts", prompts, "--out", str(root / "eval"),
                      "--metrics", "jpeg_compressibility", params=params)
    assert "jpeg_compressibility" in evaluated.stdout
    scores = json.loads((root / "eval" / "scores.json").read_text())
    assert set(scores["metrics"]["jpeg_compressibility"]["tasks"]) == {m["tag"] for m in shapes_test_set()[:2]}
    rollout = load_file(root / "run" / "round-00001" / "rollout" / "samples.safetensors")["x0"]
    assert rollout.shape[1:] == model.sample_shape and rollout.shape[1] == 16  # the VAE's latents, not pixels

    settings = load_params(params)
    one = RunContext(str(tmp_path / "one"), settings, base, prompts, cache=tmp_path / "cache", log=lambda *_: None)
    with reward_from_params(settings.rewards) as reward:
        run_rounds(one, reward, progress=False)
    staged = load_file(Path(round_uri(run, 1, "update")) / "policy.safetensors")
    in_process = load_file(Path(round_uri(one.run, 1, "update")) / "policy.safetensors")
    assert staged.keys() == in_process.keys() and all(torch.equal(staged[k], in_process[k]) for k in staged)
    assert any(v.any() for k, v in staged.items() if ".lora_B." in k)  # the adapters trained
