"""Samplers on SD3's shifted schedule, built on diffusers' schedulers (METHOD.md §0, §1, §6).

Every sampler runs on one grid: `FlowMatchEulerDiscreteScheduler`'s `linspace(1, 1/1000, N)` shifted by
`s t / (1 + (s-1) t)`, then 0. `euler` steps it with that scheduler; `dpm2` is DPM-Solver++(2M) in data
prediction on the same grid (`dpm_solver_step`; diffusers' DPM scheduler in flow mode builds another grid, which
ends with a jump from t = 0.25 to 0); `sde` is Flow-GRPO's Euler–Maruyama sampler of the SDE with the ODE's
marginals. Every sample
owns its seed (its initial noise and, for `sde`, every step's noise come from its own generator), so a
sample is the same whatever batch it was drawn in, and a rollout can be regenerated from its record.
"""

import math

import numpy as np
import torch
from torch import Tensor
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

ODE_SAMPLERS = ("euler", "dpm2")
SAMPLERS = ODE_SAMPLERS + ("sde",)


def make_scheduler(sampler: str, steps: int, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """The diffusers scheduler holding the grid every sampler runs on (METHOD.md §0)."""
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, steps))
    return scheduler


def sampler_times(sampler: str, steps: int, shift: float = 3.0) -> torch.Tensor:
    """The times t in (0, 1] at which the sampler queries the model: the ELBO draws its t from these."""
    return make_scheduler(sampler, steps, shift).sigmas[:-1].float()


def time_grid(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The N + 1 grid points every sampler steps through, from t = 1 down to t = 0."""
    return make_scheduler("euler", steps, shift).sigmas.float()


# --- DPM-Solver++(2M) on the grid (METHOD.md §0) ----------------------------------------------------------
def _signal_over_noise(t: float) -> float:
    """α_t / σ_t = (1 − t) / t (0 at t = 1, where λ = log of it is −∞)."""
    return (1.0 - t) / t


def dpm_solver_step(x: Tensor, x0_hat: Tensor, t: float, t_next: float, x0_hat_prev: Tensor | None = None,
                    t_prev: float | None = None) -> Tensor:
    """One DPM-Solver++ step in data prediction from t to t_next with α = 1 − t, σ = t, λ = log(α / σ).

    First order (DDIM) without a previous estimate: x' = (σ'/σ) x + α' (1 − e^{−h}) x0_hat, h = λ' − λ;
    second order (2M): x0_hat is replaced by D0 + D1 / 2 with D1 = (x0_hat − x0_hat_prev) / r, r = h_prev / h.
    Coefficients in float64; into t_next = 0 the step returns x0_hat.
    """
    if t_next == 0:
        return x0_hat
    decay = _signal_over_noise(t) / _signal_over_noise(t_next)  # e^{−h}, 0 from t = 1
    estimate = x0_hat.double()
    if x0_hat_prev is not None:
        h = -math.log(decay)
        h_prev = math.inf if t_prev >= 1 else math.log(_signal_over_noise(t) / _signal_over_noise(t_prev))
        estimate = estimate + 0.5 * (h / h_prev) * (estimate - x0_hat_prev.double())
    x_next = (t_next / t) * x.double() + (1.0 - t_next) * (1.0 - decay) * estimate
    return x_next.to(x.dtype)


def _dpm2_trajectory(model, x, cond, null_cond, guidance: float, grid: list[float]) -> Tensor:
    """x from t = 1 to 0 with DPM-Solver++(2M): first order at the first and the final step, second in between."""
    previous = None
    last = len(grid) - 2
    for k in range(last + 1):
        t, t_next = grid[k], grid[k + 1]
        v = guided_velocity(model, x, torch.tensor(t).to(x), cond, null_cond, guidance)
        x0_hat = x - t * v
        second_order = previous is not None and k != last
        x = dpm_solver_step(x, x0_hat, t, t_next, *(previous if second_order else (None, None)))
        previous = (x0_hat, t)
    return x


def initial_noise(seeds, shape) -> torch.Tensor:
    """x_1 ~ N(0, I), one generator per sample seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def guided_velocity(model, x, t, cond, null_cond, guidance: float, detach_null: bool = False) -> torch.Tensor:
    """CFG: v_null + g (v_cond − v_null); g = 1 is the plain conditional velocity. t: a scalar or one per row.

    detach_null: no gradient through the unconditional branch (Flow-GRPO's training pass, §6), so the update
    moves the conditional velocity only.
    """
    if guidance == 1.0:
        return model.velocity(x, t, cond)
    t = torch.as_tensor(t)
    both = model.velocity(torch.cat([x, x]), torch.cat([t, t]) if t.dim() else t, type(cond).cat([cond, null_cond]))
    v_cond, v_null = both.chunk(2)
    if detach_null:
        v_null = v_null.detach()
    return v_null + guidance * (v_cond - v_null)


# --- the SDE step (Flow-GRPO, METHOD.md §6) as pure tensor functions -------------------------------------
def per_row(t, like: Tensor) -> Tensor:
    """t (a scalar or one value per row) shaped to broadcast against a B x ... tensor."""
    return torch.as_tensor(t).to(like).reshape(-1, *([1] * (like.dim() - 1)))


def sde_sigma(t: Tensor, t_next: Tensor, noise_level: float) -> Tensor:
    """σ_t = a sqrt(t / (1 − t)); infinite at t = 1, where Flow-GRPO puts the next grid point σ₁ in the
    denominator only: σ = a sqrt(1 / (1 − σ₁)) (§6)."""
    t, t_next = torch.as_tensor(t), torch.as_tensor(t_next)
    denominator_time = torch.where(t >= 1, t_next.to(t), t)
    return noise_level * (t / (1 - denominator_time)).sqrt()


def sde_step(x: Tensor, v: Tensor, t, t_next, noise_level: float) -> tuple[Tensor, Tensor]:
    """One Euler–Maruyama step from t to t + dt (dt = t_next − t < 0) of the SDE with the ODE's marginals.

    mean μ = x + [v + σ_t² / (2t) · (x + (1 − t) v)] dt,  std σ_t sqrt(|dt|): one std per row, shape B x 1 x ...
    With noise_level 0 this is the Euler ODE step x + v dt.
    """
    t, t_next = per_row(t, x), per_row(t_next, x)
    dt = t_next - t
    sigma = sde_sigma(t, t_next, noise_level)
    mean = x + (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sigma * dt.abs().sqrt()


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; μ, std² I) averaged over every dimension but the first (one value per row), as Flow-GRPO logs it."""
    std = torch.as_tensor(std).to(x)
    std = std if std.dim() == x.dim() else per_row(std, x)
    log_density = -((x - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_density.reshape(x.shape[0], -1).mean(dim=1)


@torch.no_grad()
def sample_sde(model, prompts: list[str], seeds, steps: int = 10, shift: float = 3.0, guidance: float = 1.0,
               noise_level: float = 0.7, batch_size: int = 64, keep_trajectory: bool = False, progress: bool = False):
    """Flow-GRPO's SDE sampler (§6): x0, or with `keep_trajectory` (x0, trajectory, log_probs).

    trajectory: N x (steps + 1) x C x H x W, the latent at every grid point (trajectory[:, 0] = x_1, [:, -1] = x0);
    log_probs: N x (steps − 1), log p(trajectory[:, k + 1] | trajectory[:, k]) of the first steps − 1 steps (mean
    over dims). Every step is stochastic, the last one to t = 0 too, as Flow-GRPO samples; its std is ~2e-3 and
    its log-density a spike, and Flow-GRPO trains floor(0.99 N) steps (all but the last for N < 100), so it
    carries no log-prob and no loss term.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    grid = time_grid(steps, shift)
    finals, paths, log_probs = [], [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"sampling (sde, {steps} steps)", disable=not progress, leave=False):
        chunk_prompts, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for s in chunk_seeds]
        x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators]).to(model.device)
        cond = model.encode_prompts(chunk_prompts)
        null_cond = model.encode_prompts([""] * len(chunk_prompts)) if guidance != 1.0 else None
        path, chunk_log_probs = [x], []
        for k in range(steps):
            t, t_next = grid[k], grid[k + 1]
            v = guided_velocity(model, x, t.to(x), cond, null_cond, guidance)
            mean, std = sde_step(x, v, t, t_next, noise_level)
            noise = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators]).to(x)
            x = mean + std * noise
            if keep_trajectory and k < steps - 1:
                chunk_log_probs.append(gaussian_log_prob(x, mean, std))
            path.append(x)
        finals.append(x)
        if keep_trajectory:
            paths.append(torch.stack(path, dim=1))
            log_probs.append(torch.stack(chunk_log_probs, dim=1) if chunk_log_probs else x.new_zeros(len(x), 0))
    x0 = torch.cat(finals)
    return (x0, torch.cat(paths), torch.cat(log_probs)) if keep_trajectory else x0


@torch.no_grad()
def sample(model, prompts: list[str], seeds, sampler: str = "dpm2", steps: int = 10, shift: float = 3.0,
           guidance: float = 1.0, batch_size: int = 64, progress: bool = False, sde_noise: float = 0.7) -> torch.Tensor:
    """Final samples x0 (N x C x H x W, model space) for the prompts, one per seed (sde_noise: `sde` only)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if sampler == "sde":
        return sample_sde(model, prompts, seeds, steps, shift, guidance, sde_noise, batch_size, progress=progress)
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"sampling ({sampler}, {steps} steps)", disable=not progress, leave=False):
        chunk_prompts, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        x = initial_noise(chunk_seeds, model.sample_shape).to(model.device)
        cond = model.encode_prompts(chunk_prompts)
        null_cond = model.encode_prompts([""] * len(chunk_prompts)) if guidance != 1.0 else None
        if sampler == "dpm2":
            x = _dpm2_trajectory(model, x, cond, null_cond, guidance, time_grid(steps, shift).double().tolist())
        else:
            scheduler = make_scheduler(sampler, steps, shift)
            for timestep, t in zip(scheduler.timesteps, scheduler.sigmas[:-1]):
                v = guided_velocity(model, x, t.to(x), cond, null_cond, guidance)
                x = scheduler.step(v, timestep, x).prev_sample
        out.append(x)
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space pixels in [-1, 1] (N x 3 x H x W) to uint8 images N x H x W x 3."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
