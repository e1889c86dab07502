"""Benchmark: how much of one epoch's policy gradient is the estimator's own noise, per estimator setting.

    .venv/bin/python bench/gradient_agreement.py --compare "" --compare "rl.elbo_fraction=0.99"

Settings of the update only (the ELBO's terms, weighting, objective): the rollout is made once with params.yaml's.
With `--vary rollout` each draw also samples the prompts' images anew (same prompts, other seeds), so the cosine
then measures the rollout's noise and the estimator's together.

One rollout of the base model (epoch 0's prompts and seeds, the reward of params.yaml) is held fixed; for each
setting the epoch's gradient (one optimizer step's worth, nothing applied, KL off) is computed under several
independent draws of the ELBO's times and noise (`rl.seed`, which seeds the update's draws and nothing of the
rollout here). Prints the mean pairwise cosine between those gradients: 1 means the estimator adds no noise; for
gradients g_i = s + n_i with independent noise of equal size it is |s|^2 / (|s|^2 + |n|^2). Held-out scores
need many epochs and move by +-0.04 between evaluations; this separates estimator settings in minutes.
"""

from dataclasses import replace
import argparse
import itertools

import numpy as np
import torch

from elborl.benchmark import load_bench_params, prepare_bench
from elborl.config import load_params_with_overrides
from elborl.policy import Policy
from elborl.rewards import reward_from_params
from elborl.rl import choose_prompts, rollout, update


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
                        help="one setting: comma-separated overrides of rl.* ('' = params.yaml's)")
    parser.add_argument("--draws", type=int, default=5, help="independent estimator draws per setting")
    parser.add_argument("--vary", choices=("terms", "rollout"), default="terms",
                        help="what each draw redraws: the ELBO's times and noise, or also the rollout's images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    params = load_bench_params(args.params, [])
    bench = prepare_bench(params, args.threads)
    policy = Policy(bench.base_model, params.policy)
    prompts = choose_prompts(bench.train_set, params.rl, 0)
    reward_fn = reward_from_params(params.rewards)

    def scored_rollout(seed: int):
        ro = rollout(policy, prompts, replace(params.rl, seed=seed), 0)
        return ro, torch.as_tensor(reward_fn(policy.backbone.to_images(ro.x0), ro.metas), dtype=torch.float32)

    draws = range(1, args.draws + 1)
    rollouts = {draw: scored_rollout(draw if args.vary == "rollout" else params.rl.seed) for draw in
                (draws if args.vary == "rollout" else draws[:1])}
    reward_fn.close()
    means = [f"{rewards.mean():.3f}" for _, rewards in rollouts.values()]
    print(f"{len(rollouts)} rollout(s) of {len(prompts)} prompts x {params.rl.group_size} images, reward means {means}")
    print("| setting | terms per image | pairwise cosine between draws | gradient norm |\n|---|---|---|---|")
    for setting in args.compare or [""]:
        overrides = [o for o in setting.split(",") if o.strip()]
        rl = load_params_with_overrides(args.params, overrides).rl
        rl = replace(rl, kl_beta=0.0, optimizer_steps_per_epoch=1)
        gradients = [epoch_gradient(policy, *rollouts.get(draw, rollouts[1]), replace(rl, seed=draw)) for draw in draws]
        mean, spread = agreement(gradients)
        norm = float(torch.stack([g.norm() for g in gradients]).mean())
        terms = max(1, int(rl.elbo_fraction * rl.steps + 1e-9))
        print(f"| {setting or 'params.yaml'} | {terms} | {mean:.3f} ± {spread:.3f} | {norm:.5f} |", flush=True)


if __name__ == "__main__":
    main()
