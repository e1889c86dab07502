"""bench/gradient_agreement.py: its gradients are the update's, reproducible per draw, and differ between draws."""

import torch

from conftest import load_bench
from test_rl_loop import METAS, brightness, small_config, tiny_policy
from elborl.rl import rollout


def test_the_same_draw_agrees_exactly_other_draws_do_not_and_the_weights_stay():
    bench = load_bench("gradient_agreement")
    policy, config = tiny_policy(), small_config(kl_beta=0.0)
    ro = rollout(policy, METAS, config, epoch=0)
    rewards = torch.as_tensor(brightness(policy.backbone.to_images(ro.x0), ro.metas))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    first, again, other = (bench.epoch_gradient(policy, ro, rewards, small_config(kl_beta=0.0, seed=s))
                           for s in (1, 1, 2))
    assert torch.equal(first, again) and first.norm() > 0
    same, _ = bench.agreement([first, again])
    different, _ = bench.agreement([first, other])
    assert abs(same - 1) < 1e-6 and different < 0.999
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # nothing was applied
