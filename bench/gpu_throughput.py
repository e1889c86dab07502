"""Benchmark: RL throughput of an SD3.5-Medium-sized policy on one GPU (random weights, nothing downloaded).

    .venv/bin/python bench/gpu_throughput.py                      # on a GPU: about 2-4 minutes on an H100
    .venv/bin/python bench/gpu_throughput.py --smoke              # wiring only: a tiny transformer on the CPU

The transformer is built from SD3.5 Medium's published config (2.5B parameters, 24 MMDiT layers, dual attention in
the first 13) with random weights, at 512 px (64 x 64 latents), with the recipe's LoRA (rank 32, alpha 64 on the
attention projections, METHOD.md §5). Prompts map to fixed random text embeddings of the real shapes (333 tokens
of 4096, pooled 2048): the text encoders run once per prompt and do not bound RL throughput. Rollouts and updates
are the library's own (`elborl.rl.rollout`: 10-step DPM-Solver-2; `elborl.rl.update`: 9 ELBO terms per sample,
each through the reference, the old and the current policy, and backward), under bfloat16 autocast. Printed per
gradient-checkpointing setting: rollout images/s, update samples/s and terms/s, peak memory, and the update's
model FLOPs utilisation against the GPU's dense bfloat16 peak (FLOPs counted by torch's FlopCounterMode).
"""

from dataclasses import replace
from pathlib import Path
import argparse
import hashlib
import json
import time

import torch
from diffusers import SD3Transformer2DModel

from elborl.models.sd3 import SD3PromptEmbedding, SD3TransformerBackbone
from elborl.policy import SD3_LORA_TARGETS, Policy, PolicyConfig
from elborl.rl import RLConfig, make_optimizer, rollout, update
from elborl.runtime import RuntimeConfig, place, resolve_device

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TEXT_TOKENS = 77 + 256  # CLIP's 77 and T5's 256 tokens, as SD3.5's pipeline joins them
# Dense bfloat16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0))


class RandomTextBackbone(SD3TransformerBackbone):
    """An SD3 transformer behind the backbone interface (`encode_prompts`, `velocity`), prompts mapped to fixed
    random embeddings: throughput without the text encoders or the VAE."""

    def __init__(self, config: dict, latent_size: int, text_tokens: int):
        super().__init__()
        self.denoiser = SD3Transformer2DModel(**config)
        self.latent_size, self.text_tokens = latent_size, text_tokens

    def encode_prompts(self, prompts: list[str]) -> SD3PromptEmbedding:
        config, embeds, pooled = self.denoiser.config, [], []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
            embeds.append(torch.randn(self.text_tokens, config.joint_attention_dim, generator=generator))
            pooled.append(torch.randn(config.pooled_projection_dim, generator=generator))
        return SD3PromptEmbedding(torch.stack(embeds).to(self.device), torch.stack(pooled).to(self.device))


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def metas(n_prompts: int) -> list[dict]:
    return [{"prompt": f"a photo of prompt {i}", "tag": "throughput"} for i in range(n_prompts)]


def timed_epoch(policy: Policy, config: RLConfig, epoch: int) -> dict:
    """One rollout and one update of `config`'s size: seconds and peak memory of each."""
    device, row = policy.backbone.device, {}
    optimizer = make_optimizer(policy, config)
    for phase in ("rollout", "update"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        if phase == "rollout":
            ro = rollout(policy, metas(config.prompts_per_epoch), config, epoch)
        else:
            rewards = torch.rand(len(ro.seeds), generator=torch.Generator().manual_seed(epoch))
            update(policy, optimizer, ro, rewards, config, epoch)
        synchronize(device)
        row[f"{phase}_seconds"] = time.perf_counter() - start
        row[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return row


def update_flops_per_term(policy: Policy, config: RLConfig) -> float:
    """Model FLOPs of one ELBO term of the update (reference, old and current forward, backward), counted on a
    small epoch of the same settings."""
    from torch.utils.flop_counter import FlopCounterMode

    small = replace(config, prompts_per_epoch=1, group_size=2)
    ro = rollout(policy, metas(1), small, epoch=10_000)
    counter = FlopCounterMode(display=False)
    with counter:
        update(policy, make_optimizer(policy, small), ro, torch.rand(2), small, epoch=10_000)
    terms = 2 * max(1, int(small.elbo_fraction * small.steps + 1e-9))
    return counter.get_total_flops() / terms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per epoch")
    parser.add_argument("--group-size", type=int, default=8, help="images per prompt")
    parser.add_argument("--micro-batch", type=int, default=8, help="terms (update) and images (rollout) per pass")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bfloat16 peak, if not in the table")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a tiny transformer on the CPU: checks the wiring")
    parser.add_argument("--out", default="artifacts/bench/gpu_throughput.json")
    args = parser.parse_args(argv)
    transformer, precision = (TINY, "float32") if args.smoke else (SD35_MEDIUM, "bfloat16")
    device_name = "cpu" if args.smoke else args.device
    latent = 8 if args.smoke else args.resolution // 8
    runtime = RuntimeConfig(device=device_name)
    device = resolve_device(runtime.device)
    with torch.device(device):  # random init on the device itself: minutes faster for 2.5B parameters
        backbone = RandomTextBackbone(transformer, latent, 4 if args.smoke else TEXT_TOKENS)
    backbone = place(backbone, runtime)
    policy = Policy(backbone, PolicyConfig(lora_rank=32, lora_alpha=64, lora_targets=SD3_LORA_TARGETS))
    config = RLConfig(prompts_per_epoch=args.prompts, group_size=args.group_size, steps=3 if args.smoke else 10,
                      sampler="dpm2", elbo_fraction=0.9, micro_batch=args.micro_batch, kl_beta=1e-4,
                      rollout_precision=precision, update_precision=precision, epochs=1)
    config.validate()
    parameters = sum(p.numel() for p in backbone.denoiser.parameters())
    print(f"{parameters / 1e9:.2f}B parameters on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.resolution if not args.smoke else latent * 8} px, {precision}, {args.prompts} x {args.group_size} images")
    timed_epoch(policy, replace(config, prompts_per_epoch=1, group_size=2), epoch=0)  # warm-up
    flops = update_flops_per_term(policy, config)
    peak = peak_tflops(device, args.peak_tflops)
    terms_per_sample = int(config.elbo_fraction * config.steps + 1e-9)
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            backbone.denoiser.enable_gradient_checkpointing()
        else:
            backbone.denoiser.disable_gradient_checkpointing()
        row = {"gradient_checkpointing": checkpointing, **timed_epoch(policy, config, epoch=1)}
        images = args.prompts * args.group_size
        row["rollout_images_per_s"] = images / row["rollout_seconds"]
        row["update_samples_per_s"] = images / row["update_seconds"]
        row["update_terms_per_s"] = images * terms_per_sample / row["update_seconds"]
        row["update_mfu"] = row["update_terms_per_s"] * flops / (peak * 1e12) if peak else None
        rows.append(row)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "parameters": parameters, "precision": precision, "update_tflops_per_term": flops / 1e12,
              "peak_bf16_tflops": peak, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("| checkpointing | rollout images/s | update samples/s | update terms/s | peak GiB (rollout / update) | update MFU |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        memory = " / ".join("—" if row[k] is None else f"{row[k]:.1f}" for k in ("rollout_peak_gib", "update_peak_gib"))
        mfu = "—" if row["update_mfu"] is None else f"{100 * row['update_mfu']:.1f} %"
        print(f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['rollout_images_per_s']:.2f} | "
              f"{row['update_samples_per_s']:.2f} | {row['update_terms_per_s']:.1f} | {memory} | {mfu} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
