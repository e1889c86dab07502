"""`params.yaml` → typed, validated settings. Unknown keys and bad values fail loudly, naming the key.

The schema is the section classes (`@section`, elborl/settings.py): PromptsConfig and Params here, the others
beside the code that reads them. It is the one source of each setting's type, default, range and description;
params.yaml lists the settings the embedded default runs with (tests/test_config.py keeps the two in agreement),
and docs/configuration.md is written from the schema: `python -m elborl.config --reference`.

RL methods are presets: `recipes:` maps a method's name to its rl settings (docs/method.md), and
`rl.recipe: NAME` lays that preset under the keys written in `rl:` (a key written there wins, so one
setting of a method can be varied, e.g. `-S rl.kl_beta=1e-3`). Every preset is validated on its own.
"""

from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any
import argparse
import re

import yaml
from pydantic import Field

from elborl.evaluate import EvalConfig
from elborl.models.shapes_model import ShapesModelConfig
from elborl.policy import PolicyConfig
from elborl.pretrain import PretrainConfig
from elborl.rewards import RewardsConfig
from elborl.rl import RLConfig
from elborl.runtime import RuntimeConfig, device_present, resolve_device
from elborl.settings import Bool, Int, Str, build, rules_of, section, type_name


@section("prompts")
class PromptsConfig:
    """The shapes world's training prompts (elborl/geneval/prompts.py). The held-out test prompts are fixed and
    never among them."""

    train_per_task: Annotated[Int, Field(gt=0, description=(
        "Training prompts per GenEval task, capped by what the world has left after removing the test prompts "
        "(single_object has none left)."
    ))] = 1000
    train_seed: Annotated[Int, Field(ge=0, description="The seed that picks the training prompts.")] = 1
    coloured_variants: Annotated[Bool, Field(description=(
        "Add the colour-named counting and position prompts (\"four red circles\"): the test set leaves counting 3 "
        "colour-free training prompts (none with \"four\") and position 12; with the variants the held-out score "
        "rose faster (docs/experiments/2026-12-03-coloured-training-variants.md)."
    ))] = True


@section("")
class Params:
    """Every setting of a run: one section per part of the job, and the keys of this top level."""

    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    base_model: ShapesModelConfig = field(default_factory=ShapesModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recipes: Annotated[dict[Str, dict[Str, Any]], Field(description=(
        "RL methods as presets: {name: rl settings}, each validated as an `rl:` section on its own; `rl.recipe` "
        "picks one (already laid under `rl` once the settings are loaded)."
    ))] = field(default_factory=dict)
    eval_every: Annotated[Int, Field(ge=0, description=(
        "RL epochs between held-out evaluations of the EMA policy, which also run before training and after the "
        "last epoch (0: only those)."
    ))] = 15
    artifacts: Annotated[Str, Field(description=(
        "The main job's directory: its prompts, base-model cache, RL run and evaluations (elborl/embedded.py)."
    ))] = "artifacts"


class ParamsError(ValueError):
    pass


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
            build(RLConfig, settings, where).validate()
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
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ParamsError(f"expected a mapping of settings, got {raw!r}")
        raw = dict(raw)
        recipes = _parse_recipes(raw.pop("recipes", None) or {})
        if isinstance(raw.get("rl"), dict):
            raw["rl"] = apply_recipe(raw["rl"], recipes)
        params = build(Params, raw)
        params.recipes = recipes
        params.rl.validate()  # the rules that tie settings together; each setting's own ran in `build`
        params.rewards.validate()
        # `auto` precisions become what the run's device computes natively, so a run's recorded settings say what
        # ran; settings naming a GPU this machine lacks (read here, run elsewhere) keep `auto` until they run
        if device_present(params.runtime.device):
            params.rl = params.rl.with_precisions_for(resolve_device(params.runtime.device).type)
    except ValueError as error:  # ParamsError, SettingsError, and the sections' validate()
        raise ParamsError(f"{source}: {error}") from None
    return params


def _read_params_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"parameters file {path} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return load_params_with_overrides(path, [])


def apply_override(raw: dict, item: str) -> None:
    """Sets one dotted `key=value` override (the value read as YAML) in the raw settings, in place."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ParamsError(f"override {item!r}: expected key=value, e.g. rl.lr=1e-3")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ParamsError(f"{key}: the value {value!r} is not valid YAML") from None
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # e.g. rl.lr.x=1: the override would descend into a value
            raise ParamsError(f"{key}: {'.'.join(parents[:depth + 1])} is a value, not a section")
    node[leaf] = parsed


def add_params_options(parser, default: str = "params.yaml") -> None:
    """--params and --set for the main job and the stages. They read the settings with
    load_params_with_overrides(args.params, args.set), as the benchmarks do, so --set means the same everywhere."""
    parser.add_argument("--params", default=default, help=f"settings file (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the params file (dotted key, value read as YAML), "
                        "e.g. --set rl.lr=1e-3 --set rl.epochs=5; repeatable")


def load_params_with_overrides(path: str | Path, overrides: list[str]) -> Params:
    """`params.yaml` with dotted `key=value` overrides (values read as YAML), e.g. `rl.lr=1e-3`."""
    path = Path(path)
    raw = _read_params_file(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of settings, got {raw!r}")
    for item in overrides:
        apply_override(raw, item)
    return parse_params(raw, f"{path} with {overrides}" if overrides else str(path))


# --- the configuration reference (docs/configuration.md) ------------------------------------------
PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def settings_differences(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts. A key `old` lacks (a setting added after
    it was recorded) matches when `new` holds its default: a new setting's default keeps what the code did."""
    defaults = defaults or {}
    differences = []
    for key in sorted(set(old) | set(new)):
        a, b, default = old.get(key), new.get(key), defaults.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += settings_differences(a, b, f"{prefix}{key}.", default if isinstance(default, dict) else {})
        elif key not in old and key in defaults and b == default:
            continue
        elif a != b:
            differences.append(f"{prefix}{key}")
    return differences


def default_settings() -> dict:
    """Every section's defaults as plain JSON values (what a setting added later compares against)."""
    from dataclasses import asdict
    import json

    return json.loads(json.dumps(asdict(Params())))


def _yaml(value) -> str:
    """A default as it is written in params.yaml."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("\n...").strip()


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, `docs/...` paths as links relative to docs/."""
    text = " ".join(text.split()).replace("|", "\\|")
    return re.sub(r"docs/([\w./-]+\.md)", r"[\1](\1)", text)


def _table(cls) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for f in fields(cls):
        info = cls.__pydantic_fields__[f.name]
        if type_name(info.annotation) == "section":
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        rows.append(f"| `{f.name}` | {type_name(info.annotation)} | `{_yaml(default)}` | "
                    f"{_cell('; '.join(rules_of(info)))} | {_cell(info.description or '')} |")
    return rows


def _schema_name(cls) -> str:
    module = "elborl.config" if cls.__module__ == "__main__" else cls.__module__  # python -m elborl.config
    return f"{module}.{cls.__qualname__}"


def reference(params_file: str | Path = PARAMS_FILE) -> str:
    """The configuration reference, every section and key with its type, default, range and description, written
    from the schema (and the presets of `recipes:` in `params_file`)."""
    lines = ["# Configuration reference", "",
             "<!-- Generated from the settings' schema by `python -m elborl.config --reference > "
             "docs/configuration.md`; tests/test_config.py fails when it is out of date. Edit the schema "
             "(the section classes named below), not this page. -->", "",
             "Settings are read from `params.yaml` (the embedded default's, every key written out) or another file "
             "given with `--params`; `--set KEY=VALUE` (the main job, the stages, the benchmarks) and "
             "`dvc exp run -S KEY=VALUE` override one setting. A key left out takes the default below. An unknown "
             "key or a value outside its range stops the job before any work, naming the key, e.g. "
             "`rl.lr: must be > 0, got -1`.", "",
             "Types are YAML's: an int is written without a dot, a float may be (`1e-3` and `0.001` alike), a list "
             "as `[a, b]` and a mapping as `{key: value}`.", "",
             "## Top level", "", f"Schema: `{_schema_name(Params)}`.", "", *_table(Params)]
    for f in fields(Params):
        cls = Params.__pydantic_fields__[f.name].annotation
        if type_name(cls) != "section":
            continue
        lines += ["", f"## `{f.name}`", "", _cell(cls.__doc__ or ""), "",
                  f"Schema: `{_schema_name(cls)}`.", "", *_table(cls)]
    recipes = (yaml.safe_load(Path(params_file).read_text()) or {}).get("recipes") or {}
    if recipes:
        lines += ["", "## The presets of `recipes:` in params.yaml", "",
                  "Each is a set of `rl:` settings, validated as such; `rl.recipe: NAME` lays it under the keys "
                  "written in `rl:`, which win. params.yaml picks `elbo`. Keys a preset leaves out take the "
                  "defaults above.", "", "| recipe | settings |", "|---|---|"]
        lines += [f"| `{name}` | " + ", ".join(f"`{key}: {_yaml(value)}`" for key, value in settings.items()) + " |"
                  for name, settings in recipes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elborl.config", description="The settings' schema.")
    parser.add_argument("--reference", action="store_true",
                        help="print the configuration reference (docs/configuration.md) to stdout")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the file whose recipes the reference lists")
    parser.add_argument("--check", metavar="FILE", help="load FILE and say whether its settings are valid")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference(args.params), end="")
    elif args.check:
        try:
            load_params(args.check)
        except (FileNotFoundError, ParamsError) as error:
            parser.exit(1, f"{error}\n")
        print(f"{args.check}: valid")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
