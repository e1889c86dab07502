from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import yaml

from elborl.config import Params, ParamsError, load_params, load_params_with_overrides, parse_params, reference
from elborl.geneval.types import TASKS
from elborl.models.shapes_model import ShapesModelConfig
from elborl.policy import PolicyConfig
from elborl.pretrain import PretrainConfig, cache_key
from elborl.rl import RLConfig
from elborl.settings import SettingsError, build


def test_the_shipped_params_file_is_valid():
    params = load_params("params.yaml")
    assert params.rl.objective == "pepg" and params.rl.weighting == "adaptive" and params.rl.guidance == 1.0
    assert params.rl.recipe == "elbo" and set(params.recipes) == {"elbo", "flow_grpo", "nft"}


@pytest.mark.parametrize("raw, message", [
    ({"rl": {"objective": "ppo"}}, "rl.objective: unknown objective 'ppo'"),
    ({"rl": {"weighting": "snr"}}, "rl.weighting: unknown weighting 'snr'"),
    ({"rl": {"sampler": "ddim"}}, "rl.sampler: unknown sampler 'ddim'"),
    ({"rl": {"recipe": "ppo"}}, "rl.recipe: unknown recipe 'ppo'"),
    ({"rl": {"group_size": 1}}, "group_size"),
    ({"rl": {"elbo_min_time": 0.8, "elbo_max_time": 0.5}}, "need 0 <= min <= max <= 1"),
    ({"rl": {"elbo_min_time": 0.97, "elbo_max_time": 0.99}}, "rl.elbo_min_time 0.97 and rl.elbo_max_time 0.99 leave none"),
    ({"pretrain": {"stepz": 3}}, "unknown key(s) ['stepz']"),
    ({"pretrain": {"lr": "fast"}}, "pretrain.lr: expected float"),
    ({"evaluate": {"steps": 0}}, "evaluate.steps: must be > 0, got 0"),
    ({"pretrain": {"threads": 0}}, "pretrain.threads: must be > 0, got 0"),
    ({"rl": {"lr": -1}}, "rl.lr: must be > 0, got -1"),
    ({"rl": {"adam_beta1": 1}}, "rl.adam_beta1: must be in [0, 1), got 1"),
    ({"rl": {"epochs": 2.0}}, "rl.epochs: expected int, got 2.0"),
    ({"rl": {"drop_zero_advantage": "yes"}}, "rl.drop_zero_advantage: expected bool, got 'yes'"),
    ({"rl": {"task_weights": {"counting": -1}}}, "rl.task_weights.counting: must be >= 0, got -1"),
    ({"rl": {"bogus": 1, "lr": -1}}, "rl: unknown key(s) ['bogus']; expected some of ['adam_beta1', "),
    ({"rl": 5}, "rl: expected a mapping, got 5"),
    ({"eval_every": -1}, "eval_every: must be >= 0, got -1"),
    ({"evals_every": 1}, "top level: unknown key(s) ['evals_every']"),
    ({"base_model": {"channels": [32, "x"]}}, "base_model.channels[1]: expected int, got 'x'"),
    ({"recipes": {"mine": {"kl_beta": -1.0}}}, "recipes.mine.kl_beta: must be >= 0, got -1.0"),
    ({"policy": {"finetune": "adapters"}}, "policy.finetune: unknown mode"),
    ({"base_model": {"channels": [32, 48]}}, "multiples of 32"),
    ({"pretrain": {"time_sampling": "beta"}}, "pretrain.time_sampling: unknown sampling"),
    ({"pretrain": {"task_weights": {"colours": 2}}}, "pretrain.task_weights"),
    ({"pretrain": {"task_weights": {t: 0 for t in TASKS}}}, "not all 0"),
    ({"pretrain": {"colour_captions": 1.5}}, "pretrain.colour_captions"),
    ({"base_model": {"resnet_time_scale_shift": "film"}}, "base_model.resnet_time_scale_shift"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("rl: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.yaml")


def test_stage_cli_reports_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stages.evaluate", "--model", str(tmp_path / "nothing"),
                             "--prompts", "x.jsonl", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "no published artifact" in result.stderr and "nothing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- the schema

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def sections() -> dict:
    """{name: section class} of params.yaml."""
    return {f.name: f.type for f in fields(Params) if is_dataclass(f.type)}


def test_params_yaml_and_the_schema_defaults_agree():
    """params.yaml writes out the defaults: a key there never says something else than the schema. The recipes are
    presets, not defaults: `rl.recipe` picks one, and its keys differ from the defaults by design."""
    defaults = Params()
    for name, cls in sections().items():
        written = {k: v for k, v in SHIPPED[name].items() if not (name == "rl" and k == "recipe")}
        assert build(cls, written, name) == getattr(defaults, name), name
    assert RLConfig().recipe == "" and SHIPPED["rl"]["recipe"] in SHIPPED["recipes"]
    for name in ("eval_every", "artifacts"):
        assert SHIPPED[name] == getattr(defaults, name), name


def test_params_yaml_writes_out_every_setting():
    """Every setting of the schema appears in params.yaml (what DVC and `dvc exp run -S` see); the rl settings in
    `rl:` or, for those a method sets, in a preset."""
    assert set(SHIPPED) == {f.name for f in fields(Params)}
    for name, cls in sections().items():
        written = set(SHIPPED[name]) | (set().union(*SHIPPED["recipes"].values()) if name == "rl" else set())
        assert written == {f.name for f in fields(cls)}, (name, written ^ {f.name for f in fields(cls)})


def test_every_setting_is_documented():
    for cls in [Params, *sections().values()]:
        assert cls.__doc__, cls
        for name, info in cls.__pydantic_fields__.items():
            assert is_dataclass(info.annotation) or info.description, f"{cls.__name__}.{name}"


def test_the_configuration_reference_is_up_to_date():
    """docs/configuration.md is generated from the schema; regenerate it when this fails:
    python -m elborl.config --reference > docs/configuration.md"""
    generated = subprocess.run([sys.executable, "-m", "elborl.config", "--reference"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    assert generated == reference()
    assert (ROOT / "docs" / "configuration.md").read_text() == generated
    for name, cls in sections().items():
        assert f"## `{name}`" in generated
        assert all(f"| `{f.name}` |" in generated for f in fields(cls))


# recipe -> run key of params.yaml's settings with it, on a CPU without and with native bfloat16 (a new setting
# changes them on purpose: evaluate.scorer did)
RUN_KEYS = {
    False: {"elbo": "1b2ebb995e1a", "flow_grpo": "ebb5564635c2", "nft": "f0ff3dac3561", "''": "eeb1136b43d6"},
    True: {"elbo": "02622714aeb0", "flow_grpo": "ebb5564635c2", "nft": "bc2e0752a3be", "''": "eeb1136b43d6"},
}


@pytest.mark.parametrize("native_bfloat16", [False, True])
def test_the_shipped_settings_keep_their_cache_and_run_keys(monkeypatch, native_bfloat16):
    """The shipped base model is stored under its cache key, and runs under their run keys: the schema must read
    params.yaml into exactly the settings (keys, values, types) it did before."""
    from elborl.embedded import run_key

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    capabilities = {**torch.cpu.get_capabilities(), "avx512_bf16": native_bfloat16, "amx_bf16": native_bfloat16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    params = load_params(ROOT / "params.yaml")
    assert cache_key(params.base_model, params.pretrain) == "a62d18e5dc56"
    assert cache_key(ShapesModelConfig(), PretrainConfig()) == "a62d18e5dc56"  # the defaults are the shipped model
    for recipe, key in RUN_KEYS[native_bfloat16].items():
        settings = load_params_with_overrides(ROOT / "params.yaml", [f"rl.recipe={recipe}"])
        assert run_key(Path("a62d18e5dc56"), settings) == key, recipe


def test_sections_are_plain_dataclasses_validated_on_construction_replace_and_assignment():
    config = PretrainConfig(steps=3, batch_size=4, threads=1)
    assert is_dataclass(config) and [f.name for f in fields(config)][:2] == ["steps", "batch_size"]
    assert asdict(config)["lr"] == 1e-3 and type(asdict(PretrainConfig(lr=1))["lr"]) is float
    assert replace(config, steps=5).steps == 5 and config.steps == 3
    assert config == PretrainConfig(steps=3, batch_size=4, threads=1) != PretrainConfig()
    assert asdict(Params())["rl"]["lr"] == RLConfig().lr
    with pytest.raises(SettingsError, match=r"^pretrain.steps: must be > 0, got 0$"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"^rl.lr: must be > 0, got -1.0$"):
        replace(RLConfig(), lr=-1.0)
    with pytest.raises(ValueError, match=r"^rl.objective: unknown objective 'ppo'"):
        RLConfig().objective = "ppo"
    with pytest.raises(ValueError, match=r"^policy: unknown key\(s\) \['rank'\]; expected some of \['finetune', "):
        PolicyConfig(rank=4)
    with pytest.raises(ValueError, match=r"^rl.sde_noise: must be >= 0, got -0.5"):
        Params(rl={"sde_noise": -0.5})
    rl = RLConfig(objective="flow_grpo")  # combinations are checked by validate(), when settings load
    with pytest.raises(ValueError, match="rl.objective: flow_grpo clips per-step SDE log-prob ratios"):
        rl.validate()
