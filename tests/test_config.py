import subprocess
import sys

import pytest

from elborl.config import ParamsError, load_params, parse_params
from elborl.geneval.types import TASKS


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
    ({"evaluate": {"steps": 0}}, "evaluate.steps must be > 0"),
    ({"pretrain": {"threads": 0}}, "pretrain.threads must be > 0"),
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
