"""The baselines of METHOD.md §6 as choices inside the one RL loop: Flow-GRPO's SDE sampler, the trajectory
likelihood, the flow_grpo and nft objectives, and the recipes that select them (params.yaml)."""

from pathlib import Path
import math

import pytest
import torch
import yaml

from elborl.config import Params, ParamsError, parse_params
from elborl.likelihood import trajectory_log_prob, trajectory_terms
from elborl.models.shapes_model import ShapesFlowModel
from elborl.objectives import (kl_between_steps, nft_implicit_velocities, nft_loss, nft_optimality, policy_loss,
                               term_stats)
from elborl.policy import OLD, Policy
from elborl.rl import RLConfig, make_optimizer, rollout, update
from elborl.rounds import RunContext, round_metrics
from elborl.sampling import (gaussian_log_prob, guided_velocity, initial_noise, sample, sample_sde, sde_sigma,
                             sde_step, time_grid)

from test_rl_loop import METAS, brightness, small_config, tiny_policy, tiny_run
from test_rounds import POLICY, assert_same_as_one_process_run, each_stage_in_its_own_process, published_inputs

PROMPTS = [m["prompt"] for m in METAS] + ["a photo of a blue triangle"]
SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def recipe(name: str, **settings) -> RLConfig:
    """A shipped recipe (params.yaml) at the tiny scale of the loop tests, resolved as params.yaml would be."""
    scale = {"prompts_per_epoch": 2, "group_size": 3, "steps": 3, "micro_batch": 8, "lr": 1e-2, "epochs": 1}
    return parse_params({"recipes": SHIPPED["recipes"], "rl": {"recipe": name, **scale, **settings}}).rl


# ------------------------------------------------------------------------------------------- the SDE step

def test_sde_step_matches_hand_computed_values():
    # t = .5 -> .25, a = .7: σ = .7 sqrt(.5/.5) = .7, σ²/(2t) = .49, dt = -.25
    # x + (1 - t) v = [1.25, -1.5]; drift = v + .49 [1.25, -1.5] = [1.1125, .265]; μ = x + drift dt
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    mean, std = sde_step(x, v, torch.tensor(0.5), torch.tensor(0.25), 0.7)
    assert torch.allclose(mean, torch.tensor([[0.721875, -2.06625]]), atol=1e-6)
    assert torch.allclose(std.reshape(-1), torch.tensor([0.35]))  # .7 sqrt(.25)
    # noise level 0 is the Euler ODE step x + v dt
    mean0, std0 = sde_step(x, v, torch.tensor(0.5), torch.tensor(0.25), 0.0)
    assert torch.allclose(mean0, x - 0.25 * v) and float(std0) == 0


def test_sde_sigma_at_t_one_puts_the_next_grid_point_in_the_denominator():
    # Flow-GRPO: std_dev_t = a sqrt(σ / (1 − (σ₁ if σ == 1 else σ))): at t = 1 with σ₁ = .8, .5 sqrt(1 / .2)
    assert float(sde_sigma(torch.tensor(1.0), torch.tensor(0.8), 0.5)) == pytest.approx(0.5 * math.sqrt(5))
    assert float(sde_sigma(torch.tensor(0.8), torch.tensor(0.6), 0.5)) == pytest.approx(1.0)  # .5 sqrt(.8/.2)
    # at t = 1 the drift's (1 - t) v vanishes: σ² = 1.25, μ = x + (v + σ²/2 x) dt = 2 + (1 + 1.25)(-.2) = 1.55,
    # std = σ sqrt(.2) = .5
    mean, std = sde_step(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor(1.0), torch.tensor(0.8), 0.5)
    assert float(mean) == pytest.approx(1.55) and float(std) == pytest.approx(0.5)
    assert torch.isfinite(mean).all()


def test_sde_step_takes_one_time_per_row():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, t_next = torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.3])
    mean, std = sde_step(x, v, t, t_next, 0.7)
    for i in range(2):
        mean_i, std_i = sde_step(x[i:i + 1], v[i:i + 1], t[i], t_next[i], 0.7)
        assert torch.allclose(mean[i:i + 1], mean_i) and torch.allclose(std[i], std_i.reshape(()))


def test_gaussian_log_prob_matches_a_hand_computed_value():
    # per dim: -(x - μ)²/(2 std²) - log std - ½ log 2π with std = .5: [-2 + log 2 - c, log 2 - c], c = ½ log 2π
    c = 0.5 * math.log(2 * math.pi)
    got = gaussian_log_prob(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor(0.5))
    assert torch.allclose(got, torch.tensor([(-2 + 2 * math.log(2) - 2 * c) / 2]))
    x, mean, std = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.tensor([0.3, 1.0, 2.0])
    expected = torch.distributions.Normal(mean, std.view(3, 1, 1)).log_prob(x).mean(dim=(1, 2))
    assert torch.allclose(gaussian_log_prob(x, mean, std), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- the SDE sampler

def test_sde_sampling_is_deterministic_per_seed_and_independent_of_the_batch(tiny_model):
    seeds = [11, 12, 13]
    a = sample_sde(tiny_model, PROMPTS, seeds, steps=4)
    assert torch.equal(a, sample_sde(tiny_model, PROMPTS, seeds, steps=4))
    assert torch.allclose(a, sample_sde(tiny_model, PROMPTS, seeds, steps=4, batch_size=1), atol=1e-5)
    alone = sample_sde(tiny_model, PROMPTS[2:], seeds[2:], steps=4)  # the same sample drawn in another batch
    assert torch.allclose(a[2:], alone, atol=1e-5)
    assert not torch.allclose(a, sample_sde(tiny_model, PROMPTS, [21, 22, 23], steps=4))
    assert torch.equal(a, sample(tiny_model, PROMPTS, seeds, "sde", steps=4))  # `sample` dispatches to it


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sde_without_noise_is_the_euler_sampler(tiny_model, guidance):
    seeds = [1, 2, 3]
    euler = sample(tiny_model, PROMPTS, seeds, "euler", steps=4, guidance=guidance)
    assert torch.allclose(sample_sde(tiny_model, PROMPTS, seeds, steps=4, guidance=guidance, noise_level=0.0),
                          euler, atol=1e-6)
    assert not torch.allclose(sample_sde(tiny_model, PROMPTS, seeds, steps=4, guidance=guidance), euler, atol=1e-3)


def test_the_stored_trajectory_and_log_probs_are_those_of_the_sampled_steps(tiny_model):
    seeds, steps, guidance = [5, 6, 7], 4, 3.0
    x0, trajectory, log_probs = sample_sde(tiny_model, PROMPTS, seeds, steps=steps, guidance=guidance,
                                           keep_trajectory=True)
    assert trajectory.shape == (3, steps + 1, *tiny_model.sample_shape) and log_probs.shape == (3, steps - 1)
    assert torch.equal(trajectory[:, 0], initial_noise(seeds, tiny_model.sample_shape))  # x_1: the ODE's noise
    assert torch.equal(trajectory[:, -1], x0)
    assert torch.equal(x0, sample_sde(tiny_model, PROMPTS, seeds, steps=steps, guidance=guidance))
    # each stored log-prob is the density of the stored next latent under the step from the stored latent
    x, x_next, t, t_next, stored = trajectory_terms(trajectory, log_probs, time_grid(steps))
    with torch.no_grad():
        cond, null = tiny_model.encode_prompts(PROMPTS), tiny_model.encode_prompts([""] * 3)
        index = torch.arange(3).repeat_interleave(steps - 1)  # sample-major terms
        v = guided_velocity(tiny_model, x, t, cond[index], null[index], guidance)
    assert torch.allclose(trajectory_log_prob(v, x, x_next, t, t_next, 0.7), stored, atol=1e-5)
    assert not torch.allclose(trajectory_log_prob(v + 0.1, x, x_next, t, t_next, 0.7), stored, atol=1e-3)
    # the final step to t = 0 is stochastic too (as Flow-GRPO samples): x0 = μ + a sqrt(t / (1 − t)) sqrt(t) z,
    # μ = x + [v + σ²/(2t) (x + (1 − t) v)] (−t), z the sample generator's last draw (after x_1 and steps − 1 steps)
    t_last, a = float(time_grid(steps)[-2]), 0.7
    with torch.no_grad():
        x_last = trajectory[:, -2]
        v_last = guided_velocity(tiny_model, x_last, t_last, cond, null, guidance)
    sigma2 = a ** 2 * t_last / (1 - t_last)
    mean = x_last + (v_last + sigma2 / (2 * t_last) * (x_last + (1 - t_last) * v_last)) * (-t_last)
    last_draws = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        last_draws.append([torch.randn(tiny_model.sample_shape, generator=generator) for _ in range(steps + 1)][-1])
    assert torch.allclose(x0, mean + math.sqrt(sigma2 * t_last) * torch.stack(last_draws), atol=1e-6)
    assert not torch.allclose(x0, mean, atol=1e-4)


def test_trajectory_terms_are_sample_major_stochastic_steps():
    trajectory = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # 2 samples, 4 steps
    log_probs = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    grid = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    x, x_next, t, t_next, stored = trajectory_terms(trajectory, log_probs, grid)
    assert x.view(-1).tolist() == [0, 1, 2, 5, 6, 7] and x_next.view(-1).tolist() == [1, 2, 3, 6, 7, 8]
    assert t.tolist() == pytest.approx([1.0, 0.8, 0.5] * 2) and t_next.tolist() == pytest.approx([0.8, 0.5, 0.2] * 2)
    assert torch.equal(stored, log_probs.view(-1))
    with pytest.raises(ValueError, match="grid times"):
        trajectory_terms(trajectory, log_probs, grid[:-1])


# ------------------------------------------------------------------------------------------- objectives by hand

def test_flow_grpo_clips_the_step_ratio_where_ppo_would():
    clip = 0.2
    ratios = torch.tensor([0.7, 1.1, 1.5, 0.7, 1.1, 1.5])
    advantages = torch.tensor([2.0, 2.0, 2.0, -2.0, -2.0, -2.0])
    stored = torch.full((6,), -1.3)
    log_prob = (stored + ratios.log()).requires_grad_()
    loss = policy_loss("flow_grpo", log_prob, stored, advantages, clip)
    # -min(r A, clip(r, .8, 1.2) A): A > 0 clips r > 1.2, A < 0 clips r < .8
    assert torch.allclose(loss, torch.tensor([-1.4, -2.2, -2.4, 1.6, 2.2, 3.0]))
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    assert torch.allclose(grad, torch.tensor([-1.4, -2.2, 0.0, 0.0, 2.2, 3.0]))  # -r A unclipped, 0 clipped
    assert term_stats("flow_grpo", log_prob, stored, clip)["clip_fraction"] == pytest.approx(4 / 6)


def test_kl_between_steps_is_flow_grpos_mean_difference_over_two_sigma_squared():
    # μ_θ - μ_ref = Δv (1 + σ²(1 - t)/(2t)) dt = [1, 0] (1 + .49 * .5)(-.25) = [-.31125, 0]; σ_t² = .7² (Flow-GRPO
    # divides by 2 σ_t², not by the step's variance σ_t² |dt| = .35²)
    x, t, t_next = torch.zeros(1, 2), torch.tensor([0.5]), torch.tensor([0.25])
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_ref = torch.zeros(1, 2, requires_grad=True)
    kl = kl_between_steps(v, v_ref, x, t, t_next, 0.7)
    assert torch.allclose(kl, torch.tensor([0.31125 ** 2 / (2 * 0.7 ** 2) / 2]))
    kl.sum().backward()
    assert v_ref.grad is None and v.grad.abs().sum() > 0
    assert float(kl_between_steps(v_ref.detach(), v_ref, x, t, t_next, 0.7)) == 0


def test_kl_between_steps_on_random_terms_matches_a_transcription_of_flow_grpo():
    """Per term: mean_d (μ_θ − μ_ref)² / (2 std_dev_t²), std_dev_t = a sqrt(σ / (1 − (σ₁ if σ = 1 else σ))),
    μ = x (1 + std_dev_t² dt / (2σ)) + v (1 + std_dev_t² (1 − σ) / (2σ)) dt, written here from the formulas."""
    generator = torch.Generator().manual_seed(0)
    grid = time_grid(10).double()
    t, t_next = grid[:-1], grid[1:]
    x, v, v_ref = (torch.randn(10, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    a = 0.7
    sigma = t.view(-1, 1, 1, 1)
    sigma_max = grid[1].item()
    std_dev = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)))
    dt = (t_next - t).view(-1, 1, 1, 1)

    def mean_of(velocity):
        return x * (1 + std_dev ** 2 / (2 * sigma) * dt) + velocity * (1 + std_dev ** 2 * (1 - sigma) / (2 * sigma)) * dt

    expected = ((mean_of(v) - mean_of(v_ref)) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev.view(-1) ** 2)
    assert torch.allclose(kl_between_steps(v, v_ref, x, t, t_next, a), expected, rtol=1e-10)


def test_nft_optimality_from_advantages():
    advantages = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 6.0])
    assert torch.allclose(nft_optimality(advantages), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0]))


def test_nft_implicit_velocities():
    v, v_old = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.0]])
    positive, negative = nft_implicit_velocities(v, v_old, 0.5)
    assert torch.allclose(positive, torch.tensor([[0.75, 1.0]]))
    assert torch.allclose(negative, torch.tensor([[0.25, -1.0]]))
    positive, negative = nft_implicit_velocities(v, v_old, 1.0)
    assert torch.equal(positive, v) and torch.equal(negative, 2 * v_old - v)


# One term, two dims: x0 = [1, 0], x_t = [.5, .5], t = .5, v_θ = [1, 0], v_old = 0, r = .75.
# b = 1:  v⁺ = [1, 0]  -> x0_hat - x0 = [-1, .5],   L = .625 / .75  = 5/6
#         v⁻ = [-1, 0] -> x0_hat - x0 = [0, .5],    L = .125 / .25  = .5     loss = .75 * 5/6 + .25 * .5 = .75
# b = .5: v⁺ = [.5, 0] -> x0_hat - x0 = [-.75, .5], L = .40625 / .625 = .65
#         v⁻ = [-.5, 0] -> x0_hat - x0 = [-.25, .5], L = .15625 / .375   loss = (.75 * .65 + .25 * L⁻) / .5
NFT_CASES = [(1.0, 1.0, 0.75), (1.0, 5.0, 3.75), (0.5, 1.0, (0.75 * 0.65 + 0.25 * 0.15625 / 0.375) / 0.5)]


@pytest.mark.parametrize("beta, scale, expected", NFT_CASES)
def test_nft_loss_matches_hand_computed_values(beta, scale, expected):
    x0, x_t, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0.5])
    eps = (x_t - (1 - t) * x0) / t
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_old = torch.zeros(1, 2, requires_grad=True)
    loss = nft_loss(v, v_old, x0, x_t, eps, t, torch.tensor([0.75]), beta, "adaptive", scale)
    assert torch.allclose(loss, torch.tensor([expected]))
    loss.sum().backward()
    assert v_old.grad is None and v.grad.abs().sum() > 0  # the gradient reaches v_θ only


def test_nft_with_sure_optimality_and_b_one_is_the_x0_loss_of_the_current_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, eps, v, v_old = (torch.randn(4, 6, generator=gen) for _ in range(4))
    t = torch.tensor([0.9, 0.6, 0.3, 0.1])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    x0_hat_error = x_t - t[:, None] * v - x0
    adaptive = (x0_hat_error ** 2).mean(1) / x0_hat_error.abs().mean(1)
    assert torch.allclose(nft_loss(v, v_old, x0, x_t, eps, t, torch.ones(4)), adaptive, atol=1e-6)


# ------------------------------------------------------------------------------------------- in the loop

def test_recomputed_step_log_probs_reproduce_the_stored_ones():
    policy, config = tiny_policy(), recipe("flow_grpo", steps=4)
    ro = rollout(policy, METAS, config, epoch=0)
    assert ro.trajectory.shape[:2] == (6, 5) and ro.old_log_probs.shape == (6, 3)
    x, x_next, t, t_next, stored = trajectory_terms(ro.trajectory, ro.old_log_probs, time_grid(4))
    index = torch.arange(6).repeat_interleave(3)
    with torch.no_grad(), policy.weights(OLD):
        backbone = policy.backbone
        cond, null = backbone.encode_prompts([m["prompt"] for m in ro.metas]), backbone.encode_prompts([""] * 6)
        v = guided_velocity(backbone, x, t, cond[index], null[index], config.guidance)
    assert torch.allclose(trajectory_log_prob(v, x, x_next, t, t_next, config.sde_noise), stored, atol=1e-5)


@pytest.mark.parametrize("objective", ["epg", "pepg", "grpo"])
def test_delta_is_exactly_zero_on_the_first_trajectory_update(objective):
    """Recomputed under θ_old on the same step (as the ELBO terms are), δ is 0 while θ_old = θ."""
    policy, config = tiny_policy(), small_config(objective=objective, estimator="trajectory", sampler="sde")
    ro = rollout(policy, METAS, config, epoch=0)
    metrics = update(policy, make_optimizer(policy, config), ro, torch.rand(len(ro.seeds)), config, epoch=0)
    assert metrics["delta_abs_max"] == 0.0 and metrics["ratio_min"] == 1.0 == metrics["ratio_max"]
    assert metrics["grad_norm"] > 0


def test_flow_grpo_first_step_is_on_policy_against_the_stored_log_probs():
    policy = tiny_policy()
    config = recipe("flow_grpo", optimizer_steps_per_epoch=1)
    ro = rollout(policy, METAS, config, epoch=0)
    metrics = update(policy, make_optimizer(policy, config), ro, torch.rand(len(ro.seeds)), config, epoch=0)
    # stored at rollout in other batches: equal up to float noise, far inside the 1e-4 clip
    assert metrics["delta_abs_max"] < 1e-5 and metrics["clip_fraction"] == 0.0
    assert metrics["grad_norm"] > 0


def test_flow_grpo_takes_its_old_log_probs_from_the_rollout():
    """flow_grpo's ratio is against the stored log-probs, the other objectives' against a recomputation."""
    shifted = {}
    for objective in ("flow_grpo", "grpo"):
        policy, config = tiny_policy(), recipe("flow_grpo", objective=objective, optimizer_steps_per_epoch=1)
        ro = rollout(policy, METAS, config, epoch=0)
        ro.old_log_probs = ro.old_log_probs - 0.5  # as if the rollout policy had found these steps less likely
        shifted[objective] = update(policy, make_optimizer(policy, config), ro, torch.rand(6), config, epoch=0)
    assert shifted["flow_grpo"]["delta_mean"] == pytest.approx(0.5, abs=1e-4)
    assert shifted["flow_grpo"]["clip_fraction"] == 1.0
    assert shifted["grpo"]["delta_abs_max"] == 0.0


def test_the_training_pass_detaches_the_unconditional_branch(tiny_model):
    """d/dθ [sg(v_null) + g (v_cond − sg(v_null))] = g dv_cond/dθ: the gradient of g times the conditional velocity."""
    x = torch.randn(2, *tiny_model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, null = tiny_model.encode_prompts(PROMPTS[:2]), tiny_model.encode_prompts(["", ""])
    t, g = torch.tensor([0.7, 0.4]), 4.5
    weights = [p for p in tiny_model.parameters() if p.requires_grad]

    def gradient(output):  # text-encoder weights get none: the prompts were encoded without gradient
        grads = torch.autograd.grad(output.sum(), weights, allow_unused=True)
        return torch.cat([g.reshape(-1) for g in grads if g is not None])

    def relative_gap(a, b):  # float rounding differs between a batch of 4 and one of 2
        return float((a - b).norm() / b.norm())

    conditional_only = gradient(g * tiny_model.velocity(x, t, cond))
    assert relative_gap(gradient(guided_velocity(tiny_model, x, t, cond, null, g, detach_null=True)),
                        conditional_only) < 1e-5
    assert relative_gap(gradient(guided_velocity(tiny_model, x, t, cond, null, g)), conditional_only) > 1e-2


def flow_grpo_update(rewards, **settings):
    policy, config = tiny_policy(), recipe("flow_grpo", optimizer_steps_per_epoch=1, kl_beta=0.0, grad_clip=1e6,
                                           **settings)
    ro = rollout(policy, METAS, config, epoch=0)
    return update(policy, make_optimizer(policy, config), ro, rewards, config, epoch=0), policy


def test_flow_grpo_leaves_samples_with_zero_advantage_out_of_the_update():
    # the first prompt's three images score the same (advantage 0); the second's differ
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.4])
    dropped, _ = flow_grpo_update(rewards)
    kept_all, _ = flow_grpo_update(rewards, drop_zero_advantage=False)
    assert dropped["terms_trained"] == 3 * 2  # 3 samples x (3 steps - 1) terms
    # without a KL the dropped terms add nothing but their count to the mean: the gradient scales by 12 / 6
    assert dropped["grad_norm"] == pytest.approx(2 * kept_all["grad_norm"], rel=1e-4)
    # nothing to learn from: no optimizer step at all, the weights stay put
    before = tiny_policy().state_dict()
    flat, policy = flow_grpo_update(torch.full((6,), 0.5))
    assert flat["terms_trained"] == 0 and flat["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items() if k in before)


ELBO_ROW_KEYS = {"epoch", "reward_mean", "reward_std", "delta_mean", "delta_abs_max", "ratio_mean", "ratio_min",
                 "ratio_max", "kl", "grad_norm", "advantage_abs_mean", "seconds_rollout", "seconds_reward",
                 "seconds_update", "train_seconds", "group_diversity", "nonfinite_steps"}


@pytest.mark.parametrize("name, settings, extra", [
    ("flow_grpo", {}, {"clip_fraction"}),
    ("flow_grpo", {"objective": "epg"}, set()),  # EPG on the trajectory likelihood: only the objective swapped
    ("nft", {}, {"nft_r_mean"}),
])
def test_a_short_run_of_each_baseline_through_the_one_loop(tmp_path, name, settings, extra):
    config = recipe(name, epochs=2, **settings)
    assert config.recipe == name
    logged = round_metrics(tiny_run(tmp_path, config))
    assert [r["epoch"] for r in logged] == [0, 1]
    assert all(ELBO_ROW_KEYS | extra <= set(r) for r in logged)
    assert all(math.isfinite(r["delta_mean"]) and r["grad_norm"] > 0 for r in logged)
    if name == "nft":
        assert 0 < logged[0]["nft_r_mean"] < 1


def test_the_elbo_row_keys_are_unchanged(tmp_path):
    row = round_metrics(tiny_run(tmp_path, recipe("elbo", kl_beta=0.0)))[0]
    # with kl_beta 0 the KL is neither computed nor logged (a 0 would read as measured)
    assert set(row) - {"reward/colors", "reward/counting"} == ELBO_ROW_KEYS - {"kl"}
    assert round_metrics(tiny_run(tmp_path / "kl", recipe("elbo", kl_beta=1e-3)))[0]["kl"] > 0


def test_sde_rollouts_through_stored_trajectories_give_exactly_the_one_process_run(tmp_path):
    base, prompts = published_inputs(tmp_path, str(tmp_path / "store"))
    config = recipe("flow_grpo", epochs=2)
    ctx = RunContext(str(tmp_path / "store" / "run"), Params(policy=POLICY, rl=config), base, prompts,
                     cache=tmp_path / "cache", log=lambda *_: None)
    each_stage_in_its_own_process(ctx, brightness, 2)
    assert_same_as_one_process_run(ctx, tmp_path, epochs=2)
    samples = (tmp_path / "store/run/round-00001/rollout/samples.jsonl").read_text().splitlines()[0]
    assert '"sde_noise": 0.7' in samples and '"sampler": "sde"' in samples


# ------------------------------------------------------------------------------------------- configuration

def test_each_shipped_recipe_resolves_to_its_method():
    assert parse_params(SHIPPED).rl.recipe == "elbo"
    flow_grpo, nft = recipe("flow_grpo"), recipe("nft")
    assert (flow_grpo.objective, flow_grpo.estimator, flow_grpo.sampler) == ("flow_grpo", "trajectory", "sde")
    assert (flow_grpo.guidance, flow_grpo.grpo_clip, flow_grpo.kl_beta, flow_grpo.advantage) == (4.5, 1e-4, 0.04, "std")
    assert flow_grpo.optimizer_steps_per_epoch == 2 and flow_grpo.old_decay_max == 0
    assert (nft.objective, nft.sampler, nft.guidance, nft.nft_beta, nft.kl_beta) == ("nft", "dpm2", 1.0, 1.0, 1e-4)
    scale = parse_params(SHIPPED).rl
    assert (flow_grpo.prompts_per_epoch, flow_grpo.lr) == (2, 1e-2)  # the rl keys win over the preset
    assert all(parse_params({**SHIPPED, "rl": {**SHIPPED["rl"], "recipe": name}}).rl.lr == scale.lr
               for name in SHIPPED["recipes"])


def test_a_key_written_in_rl_overrides_the_recipe():
    assert recipe("flow_grpo", grpo_clip=1e-3).grpo_clip == 1e-3
    assert parse_params({"rl": {"objective": "epg"}}).rl.recipe == ""  # no recipe: the written keys only


@pytest.mark.parametrize("raw, message", [
    ({"rl": {"recipe": "ppo"}}, "rl.recipe: unknown recipe 'ppo'; expected one of ['elbo', 'flow_grpo', 'nft']"),
    ({"rl": {"recipe": "flow_grpo", "sampler": "dpm2"}}, "rl.estimator: trajectory needs the stored SDE trajectory"),
    ({"rl": {"objective": "flow_grpo"}}, "rl.objective: flow_grpo clips per-step SDE log-prob ratios"),
    ({"rl": {"objective": "nft", "estimator": "trajectory", "sampler": "sde"}}, "rl.objective: nft trains"),
    ({"rl": {"estimator": "trajectory", "sampler": "sde", "sde_noise": 0.0}}, "rl.sde_noise > 0"),
    ({"rl": {"estimator": "trajectory", "sampler": "sde", "steps": 1}}, "rl.steps >= 2"),
    ({"rl": {"estimator": "score"}}, "rl.estimator: unknown estimator 'score'"),
    ({"rl": {"nft_beta": 0.0}}, "nft_beta"),
    ({"rl": {"objective": "grpo", "advantage": "recipe"}}, "rl.objective: grpo clips ratios at 1 ± 0.001"),
    ({"rl": {"recipe": "flow_grpo", "advantage": "recipe"}}, "set rl.advantage: std (got recipe)"),
    ({"rl": {"recipe": "flow_grpo", "train_guidance": 2.0}}, "trajectory terms use rl.guidance for every policy"),
    ({"rl": {"train_guidance": 0.5}}, "must be >= 1 (1 = CFG off)"),
    ({"recipes": {"mine": {"objective": "flow_grpo"}}}, "recipes.mine: rl.objective: flow_grpo"),
    ({"recipes": {"mine": {"stepz": 3}}}, "recipes.mine: unknown key(s) ['stepz']"),
    ({"recipes": {"mine": {"recipe": "elbo"}}}, "recipes.mine: a recipe cannot name another recipe"),
])
def test_bad_recipes_and_combinations_name_the_key(raw, message):
    if "recipes" not in raw:
        raw = {**raw, "recipes": SHIPPED["recipes"]}
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)
