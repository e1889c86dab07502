"""The likelihood estimators of METHOD.md §1-§2 (the ELBO, and the trajectory's for the baselines), as pure
tensor functions.

One ELBO *term* is one (sample, t) pair: a final sample `x0`, a time `t` drawn from the rollout sampler's
own times, a fresh noise `eps`, the noised `x_t = (1 - t) x0 + t eps` and the velocity `v` some model
predicts at `x_t`. Nothing here knows about policies, adapters or prompts: the caller feeds the same
`x_t` to the current, old and reference models (§2, common random numbers) and passes each `v` to `elbo`.

Typical use for a batch of B final samples:

    times = elbo_times(sampler_times("dpm2", 10), B, generator)     # B x K
    x0_terms, t_terms = expand_to_terms(x0, times)                   # (B*K) x ..., B*K
    x_t, eps = perturb(x0_terms, t_terms, generator)
    elbo_now = elbo(v_current, x0_terms, x_t, eps, t_terms, "adaptive")

The trajectory estimator (the paper's "Traj.", Flow-GRPO's) needs the whole stored SDE trajectory instead:
one *term* is one (sample, step k) pair, the stored latents x at t_k and x_next at t_{k+1}, and its
log-likelihood is the Gaussian log-density of x_next under the SDE step that a model's velocity at (x, t_k)
defines (`trajectory_terms`, `trajectory_log_prob`). Both estimators give one value per term, higher is more
likely, so the objectives take either.
"""

import math

import torch
from torch import Tensor

from elborl.sampling import gaussian_log_prob, per_row, sde_step

ESTIMATORS = ("elbo", "trajectory")
WEIGHTINGS = ("adaptive", "t", "uniform", "exact")

ADAPTIVE_WEIGHT_FLOOR = 1e-5  # §2: w is clipped below at 1e-5
EXACT_TIME_OFFSET = 1e-3  # §2: (1 - t) / (t + 1e-3)


def times_in_window(times: Tensor, min_time: float = 0.0, max_time: float = 1.0) -> Tensor:
    """The sampler times t with min_time <= t <= max_time, flattened (all of them for the default window)."""
    flat = times.reshape(-1)
    return flat[(flat >= min_time) & (flat <= max_time)]


def elbo_times(times: Tensor, n_samples: int, generator: torch.Generator, fraction: float = 0.99,
               min_time: float = 0.0, max_time: float = 1.0) -> Tensor:
    """§2: per sample, a random permutation of the sampler's N times, keeping the first K = floor(fraction N).

    `min_time`, `max_time` (ours, not the recipe's; 0 and 1 = every time, as §2) draw the K times among the sampler
    times in [min_time, max_time] only (K is capped at their number): on the shapes world the terms below t ~ 0.6
    carry almost none of the gradient's signal across rollouts (docs/experiments/2026-12-04-signal-along-the-
    schedule.md, since overturned: docs/experiments/2026-12-07-method-fidelity.md).

    Returns n_samples x K; each row holds K distinct entries of `times` (distinct positions, so distinct values when
    the times are). K is at least 1. Deterministic given the generator's state.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # the small offset keeps e.g. 0.29 * 100 = 28.999999999999996 from losing a time to rounding
    keep = max(1, math.floor(fraction * times.numel() + 1e-9))
    times = times_in_window(times, min_time, max_time)
    n_times = times.numel()
    if n_times < 1:
        raise ValueError(f"elbo_times needs at least one sampler time in [min_time, max_time] = "
                         f"[{min_time}, {max_time}]")
    keep = min(keep, n_times)
    rows = [torch.randperm(n_times, generator=generator, device=generator.device)[:keep] for _ in range(n_samples)]
    if not rows:
        return times.new_empty(0, keep)
    return times.reshape(-1)[torch.stack(rows).to(times.device)]


def expand_to_terms(x0: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    """§2 "each (sample, t_k) is its own loss term": B samples x K times -> B*K terms, sample-major.

    Returns (x0 repeated K times per sample, the matching flat times); term i belongs to sample i // K.
    """
    if times.dim() != 2 or times.shape[0] != x0.shape[0]:
        raise ValueError(f"times must be B x K with B = {x0.shape[0]}, got {tuple(times.shape)}")
    return x0.repeat_interleave(times.shape[1], dim=0), times.reshape(-1)


def perturb(x0: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """§0/§2 forward process with fresh noise per term: returns (x_t = (1 - t) x0 + t eps, eps)."""
    eps = term_noise(x0, generator)
    t = per_row(t, x0)
    return (1 - t) * x0 + t * eps, eps


def term_noise(x0: Tensor, generator: torch.Generator) -> Tensor:
    """The noise `perturb` draws for these terms (a process skipping another's micro-batch draws it too, so the
    generator stays where one process would have it)."""
    return torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)


def _mean_over_data(x: Tensor) -> Tensor:
    """mean_d: the mean over every dimension but the first (the term index)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def clean_estimate(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """§0: x0_hat = x_t - t v."""
    return x_t - per_row(t, x_t) * v


def adaptive_weight(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """§2: w = stopgrad(mean_d |x0_hat - x0|), clipped below at 1e-5; one weight per term."""
    return _mean_over_data((x0_hat - x0).abs()).detach().clamp_min(ADAPTIVE_WEIGHT_FLOOR)


def elbo(v: Tensor, x0: Tensor, x_t: Tensor, eps: Tensor, t: Tensor, weighting: str = "adaptive",
         guidance: float = 1.0) -> Tensor:
    """§2: the ELBO of each term (higher is more likely), shape B.

    adaptive: -mean_d (x0_hat - x0)^2 / (G w) with w = stopgrad(mean_d |x0_hat - x0|) (the recipe's default)
    t:        -mean_d (x0_hat - x0)^2
    uniform:  -mean_d (v - (eps - x0))^2 / G^2
    exact:    -((1 - t) / (t + 1e-3)) * mean_d (v - (eps - x0))^2

    G is the CFG guidance `v` was computed with (1 = none). A guided velocity's error grows about linearly in G,
    so the official code divides the adaptive ELBO by G and the uniform one by G^2 to keep ELBOs, δ and the
    advantage's weight against δ comparable across guidances (§2).
    """
    if weighting in ("adaptive", "t"):
        x0_hat = clean_estimate(v, x_t, t)
        squared = _mean_over_data((x0_hat - x0) ** 2)
        if weighting == "t":
            return -squared
        return -squared / adaptive_weight(x0_hat, x0) / guidance
    if weighting in ("uniform", "exact"):
        squared = _mean_over_data((v - (eps - x0)) ** 2)
        if weighting == "uniform":
            return -squared / guidance ** 2
        t = t.to(squared).reshape(-1)
        return -((1 - t) / (t + EXACT_TIME_OFFSET)) * squared
    raise ValueError(f"unknown ELBO weighting {weighting!r}; expected one of {WEIGHTINGS}")


# ---------------------------------------------------------------------------------------------- trajectory

def trajectory_terms(trajectory: Tensor, log_probs: Tensor, grid: Tensor) -> tuple[Tensor, ...]:
    """B stored SDE trajectories (B x (N + 1) x ...) -> B*(N − 1) step terms, sample-major like `expand_to_terms`.

    Only the N − 1 stochastic steps are terms (the sampler's last step is deterministic). Returns per term
    (x at t_k, x_next at t_{k+1}, t_k, t_{k+1}, the log-prob stored at rollout); term i is sample i // (N − 1),
    step i % (N − 1). `grid` holds the sampler's N + 1 times (`sampling.time_grid`).
    """
    n_samples, n_points = trajectory.shape[:2]
    stochastic_steps = n_points - 2
    if grid.numel() != n_points or log_probs.shape != (n_samples, stochastic_steps):
        raise ValueError(f"a trajectory of {n_points} latents needs {n_points} grid times and {stochastic_steps} "
                         f"log-probs per sample, got {grid.numel()} and {tuple(log_probs.shape)}")
    latent_shape = trajectory.shape[2:]
    x = trajectory[:, :-2].reshape(-1, *latent_shape)
    x_next = trajectory[:, 1:-1].reshape(-1, *latent_shape)
    t, t_next = grid[:-2].repeat(n_samples), grid[1:-1].repeat(n_samples)
    return x, x_next, t.to(trajectory), t_next.to(trajectory), log_probs.reshape(-1)


def trajectory_log_prob(v: Tensor, x: Tensor, x_next: Tensor, t: Tensor, t_next: Tensor,
                        noise_level: float) -> Tensor:
    """§6: log p(x_next | x) under the SDE step the velocity v defines, mean over dims; one value per term."""
    mean, std = sde_step(x, v, t, t_next, noise_level)
    return gaussian_log_prob(x_next, mean, std)
