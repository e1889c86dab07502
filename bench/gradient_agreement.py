"""Benchmark: how much of one epoch's policy gradient is noise, per setting, and what a unit of signal costs.

    .venv/bin/python bench/gradient_agreement.py --compare "" --compare "rl.elbo_fraction=0.99"
    .venv/bin/python bench/gradient_agreement.py --vary rollout --compare "" --compare "rl.group_size=16"

From the base model, the epoch's gradient (one optimizer step's worth, nothing applied) is computed under several
independent draws, and the mean pairwise cosine between them is printed: 1 means no noise; for gradients
g_i = s + n_i with independent noise of equal size it is c = |s|^2 / (|s|^2 + |n|^2), so c / (1 - c) is the
signal-to-noise ratio of one epoch, and that divided by the epoch's seconds is the signal per second the
setting buys (averaging n epochs multiplies the ratio by n). What a draw redraws:
  --vary terms    the ELBO's times and noise only (`rl.seed` of the update); one rollout of epoch 0's prompts
                  is held fixed: the estimator's own noise
  --vary rollout  also the images (same prompts, other seeds): the rollout's noise and the estimator's together
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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    params = load_bench_params(args.params, [])
    # every setting is read (and a bad override refused) before any model work starts
    settings = {setting or "params.yaml": replace(load_params_with_overrides(
        args.params, [o for o in setting.split(",") if o.strip()]).rl, optimizer_steps_per_epoch=1)
        for setting in args.compare or [""]}
    bench = prepare_bench(params, args.threads)
    policy = Policy(bench.base_model, params.policy)
    print(f"redrawing the {args.vary} {args.draws} times per setting")
    print("| setting | images per epoch | terms per image | cosine between draws | signal / noise | "
          "s rollout + update | signal / noise per 100 s |\n|---|---|---|---|---|---|---|")
    with reward_from_params(params.rewards) as reward_fn:
        for name, rl in settings.items():
            prompts = choose_prompts(bench.train_set, rl, 0)
            gradients, seconds, fixed = [], [], None
            for draw in range(1, args.draws + 1):
                start = time.perf_counter()
                if fixed is None or args.vary == "rollout":
                    ro = rollout(policy, prompts, replace(rl, seed=draw) if args.vary == "rollout" else rl, 0)
                    rewards = torch.as_tensor(reward_fn(policy.backbone.to_images(ro.x0), ro.metas),
                                              dtype=torch.float32)
                    fixed = ro, rewards
                gradients.append(epoch_gradient(policy, *fixed, replace(rl, seed=draw)))
                seconds.append(time.perf_counter() - start)
            mean, spread = agreement(gradients)
            snr = mean / max(1 - mean, 1e-9)
            epoch_seconds = float(np.mean(seconds)) if args.vary == "rollout" else float("nan")
            terms, _ = epoch_terms(fixed[0], rl, torch.Generator())  # per image, as the update counts them
            print(f"| {name} | {len(fixed[0].seeds)} | {terms} | {mean:.3f} ± {spread:.3f} | "
                  f"{snr:.3f} | {epoch_seconds:.1f} | {100 * snr / epoch_seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
