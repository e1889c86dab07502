"""Deterministic ODE samplers on SD3's shifted schedule, built on diffusers' schedulers.

`euler` is `FlowMatchEulerDiscreteScheduler` on `linspace(1, 1/1000, N)` shifted by `s t / (1 + (s-1) t)`;
`dpm2` is the second-order multistep `DPMSolverMultistepScheduler` in flow mode. Every sample owns its seed,
so a sample is the same whatever batch it was drawn in, and a rollout can be regenerated from its record.
"""

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

ODE_SAMPLERS = ("euler", "dpm2")


def make_scheduler(sampler: str, steps: int, shift: float = 3.0):
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, steps))
    elif sampler == "dpm2":
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift,
        )
        scheduler.set_timesteps(steps)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {ODE_SAMPLERS}")
    return scheduler


def sampler_times(sampler: str, steps: int, shift: float = 3.0) -> torch.Tensor:
    """The times t in (0, 1] at which the sampler queries the model: the ELBO draws its t from these."""
    return make_scheduler(sampler, steps, shift).sigmas[:-1].float()


def initial_noise(seeds, shape) -> torch.Tensor:
    """x_1 ~ N(0, I), one generator per sample seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def guided_velocity(model, x, t, cond, null_cond, guidance: float) -> torch.Tensor:
    if guidance == 1.0:
        return model.velocity(x, t, cond)
    both = model.velocity(torch.cat([x, x]), t, type(cond).cat([cond, null_cond]))
    v_cond, v_null = both.chunk(2)
    return v_null + guidance * (v_cond - v_null)


@torch.no_grad()
def sample(model, prompts: list[str], seeds, sampler: str = "dpm2", steps: int = 10, shift: float = 3.0,
           guidance: float = 1.0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Final samples x0 (N x C x H x W, model space) for the prompts, one per seed."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"sampling ({sampler}, {steps} steps)", disable=not progress, leave=False):
        chunk_prompts, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        x = initial_noise(chunk_seeds, model.sample_shape).to(model.device)
        cond = model.encode_prompts(chunk_prompts)
        null_cond = model.encode_prompts([""] * len(chunk_prompts)) if guidance != 1.0 else None
        scheduler = make_scheduler(sampler, steps, shift)  # multistep state is per batch
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
