"""The RL epoch: rollout -> reward -> update (METHOD.md §2-§4), each phase a plain function; a run is rounds of
them (elborl/rounds.py), one epoch per round.

The method and its baselines (§6) are choices inside this one epoch, never a second one:
- rollout: `sampler` euler / dpm2 (ODE) or sde (Flow-GRPO's, which can store the trajectory and its log-probs);
- likelihood: `estimator` elbo (final sample only, §2) or trajectory (stored SDE steps, §6);
- `objective`: epg / pepg / par / grpo (+ `_noratio`) on either estimator, flow_grpo (PPO clip against the
  rollout's stored step log-probs), nft (DiffusionNFT's implicit positive/negative policies on ELBO terms).
Each method's settings are a preset in params.yaml (`recipes:`), picked by `rl.recipe` (elborl/config.py).

Every random draw of epoch e comes from generators seeded by (seed, e), so an epoch can be regenerated
from the run's settings, and a resumed run continues exactly where a straight run would be.
"""

from dataclasses import dataclass, field, replace
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from elborl.distributed import SINGLE, Processes
from elborl.likelihood import (ESTIMATORS, WEIGHTINGS, elbo, elbo_times, expand_to_terms, perturb, term_noise,
                               times_in_window, trajectory_log_prob, trajectory_terms)
from elborl.objectives import (ADVANTAGE_MODES, CLIPPED_OBJECTIVES, OBJECTIVES, TermStats, group_advantages,
                               kl_between_steps, kl_to_reference, nft_loss, nft_optimality, policy_loss)
from elborl.policy import CURRENT, OLD, REFERENCE, Policy
from elborl.runtime import PRECISIONS, resolve_precision
from elborl.sampling import SAMPLERS, sample, sample_sde, sampler_times, time_grid
from elborl.settings import Bool, Float, Int, OneOf, Str, section


@section("rl")
class RLConfig:
    """RL fine-tuning (docs/method.md): every epoch samples `group_size` images of `prompts_per_epoch` prompts from
    θ_old, scores them, and takes `optimizer_steps_per_epoch` steps on the objective. In params.yaml `rl.recipe`
    lays a method's preset (`recipes:`) under the keys written here; a key written in `rl:` wins."""

    recipe: Annotated[Str, Field(description=(
        "The preset of `recipes:` these settings start from (\"\" = none): its keys are laid under the ones "
        "written in `rl:`, so `--set rl.kl_beta=1e-3` varies one setting of a method. params.yaml picks `elbo`."
    ))] = ""
    objective: Annotated[Str, OneOf(OBJECTIVES, "objective"), Field(description=(
        "The policy-gradient objective (docs/method.md, \"The objectives\"): epg, pepg (the method), par, grpo and "
        "their `_noratio` variants on either estimator; flow_grpo and nft are the baselines."
    ))] = "pepg"
    estimator: Annotated[Str, OneOf(ESTIMATORS, "estimator"), Field(description=(
        "The likelihood: `elbo` from the final sample alone (the method), or `trajectory`, the log-probs of the "
        "stored SDE steps (Flow-GRPO's; needs `sampler: sde`)."
    ))] = "elbo"
    weighting: Annotated[Str, OneOf(WEIGHTINGS, "weighting"), Field(description=(
        "The weighting of the ELBO's terms over time (docs/method.md, \"The estimator\")."
    ))] = "adaptive"
    sampler: Annotated[Str, OneOf(SAMPLERS, "sampler"), Field(description=(
        "The rollout sampler: `euler` or `dpm2` (ODE), or `sde` (Flow-GRPO's, which stores the trajectory and its "
        "log-probs)."
    ))] = "dpm2"
    steps: Annotated[Int, Field(ge=1, description="Sampler steps of a rollout.")] = 10
    shift: Annotated[Float, Field(gt=0, description=(
        "The time-schedule shift of the rollout sampler (SD3's 3.0: more steps at high noise)."
    ))] = 3.0
    guidance: Annotated[Float, Field(ge=1, allow_inf_nan=False, json_schema_extra={"note": "1 = CFG off"},
                                     description=(
        "The rollout's classifier-free guidance; 1.0 = CFG off, the method's headline setting. Trajectory terms "
        "use it for every policy, as Flow-GRPO does."
    ))] = 1.0
    train_guidance: Annotated[Float, Field(ge=1, allow_inf_nan=False, json_schema_extra={"note": "1 = CFG off"},
                                           description=(
        "The CFG guidance of θ's velocity in ELBO terms (as the official code): θ_old's is `guidance` (as it "
        "sampled), the reference's `reference_guidance`; each ELBO is normalised by its own guidance."
    ))] = 1.0
    reference_guidance: Annotated[Float, Field(ge=1, allow_inf_nan=False, json_schema_extra={"note": "1 = CFG off"},
                                               description="The CFG guidance of the reference policy's velocity in "
                                               "ELBO terms (see `train_guidance`).")] = 1.0
    sde_noise: Annotated[Float, Field(ge=0, allow_inf_nan=False, description=(
        "The sde sampler's noise level a in σ_t = a sqrt(t / (1 − t)). Flow-GRPO's 0.7 is tuned for SD3 latents "
        "and wrecks 32 x 32 pixels (strict score 0.02 against the ODE's 0.40 on the same prompts and seeds); 0.2 "
        "is the largest level whose reward and strict score stay within noise of the ODE's (bench/sde_noise.py, "
        "docs/experiments/2026-12-07-method-fidelity.md)."
    ))] = 0.2
    rollout_precision: Annotated[Str, OneOf(PRECISIONS, "precision"), Field(description=(
        "bfloat16: rollouts under autocast (a forward pass 1.45x faster on an AVX-512 BF16 CPU, 26x slower on an "
        "AVX2 one, where it is emulated); auto: bfloat16 where the device computes it natively (elborl/runtime.py), "
        "resolved when the settings load. Only the ELBO estimator may use bfloat16: it needs nothing of the sampler "
        "but the final sample, while trajectory log-probs stored at rollout must come from the update's "
        "arithmetic. On an AVX-512 BF16 CPU an epoch's rollout took 8.0 s instead of 10.0 s and the base model's "
        "samples scored the same (docs/experiments/2026-12-03-bfloat16.md)."
    ))] = "float32"
    update_precision: Annotated[Str, OneOf(PRECISIONS, "precision"), Field(description=(
        "bfloat16: the update's forward and backward passes under autocast too (ELBO terms only); the ELBO, δ and "
        "the loss stay float32. Current and old see the same arithmetic, so δ = 0 exactly when their weights are "
        "equal. auto as for `rollout_precision`. On the base model the epoch's gradient had cosine 1.0000 with "
        "float32's (two float32 draws: 0.26) and the update took 17% less time on an AVX-512 BF16 CPU."
    ))] = "float32"
    prompts_per_epoch: Annotated[Int, Field(ge=1, description=(
        "Prompts drawn per epoch, balanced over tasks (with several processes: a multiple of their number)."
    ))] = 8
    task_weights: Annotated[dict[Str, Annotated[Float, Field(ge=0, allow_inf_nan=False)]], Field(description=(
        "How likely each task's prompts are drawn relative to the others: {task: weight}, a task not named weighs "
        "1, weight 0 never draws it (docs/experiments/2026-12-03-task-weights-and-reward-mix.md)."
    ))] = field(default_factory=dict)
    group_size: Annotated[Int, Field(ge=2, json_schema_extra={"note": "advantages are relative to the group"},
                                     description="Images per prompt; advantages are relative to the group.")] = 8
    optimizer_steps_per_epoch: Annotated[Int, Field(ge=1, description=(
        "K: optimizer steps per rollout, each on its own share of the epoch's terms (1: all terms accumulate "
        "into one step). The `elbo` preset's 4 beat 1 on the 2-core CPU "
        "(docs/experiments/2026-11-30-rl-recipe-sweep.md)."
    ))] = 1
    micro_batch: Annotated[Int, Field(ge=1, description=(
        "Terms per forward pass of the update: memory, not results (up to float rounding)."
    ))] = 64
    lr: Annotated[Float, Field(gt=0, allow_inf_nan=False, description="AdamW's learning rate.")] = 1e-3
    adam_beta1: Annotated[Float, Field(ge=0, lt=1, description=(
        "Adam's β1 (the paper's 0.9). At about 0.15 signal-to-noise per epoch a longer average (0.98: about 50 "
        "steps) leaves less noise in each step; on the shapes world it gave no held-out gain "
        "(docs/experiments/2026-12-04-adam-momentum-and-ema.md)."
    ))] = 0.9
    weight_decay: Annotated[Float, Field(ge=0, description="AdamW's decoupled weight decay.")] = 1e-4
    grad_clip: Annotated[Float, Field(gt=0, description="The gradient-norm clip of every optimizer step.")] = 5.0
    max_nonfinite_steps: Annotated[Int, Field(ge=0, description=(
        "An optimizer step whose gradient is NaN or infinite (from a reward, loss or gradient that is) is skipped: "
        "no step, no EMA move, logged. A run that has skipped more than this many stops at the round that "
        "crossed it, naming the cause, before publishing it: the last good round's state stays the latest."
    ))] = 8
    kl_beta: Annotated[Float, Field(ge=0, allow_inf_nan=False, description=(
        "β of the KL penalty to the reference policy (0: neither computed nor logged). The paper's 1e-4 is "
        "negligible at the shapes world's scale: without a KL the policy's palette drifts within 15 minutes "
        "(colour-free prompts end up green, blue or purple, yellow turns lime), and the `elbo` preset's 0.03 keeps "
        "it at a similar score (docs/experiments/2026-11-30-kl-term.md)."
    ))] = 1e-4
    advantage: Annotated[Str, OneOf(ADVANTAGE_MODES, "advantage"), Field(description=(
        "recipe: `advantage_scale` · (R − group mean), the paper's for the ELBO objectives; std: "
        "(R − group mean) / the batch std, clipped to ±5 (GRPO's, needed by the clipped objectives); positive: only "
        "the better half of a group is reinforced."
    ))] = "recipe"
    advantage_scale: Annotated[Float, Field(gt=0, description=(
        "The scale of the `recipe` and `positive` advantages."
    ))] = 0.1
    drop_zero_advantage: Annotated[Bool, Field(description=(
        "Leave samples whose advantage is exactly 0 (groups whose images all scored the same) out of the update, "
        "as Flow-GRPO does: they would only add KL terms and shrink the mean loss of the others."
    ))] = False
    grpo_clip: Annotated[Float, Field(gt=0, description="The PPO clip range ε of grpo and flow_grpo.")] = 1e-3
    nft_beta: Annotated[Float, Field(gt=0, description="DiffusionNFT's b (docs/method.md, \"Baselines\").")] = 1.0
    nft_loss_scale: Annotated[Float, Field(gt=0, description=(
        "A factor on the nft loss (DiffusionNFT's recipe uses 5); under Adam it matters only against `grad_clip`, "
        "`kl_beta` and the weight decay."
    ))] = 1.0
    elbo_fraction: Annotated[Float, Field(gt=0, le=1, description=(
        "The share of the sampler's times drawn as ELBO terms per sample (K = floor(fraction · steps), at least 1); "
        "the paper's 0.99 takes 9 of 10."
    ))] = 0.99
    elbo_min_time: Annotated[Float, Field(ge=0, le=1, description=(
        "ELBO times are drawn only among the sampler times in [elbo_min_time, elbo_max_time] (0 and 1: all). "
        "Terms at low t seemed to carry little signal (docs/experiments/2026-12-04-signal-along-the-schedule.md), "
        "which a later experiment overturned (docs/experiments/2026-12-07-method-fidelity.md)."
    ))] = 0.0
    elbo_max_time: Annotated[Float, Field(ge=0, le=1, description="See `elbo_min_time`.")] = 1.0
    old_decay_rate: Annotated[Float, Field(ge=0, description=(
        "The old policy's soft update θ_old ← d θ_old + (1 − d) θ after each epoch, with "
        "d = min(rate · optimizer steps so far, `old_decay_max`); 0 and 0 make every rollout on-policy (Flow-GRPO)."
    ))] = 0.001
    old_decay_max: Annotated[Float, Field(ge=0, le=1, description="The cap of d (see `old_decay_rate`).")] = 0.5
    ema_decay: Annotated[Float, Field(ge=0, lt=1, description=(
        "The cap of the evaluation EMA's per-optimizer-step decay (a warm-up, then this cap)."
    ))] = 0.9
    epochs: Annotated[Int, Field(ge=1, description="RL epochs (rounds) of the run.")] = 60
    seed: Annotated[Int, Field(ge=0, description=(
        "Every random draw of epoch e comes from generators seeded by (seed, e), so an epoch can be regenerated "
        "and a resumed run continues as a straight one would."
    ))] = 0

    def validate(self) -> None:
        """The rules that tie settings together (each field's own are checked on construction)."""
        if not self.elbo_min_time <= self.elbo_max_time:
            raise ValueError(f"rl.elbo_min_time and rl.elbo_max_time need 0 <= min <= max <= 1, got "
                             f"{self.elbo_min_time} and {self.elbo_max_time}")
        times = sampler_times(self.sampler, self.steps, self.shift)
        if self.estimator == "elbo" and times_in_window(times, self.elbo_min_time, self.elbo_max_time).numel() == 0:
            raise ValueError(f"rl.elbo_min_time {self.elbo_min_time} and rl.elbo_max_time {self.elbo_max_time} leave "
                             f"none of the {self.steps}-step {self.sampler} sampler's times {times.tolist()}; widen them")
        self._validate_combination()

    def _validate_combination(self) -> None:
        """Sampler, estimator and objective that cannot go together (each message names the fix)."""
        if self.estimator == "trajectory" and self.sampler != "sde":
            raise ValueError(f"rl.estimator: trajectory needs the stored SDE trajectory, so rl.sampler: sde "
                             f"(got rl.sampler: {self.sampler})")
        if self.estimator == "trajectory" and not (self.sde_noise > 0 and self.steps >= 2):
            raise ValueError("rl.estimator: trajectory needs stochastic steps with a density: rl.sde_noise > 0 and "
                             f"rl.steps >= 2 (got {self.sde_noise}, {self.steps})")
        if self.objective == "flow_grpo" and self.estimator != "trajectory":
            raise ValueError("rl.objective: flow_grpo clips per-step SDE log-prob ratios, so it needs "
                             f"rl.estimator: trajectory and rl.sampler: sde (got rl.estimator: {self.estimator})")
        if self.rollout_precision == "bfloat16" and self.estimator != "elbo":
            raise ValueError(f"rl.rollout_precision: {self.rollout_precision} rollouts need rl.estimator: elbo; the "
                             "trajectory estimator's stored log-probs must match the update's float32 arithmetic")
        if self.update_precision == "bfloat16" and self.estimator != "elbo":
            raise ValueError(f"rl.update_precision: {self.update_precision} updates need rl.estimator: elbo; the "
                             "trajectory estimator's log-probs are compared with ones stored in float32")
        if self.objective in CLIPPED_OBJECTIVES and self.advantage != "std":
            raise ValueError(f"rl.objective: {self.objective} clips ratios at 1 ± {self.grpo_clip}, tuned for advantages "
                             f"normalised by the batch std: set rl.advantage: std (got {self.advantage})")
        if self.estimator == "trajectory" and (self.train_guidance, self.reference_guidance) != (1.0, 1.0):
            raise ValueError("rl.train_guidance and rl.reference_guidance apply to ELBO terms; trajectory terms use "
                             f"rl.guidance for every policy (got {self.train_guidance}, {self.reference_guidance})")
        if self.objective == "nft" and self.estimator != "elbo":
            raise ValueError("rl.objective: nft trains the x0-loss of the final sample, so it needs rl.estimator: elbo "
                             f"(got rl.estimator: {self.estimator})")

    def with_precisions_for(self, device_type: str) -> "RLConfig":
        """These settings with `auto` precisions made concrete for `device_type` (float32 off the ELBO estimator)."""
        def concrete(precision: str) -> str:
            if precision == "auto" and self.estimator != "elbo":
                return "float32"
            return resolve_precision(precision, device_type)

        return replace(self, rollout_precision=concrete(self.rollout_precision),
                       update_precision=concrete(self.update_precision))

    def sampler_settings(self) -> dict:
        """What a rollout records with each sample: enough to regenerate it from its seed."""
        settings = {"sampler": self.sampler, "steps": self.steps, "shift": self.shift, "guidance": self.guidance}
        if self.rollout_precision != "float32":
            settings["precision"] = self.rollout_precision
        return {**settings, "sde_noise": self.sde_noise} if self.sampler == "sde" else settings


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0]))


# --- rollout ------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """G samples per prompt, with everything needed to regenerate them (prompt, seed, sampler settings).

    The trajectory estimator also needs the SDE trajectory (N x (steps + 1) x C x H x W) and the log-prob of
    each stochastic step under θ_old at rollout (N x (steps − 1)); other settings leave them None.
    """

    metas: list[dict]
    group_ids: list[int]
    seeds: list[int]
    x0: torch.Tensor
    sampler: dict = field(default_factory=dict)
    trajectory: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None

    def records(self) -> list[dict]:
        return [{"prompt": m["prompt"], "tag": m["tag"], "group": g, "seed": s, **self.sampler}
                for m, g, s in zip(self.metas, self.group_ids, self.seeds)]


def choose_prompts(train_metas: list[dict], config: RLConfig, epoch: int) -> list[dict]:
    """The epoch's prompts, tasks equally likely unless `task_weights` says otherwise: a world's task sizes differ
    a lot (the shapes world's training prompts are 80% position), and sampling prompts uniformly would train
    mostly one task."""
    rng = np.random.default_rng([config.seed, epoch, 0])
    by_task: dict[str, list[dict]] = {}
    for meta in train_metas:
        by_task.setdefault(meta.get("tag", ""), []).append(meta)
    tasks = sorted(by_task)
    unknown = sorted(set(config.task_weights) - set(tasks))
    if unknown:
        raise ValueError(f"rl.task_weights names tasks without training prompts: {unknown}; the tasks are {tasks}")
    weights = np.array([config.task_weights.get(task, 1.0) for task in tasks], dtype=np.float64)
    if not weights.sum() > 0:
        raise ValueError(f"rl.task_weights leave no training prompt to draw (tasks: {tasks})")
    if np.all(weights == weights[0]):  # equal weights draw exactly as before the option existed
        task_indices = rng.integers(len(tasks), size=config.prompts_per_epoch)
    else:
        task_indices = rng.choice(len(tasks), size=config.prompts_per_epoch, p=weights / weights.sum())
    chosen = []
    for task_index in task_indices:
        prompts = by_task[tasks[task_index]]
        chosen.append(prompts[rng.integers(len(prompts))])
    return chosen


def rollout(policy: Policy, prompt_metas: list[dict], config: RLConfig, epoch: int,
            processes: Processes = SINGLE) -> Rollout:
    """Samples G images per prompt from the old policy θ_old (with the SDE trajectory when the estimator needs it).
    Each of several processes samples its share of whole groups; every process returns the whole rollout."""
    metas = [m for m in prompt_metas for _ in range(config.group_size)]
    group_ids = [i for i in range(len(prompt_metas)) for _ in range(config.group_size)]
    first_seed = (config.seed * 100_003 + epoch) * 10_000  # disjoint from evaluation seeds (>= 10^6 apart per run)
    seeds = [first_seed + i for i in range(len(metas))]
    mine = processes.sample_share(len(prompt_metas), config.group_size)
    prompts, own_seeds = [m["prompt"] for m in metas[mine]], seeds[mine]
    trajectory = old_log_probs = None
    with policy.weights(OLD), _autocast(policy, config.rollout_precision):
        if config.estimator == "trajectory":
            x0, trajectory, old_log_probs = sample_sde(
                policy.backbone, prompts, own_seeds, config.steps, config.shift, config.guidance, config.sde_noise,
                batch_size=config.micro_batch, keep_trajectory=True)
            trajectory, old_log_probs = processes.gather(trajectory), processes.gather(old_log_probs)
        else:
            x0 = sample(policy.backbone, prompts, own_seeds, config.sampler, config.steps, config.shift,
                        config.guidance, batch_size=config.micro_batch, sde_noise=config.sde_noise)
    return Rollout(metas, group_ids, seeds, processes.gather(x0.float()), config.sampler_settings(), trajectory,
                   old_log_probs)


def _autocast(policy: Policy, precision: str):
    device_type = policy.backbone.device.type
    return torch.autocast(device_type, torch.bfloat16, enabled=resolve_precision(precision, device_type) == "bfloat16")


# --- update ---------------------------------------------------------------------------------------
def epoch_terms(ro: Rollout, config: RLConfig, generator: torch.Generator) -> tuple[int, dict[str, torch.Tensor]]:
    """Every loss term of the epoch, sample-major: (terms per sample, per-term tensors).

    elbo: one term per (sample, t_k), t_k drawn from the sampler's times (§2); trajectory: one per (sample,
    stochastic step) of the stored SDE trajectory (§6), with the log-prob stored at rollout.
    """
    if config.estimator == "trajectory":
        x, x_next, t, t_next, stored = trajectory_terms(ro.trajectory, ro.old_log_probs,
                                                        time_grid(config.steps, config.shift))
        return ro.trajectory.shape[1] - 2, {"x": x, "x_next": x_next, "t": t, "t_next": t_next,
                                            "stored_log_prob": stored}
    times = elbo_times(sampler_times(config.sampler, config.steps, config.shift), len(ro.seeds), generator,
                       config.elbo_fraction, config.elbo_min_time, config.elbo_max_time)
    x0_terms, t_terms = expand_to_terms(ro.x0, times)
    return times.shape[1], {"x0": x0_terms, "t": t_terms}


class EpochStats:
    """δ and ratio statistics, KL and per-method values over an epoch's terms, merged across micro-batches."""

    def __init__(self, config: RLConfig):
        self.objective, self.clip_range = config.objective, config.grpo_clip
        self.terms, self.kl, self.optimality = TermStats(), [], []

    def add(self, likelihood_current, likelihood_old, kl, optimality=None) -> None:
        self.terms = self.terms.merge(TermStats.of(likelihood_current.detach(), likelihood_old, self.clip_range))
        if kl is not None:  # computed only when it is in the loss (kl_beta > 0): it costs a reference forward
            self.kl.append(kl.detach())
        if optimality is not None:
            self.optimality.append(optimality)

    def gather(self, processes: Processes) -> None:
        """Makes these the statistics over every process's terms (with one process they already are)."""
        if processes.world == 1:
            return
        shares = processes.gather_objects((self.terms, [k.cpu() for k in self.kl],
                                           [o.cpu() for o in self.optimality]))
        self.terms, self.kl, self.optimality = TermStats(), [], []
        for terms, kl, optimality in shares:
            self.terms = self.terms.merge(terms)
            self.kl += kl
            self.optimality += optimality

    def summary(self) -> dict:
        out = self.terms.summary(self.objective)
        if self.kl:
            out["kl"] = float(torch.cat(self.kl).mean())
        if self.optimality:  # nft: the mean optimality probability r of the terms
            out["nft_r_mean"] = float(torch.cat(self.optimality).mean())
        return out


def _elbo_term_losses(policy, config, batch, cond, null_cond, advantages, generator, stats: EpochStats):
    """ELBO terms (§2): the same x_t goes to current, old and reference; the objective is §3's, or nft (§6)."""
    x0, t = batch["x0"], batch["t"]
    x_t, eps = perturb(x0, t, generator)

    def velocity(which, guidance):
        return policy.velocity(which, x_t, t, cond, null_cond, guidance).float()

    with _autocast(policy, config.update_precision):
        with torch.no_grad():
            v_ref = velocity(REFERENCE, config.reference_guidance) if config.kl_beta else None
            v_old = velocity(OLD, config.guidance)
        v = velocity(CURRENT, config.train_guidance)
    kl = kl_to_reference(v, v_ref) if v_ref is not None else None
    elbo_current = elbo(v, x0, x_t, eps, t, config.weighting, config.train_guidance)
    elbo_old = elbo(v_old, x0, x_t, eps, t, config.weighting, config.guidance)
    if config.objective == "nft":
        optimality = nft_optimality(advantages)
        loss = nft_loss(v, v_old, x0, x_t, eps, t, optimality, config.nft_beta, config.weighting,
                        config.nft_loss_scale)
        stats.add(elbo_current, elbo_old, kl, optimality)
    else:
        loss = policy_loss(config.objective, elbo_current, elbo_old, advantages, config.grpo_clip)
        stats.add(elbo_current, elbo_old, kl)
    return loss if kl is None else loss + config.kl_beta * kl


def _trajectory_term_losses(policy, config, batch, cond, null_cond, advantages, stats: EpochStats):
    """Trajectory terms (§6): log-probs of the stored step x -> x_next under current, old and reference.

    flow_grpo compares against the log-probs stored at rollout (Flow-GRPO's PPO); the other objectives
    recompute θ_old's on the same step, as the ELBO terms do. The KL to the reference is the one between
    the two Gaussian steps (§6), for every objective on these terms.
    """
    x, x_next, t, t_next = batch["x"], batch["x_next"], batch["t"], batch["t_next"]

    def velocity(which, detach_null=False):
        return policy.velocity(which, x, t, cond, null_cond, config.guidance, detach_null)

    with torch.no_grad():
        v_ref = velocity(REFERENCE) if config.kl_beta else None
        if config.objective == "flow_grpo":
            log_prob_old = batch["stored_log_prob"]
        else:
            log_prob_old = trajectory_log_prob(velocity(OLD), x, x_next, t, t_next, config.sde_noise)
    v = velocity(CURRENT, detach_null=True)  # as Flow-GRPO trains: no gradient through the unconditional branch
    log_prob = trajectory_log_prob(v, x, x_next, t, t_next, config.sde_noise)
    loss = policy_loss(config.objective, log_prob, log_prob_old, advantages, config.grpo_clip)
    kl = kl_between_steps(v, v_ref, x, t, t_next, config.sde_noise) if v_ref is not None else None
    stats.add(log_prob, log_prob_old, kl)
    return loss if kl is None else loss + config.kl_beta * kl


def update(policy: Policy, optimizer, ro: Rollout, rewards: torch.Tensor, config: RLConfig, epoch: int,
           processes: Processes = SINGLE) -> dict:
    """One epoch of policy updates over all terms (§2, §6); K optimizer steps; then θ_old and EMA move.

    Several processes deal each step's micro-batches round-robin and sum their gradients before the step: the
    step is the one process's up to the order of floating-point sums, and every process takes it."""
    generator = epoch_generator(config.seed, epoch, 1)
    advantages = group_advantages(rewards, ro.group_ids, config.advantage, config.advantage_scale)
    per_sample, terms = epoch_terms(ro, config, generator)
    trajectory = config.estimator == "trajectory"
    prompts = [m["prompt"] for m in ro.metas]
    with torch.no_grad():
        cond = policy.backbone.encode_prompts(prompts)
        guidances = (config.guidance,) if trajectory else (config.guidance, config.train_guidance,
                                                           config.reference_guidance)
        guided = any(g != 1.0 for g in guidances)
        null_cond = policy.backbone.encode_prompts([""] * len(prompts)) if guided else None
    order = torch.randperm(len(terms["t"]), generator=generator)
    if config.drop_zero_advantage:
        order = order[advantages[order // per_sample] != 0]
    stats, grad_norms, nonfinite_steps = EpochStats(config), [], 0
    for step_in_epoch, chunk in enumerate(order.chunk(config.optimizer_steps_per_epoch)):
        if len(chunk) == 0:  # every sample dropped (drop_zero_advantage): no step, as Flow-GRPO
            continue
        optimizer.zero_grad(set_to_none=True)
        for index, ids in enumerate(chunk.split(config.micro_batch)):
            batch = {name: values[ids] for name, values in terms.items()}
            if not processes.owns_micro_batch(index):
                if not trajectory:
                    term_noise(batch["x0"], generator)  # the noise this micro-batch takes on its process
                continue
            samples = ids // per_sample
            sample_null = null_cond[samples] if guided else None
            if trajectory:
                losses = _trajectory_term_losses(policy, config, batch, cond[samples], sample_null,
                                                 advantages[samples], stats)
            else:
                losses = _elbo_term_losses(policy, config, batch, cond[samples], sample_null, advantages[samples],
                                           generator, stats)
            (losses.sum() / len(chunk)).backward()
        processes.sum_gradients(policy.trainable_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.grad_clip)
        if not torch.isfinite(grad_norm):  # the summed gradient is the same on every process: all skip together
            nonfinite_steps += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        grad_norms.append(float(grad_norm))
        optimizer.step()
        policy.update_ema(ema_decay(epoch * config.optimizer_steps_per_epoch + step_in_epoch, config.ema_decay))
    steps_taken = (epoch + 1) * config.optimizer_steps_per_epoch
    policy.soft_update_old(min(config.old_decay_rate * steps_taken, config.old_decay_max))
    stats.gather(processes)
    row = {**stats.summary(), "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
           "advantage_abs_mean": float(advantages.abs().mean()),
           "group_diversity": group_diversity(ro.x0, ro.group_ids), "nonfinite_steps": nonfinite_steps}
    if config.drop_zero_advantage:
        row["terms_trained"] = len(order)
    return row


def group_diversity(x0: torch.Tensor, group_ids: list[int]) -> float:
    """How far apart one prompt's samples lie: the root-mean-square difference between two samples of a group,
    averaged over pairs and groups. A reward-hacking monitor: a policy that found one image the reward likes
    draws it for every seed, and this falls towards 0 while the reward still rises."""
    flat, groups = x0.detach().float().flatten(1), torch.as_tensor(group_ids)
    per_group = []
    for group in groups.unique():
        members = flat[groups == group]
        if len(members) < 2:
            continue
        distances = torch.cdist(members, members, compute_mode="donot_use_mm_for_euclid_dist")
        per_group.append(distances.sum() / (len(members) * (len(members) - 1)))  # the diagonal is 0
    return float(torch.stack(per_group).mean()) / flat.shape[1] ** 0.5 if per_group else 0.0


def ema_decay(optimizer_step: int, max_decay: float) -> float:
    """The evaluation EMA's decay after optimizer step `optimizer_step` (0-based), §4: a warm-up
    (1 + s) / (10 + s) that lets the EMA follow θ closely at first, capped at `max_decay`."""
    return min((1 + optimizer_step) / (10 + optimizer_step), max_decay)


# --- the loop -------------------------------------------------------------------------------------
def make_optimizer(policy: Policy, config: RLConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, betas=(config.adam_beta1, 0.999),
                             weight_decay=config.weight_decay, eps=1e-8)


def reward_summary(rewards: torch.Tensor, metas: list[dict]) -> dict:
    out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(correction=0))}
    tags = np.array([m.get("tag", "all") for m in metas])
    for tag in sorted(set(tags)):
        out[f"reward/{tag}"] = float(rewards[torch.from_numpy(tags == tag)].mean())
    return out
