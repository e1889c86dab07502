"""Rewards: callables (images uint8 N x H x W x 3, prompt metadata list[dict]) -> float32 (N,), by name.

`REWARDS` maps a name to a factory(**kwargs); `make_reward(name, **kwargs)` builds one. Factories import
their modules lazily, so importing this package stays light (numpy only).

| name                   | module           | kwargs (main ones)                                   |
|------------------------|------------------|------------------------------------------------------|
| shapes_geneval         | geneval          | -                                                    |
| shapes_geneval_strict  | geneval          | - (GenEval's strict verdict: 1 correct, 0 not)       |
| geneval                | geneval          | Mask2Former GenEval reward's own                     |
| ocr                    | ocr              | min_confidence, threads                              |
| clipscore              | clip_family      | path, model_name                                     |
| pickscore              | clip_family      | path, processor_path                                 |
| hpsv2                  | clip_family      | path, model_name="ViT-H-14" (HPS v2.1 weights)       |
| aesthetic              | clip_family      | path | clip_path + head_path                         |
| jpeg_compressibility   | jpeg             | quality                                              |
| jpeg_incompressibility | jpeg             | quality                                              |

Several rewards at once: `MultiReward` (or `reward_from_params(params.rewards)`, the training reward of every
entry point) with per-reward weights w_i and one of two aggregations (`params.yaml`: `rewards: {aggregate, weights,
paths}`):

- weighted_sum: R = Σ w_i R_i per sample; the training loop's advantages are then taken of R as usual.
- advantages:   Σ w_i · z_i with z_i = (R_i − mean_group R_i) / std_batch(R_i), each reward normalised on its own
                (group = the images of one prompt; std = population std of the batch, floored at 1e-6), so no
                reward dominates by its scale. `__call__` returns these per-sample values (zero mean per group);
                the loop's own advantage mode then applies on top, unchanged: `recipe` gives
                advantage_scale · Σ w_i z_i, `std` renormalises the sum by its batch std and clips it. With
                these values, `reward_mean` in the training log is ≈ 0; per-reward means are in
                `last_scores`. Needs whole groups in one call (a rollout batch). `advantages(scores, group_ids,
                mode, scale, clip)` is the general form: Σ w_i · group_advantages(R_i) with explicit group ids.

A weight of 0 keeps a reward computed (in `last_scores`, logged by the training loop as `score/<name>`) but out
of training.
"""

import importlib
import math
from dataclasses import field, replace
from typing import Annotated

import numpy as np
from pydantic import Field

from elborl.settings import Float, OneOf, Rule, Str, section


# --- the registry ---------------------------------------------------------------------------------
def _lazy(target: str):
    """The factory `elborl.rewards.<module>:<function>`, imported on first call."""
    module, function = target.split(":")

    def factory(**kwargs):
        return getattr(importlib.import_module(f"elborl.rewards.{module}"), function)(**kwargs)

    factory.__name__ = factory.__qualname__ = function
    return factory


REWARDS = {name: _lazy(target) for name, target in {
    "shapes_geneval": "geneval:shapes_geneval_reward",
    "shapes_geneval_strict": "geneval:shapes_geneval_strict_reward",
    "geneval": "geneval:mask2former_geneval_reward",
    "ocr": "ocr:ocr_reward",
    "clipscore": "clip_family:clipscore_reward",
    "pickscore": "clip_family:pickscore_reward",
    "hpsv2": "clip_family:hpsv2_reward",
    "aesthetic": "clip_family:aesthetic_reward",
    "jpeg_compressibility": "jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "jpeg:jpeg_incompressibility",
}.items()}
# Rewards whose factory needs the location of model weights (rewards.paths.<name> in params.yaml).
NEEDS_PATH = ("clipscore", "pickscore", "hpsv2", "aesthetic")
AGGREGATES = ("weighted_sum", "advantages")


def check_reward_name(name: str, where: str = "reward") -> None:
    if name not in REWARDS:
        raise ValueError(f"{where}: unknown reward {name!r}; expected one of {sorted(REWARDS)}")


def make_reward(name: str, **kwargs):
    """The reward registered as `name`, built with the factory's kwargs."""
    check_reward_name(name)
    if name in NEEDS_PATH and kwargs.get("path") is None and not (name == "aesthetic" and kwargs.get("clip_path")):
        raise ValueError(f"reward {name!r} needs the location of its weights: path=<local dir or s3://...> "
                         f"(params.yaml: rewards.paths.{name})")
    return REWARDS[name](**kwargs)


# --- several rewards ------------------------------------------------------------------------------
def _registered(name: str) -> None:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)}")


def _some_training_reward(weights: dict) -> None:
    if not weights:
        raise ValueError("name at least one reward")
    if not any(weights.values()):
        raise ValueError("every weight is 0; at least one reward must train the policy")


RewardName = Annotated[Str, Rule("a registered reward (elborl/rewards/__init__.py)", _registered)]


@section("rewards")
class RewardsConfig:
    """Which rewards train the policy, their weights, and where their models live (docs/rewards.md)."""

    aggregate: Annotated[Str, OneOf(AGGREGATES, "aggregation"), Field(description=(
        "weighted_sum: R = Σ w_i R_i per sample; advantages: Σ w_i z_i, each reward normalised on its own "
        "(z_i: its group-centred value over its batch std), so no reward dominates by its scale."
    ))] = "weighted_sum"
    weights: Annotated[dict[RewardName, Annotated[Float, Field(allow_inf_nan=False)]],
                       Rule("not empty, not all 0", _some_training_reward), Field(description=(
        "{reward: weight} by registered name. A weight of 0 keeps a reward computed and logged (`score/<name>`) "
        "but out of training."
    ))] = field(default_factory=lambda: {"shapes_geneval": 1.0})
    paths: Annotated[dict[RewardName, Str], Field(description=(
        "{reward: where its model weights live}, a local path or an s3:// artifact, e.g. pickscore: "
        "s3://bucket/pickscore; needed by the rewards built on a model (clipscore, pickscore, hpsv2, aesthetic)."
    ))] = field(default_factory=dict)

    def validate(self) -> None:
        """The rule that ties weights to paths: a reward with a weight, even 0, is computed and needs its model
        (each setting's own rules are checked on construction)."""
        for name in self.weights:
            if name in NEEDS_PATH and not self.paths.get(name):
                raise ValueError(f"rewards.paths.{name}: reward {name!r} is weighted but the location of its "
                                 "model weights is not given (a local path or s3:// artifact)")


def prompt_groups(metas: list[dict]) -> list[int]:
    """Group ids from prompt metadata: images of the same prompt form one group."""
    ids: dict[str, int] = {}
    return [ids.setdefault(m["prompt"], len(ids)) for m in metas]


class MultiReward:
    """Weighted rewards by name, aggregated by weighted sum or by per-reward normalised advantages (module doc)."""

    def __init__(self, rewards: dict, weights: dict[str, float], aggregate: str = "weighted_sum"):
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregation {aggregate!r}; expected one of {AGGREGATES}")
        missing = sorted(set(weights) - set(rewards))
        if missing:
            raise ValueError(f"weights name rewards that were not given: {missing}")
        self.names = list(weights)
        self.rewards = {name: rewards[name] for name in self.names}
        self.weights = np.array([float(weights[n]) for n in self.names], dtype=np.float64)
        self.aggregate = aggregate
        self.last_scores: dict[str, np.ndarray] = {}

    def scores(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        """Each reward of each image: float32 (N, K), columns in `names` order (also kept in `last_scores`)."""
        columns = []
        for name in self.names:
            values = np.asarray(self.rewards[name](images, metas), dtype=np.float32).reshape(-1)
            if values.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned {values.shape[0]} values for {len(images)} images")
            columns.append(values)
        matrix = np.stack(columns, axis=1) if columns else np.zeros((len(images), 0), np.float32)
        self.last_scores = {name: matrix[:, i].copy() for i, name in enumerate(self.names)}
        return matrix

    def combine(self, scores: np.ndarray, group_ids=None) -> np.ndarray:
        """(N, K) rewards -> (N,) training values: Σ w_i R_i, or Σ w_i z_i for `advantages` (needs group_ids)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.aggregate == "weighted_sum":
            return (scores @ self.weights).astype(np.float32)
        if group_ids is None:
            raise ValueError("aggregate 'advantages' needs the group of every sample")
        return self.advantages(scores, group_ids, mode="std", clip=math.inf).numpy().astype(np.float32)

    def advantages(self, scores, group_ids, mode: str = "recipe", scale: float = 0.1, clip: float = 5.0):
        """Σ w_i · group_advantages(R_i, group_ids, mode, scale, clip): per-reward advantages, weighted, summed."""
        import torch

        from elborl.objectives import group_advantages

        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
        total = torch.zeros(scores.shape[0], dtype=torch.float32)
        for i, weight in enumerate(self.weights):
            total += float(weight) * group_advantages(scores[:, i], group_ids, mode, scale, clip)
        return total

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        return self.combine(self.scores(images, metas), prompt_groups(metas))

    def close(self) -> None:
        """Closes the rewards that hold connections (reward service clients)."""
        for reward in self.rewards.values():
            if hasattr(reward, "close"):
                reward.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def configured_reward(name: str, config: RewardsConfig):
    """The reward `name`, its model weights from `config.paths` (params.yaml rewards.paths.<name>) when given."""
    return make_reward(name, **({"path": config.paths[name]} if name in config.paths else {}))


def reward_from_params(config: RewardsConfig, url: str | None = None, only: str | None = None) -> MultiReward:
    """The MultiReward that params.yaml's `rewards:` section describes (each model from rewards.paths).

    only: this one reward alone at weight 1 instead of `config.weights` (a stage's --reward override).
    url: each reward is computed by the reward service at `url` (`RewardClient`, token from $ELBORL_REWARD_TOKEN)
    instead of in this process; weights and aggregation still apply here.
    """
    if only is not None:
        config = replace(config, weights={only: 1.0})
    config.validate()
    if url is not None:
        from elborl.rewards.service import RewardClient

        rewards = {name: RewardClient(url, name) for name in config.weights}
    else:
        rewards = {name: configured_reward(name, config) for name in config.weights}
    return MultiReward(rewards, config.weights, config.aggregate)
