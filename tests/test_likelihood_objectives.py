"""The ELBO estimator (METHOD.md §2) and the objectives, advantages and KL (§3)."""

import copy
import math

import pytest
import torch

from elborl.likelihood import WEIGHTINGS, elbo, elbo_times, expand_to_terms, perturb
from elborl.objectives import (OBJECTIVES, TermStats, group_advantages, kl_to_reference, log_ratio,
                               importance_weight, policy_loss, term_stats)
from elborl.sampling import sampler_times

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


# ------------------------------------------------------------------------------------------- elbo_times

def test_elbo_times_are_per_sample_permutations_of_the_sampler_times():
    times = sampler_times("dpm2", 10)
    drawn = elbo_times(times, 6, torch.Generator().manual_seed(0))
    assert drawn.shape == (6, 9)  # floor(0.99 * 10)
    for row in drawn:
        assert len(set(row.tolist())) == 9  # no repeats
        assert all(bool((times == value).any()) for value in row)  # a subset of the sampler's times
    assert len({tuple(row.tolist()) for row in drawn}) > 1  # rows differ
    again = elbo_times(times, 6, torch.Generator().manual_seed(0))
    other = elbo_times(times, 6, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)


def test_elbo_times_keep_at_least_one_time():
    assert elbo_times(torch.tensor([0.5]), 3, torch.Generator().manual_seed(0)).shape == (3, 1)
    assert elbo_times(torch.rand(10), 2, torch.Generator().manual_seed(0), fraction=0.01).shape == (2, 1)
    assert elbo_times(torch.rand(100), 2, torch.Generator().manual_seed(0)).shape == (2, 99)


def test_elbo_times_min_time_draws_only_the_late_sampler_times():
    times = sampler_times("dpm2", 10)  # SD3 grid: 1.0, 0.96, ..., 0.2745, 0.003
    drawn = elbo_times(times, 50, torch.Generator().manual_seed(0), fraction=0.3, min_time=0.6)
    assert drawn.shape == (50, 3)  # still floor(0.3 * 10) terms per sample
    assert bool((drawn >= 0.6).all())
    assert set(drawn.reshape(-1).tolist()) == set(times[times >= 0.6].tolist())  # every eligible time is drawn
    # K is capped at the eligible times; none eligible is an error naming the setting
    assert elbo_times(times, 2, torch.Generator().manual_seed(0), min_time=0.9).shape == (2, int((times >= 0.9).sum()))
    with pytest.raises(ValueError, match="min_time, max_time"):
        elbo_times(times, 2, torch.Generator().manual_seed(0), min_time=0.97, max_time=0.99)  # between 0.96 and 1.0
    window = elbo_times(times, 20, torch.Generator().manual_seed(0), fraction=0.1, min_time=0.5, max_time=0.9)
    assert set(window.reshape(-1).tolist()) == set(times[(times >= 0.5) & (times <= 0.9)].tolist())
    # min_time 0 is the recipe's draw, bit for bit
    assert torch.equal(elbo_times(times, 6, torch.Generator().manual_seed(3), 0.3, 0.0),
                       elbo_times(times, 6, torch.Generator().manual_seed(3), 0.3))


def test_perturb_mixes_x0_and_fresh_noise_per_term():
    x0 = torch.randn(4, 3, 2, 2)
    t = torch.tensor([1.0, 0.5, 0.25, 0.0])
    x_t, eps = perturb(x0, t, torch.Generator().manual_seed(0))
    assert torch.allclose(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    assert torch.equal(x_t[0], eps[0]) and torch.equal(x_t[3], x0[3])
    assert not torch.equal(eps[1], eps[2])
    _, eps_again = perturb(x0, t, torch.Generator().manual_seed(0))
    assert torch.equal(eps, eps_again)


def test_expand_to_terms_is_sample_major():
    x0 = torch.arange(2.0).view(2, 1)
    times = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    x0_terms, t_terms = expand_to_terms(x0, times)
    assert x0_terms.view(-1).tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(t_terms, times.view(-1))


# ------------------------------------------------------------------------------------------- weightings

# Two terms with two data dims each, worked by hand:
#   x_t = (1 - t) x0 + t eps = [[.5, .5], [.5, 1.5]];  v - (eps - x0) = [[1, -1], [0, 3]]
#   x0_hat - x0 = -t (v - (eps - x0)) = [[-.5, .5], [0, -.75]]
X0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
EPS = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
T = torch.tensor([0.5, 0.25])
V = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
HAND = {
    "uniform": [-1.0, -4.5],
    "t": [-0.25, -0.28125],
    "adaptive": [-0.25 / 0.5, -0.28125 / 0.375],  # w = mean |x0_hat - x0| = .5, .375
    "exact": [-(0.5 / 0.501) * 1.0, -(0.75 / 0.251) * 4.5],
}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_weighting_matches_a_hand_computed_value(weighting):
    x_t = (1 - T[:, None]) * X0 + T[:, None] * EPS
    assert torch.allclose(x_t, torch.tensor([[0.5, 0.5], [0.5, 1.5]]))
    got = elbo(V, X0, x_t, EPS, T, weighting)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(HAND[weighting]), atol=1e-6)


# The official code normalises a guided velocity's ELBO by its guidance G: adaptive / G, uniform / G^2, the others
# unchanged (hand values above divided accordingly)
GUIDED_HAND = {"uniform": [v / 9 for v in HAND["uniform"]], "adaptive": [v / 3 for v in HAND["adaptive"]],
               "t": HAND["t"], "exact": HAND["exact"]}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_an_elbo_under_guidance_three_is_normalised_as_the_official_code_does(weighting):
    x_t = (1 - T[:, None]) * X0 + T[:, None] * EPS
    assert torch.allclose(elbo(V, X0, x_t, EPS, T, weighting, guidance=3.0), torch.tensor(GUIDED_HAND[weighting]),
                          atol=1e-6)


def test_adaptive_weight_is_floored():
    x0 = torch.zeros(1, 4)
    x_t, eps, t = x0.clone(), torch.zeros(1, 4), torch.tensor([0.5])
    v = torch.full((1, 4), -2e-6)  # x0_hat - x0 = 1e-6 everywhere, so mean |.| = 1e-6 < 1e-5
    assert torch.allclose(elbo(v, x0, x_t, eps, t, "adaptive"), torch.tensor([-1e-12 / 1e-5]), rtol=1e-4)


def test_adaptive_weight_carries_no_gradient():
    gen = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(3, 5, generator=gen) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.1])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = v.requires_grad_()
    (grad,) = torch.autograd.grad(elbo(v, x0, x_t, eps, t, "adaptive").sum(), v)
    # by hand, with w a constant: d = x_t - t v - x0, ELBO = -mean(d^2) / w, dELBO/dv = 2 t d / (D w)
    d = x_t - t[:, None] * v.detach() - x0
    w = d.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(grad, 2 * t[:, None] * d / (5 * w), atol=1e-6)
    # and it is not the gradient one would get by differentiating through w
    x0_hat = x_t - t[:, None] * v
    through_w = -((x0_hat - x0) ** 2).mean(1) / (x0_hat - x0).abs().mean(1)
    (grad_through_w,) = torch.autograd.grad(through_w.sum(), v)
    assert not torch.allclose(grad, grad_through_w, atol=1e-4)


def test_unknown_weighting_names_the_valid_ones():
    with pytest.raises(ValueError, match="adaptive"):
        elbo(V, X0, X0, EPS, T, "snr")


# ------------------------------------------------------------------------------------------- on the tiny model

def _terms(model, n_samples=2, fraction=0.99, seed=0):
    """Final samples x0 with their ELBO terms: x0, x_t, eps, t and the conditioning, all per term."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n_samples, *model.sample_shape, generator=gen).clamp(-1, 1)
    times = elbo_times(sampler_times("dpm2", 10), n_samples, gen, fraction)
    x0_terms, t_terms = expand_to_terms(x0, times)
    x_t, eps = perturb(x0_terms, t_terms, gen)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_samples) for _ in range(times.shape[1])]
    return x0_terms, x_t, eps, t_terms, prompts


def _velocity(model, x_t, t, prompts):
    return model.velocity(x_t, t, model.encode_prompts(prompts))


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _all_close(a, b, **kw):
    return all(torch.allclose(x, y, **kw) for x, y in zip(a, b))


def test_old_copy_on_the_same_x_t_gives_zero_delta_and_unit_ratio(tiny_model):
    # §2 common random numbers: the first update after θ_old ← θ sees δ = 0 exactly for every term
    old = copy.deepcopy(tiny_model)
    for p in old.parameters():
        p.requires_grad_(False)
    x0, x_t, eps, t, prompts = _terms(tiny_model)
    assert x0.shape[0] == 18  # 2 samples x 9 times
    v_current = _velocity(tiny_model, x_t, t, prompts)
    with torch.no_grad():
        v_old = _velocity(old, x_t, t, prompts)
    for weighting in WEIGHTINGS:
        elbo_current = elbo(v_current, x0, x_t, eps, t, weighting)
        elbo_old = elbo(v_old, x0, x_t, eps, t, weighting)
        assert elbo_current.requires_grad and not elbo_old.requires_grad
        delta = log_ratio(elbo_current, elbo_old)
        assert torch.equal(delta, torch.zeros(18))
        assert torch.equal(importance_weight("pepg", delta), torch.ones(18))
        stats = term_stats("grpo", elbo_current, elbo_old)
        assert stats["delta_abs_max"] == 0 and stats["ratio_min"] == stats["ratio_max"] == 1
        assert stats["clip_fraction"] == 0


def test_epg_without_ratio_is_advantage_weighted_flow_matching(tiny_model):
    x0, x_t, eps, t, prompts = _terms(tiny_model, n_samples=2, fraction=0.2)  # 2 samples x 2 times
    advantages = torch.tensor([0.3, 0.3, -0.5, -0.5])
    v = _velocity(tiny_model, x_t, t, prompts)
    elbo_current = elbo(v, x0, x_t, eps, t, "uniform")
    elbo_old = elbo_current.detach() + torch.tensor([0.2, -0.1, 0.3, -0.4])  # ρ != 1 if it were used
    epg = _param_grads(tiny_model, policy_loss("epg_noratio", elbo_current, elbo_old, advantages).sum())
    flow_matching = (advantages * ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))).sum()
    expected = _param_grads(tiny_model, flow_matching)
    assert any(g.abs().sum() > 0 for g in expected)
    assert _all_close(epg, expected, rtol=1e-5, atol=1e-8)
    with_ratio = _param_grads(tiny_model, policy_loss("epg", elbo_current, elbo_old, advantages).sum())
    assert not _all_close(with_ratio, expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("suffix", ["", "_noratio"])
def test_par_and_pepg_have_the_same_gradient(tiny_model, suffix):
    x0, x_t, eps, t, prompts = _terms(tiny_model, n_samples=2, fraction=0.2)
    advantages = torch.tensor([0.05, 0.05, -0.08, -0.08])
    v = _velocity(tiny_model, x_t, t, prompts)
    elbo_current = elbo(v, x0, x_t, eps, t, "adaptive")
    elbo_old = elbo_current.detach() + torch.tensor([0.02, -0.03, 0.04, -0.01])  # nonzero δ
    pepg = _param_grads(tiny_model, policy_loss("pepg" + suffix, elbo_current, elbo_old, advantages).sum())
    par = _param_grads(tiny_model, policy_loss("par" + suffix, elbo_current, elbo_old, advantages).sum())
    epg = _param_grads(tiny_model, policy_loss("epg" + suffix, elbo_current, elbo_old, advantages).sum())
    assert _all_close(pepg, par, rtol=1e-4, atol=1e-9)
    assert not _all_close(pepg, epg, rtol=1e-3, atol=1e-7)  # δ matters, so the check above has teeth


# ------------------------------------------------------------------------------------------- objectives by hand

def test_objectives_match_the_formulas_by_hand():
    elbo_current = torch.tensor([-1.0, -2.0], requires_grad=True)
    elbo_old = torch.tensor([-1.5, -1.5])
    advantages = torch.tensor([0.4, -0.2])
    delta = torch.tensor([0.5, -0.5])
    rho = delta.exp()
    expected = {
        "epg": -rho * advantages * elbo_current,
        "pepg": -rho * (advantages - delta) * elbo_current,
        "par": 0.5 * rho * (advantages - delta) ** 2,
        "epg_noratio": -advantages * elbo_current,
        "pepg_noratio": -(advantages - delta) * elbo_current,
        "par_noratio": 0.5 * (advantages - delta) ** 2,
    }
    for objective, value in expected.items():
        assert torch.allclose(policy_loss(objective, elbo_current, elbo_old, advantages), value), objective


def test_grpo_clips_the_ratio_where_ppo_would():
    eps = 0.1
    ratios = torch.tensor([0.8, 1.05, 1.3, 0.8, 1.05, 1.3])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    elbo_old = torch.tensor([-2.0] * 6)
    elbo_current = (elbo_old + ratios.log()).requires_grad_()
    loss = policy_loss("grpo", elbo_current, elbo_old, advantages, clip_range=eps)
    # -min(r A, clip(r) A): A > 0 clips above 1 + eps, A < 0 clips below 1 - eps
    assert torch.allclose(loss, torch.tensor([-0.8, -1.05, -1.1, 0.9, 1.05, 1.3]))
    (grad,) = torch.autograd.grad(loss.sum(), elbo_current)
    # d(-r A)/dELBO = -r A where unclipped, zero where clipped
    assert torch.allclose(grad, torch.tensor([-0.8, -1.05, 0.0, 0.0, 1.05, 1.3]))
    assert term_stats("grpo", elbo_current, elbo_old, clip_range=eps)["clip_fraction"] == pytest.approx(4 / 6)


def test_grpo_default_clip_range_is_1e_3():
    elbo_current = torch.tensor([0.01], requires_grad=True)
    loss = policy_loss("grpo", elbo_current, torch.zeros(1), torch.ones(1))
    assert torch.allclose(loss, torch.tensor([-1.001]))


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ValueError, match="pepg"):
        policy_loss("grpo_noratio", torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert "grpo_noratio" not in OBJECTIVES and len(OBJECTIVES) == 9  # + flow_grpo and nft (§6)
    with pytest.raises(ValueError, match="nft_loss"):
        policy_loss("nft", torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_term_stats_merge_across_micro_batches():
    a = TermStats.of(torch.tensor([0.1, -0.2]), torch.zeros(2))
    b = TermStats.of(torch.tensor([0.4]), torch.zeros(1))
    merged = a.merge(b).summary("pepg")
    assert merged["delta_mean"] == pytest.approx(0.1) and merged["delta_abs_max"] == pytest.approx(0.4)
    assert merged["ratio_min"] == pytest.approx(math.exp(-0.2)) and merged["ratio_max"] == pytest.approx(math.exp(0.4))
    assert merged["ratio_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.2) + math.exp(0.4)) / 3)
    assert "clip_fraction" not in merged


# ------------------------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.9, 0.0, 0.3, 0.2])
GROUPS = ["a", "b", "a", "b", "a"]  # a: 1.0, 0.0, 0.2 (mean 0.4); b: 0.9, 0.3 (mean 0.6)


def test_recipe_advantages_centre_per_group_and_scale():
    got = group_advantages(REWARDS, GROUPS, mode="recipe")
    assert torch.allclose(got, torch.tensor([0.06, 0.03, -0.04, -0.03, -0.02]), atol=1e-7)
    same = group_advantages(REWARDS, torch.tensor([7, 3, 7, 3, 7]), mode="recipe")
    assert torch.allclose(got, same)


def test_positive_advantages_keep_only_the_better_than_group_part():
    got = group_advantages(REWARDS, GROUPS, mode="positive", scale=0.5)
    assert torch.allclose(got, torch.tensor([0.3, 0.15, 0.0, 0.0, 0.0]), atol=1e-7)


def test_std_advantages_divide_by_the_global_std():
    std = math.sqrt(sum((r - 0.48) ** 2 for r in REWARDS.tolist()) / 5)  # population std of the batch
    expected = torch.tensor([0.6, 0.3, -0.4, -0.3, -0.2]) / std
    assert torch.allclose(group_advantages(REWARDS, GROUPS, mode="std"), expected, atol=1e-6)


def test_std_advantages_are_clipped_at_five():
    one_high = torch.tensor([0.0] * 30 + [1.0])
    got = group_advantages(one_high, torch.zeros(31, dtype=torch.long), mode="std")
    assert got[-1] == 5.0 and torch.allclose(got[:-1], torch.tensor(-(1 / 31) / math.sqrt(30 / 31 ** 2)))
    got = group_advantages(1 - one_high, torch.zeros(31, dtype=torch.long), mode="std")
    assert got[-1] == -5.0
    equal = group_advantages(torch.ones(4), [0, 0, 1, 1], mode="std")
    assert torch.equal(equal, torch.zeros(4))  # no division by a zero std


def test_advantage_inputs_are_checked():
    with pytest.raises(ValueError, match="recipe"):
        group_advantages(REWARDS, GROUPS, mode="rank")
    with pytest.raises(ValueError, match="group ids"):
        group_advantages(REWARDS, GROUPS[:3])


# ------------------------------------------------------------------------------------------- KL

def test_kl_to_reference_is_zero_for_equal_velocities_and_flows_to_current_only():
    v_ref = torch.randn(3, 3, 4, 4, requires_grad=True)
    assert torch.equal(kl_to_reference(v_ref.detach().clone(), v_ref), torch.zeros(3))
    v_current = (v_ref.detach() + torch.randn(3, 3, 4, 4)).requires_grad_()
    kl = kl_to_reference(v_current, v_ref)
    assert kl.shape == (3,) and bool((kl > 0).all())
    assert torch.allclose(kl, ((v_current - v_ref) ** 2).mean(dim=(1, 2, 3)))
    kl.sum().backward()
    assert v_ref.grad is None
    assert torch.allclose(v_current.grad, 2 * (v_current - v_ref).detach() / 48)
