"""Training as rounds of stages: rollout -> score -> update, each publishing one artifact (METHOD.md §2-§4).

RL is a loop; DVC and container schedulers run DAGs. A run is therefore a sequence of rounds r = 0, 1, ...
Round r samples from the policy that round r-1's update left, and publishes under the run's prefix

    <run>/run.json                    the run's identity: the settings it was started with (later stages must match)
    <run>/round-00003/rollout/        images/*.png, samples.safetensors (x0; with the trajectory estimator
                                      also the SDE trajectory and its per-step log-probs), samples.jsonl
                                      (prompt, group, seed and sampler settings: enough to regenerate every sample)
    <run>/round-00003/score/          rewards.json (one reward per sample, per-task means, per-reward means)
    <run>/round-00003/update/         policy/optimizer/rng safetensors, state.json, metrics.json
    <run>/evals/00004/                held-out evaluation of the EMA policy after 4 rounds (scores, grid)

through `elborl.store` (manifest last), so a run resumes at the first round without a published update,
and a stage whose artifact is already published is skipped. This is the only kind of training run: the stages
run it one artifact at a time (DVC, Prefect, containers), `run_rounds` runs it in one process (the main job,
the benchmarks), and both publish the same artifacts with the same per-round random streams, so a run started
one way can be resumed the other.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
import json
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from elborl.checkpoint import read_state, write_state
from elborl.config import default_settings, settings_differences
from elborl.distributed import Processes
from elborl.evaluate import write_evaluation
from elborl.geneval.prompts import read_jsonl
from elborl.models import load_backbone
from elborl.policy import Policy
from elborl.rl import Rollout, choose_prompts, make_optimizer, reward_summary, rollout, update
from elborl.runtime import precision_choice, resolve_device
from elborl.store import ArtifactStore, cache_root

STAGES = ("rollout", "score", "update")


RUN_FILE = "run.json"


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def round_uri(run: str, round_index: int, stage: str) -> str:
    return join(run, f"round-{round_index:05d}", stage)


def evaluation_uri(run: str, rounds_done: int) -> str:
    """The held-out evaluation of the EMA policy after `rounds_done` rounds (0: the initial policy)."""
    return join(run, "evals", f"{rounds_done:05d}")


class RunContext:
    """Where a run lives and what it needs: settings, the base model, training prompts, a local cache.

    The base model and the training prompts are artifact URIs (`base_model`, `prompts`: a stage in its own
    process or container) or objects already in memory (`backbone`, `train_metas`: a run in one process).
    Artifacts at local paths are read in place; `s3://` artifacts are fetched once into the cache root `cache`
    (default: `elborl.store.cache_root()`, verified against their manifests) and reused by later stages of the
    same process or machine. `processes`: the
    job's processes when it runs data parallel (elborl/distributed.py; default: what the launcher set up).
    `log` takes the run's messages; `artifact_log` the line per artifact published or skipped (default: `log`).
    `identity`: what else defines the run besides its policy and RL settings (base model, prompts, rewards,
    evaluation, a benchmark's budget), recorded with them in run.json.
    """

    def __init__(self, run: str, params, base_model: str | None = None, prompts: str | None = None,
                 store: ArtifactStore | None = None, cache: str | Path | None = None, log=print,
                 backbone=None, train_metas: list[dict] | None = None, processes: Processes | None = None,
                 artifact_log=None, identity: dict | None = None):
        self.run, self.params, self.base_model, self.prompts = str(run), params, base_model, prompts
        self.identity = identity or {}
        self.store = store or ArtifactStore()
        self.cache = cache_root(cache)
        self.processes = processes or Processes.from_environment()
        self.log = log if self.processes.is_main else (lambda *_: None)
        self.artifact_log = artifact_log if artifact_log and self.processes.is_main else self.log
        self._backbone, self._train_metas = backbone, train_metas
        self._policy, self._initial_state = None, None
        # (round, optimizer, torch RNG state) the policy in memory holds: consecutive stages in one process
        # continue from it instead of reading back the state the previous stage just published
        self._held: tuple[int, torch.optim.Optimizer, torch.Tensor] | None = None

    # --- artifacts ---------------------------------------------------------------------------------
    def publish(self, uri: str, write, meta: dict, everyone: bool = True) -> None:
        """`write`'s artifact published at `uri` unless it already is, once among the job's processes
        (`Processes.publish`)."""
        self.processes.publish(self.store, uri, write, meta, self.artifact_log, everyone)

    def local(self, uri: str) -> Path:
        """A published artifact as a local directory (s3:// ones cached by manifest digest)."""
        return self.store.local_artifact(uri, self.cache)

    def settings(self) -> dict:
        """The run's identity as plain JSON values: its policy and RL settings and the caller's `identity`."""
        return json.loads(json.dumps({"policy": asdict(self.params.policy), "rl": asdict(self.params.rl),
                                      **self.identity}))

    def check_settings(self) -> None:
        """Records the run's identity in run.json at its start; later stages and resumptions must match it (a stage
        under other settings would mix two runs). Only what both know is compared: a stage that gives no
        `identity` checks the policy and RL settings, and groups the record lacks are added to it."""
        if not self.processes.is_main:
            return
        settings = self.settings()
        uri = join(self.run, RUN_FILE)
        try:
            recorded = self.store.read_json(uri)
        except FileNotFoundError:
            self.store.write_json(uri, settings)
            return
        shared = [group for group in settings if group in recorded]
        changed = settings_differences({g: recorded[g] for g in shared}, {g: settings[g] for g in shared},
                                       defaults=default_settings())
        if changed:
            raise ValueError(f"run {self.run} was started with other settings (changed: {', '.join(changed)}); "
                             "start a new run prefix for new settings")
        if len(shared) < len(settings):
            self.store.write_json(uri, {**recorded, **settings})

    def train_metas(self) -> list[dict]:
        if self._train_metas is None:
            if self.prompts is None:
                raise ValueError("the rollout stage needs the training prompts (--prompts)")
            self._train_metas = read_jsonl(self.local(self.prompts) / "train.jsonl")
        return self._train_metas

    # --- the policy --------------------------------------------------------------------------------
    def policy_after(self, round_index: int) -> tuple[Policy, torch.optim.Optimizer]:
        """The policy and optimizer as round `round_index`'s update left them (-1: the initial policy).

        One policy is built per process (adapters attach to the backbone once); its state, the optimizer's
        and the torch RNG's are those the round's update published, read back unless already in memory.
        """
        if self._policy is None:
            self._policy = Policy(self._load_backbone(), self.params.policy)
            self._initial_state = self._policy.state_dict()
        if self._held is not None and self._held[0] == round_index:
            _, optimizer, rng = self._held
            torch.set_rng_state(rng)
            return self._policy, optimizer
        optimizer = make_optimizer(self._policy, self.params.rl)
        if round_index >= 0:
            read_state(self.local(round_uri(self.run, round_index, "update")), self._policy, optimizer)
        else:
            self._policy.load_state_dict(self._initial_state)
            # torch seeds its global generator from the OS in every process; the run's own draws come from
            # generators of (seed, epoch), and whatever else draws starts from the settings too, so the RNG state
            # each update publishes is the same wherever the round ran
            torch.manual_seed(self.params.rl.seed)
        self._held = (round_index, optimizer, torch.get_rng_state())
        return self._policy, optimizer

    def _load_backbone(self):
        if self._backbone is not None:
            return self._backbone
        if self.base_model is None:
            raise ValueError("this stage needs the base model (--base-model)")
        return load_backbone(self.local(self.base_model), self.params.runtime)

    def forget_held_state(self) -> None:
        self._held = None

    def hold(self, round_index: int, optimizer) -> None:
        """The policy in memory now holds the state round `round_index`'s update is publishing."""
        self._held = (round_index, optimizer, torch.get_rng_state())

    def device_type(self) -> str:
        """Where this run's model runs ("cpu", "cuda")."""
        return resolve_device(self.params.runtime.device).type

    def completed_rounds(self) -> int:
        """The number of rounds with a published update: where the run resumes."""
        done = 0
        while self.store.exists(round_uri(self.run, done, "update")):
            done += 1
        return done

    def round_row(self, round_index: int) -> dict:
        """A published round's training metrics (reward, δ, KL, grad norm) and the seconds each stage took
        (rollout, reward, update), from the stages' manifests."""
        seconds = {f"seconds_{name}": self.store.read_manifest(round_uri(self.run, round_index, stage))["meta"]["seconds"]
                   for name, stage in (("rollout", "rollout"), ("reward", "score"))}
        update = self.store.read_manifest(round_uri(self.run, round_index, "update"))["meta"]
        return {**update["metrics"], **seconds, "seconds_update": update["seconds"]}


# --- the three stages ----------------------------------------------------------------------------------
def rollout_stage(ctx: RunContext, round_index: int) -> str:
    """G images per prompt from θ_old of the previous round, with everything needed to regenerate them."""
    out = round_uri(ctx.run, round_index, "rollout")

    def write(directory: Path) -> dict:
        ctx.check_settings()
        train_metas = ctx.train_metas()
        start = time.perf_counter()
        policy, _ = ctx.policy_after(round_index - 1)
        ro = rollout(policy, choose_prompts(train_metas, ctx.params.rl, round_index), ctx.params.rl, round_index,
                     ctx.processes)
        images = policy.backbone.to_images(ro.x0)
        seconds = time.perf_counter() - start
        if not ctx.processes.is_main:
            return {}
        save_file(_sample_tensors(ro), directory / "samples.safetensors")
        with open(directory / "samples.jsonl", "w") as f:
            for meta, record in zip(ro.metas, ro.records()):
                f.write(json.dumps({**meta, **record}) + "\n")
        (directory / "images").mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(directory / "images" / f"{i:05d}.png")
        return {"seconds": seconds}

    ctx.publish(out, write, {"round": round_index, "stage": "rollout"})
    return out


SAMPLER_KEYS = ("sampler", "steps", "shift", "guidance", "sde_noise", "precision")


def _sample_tensors(ro: Rollout) -> dict:
    """What samples.safetensors holds: x0, and the SDE trajectory with its rollout log-probs when kept."""
    tensors = {"x0": ro.x0, "trajectory": ro.trajectory, "old_log_probs": ro.old_log_probs}
    return {name: value.contiguous() for name, value in tensors.items() if value is not None}


def _read_rollout(directory: Path) -> tuple[Rollout, list[dict]]:
    rows = [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines() if line]
    sampler = {k: rows[0][k] for k in SAMPLER_KEYS if k in rows[0]} if rows else {}
    tensors = load_file(directory / "samples.safetensors")
    return Rollout(rows, [r["group"] for r in rows], [r["seed"] for r in rows], tensors["x0"], sampler,
                   tensors.get("trajectory"), tensors.get("old_log_probs")), rows


def read_images(directory: Path, n: int, share: slice = slice(None)) -> np.ndarray:
    """The rollout's `n` images (or the `share` of them one process scores): RGB, all of one size."""
    images, first = [], None
    for i in range(n)[share]:
        name = f"images/{i:05d}.png"
        with Image.open(directory / name) as image:
            shape = (image.mode, image.size)
            first = first or (name, shape)
            if image.mode != "RGB" or shape != first[1]:
                raise ValueError(f"{directory}/{name} is {image.size[0]}x{image.size[1]} {image.mode}; the rollout's "
                                 f"images are RGB and of one size ({first[0]}: {first[1][1][0]}x{first[1][1][1]} "
                                 f"{first[1][0]})")
            images.append(np.asarray(image))
    return np.stack(images)


def score_stage(ctx: RunContext, round_index: int, reward_fn) -> str:
    """Rewards for the round's images; needs only the rollout artifact (not the diffusion model)."""
    out = round_uri(ctx.run, round_index, "score")

    def write(directory: Path) -> dict:
        rollout_dir = ctx.local(round_uri(ctx.run, round_index, "rollout"))
        ro, rows = _read_rollout(rollout_dir)
        groups = len(set(ro.group_ids))
        mine = ctx.processes.sample_share(groups, len(rows) // groups)
        start = time.perf_counter()
        own_rewards = reward_fn(read_images(rollout_dir, len(rows), mine), ro.metas[mine])
        rewards = ctx.processes.gather(torch.as_tensor(own_rewards, dtype=torch.float32))
        scores = _gathered_scores(ctx.processes, getattr(reward_fn, "last_scores", {}))
        seconds = time.perf_counter() - start
        (directory / "rewards.json").write_text(json.dumps(
            {"rewards": rewards.tolist(), **reward_summary(rewards, ro.metas),
             **{f"score/{name}": float(np.mean(values)) for name, values in scores.items()}}))
        return {"seconds": seconds}

    ctx.publish(out, write, {"round": round_index, "stage": "score"})
    return out


def _gathered_scores(processes: Processes, scores: dict) -> dict[str, list[float]]:
    """Each reward's scores (a MultiReward's `last_scores`) over every process's samples, in sample order."""
    merged: dict[str, list[float]] = {}
    for share in processes.gather_objects({name: [float(v) for v in values] for name, values in scores.items()}):
        for name, values in share.items():
            merged.setdefault(name, []).extend(values)
    return merged


def update_stage(ctx: RunContext, round_index: int) -> str:
    """One epoch of policy updates on the round's samples and rewards; publishes the new policy state."""
    out = round_uri(ctx.run, round_index, "update")

    def write(directory: Path) -> dict:
        ctx.check_settings()
        ro, _ = _read_rollout(ctx.local(round_uri(ctx.run, round_index, "rollout")))
        scores = json.loads((ctx.local(round_uri(ctx.run, round_index, "score")) / "rewards.json").read_text())
        rewards = torch.tensor(scores["rewards"], dtype=torch.float32)
        policy, optimizer = ctx.policy_after(round_index - 1)
        ctx.forget_held_state()  # the update changes the policy in memory: it holds no published round until written
        start = time.perf_counter()
        metrics = {"epoch": round_index, **reward_summary(rewards, ro.metas),
                   **{k: v for k, v in scores.items() if k.startswith("score/")},
                   **update(policy, optimizer, ro, rewards, ctx.params.rl, round_index, ctx.processes)}
        seconds = time.perf_counter() - start
        check_finite_training(ctx, round_index, metrics, rewards)
        ctx.hold(round_index, optimizer)
        if not ctx.processes.is_main:
            return {}
        write_state(directory, policy, optimizer, {"epoch": round_index + 1})
        (directory / "metrics.json").write_text(json.dumps(metrics))
        # the metrics ride in the manifest too, so curves need no download of policy states
        return {"seconds": seconds, "metrics": metrics}

    ctx.publish(out, write, {"round": round_index, "stage": "update"})
    return out


class NonFiniteTrainingError(FloatingPointError):
    """More optimizer steps of a run had a NaN or infinite gradient than rl.max_nonfinite_steps allows."""


def check_finite_training(ctx: RunContext, round_index: int, metrics: dict, rewards: torch.Tensor) -> None:
    """Logs the steps this round skipped for a NaN/inf gradient, and stops the run, before the round is published,
    once the run has skipped more than rl.max_nonfinite_steps, naming the rewards when they are the cause."""
    skipped = metrics["nonfinite_steps"]
    if skipped == 0:
        return
    bad_rewards = int((~torch.isfinite(rewards)).sum())
    cause = f"{bad_rewards} of {len(rewards)} rewards are NaN or infinite" if bad_rewards else \
        "the rewards are finite: the loss or its gradient overflowed"
    earlier = sum(ctx.store.read_manifest(round_uri(ctx.run, r, "update"))["meta"]["metrics"].get("nonfinite_steps", 0)
                  for r in range(round_index))
    limit = ctx.params.rl.max_nonfinite_steps
    ctx.log(f"round {round_index}: skipped {skipped} optimizer step(s) with a NaN or infinite gradient ({cause}); "
            f"{earlier + skipped} in the run, at most {limit} allowed (rl.max_nonfinite_steps)")
    if earlier + skipped > limit:
        last_good = f"round {round_index - 1}'s update" if round_index > 0 else "the initial policy"
        raise NonFiniteTrainingError(
            f"round {round_index} not published: {earlier + skipped} optimizer steps of this run had a NaN or infinite "
            f"gradient, over rl.max_nonfinite_steps = {limit} ({cause}); the run's latest state is {last_good}")


def evaluation_stage(ctx: RunContext, rounds_done: int, evaluate_fn, result: Callable[[], tuple] | None = None,
                     train_seconds: float | None = None) -> str:
    """Held-out evaluation of the EMA policy after `rounds_done` rounds: evaluate_fn(backbone) -> (summary,
    per-image records, images), published with write_evaluation's files; `result()`, when given, stands in
    for the evaluation (the base model's, which the caller already has)."""
    out = evaluation_uri(ctx.run, rounds_done)

    def write(directory: Path) -> dict:
        evaluation = result() if result else None
        if evaluation is None:
            policy, _ = ctx.policy_after(rounds_done - 1)
            with policy.ema_weights(), torch.no_grad():
                evaluation = evaluate_fn(policy.backbone)
        write_evaluation(directory, *evaluation)
        return {"summary": evaluation[0]}

    ctx.publish(out, write, {"rounds": rounds_done, "stage": "evaluate", "train_seconds": train_seconds},
                everyone=False)
    return out


# --- a whole run in one process --------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Held-out evaluations during a run: before the first round, every `every` rounds (0: never in between)
    and after the last; evaluate(backbone) -> (summary, records, images). `initial()`, when given, returns the
    evaluation before training (the base model's, when the caller has it; called only if not yet published)."""

    evaluate: Callable
    every: int = 0
    initial: Callable[[], tuple] | None = None


class RoundsProgress:
    """A rounds run's progress line: rounds against the total, or under a time budget training minutes against
    the budget (an ETA either way). run_rounds calls start, then round_done after every round, then close; the
    main job passes its own line (elborl.embedded.JobProgress) in its place."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def start(self, done: int, total: int, spent: float, max_train_seconds: float | None) -> None:
        from tqdm.auto import tqdm

        self.minutes = max_train_seconds is not None
        if not self.minutes:
            self.bar = tqdm(initial=done, total=total, desc="rounds", unit="round", disable=not self.enabled)
            return
        self.bar = tqdm(initial=min(spent, max_train_seconds) / 60, total=max_train_seconds / 60,
                        desc="training minutes", unit="min", disable=not self.enabled,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")

    def round_done(self, done: int, row: dict) -> None:
        _advance(self.bar, train_seconds(row) / 60 if self.minutes else 1)
        self.bar.set_postfix(round=done, reward=f"{row['reward_mean']:.3f}")

    def close(self) -> None:
        self.bar.close()


def run_rounds(ctx: RunContext, reward_fn, rounds: int | None = None, progress: bool | RoundsProgress = True,
               held_out: HeldOut | None = None, max_train_seconds: float | None = None) -> int:
    """Rounds from the first incomplete one up to `rounds` (default: rl.epochs), or until the training
    seconds (rollout + reward + update, summed over published rounds; evaluations excluded) reach
    `max_train_seconds`; returns the rounds completed. `progress`: draw the default line (True), none (False),
    or report to the RoundsProgress given."""
    rl = ctx.params.rl
    rl.validate()
    total = rounds if rounds is not None else rl.epochs
    start = ctx.completed_rounds()
    ctx.check_settings()
    ctx.log(precision_choice(rl.rollout_precision, rl.update_precision, ctx.device_type()))
    if start:
        ctx.log(f"{ctx.run}: {start} round(s) already published, resuming at round {start}")
    spent = sum(train_seconds(ctx.round_row(r)) for r in range(start))
    if held_out:
        evaluation_stage(ctx, 0, held_out.evaluate, held_out.initial, 0.0)
    done = start
    if not isinstance(progress, RoundsProgress) or not ctx.processes.is_main:
        progress = RoundsProgress(enabled=progress is True and ctx.processes.is_main)
    progress.start(start, total, spent, max_train_seconds)
    while done < total and (max_train_seconds is None or not done or spent < max_train_seconds):
        rollout_stage(ctx, done)
        score_stage(ctx, done, reward_fn)
        update_stage(ctx, done)
        row = ctx.round_row(done)
        spent, done = spent + train_seconds(row), done + 1
        progress.round_done(done, row)
        if held_out and held_out.every and done % held_out.every == 0:
            evaluation_stage(ctx, done, held_out.evaluate, train_seconds=spent)
    progress.close()
    if held_out:  # the run ends with its final policy evaluated (skipped when already published)
        evaluation_stage(ctx, done, held_out.evaluate, train_seconds=spent)
    return done


def _advance(bar, amount: float) -> None:
    """Moves the bar by `amount`, at most to its total: tqdm forgets a total that `n` passes by half a unit, and
    the minutes format then fails, which a last round of minutes (a large model) would do to a budgeted run."""
    bar.update(min(amount, bar.total - bar.n))


def train_seconds(row: dict) -> float:
    """A round's training seconds: rollout + reward + update (held-out evaluations are not training)."""
    return row["seconds_rollout"] + row["seconds_reward"] + row["seconds_update"]


def round_metrics(ctx: RunContext) -> list[dict]:
    """Every completed round's training metrics (reward, δ, KL, grad norm, seconds per stage and the training
    seconds summed up to the round's end), in round order."""
    rows, spent = [], 0.0
    for r in range(ctx.completed_rounds()):
        row = ctx.round_row(r)
        spent += train_seconds(row)
        rows.append({**row, "train_seconds": spent})
    return rows


def evaluations(ctx: RunContext) -> list[dict]:
    """The run's held-out evaluations in round order: rounds done ("epoch"), training seconds then, the summary."""
    rows = []
    for rounds_done in range(ctx.completed_rounds() + 1):
        uri = evaluation_uri(ctx.run, rounds_done)
        if ctx.store.exists(uri):
            meta = ctx.store.read_manifest(uri)["meta"]
            rows.append({"epoch": rounds_done, "train_seconds": meta["train_seconds"], **meta["summary"]})
    return rows
