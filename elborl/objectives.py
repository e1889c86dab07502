"""Policy-gradient objectives on the ELBO (METHOD.md §3), per loss term, minimised.

Every function takes one value per (sample, t) term (§2): `elbo_current` carries the gradient of the
current policy θ, `elbo_old` comes from the old policy θ_old on the same x_t (no gradient; it is detached
here anyway). With δ = stopgrad(ELBO_θ) − ELBO_old and ρ = exp(δ) (detached):

    epg   −ρ · A · ELBO_θ
    pepg  −ρ · (A − δ) · ELBO_θ
    par   ½ · ρ · (A − (ELBO_θ − ELBO_old))²            (same gradient as pepg)
    grpo  −min(r A, clip(r, 1 − ε, 1 + ε) A),  r = exp(ELBO_θ − ELBO_old) with gradient

`<name>_noratio` sets ρ = 1 for epg, pepg and par. There is no `grpo_noratio`: GRPO's ratio r *is* the
objective (its gradient r A ∇ELBO_θ is where ρ comes from, and the clip acts on it), so dropping it leaves
nothing that is GRPO — plain advantage-weighted likelihood is already `epg_noratio`.

The KL penalty (§3, "+ β · mean_d (v_θ − v_ref)²") is separate: `kl_to_reference`, weighted by the caller.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

RATIO_OBJECTIVES = ("epg", "pepg", "par", "grpo")
NORATIO_OBJECTIVES = ("epg_noratio", "pepg_noratio", "par_noratio")
OBJECTIVES = RATIO_OBJECTIVES + NORATIO_OBJECTIVES
ADVANTAGE_MODES = ("recipe", "std")

STD_FLOOR = 1e-6  # guards the global std of a batch whose rewards are (nearly) all equal


# ---------------------------------------------------------------------------------------------- advantages

def _group_index(group_ids, n: int, device) -> Tensor:
    """Group labels (a tensor or a list of any hashables, e.g. prompts) to dense ints 0..G-1."""
    if isinstance(group_ids, Tensor):
        labels = group_ids.reshape(-1).tolist()
    else:
        labels = list(group_ids)
    if len(labels) != n:
        raise ValueError(f"{n} rewards but {len(labels)} group ids")
    dense: dict = {}
    return torch.tensor([dense.setdefault(label, len(dense)) for label in labels], device=device)


def group_means(rewards: Tensor, group_ids) -> Tensor:
    """Each reward's group mean (group = all images of one prompt, §3), shape B."""
    index = _group_index(group_ids, rewards.numel(), rewards.device)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, index, rewards)
    counts = torch.bincount(index, minlength=n_groups).to(rewards.dtype)
    return (sums / counts)[index]


def group_advantages(rewards: Tensor, group_ids, mode: str = "recipe", scale: float = 0.1,
                     clip: float = 5.0) -> Tensor:
    """§3 advantages, shape B.

    recipe: scale · (R − mean_group R), no std normalisation, no clipping (the ELBO objectives' recipe).
    std:    (R − mean_group R) / std_global, clipped to ±clip (GRPO's, and Flow-GRPO's §6). std_global
            is the population std of the whole batch, floored at 1e-6.
    """
    rewards = rewards.reshape(-1).float()
    centred = rewards - group_means(rewards, group_ids)
    if mode == "recipe":
        return scale * centred
    if mode == "std":
        std = rewards.std(correction=0).clamp_min(STD_FLOOR)
        return (centred / std).clamp(-clip, clip)
    raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")


# ---------------------------------------------------------------------------------------------- losses

def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def log_ratio(elbo_current: Tensor, elbo_old: Tensor) -> Tensor:
    """§3: δ = stopgrad(ELBO_θ) − ELBO_old (no gradient)."""
    return elbo_current.detach() - elbo_old.detach()


def importance_weight(objective: str, delta: Tensor) -> Tensor:
    """§3: ρ = exp(δ), or exactly 1 for the `_noratio` variants."""
    return torch.ones_like(delta) if objective.endswith("_noratio") else delta.exp()


def grpo_loss(elbo_current: Tensor, elbo_old: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """§3 PPO clip on r = exp(ELBO_θ − ELBO_old) (r carries the gradient): −min(r A, clip(r, 1±ε) A)."""
    ratio = (elbo_current - elbo_old.detach()).exp()
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def policy_loss(objective: str, elbo_current: Tensor, elbo_old: Tensor, advantages: Tensor,
                clip_range: float = 1e-3) -> Tensor:
    """§3: the loss of each term (shape B, to be minimised; the caller sums or averages).

    `advantages` holds each term's advantage (the advantage of the term's sample); `clip_range` is used by
    grpo only. Unknown objectives raise ValueError.
    """
    _check_objective(objective)
    advantages = advantages.to(elbo_current)
    if objective == "grpo":
        return grpo_loss(elbo_current, elbo_old, advantages, clip_range)
    delta = log_ratio(elbo_current, elbo_old)
    rho = importance_weight(objective, delta)
    base = objective.removesuffix("_noratio")
    if base == "epg":
        return -rho * advantages * elbo_current
    if base == "pepg":
        return -rho * (advantages - delta) * elbo_current
    # par
    return 0.5 * rho * (advantages - (elbo_current - elbo_old.detach())) ** 2


def kl_to_reference(v_current: Tensor, v_reference: Tensor) -> Tensor:
    """§3 KL surrogate per term: mean_d (v_θ − v_ref)², gradient to v_θ only. The caller multiplies by β."""
    diff = v_current - v_reference.detach()
    return (diff ** 2).reshape(diff.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------- metrics

@dataclass
class TermStats:
    """Running statistics of δ and the ratio exp(δ) over loss terms, mergeable across micro-batches.

    The ratio is exp(ELBO_θ − ELBO_old) whatever the objective (for `_noratio` objectives it is what ρ
    would have been). `clipped` counts terms with |ratio − 1| > clip_range: only meaningful for grpo.
    """

    terms: int = 0
    delta_sum: float = 0.0
    delta_abs_max: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    clipped: int = 0

    @classmethod
    def of(cls, elbo_current: Tensor, elbo_old: Tensor, clip_range: float = 1e-3) -> "TermStats":
        delta = log_ratio(elbo_current, elbo_old).double()
        if delta.numel() == 0:
            return cls()
        ratio = delta.exp()
        return cls(terms=delta.numel(), delta_sum=float(delta.sum()), delta_abs_max=float(delta.abs().max()),
                   ratio_sum=float(ratio.sum()), ratio_min=float(ratio.min()), ratio_max=float(ratio.max()),
                   clipped=int(((ratio - 1).abs() > clip_range).sum()))

    def merge(self, other: "TermStats") -> "TermStats":
        return TermStats(
            terms=self.terms + other.terms, delta_sum=self.delta_sum + other.delta_sum,
            delta_abs_max=max(self.delta_abs_max, other.delta_abs_max), ratio_sum=self.ratio_sum + other.ratio_sum,
            ratio_min=min(self.ratio_min, other.ratio_min), ratio_max=max(self.ratio_max, other.ratio_max),
            clipped=self.clipped + other.clipped,
        )

    def summary(self, objective: str | None = None) -> dict[str, float]:
        """Metrics: delta_mean, delta_abs_max, ratio_mean/min/max, and clip_fraction for grpo."""
        n = max(self.terms, 1)
        out = {"delta_mean": self.delta_sum / n, "delta_abs_max": self.delta_abs_max,
               "ratio_mean": self.ratio_sum / n, "ratio_min": self.ratio_min, "ratio_max": self.ratio_max}
        if objective == "grpo":
            out["clip_fraction"] = self.clipped / n
        return out


def term_stats(objective: str, elbo_current: Tensor, elbo_old: Tensor, clip_range: float = 1e-3) -> dict[str, float]:
    """One-shot metrics of a batch of terms (see TermStats.summary)."""
    _check_objective(objective)
    return TermStats.of(elbo_current, elbo_old, clip_range).summary(objective)
