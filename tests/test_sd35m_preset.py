"""The production preset (configs/sd35m-geneval.yaml) against METHOD.md §4-§5, transcribed here by hand."""

from pathlib import Path
import math

from elborl.config import load_params
from elborl.distributed import Processes

PRESET = Path(__file__).resolve().parents[1] / "configs" / "sd35m-geneval.yaml"

# METHOD.md §5: 512 px; LoRA rank 32, alpha 64 on the attention projections (8 of them); AdamW (0.9, 0.999, wd 1e-4),
# lr 3e-4, grad-norm clip 5; fp32 with tf32; 8 GPUs x per-GPU batch 9; 48 prompts x 24 images and one optimizer
# step per epoch (1152 x 9 terms); 360 epochs; evaluation with a 40-step Euler ODE, CFG off. §4: EMA 0.9 cap,
# θ_old decay min(0.001 step, 0.5). §2-§3: PEPG on the adaptive ELBO, 10-step DPM-Solver-2 rollouts, KL 1e-4.
PAPER = {
    "lora_rank": 32, "lora_alpha": 64,
    "lora_targets": {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"},
    "lr": 3e-4, "adam_beta1": 0.9, "weight_decay": 1e-4, "grad_clip": 5.0, "gpus": 8, "per_gpu_batch": 9,
    "prompts": 48, "images_per_prompt": 24, "optimizer_steps": 1, "terms_per_sample": 9, "epochs": 360,
    "eval_steps": 40, "ema_cap": 0.9, "old_rate": 0.001, "old_max": 0.5, "kl": 1e-4, "rollout_steps": 10,
}


def test_the_preset_is_the_papers_recipe():
    params = load_params(PRESET)
    policy, rl, evaluation = params.policy, params.rl, params.evaluate
    assert (policy.finetune, policy.lora_rank, policy.lora_alpha) == ("lora", PAPER["lora_rank"], PAPER["lora_alpha"])
    assert set(policy.lora_targets) == PAPER["lora_targets"]
    assert (rl.lr, rl.adam_beta1, rl.weight_decay, rl.grad_clip) == (PAPER["lr"], PAPER["adam_beta1"],
                                                                      PAPER["weight_decay"], PAPER["grad_clip"])
    assert (rl.objective, rl.estimator, rl.weighting, rl.sampler, rl.steps) == ("pepg", "elbo", "adaptive", "dpm2",
                                                                                 PAPER["rollout_steps"])
    assert rl.prompts_per_epoch * rl.group_size == PAPER["prompts"] * PAPER["images_per_prompt"] == 1152
    assert rl.optimizer_steps_per_epoch == PAPER["optimizer_steps"] and rl.epochs == PAPER["epochs"]
    assert math.floor(rl.elbo_fraction * rl.steps) == PAPER["terms_per_sample"]  # K = floor(fraction N), §2
    assert rl.micro_batch == PAPER["per_gpu_batch"]
    assert (rl.kl_beta, rl.ema_decay, rl.old_decay_rate, rl.old_decay_max) == (PAPER["kl"], PAPER["ema_cap"],
                                                                               PAPER["old_rate"], PAPER["old_max"])
    assert (rl.rollout_precision, rl.update_precision, params.runtime.tf32) == ("float32", "float32", True)
    assert (evaluation.sampler, evaluation.steps, evaluation.guidance) == ("euler", PAPER["eval_steps"], 1.0)
    assert evaluation.scorer == "geneval"  # GenEval's own detector, not the shapes world's
    assert rl.guidance == 1.0 and params.rewards.weights == {"geneval": 1.0}


def test_the_preset_splits_whole_groups_over_eight_gpus():
    rl = load_params(PRESET).rl
    Processes(0, PAPER["gpus"]).check_groups(rl.prompts_per_epoch)  # raises when the groups do not split evenly
    assert len(Processes(7, PAPER["gpus"]).group_share(rl.prompts_per_epoch)) == 6


def test_the_launch_command_in_the_preset_names_the_preset_and_the_stage():
    header = PRESET.read_text().split("\n\n")[0]
    assert "accelerate launch --multi_gpu --num_processes 8 -m stages.train --params configs/sd35m-geneval.yaml" in header
