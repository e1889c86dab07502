"""bench/gradient_agreement.py: its gradients are the update's, reproducible per draw, and differ between draws."""

import torch

from conftest import load_bench
from test_rl_loop import METAS, brightness, small_config, tiny_policy
from elborl.rl import epoch_terms, rollout
from elborl.sampling import sampler_times


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


def test_per_time_settings_put_every_term_at_one_sampler_time():
    bench = load_bench("gradient_agreement")
    config = small_config(steps=4, elbo_fraction=0.99)
    settings = bench.per_time_settings({"defaults": config})
    times = sampler_times(config.sampler, config.steps, config.shift).tolist()
    assert list(settings) == [f"t = {t:.3f}" for t in times]
    policy = tiny_policy()
    ro = rollout(policy, METAS, config, epoch=0)
    for t, rl in zip(times, settings.values()):
        rl.validate()
        per_image, terms = epoch_terms(ro, rl, torch.Generator().manual_seed(0))
        assert per_image == 1 and torch.allclose(terms["t"], torch.full_like(terms["t"], t))


def test_alignment_table_reads_the_cosine_with_the_mean():
    bench = load_bench("gradient_agreement")
    table = bench.alignment_table({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]),
                                   "c": torch.tensor([-1.0, 0.0])})
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()[2:]}
    # the mean is (0, 1/3): a and c are orthogonal to it, b points along it
    assert rows == {"a": 0.0, "b": 1.0, "c": 0.0}
