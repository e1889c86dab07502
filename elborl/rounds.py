"""Training as rounds of stages: rollout -> score -> update, each publishing one artifact (METHOD.md §2-§4).

RL is a loop; DVC and container schedulers run DAGs. A run is therefore a sequence of rounds r = 0, 1, ...
Round r samples from the policy that round r-1's update left, and publishes under the run's prefix

    <run>/run.json                    the settings the run was started with (later stages must match)
    <run>/round-00003/rollout/        images/*.png, samples.safetensors (x0; with the trajectory estimator
                                      also the SDE trajectory and its per-step log-probs), samples.jsonl
                                      (prompt, group, seed and sampler settings: enough to regenerate every sample)
    <run>/round-00003/score/          rewards.json (one reward per sample, per-task means, per-reward means)
    <run>/round-00003/update/         policy/optimizer/rng safetensors, state.json, metrics.json

through `elborl.store` (manifest last), so a run resumes at the first round without a published update,
and a stage whose artifact is already published is skipped. Each stage calls the same functions as the
one-process loop (`elborl.rl`), with the same per-round random streams, so N rounds here give exactly the
weights and metrics of N epochs of `rl.train`.
"""

from dataclasses import asdict
from pathlib import Path
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from elborl.checkpoint import read_state, write_state
from elborl.geneval.prompts import read_jsonl
from elborl.models import load_backbone
from elborl.policy import Policy
from elborl.rl import Rollout, choose_prompts, make_optimizer, reward_summary, rollout, score_means, update
from elborl.runtime import place, precision_choice, resolve_device
from elborl.store import ArtifactStore

STAGES = ("rollout", "score", "update")


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def round_uri(run: str, round_index: int, stage: str) -> str:
    return join(run, f"round-{round_index:05d}", stage)


class RunContext:
    """Where a run lives and what it needs: settings, the base model, training prompts, a local cache.

    Artifacts at local paths are read in place; `s3://` artifacts are fetched once into `cache` (verified
    against their manifests) and reused by later stages of the same process or machine.
    """

    def __init__(self, run: str, params, base_model: str | None = None, prompts: str | None = None,
                 store: ArtifactStore | None = None, cache: str | Path | None = None, log=print):
        self.run, self.params, self.base_model, self.prompts = str(run), params, base_model, prompts
        self.store = store or ArtifactStore()
        self.cache = Path(cache or Path(tempfile.gettempdir()) / "elborl-cache")
        self.log = log
        self._policy, self._initial_state = None, None

    # --- artifacts ---------------------------------------------------------------------------------
    def local(self, uri: str) -> Path:
        """A published artifact as a local directory (s3:// ones cached by manifest digest)."""
        return self.store.local_artifact(uri, self.cache)

    def check_settings(self) -> None:
        """The run's settings are fixed at its first stage; a stage under other settings would mix runs."""
        settings = json.loads(json.dumps({"policy": asdict(self.params.policy), "rl": asdict(self.params.rl)}))
        uri = join(self.run, "run.json")
        try:
            recorded = self.store.read_json(uri)
        except FileNotFoundError:
            self.store.write_json(uri, settings)
            return
        if recorded != settings:
            changed = sorted(f"{group}.{key}" for group in settings for key in settings[group]
                             if recorded.get(group, {}).get(key) != settings[group][key])
            raise ValueError(f"run {self.run} was started with other settings (changed: {', '.join(changed)}); "
                             "start a new run prefix for new settings")

    # --- the policy --------------------------------------------------------------------------------
    def policy_after(self, round_index: int) -> tuple[Policy, torch.optim.Optimizer]:
        """The policy and optimizer as round `round_index`'s update left them (-1: the initial policy).

        One policy is built per process (adapters attach to the backbone once) and its state is reloaded.
        """
        if self._policy is None:
            if self.base_model is None:
                raise ValueError("this stage needs the base model (--base-model)")
            backbone = place(load_backbone(self.local(self.base_model)), self.params.runtime)
            self._policy = Policy(backbone, self.params.policy)
            self._initial_state = self._policy.state_dict()
        optimizer = make_optimizer(self._policy, self.params.rl)
        if round_index >= 0:
            read_state(self.local(round_uri(self.run, round_index, "update")), self._policy, optimizer)
        else:
            self._policy.load_state_dict(self._initial_state)
        return self._policy, optimizer

    def device_type(self) -> str:
        """Where this run's model runs ("cpu", "cuda")."""
        return resolve_device(self.params.runtime.device).type

    def completed_rounds(self) -> int:
        """The number of rounds with a published update: where the run resumes."""
        done = 0
        while self.store.exists(round_uri(self.run, done, "update")):
            done += 1
        return done


# --- the three stages ----------------------------------------------------------------------------------
def rollout_stage(ctx: RunContext, round_index: int) -> str:
    """G images per prompt from θ_old of the previous round, with everything needed to regenerate them."""
    out = round_uri(ctx.run, round_index, "rollout")

    def write(directory: Path) -> dict:
        ctx.check_settings()
        if ctx.prompts is None:
            raise ValueError("the rollout stage needs the training prompts (--prompts)")
        start = time.perf_counter()
        policy, _ = ctx.policy_after(round_index - 1)
        train_metas = read_jsonl(ctx.local(ctx.prompts) / "train.jsonl")
        ro = rollout(policy, choose_prompts(train_metas, ctx.params.rl, round_index), ctx.params.rl, round_index)
        images = policy.backbone.to_images(ro.x0)
        seconds = time.perf_counter() - start
        save_file(_sample_tensors(ro), directory / "samples.safetensors")
        with open(directory / "samples.jsonl", "w") as f:
            for meta, record in zip(ro.metas, ro.records()):
                f.write(json.dumps({**meta, **record}) + "\n")
        (directory / "images").mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(directory / "images" / f"{i:05d}.png")
        return {"seconds": seconds}

    ctx.store.publish(out, write, {"round": round_index, "stage": "rollout"}, log=ctx.log)
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


def read_images(directory: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(directory / "images" / f"{i:05d}.png").convert("RGB")) for i in range(n)])


def score_stage(ctx: RunContext, round_index: int, reward_fn) -> str:
    """Rewards for the round's images; needs only the rollout artifact (not the diffusion model)."""
    out = round_uri(ctx.run, round_index, "score")

    def write(directory: Path) -> dict:
        rollout_dir = ctx.local(round_uri(ctx.run, round_index, "rollout"))
        ro, rows = _read_rollout(rollout_dir)
        start = time.perf_counter()
        rewards = torch.as_tensor(reward_fn(read_images(rollout_dir, len(rows)), ro.metas), dtype=torch.float32)
        seconds = time.perf_counter() - start
        (directory / "rewards.json").write_text(json.dumps(
            {"rewards": rewards.tolist(), **reward_summary(rewards, ro.metas), **score_means(reward_fn)}))
        return {"seconds": seconds}

    ctx.store.publish(out, write, {"round": round_index, "stage": "score"}, log=ctx.log)
    return out


def update_stage(ctx: RunContext, round_index: int) -> str:
    """One epoch of policy updates on the round's samples and rewards; publishes the new policy state."""
    out = round_uri(ctx.run, round_index, "update")

    def write(directory: Path) -> dict:
        ctx.check_settings()
        ro, _ = _read_rollout(ctx.local(round_uri(ctx.run, round_index, "rollout")))
        scores = json.loads((ctx.local(round_uri(ctx.run, round_index, "score")) / "rewards.json").read_text())
        rewards = torch.tensor(scores["rewards"], dtype=torch.float32)
        policy, optimizer = ctx.policy_after(round_index - 1)
        start = time.perf_counter()
        metrics = {"epoch": round_index, **reward_summary(rewards, ro.metas),
                   **{k: v for k, v in scores.items() if k.startswith("score/")},
                   **update(policy, optimizer, ro, rewards, ctx.params.rl, round_index)}
        seconds = time.perf_counter() - start
        write_state(directory, policy, optimizer, {"epoch": round_index + 1})
        metrics["seconds_update"] = seconds
        (directory / "metrics.json").write_text(json.dumps(metrics))
        # the metrics ride in the manifest too, so curves need no download of policy states
        return {"seconds": seconds, "metrics": metrics}

    ctx.store.publish(out, write, {"round": round_index, "stage": "update"}, log=ctx.log)
    return out


# --- a whole run in one process --------------------------------------------------------------------------
def run_rounds(ctx: RunContext, reward_fn, rounds: int | None = None, progress: bool = True) -> int:
    """Rounds from the first incomplete one up to `rounds` (default: rl.epochs); returns rounds completed."""
    from tqdm.auto import tqdm

    total = rounds if rounds is not None else ctx.params.rl.epochs
    start = ctx.completed_rounds()
    rl = ctx.params.rl
    ctx.log(precision_choice(rl.rollout_precision, rl.update_precision, ctx.device_type()))
    if start:
        ctx.log(f"{ctx.run}: {start} round(s) already published, resuming at round {start}")
    for r in tqdm(range(start, total), initial=start, total=total, desc="rounds", disable=not progress):
        rollout_stage(ctx, r)
        score_stage(ctx, r, reward_fn)
        update_stage(ctx, r)
    return max(start, total)


def round_metrics(ctx: RunContext) -> list[dict]:
    """Every completed round's training metrics (reward, δ, KL, grad norm, seconds), in round order."""
    return [ctx.store.read_manifest(round_uri(ctx.run, r, "update"))["meta"]["metrics"]
            for r in range(ctx.completed_rounds())]
