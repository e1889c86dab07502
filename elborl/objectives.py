"""Policy-gradient objectives (METHOD.md §3) and the baselines' (§6), per loss term, minimised.

The likelihood objectives take one value per term from either estimator (`elborl.likelihood`): an ELBO
per (sample, t) term (§2) or a trajectory log-prob per (sample, step) term (§6). Written for the ELBO:
`elbo_current` carries the gradient of the current policy θ, `elbo_old` comes from the old policy θ_old on
the same x_t (no gradient; it is detached here anyway). With δ = stopgrad(ELBO_θ) − ELBO_old and
ρ = exp(δ) (detached):

    epg        −ρ · A · ELBO_θ
    pepg       −ρ · (A − δ) · ELBO_θ
    par        ½ · ρ · (A − (ELBO_θ − ELBO_old))²            (same gradient as pepg)
    grpo       −min(r A, clip(r, 1 − ε, 1 + ε) A),  r = exp(ELBO_θ − ELBO_old) with gradient
    flow_grpo  the same PPO clip, on per-step trajectory log-probs against the log-probs *stored at rollout*
               (Flow-GRPO, §6); the caller passes those as the "old" values

`<name>_noratio` sets ρ = 1 for epg, pepg and par. There is no `grpo_noratio`: GRPO's ratio r *is* the
objective (its gradient r A ∇ELBO_θ is where ρ comes from, and the clip acts on it), so dropping it leaves
nothing that is GRPO — plain advantage-weighted likelihood is already `epg_noratio`.

`nft` (DiffusionNFT, §6) is not a function of likelihood values but of velocities: `nft_loss`.

The KL penalties are separate and weighted by the caller: `kl_to_reference` (§3, "+ β · mean_d (v_θ − v_ref)²")
on ELBO terms, `kl_between_steps` (§6, ‖μ_θ − μ_ref‖² / (2 σ_t²), as Flow-GRPO's code) on trajectory terms.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from elborl.likelihood import elbo
from elborl.sampling import per_row, sde_sigma, sde_step

RATIO_OBJECTIVES = ("epg", "pepg", "par", "grpo")
NORATIO_OBJECTIVES = ("epg_noratio", "pepg_noratio", "par_noratio")
LIKELIHOOD_OBJECTIVES = RATIO_OBJECTIVES + NORATIO_OBJECTIVES + ("flow_grpo",)  # what `policy_loss` computes
OBJECTIVES = LIKELIHOOD_OBJECTIVES + ("nft",)
CLIPPED_OBJECTIVES = ("grpo", "flow_grpo")  # PPO clip: the clip fraction is worth logging
ADVANTAGE_MODES = ("recipe", "std", "positive")

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
    positive: scale · max(R − mean_group R, 0) (ours, not the recipe's): only the better half of a group is
            reinforced and no term pushes a sample's likelihood down, as in reward-weighted regression.
    """
    rewards = rewards.reshape(-1).float()
    centred = rewards - group_means(rewards, group_ids)
    if mode == "recipe":
        return scale * centred
    if mode == "positive":
        return scale * centred.clamp_min(0)
    if mode == "std":
        std = rewards.std(correction=0).clamp_min(STD_FLOOR)
        return (centred / std).clamp(-clip, clip)
    raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")


# ---------------------------------------------------------------------------------------------- losses

def _check_objective(objective: str, valid: tuple[str, ...] = OBJECTIVES) -> None:
    if objective == "nft" and "nft" not in valid:
        raise ValueError("nft is not a likelihood-ratio objective: its loss is `nft_loss` on velocities")
    if objective not in valid:
        raise ValueError(f"unknown objective {objective!r}; expected one of {valid}")


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
    grpo and flow_grpo only. Unknown objectives raise ValueError.
    """
    _check_objective(objective, LIKELIHOOD_OBJECTIVES)
    advantages = advantages.to(elbo_current)
    if objective in CLIPPED_OBJECTIVES:
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


def kl_between_steps(v_current: Tensor, v_reference: Tensor, x: Tensor, t: Tensor, t_next: Tensor,
                     noise_level: float) -> Tensor:
    """§6 Flow-GRPO's KL per trajectory term as its code computes it: mean_d (μ_θ − μ_ref)² / (2 σ_t²), with σ_t
    the SDE's noise scale *without* the step's sqrt(|dt|). The exact KL between the two Gaussian steps divides by
    σ_t² |dt| instead (4-25x larger on a 10-step grid); this one is what β = 0.04 was tuned with. Gradient to v_θ
    only; the caller multiplies by β."""
    mean, _ = sde_step(x, v_current, t, t_next, noise_level)
    mean_reference, _ = sde_step(x, v_reference.detach(), t, t_next, noise_level)
    sigma = sde_sigma(per_row(t, x), per_row(t_next, x), noise_level)
    kl = (mean - mean_reference) ** 2 / (2 * sigma ** 2)
    return kl.reshape(kl.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------- DiffusionNFT

NFT_ADVANTAGE_CLIP = 5.0


def nft_optimality(advantages: Tensor) -> Tensor:
    """§6: the optimality probability r = clip(clip(A, −5, 5) / 10 + 0.5, 0, 1) of each term's sample."""
    clipped = advantages.clamp(-NFT_ADVANTAGE_CLIP, NFT_ADVANTAGE_CLIP)
    return (clipped / 10 + 0.5).clamp(0, 1)


def nft_implicit_velocities(v_current: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """§6: v⁺ = b v_θ + (1 − b) sg(v_old), v⁻ = (1 + b) sg(v_old) − b v_θ; v⁺ and v⁻ mirror each other about v_old."""
    v_old = v_old.detach()
    return beta * v_current + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_current


def nft_loss(v_current: Tensor, v_old: Tensor, x0: Tensor, x_t: Tensor, eps: Tensor, t: Tensor,
             optimality: Tensor, beta: float = 1.0, weighting: str = "adaptive", scale: float = 1.0) -> Tensor:
    """§6 DiffusionNFT per term: scale · (r L(v⁺) + (1 − r) L(v⁻)) / b, with L(v) = −ELBO(v) on the term's x_t,
    i.e. the adaptive x0-loss of §2 for the default weighting. The gradient reaches v_θ only."""
    v_positive, v_negative = nft_implicit_velocities(v_current, v_old, beta)
    loss_positive = -elbo(v_positive, x0, x_t, eps, t, weighting)
    loss_negative = -elbo(v_negative, x0, x_t, eps, t, weighting)
    optimality = optimality.to(loss_positive)
    return scale * (optimality * loss_positive + (1 - optimality) * loss_negative) / beta


# ---------------------------------------------------------------------------------------------- metrics

@dataclass
class TermStats:
    """Running statistics of δ and the ratio exp(δ) over loss terms, mergeable across micro-batches.

    The ratio is exp(ELBO_θ − ELBO_old) whatever the objective (for `_noratio` objectives it is what ρ
    would have been). `clipped` counts terms with |ratio − 1| > clip_range: only meaningful for grpo and
    flow_grpo.
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
        """Metrics: delta_mean, delta_abs_max, ratio_mean/min/max, and clip_fraction for grpo and flow_grpo."""
        n = max(self.terms, 1)
        out = {"delta_mean": self.delta_sum / n, "delta_abs_max": self.delta_abs_max,
               "ratio_mean": self.ratio_sum / n, "ratio_min": self.ratio_min, "ratio_max": self.ratio_max}
        if objective in CLIPPED_OBJECTIVES:
            out["clip_fraction"] = self.clipped / n
        return out


def term_stats(objective: str, elbo_current: Tensor, elbo_old: Tensor, clip_range: float = 1e-3) -> dict[str, float]:
    """One-shot metrics of a batch of terms (see TermStats.summary)."""
    _check_objective(objective)
    return TermStats.of(elbo_current, elbo_old, clip_range).summary(objective)
