"""Benchmark: how much of one epoch's policy gradient is noise, per setting, and what a unit of signal costs.

    .venv/bin/python bench/gradient_agreement.py --compare "" --compare "rl.elbo_fraction=0.99"
    .venv/bin/python bench/gradient_agreement.py --vary rollout --compare "" --compare "rl.group_size=16"
    .venv/bin/python bench/gradient_agreement.py --vary rollout --per-time --draws 8

From the base model, the epoch's gradient (one optimizer step's worth, nothing applied) is computed under several
independent draws, and the mean pairwise cosine between them is printed: 1 means no noise; for gradients
g_i = s + n_i with independent noise of equal size it is c = |s|^2 / (|s|^2 + |n|^2), so c / (1 - c) is the
signal-to-noise ratio of one epoch, and that divided by the epoch's seconds is the signal per second the
setting buys (averaging n epochs multiplies the ratio by n). What a draw redraws:
  --vary terms    the ELBO's times and noise only (`rl.seed` of the update); one rollout of epoch 0's prompts
                  is held fixed: the estimator's own noise
  --vary rollout  also the images (same prompts, other seeds): the rollout's noise and the estimator's together
  --per-time      one setting per sampler time t (every image's one ELBO term at t), and how each t's mean
                  gradient aligns with the mean over all t: where along the schedule the signal is
Held-out scores need many epochs and move by +-0.04 between evaluations; this separates settings in minutes.
At the base model the LoRA adapters are zero, so the KL term's gradient is zero and only its cost shows.
"""

from dataclasses import replace
import argparse
import itertools
import time

import numpy as np
import torch

from elborl.benchmark import load_bench_params, prepare_bench
from elborl.config import load_params_with_overrides
from elborl.policy import Policy
from elborl.rewards import reward_from_params
from elborl.rl import choose_prompts, epoch_terms, rollout, update
from elborl.sampling import sampler_times


class NoStep(torch.optim.SGD):
    """An optimizer that leaves the weights alone, so every draw sees the same policy."""

    def step(self, closure=None):
        return None


def epoch_gradient(policy: Policy, ro, rewards, config) -> torch.Tensor:
    parameters = list(policy.trainable_parameters())
    update(policy, NoStep(parameters, lr=0.0), ro, rewards, config, epoch=0)
    return torch.cat([p.grad.reshape(-1).clone() for p in parameters if p.grad is not None])


def agreement(gradients: list[torch.Tensor]) -> tuple[float, float]:
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(gradients, 2)]
    return float(np.mean(cosines)), float(np.std(cosines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--compare", action="append", default=[],
                        help="one setting: comma-separated overrides, e.g. 'rl.group_size=16,rl.lr=2e-3' ('' = as is)")
    parser.add_argument("--draws", type=int, default=5, help="independent draws per setting")
    parser.add_argument("--vary", choices=("terms", "rollout"), default="terms",
                        help="what each draw redraws: the ELBO's times and noise, or also the rollout's images")
    parser.add_argument("--per-time", action="store_true",
                        help="one setting per sampler time t: every image's one ELBO term at t (rl.elbo_min_time = "
                             "rl.elbo_max_time = t); also prints how each t's mean gradient aligns with their mean")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    params = load_bench_params(args.params, [])
    # every setting is read (and a bad override refused) before any model work starts
    settings = {setting or "params.yaml": replace(load_params_with_overrides(
        args.params, [o for o in setting.split(",") if o.strip()]).rl, optimizer_steps_per_epoch=1)
        for setting in args.compare or [""]}
    if args.per_time:
        settings = per_time_settings(settings)
    bench = prepare_bench(params, args.threads)
    policy = Policy(bench.base_model, params.policy)
    print(f"redrawing the {args.vary} {args.draws} times per setting")
    print("| setting | images per epoch | terms per image | cosine between draws | signal / noise | "
          "s rollout + update | signal / noise per 100 s |\n|---|---|---|---|---|---|---|")
    rollouts, mean_gradients = {}, {}
    with reward_from_params(params.rewards) as reward_fn:
        def rollout_of(rl, draw):
            """The draw's rollout and rewards, and its seconds; settings that sample alike share it."""
            rollout_config = replace(rl, seed=draw) if args.vary == "rollout" else rl
            prompts = choose_prompts(bench.train_set, rl, 0)
            key = (tuple(m["prompt"] for m in prompts), rollout_config.seed, rl.group_size, rl.micro_batch,
                   tuple(sorted(rl.sampler_settings().items())))
            if key not in rollouts:
                start = time.perf_counter()
                ro = rollout(policy, prompts, rollout_config, 0)
                rewards = torch.as_tensor(reward_fn(policy.backbone.to_images(ro.x0), ro.metas), dtype=torch.float32)
                rollouts[key] = ro, rewards, time.perf_counter() - start
            return rollouts[key]

        for name, rl in settings.items():
            gradients, seconds = [], []
            for draw in range(1, args.draws + 1):
                ro, rewards, rollout_seconds = rollout_of(rl, draw)
                start = time.perf_counter()
                gradients.append(epoch_gradient(policy, ro, rewards, replace(rl, seed=draw)))
                seconds.append(time.perf_counter() - start + rollout_seconds)
            mean, spread = agreement(gradients)
            mean_gradients[name] = torch.stack(gradients).mean(0)
            snr = mean / max(1 - mean, 1e-9)
            epoch_seconds = float(np.mean(seconds)) if args.vary == "rollout" else float("nan")
            terms, _ = epoch_terms(ro, rl, torch.Generator())  # per image, as the update counts them
            print(f"| {name} | {len(ro.seeds)} | {terms} | {mean:.3f} ± {spread:.3f} | "
                  f"{snr:.3f} | {epoch_seconds:.1f} | {100 * snr / epoch_seconds:.2f} |", flush=True)
    if args.per_time:
        print("\n" + alignment_table(mean_gradients))


def per_time_settings(settings: dict) -> dict:
    """Each setting once per sampler time t, with its ELBO terms at t only (one per image)."""
    out = {}
    for name, rl in settings.items():
        for t in sampler_times(rl.sampler, rl.steps, rl.shift).tolist():
            label = f"t = {t:.3f}" if len(settings) == 1 else f"{name}, t = {t:.3f}"
            out[label] = replace(rl, elbo_min_time=max(t - 1e-6, 0.0), elbo_max_time=min(t + 1e-6, 1.0))
    return out


def alignment_table(mean_gradients: dict[str, torch.Tensor]) -> str:
    """How each setting's mean gradient (over draws) points relative to the mean of all of them."""
    overall = torch.stack(list(mean_gradients.values())).mean(0)
    rows = [f"| {name} | {float(torch.nn.functional.cosine_similarity(g, overall, dim=0)):.3f} | {g.norm():.2e} |"
            for name, g in mean_gradients.items()]
    return "| setting | cosine of its mean gradient with the mean over settings | norm |\n|---|---|---|\n" + "\n".join(rows)

if __name__ == "__main__":
    main()
