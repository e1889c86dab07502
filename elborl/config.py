"""`params.yaml` → typed, validated settings. Unknown keys and bad values fail loudly, naming the key.

RL methods are presets: `recipes:` maps a method's name to its rl settings (METHOD.md §3-§6), and
`rl.recipe: NAME` lays that preset under the keys written in `rl:` (a key written there wins, so one
setting of a method can be varied, e.g. `-S rl.kl_beta=1e-3`). Every preset is validated on its own.
"""

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
import typing

import yaml

from elborl.evaluate import EvalConfig
from elborl.models.shapes_model import RESNET_TIME_SCALE_SHIFTS, ShapesModelConfig
from elborl.policy import FINETUNE_MODES, PolicyConfig
from elborl.geneval.types import TASKS
from elborl.pretrain import LR_SCHEDULES, TIME_SAMPLINGS, PretrainConfig
from elborl.rewards import RewardsConfig
from elborl.rl import RLConfig
from elborl.runtime import RuntimeConfig, device_present, resolve_device
from elborl.sampling import ODE_SAMPLERS


@dataclass
class PromptsConfig:
    train_per_task: int = 1000  # capped by what the world has left after removing the test prompts
    train_seed: int = 1
    coloured_variants: bool = False  # add the colour-named counting and position prompts (geneval/prompts.py)


@dataclass
class Params:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    base_model: ShapesModelConfig = field(default_factory=ShapesModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recipes: dict = field(default_factory=dict)  # name -> rl settings (already applied to `rl` by `rl.recipe`)
    eval_every: int = 10  # RL epochs between held-out evaluations of the EMA policy (0 = only at the end)
    artifacts: str = "artifacts"


class ParamsError(ValueError):
    pass


def _convert(value, kind, where: str):
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, typing.get_args(kind)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        key_kind, value_kind = typing.get_args(kind)
        return {_convert(k, key_kind, f"{where} (key {k!r})"): _convert(v, value_kind, f"{where}.{k}")
                for k, v in value.items()}
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise ParamsError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    values = {}
    for name, value in raw.items():
        kind, key = hints[name], f"{where}.{name}" if where else name
        values[name] = _build(kind, value, key) if is_dataclass(kind) else _convert(value, kind, key)
    return cls(**values)


def _check(params: Params) -> None:
    positive = {"prompts.train_per_task": params.prompts.train_per_task,"pretrain.steps": params.pretrain.steps, "pretrain.batch_size": params.pretrain.batch_size,
                "pretrain.threads": params.pretrain.threads,
                "pretrain.lr": params.pretrain.lr, "evaluate.steps": params.evaluate.steps,
                "evaluate.images_per_prompt": params.evaluate.images_per_prompt}
    for key, value in positive.items():
        if value <= 0:
            raise ParamsError(f"{key} must be > 0, got {value}")
    if params.pretrain.lr_schedule not in LR_SCHEDULES:
        raise ParamsError(f"pretrain.lr_schedule: unknown schedule {params.pretrain.lr_schedule!r}; expected one of {LR_SCHEDULES}")
    weights = params.pretrain.task_weights
    if set(weights) - set(TASKS) or any(w < 0 for w in weights.values()) or (weights and not any(
            weights.get(task, 1.0) > 0 for task in TASKS)):
        raise ParamsError(f"pretrain.task_weights: expected weights >= 0, not all 0, for tasks among {TASKS}; "
                          f"got {weights}")
    if not 0.0 <= params.pretrain.colour_captions <= 1.0:
        raise ParamsError(f"pretrain.colour_captions: expected a share in [0, 1], got {params.pretrain.colour_captions}")
    if params.pretrain.time_sampling not in TIME_SAMPLINGS:
        raise ParamsError(f"pretrain.time_sampling: unknown sampling {params.pretrain.time_sampling!r}; "
                          f"expected one of {TIME_SAMPLINGS}")
    if params.evaluate.sampler not in ODE_SAMPLERS:
        raise ParamsError(f"evaluate.sampler: unknown sampler {params.evaluate.sampler!r}; expected one of {ODE_SAMPLERS}")
    try:
        params.rl.validate()
        params.runtime.validate()
    except ValueError as error:
        raise ParamsError(str(error)) from None
    try:
        params.rewards.validate()
    except ValueError as error:
        raise ParamsError(str(error)) from None
    if params.policy.finetune not in FINETUNE_MODES:
        raise ParamsError(f"policy.finetune: unknown mode {params.policy.finetune!r}; expected one of {FINETUNE_MODES}")
    if params.eval_every < 0:
        raise ParamsError(f"eval_every must be >= 0, got {params.eval_every}")
    if params.base_model.resnet_time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
        raise ParamsError(f"base_model.resnet_time_scale_shift: expected one of {RESNET_TIME_SCALE_SHIFTS}, got "
                          f"{params.base_model.resnet_time_scale_shift!r}")
    if any(c % 32 for c in params.base_model.channels):
        raise ParamsError(f"base_model.channels must be multiples of 32 (group norm), got {params.base_model.channels}")


def _parse_recipes(raw) -> dict[str, dict]:
    """`recipes:` as {name: rl settings}; each preset must be a valid rl configuration by itself."""
    if not isinstance(raw, dict):
        raise ParamsError(f"recipes: expected a mapping of recipe names to rl settings, got {raw!r}")
    for name, settings in raw.items():
        where = f"recipes.{name}"
        if not isinstance(settings, dict):
            raise ParamsError(f"{where}: expected a mapping of rl settings, got {settings!r}")
        if "recipe" in settings:
            raise ParamsError(f"{where}: a recipe cannot name another recipe")
        try:
            _build(RLConfig, settings, where).validate()
        except ValueError as error:
            message = str(error)
            raise ParamsError(message if message.startswith(where) else f"{where}: {message}") from None
    return dict(raw)


def apply_recipe(rl: dict, recipes: dict[str, dict]) -> dict:
    """The rl settings with `rl.recipe`'s preset laid under them (no recipe or "": the settings unchanged)."""
    name = rl.get("recipe", "")
    if name == "":
        return rl
    if name not in recipes:
        raise ParamsError(f"rl.recipe: unknown recipe {name!r}; expected one of {sorted(recipes)}")
    return {**recipes[name], **rl}


def parse_params(raw: dict | None, source: str = "params") -> Params:
    try:
        raw = raw or {}
        recipes = {}
        if isinstance(raw, dict):
            raw = dict(raw)
            recipes = _parse_recipes(raw.pop("recipes", None) or {})
            if isinstance(raw.get("rl"), dict):
                raw["rl"] = apply_recipe(raw["rl"], recipes)
        params = _build(Params, raw, "")
        params.recipes = recipes
        _check(params)
        # `auto` precisions become what the run's device computes natively, so a run's recorded settings say what
        # ran; settings naming a GPU this machine lacks (read here, run elsewhere) keep `auto` until they run
        if device_present(params.runtime.device):
            params.rl = params.rl.with_precisions_for(resolve_device(params.runtime.device).type)
    except ParamsError as error:
        raise ParamsError(f"{source}: {error}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parameters file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))


def load_params_with_overrides(path: str | Path, overrides: list[str]) -> Params:
    """`params.yaml` with dotted `key=value` overrides (values read as YAML), e.g. `rl.lr=1e-3`."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    if raw is None and path.exists():
        raw = {}
    elif raw is None:
        raise FileNotFoundError(f"parameters file {path} not found")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"override {item!r}: expected key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return parse_params(raw, f"{path} with {overrides}" if overrides else str(path))
