"""The installed `elborl` command: its subcommands are the modules' own parsers and mains, and --set overrides
reach the settings (or fail in one line naming the key). Runs the console script pip installed next to this
interpreter, so a broken [project.scripts] entry fails here too."""

from collections import Counter
from pathlib import Path
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from elborl.cli import COMMANDS
from elborl.config import ParamsError, load_params_with_overrides
from test_embedded_job import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
ELBORL = Path(sys.executable).parent / "elborl"
# one thread (the CPU is shared) and a fixed terminal width (argparse wraps help to it)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}


def run(argv: list, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def elborl(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    assert ELBORL.exists(), f"{ELBORL} missing: install the project with `pip install -e .`"
    return run([ELBORL, *args], cwd)


def stage_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))


def test_help_lists_every_stage_the_main_job_and_the_reward_service():
    result = elborl("--help")
    assert result.returncode == 0, result.stderr
    for name in [*(stage.replace("_", "-") for stage in stage_modules()), "run", "reward-service"]:
        assert f"\n  {name} " in result.stdout, name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_builds_its_modules_parser_under_its_own_name(name):
    parser = importlib.import_module(COMMANDS[name].module).build_parser(f"elborl {name}")
    assert parser.format_usage().startswith(f"usage: elborl {name} ")
    options = {option for action in parser._actions for option in action.option_strings}
    if name != "reward-service":  # the service reads no settings file by default; --params only names weights
        assert {"--params", "--set", "--threads"} <= options


def test_a_stage_takes_the_same_arguments_through_elborl_and_python_m():
    through_elborl = elborl("prepare-prompts", "--help")
    through_module = run([sys.executable, "-m", "stages.prepare_prompts", "--help"])
    assert through_elborl.returncode == through_module.returncode == 0
    assert through_elborl.stdout.startswith("usage: elborl prepare-prompts ")

    def after_usage(text: str) -> str:  # the usage paragraph names the program; the rest must match exactly
        return text.split("\n\n", 1)[1]

    assert after_usage(through_elborl.stdout) == after_usage(through_module.stdout)
    assert "--set KEY=VALUE" in through_elborl.stdout and "--out OUT" in through_elborl.stdout


def test_set_overrides_reach_the_stage(tmp_path):
    out = tmp_path / "prompts"
    result = elborl("prepare-prompts", "--params", PARAMS, "--threads", 1, "--set", "prompts.train_per_task=3",
                    "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    per_task = Counter(json.loads(line)["tag"] for line in (out / "train.jsonl").read_text().splitlines())
    # params.yaml asks for 1000 per task; tasks the test set has used up get fewer than 3 (single_object none)
    assert max(per_task.values()) == 3 and sum(count == 3 for count in per_task.values()) >= 3, per_task


def test_set_overrides_reach_the_main_job(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    moved = tmp_path / "moved"
    result = elborl("run", "--threads", 1, "--skip-rl", "--set", f"artifacts={moved}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (moved / "prompts" / "train.jsonl").exists() and (moved / "eval" / "base" / "scores.json").exists()
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("command", ["prepare-prompts", "run"])
def test_a_bad_override_fails_in_one_line_naming_the_key(tmp_path, command):
    out = tmp_path / "out"
    args = ["--out", out] if command != "run" else ["--set", f"artifacts={out}"]
    result = elborl(command, "--params", PARAMS, "--set", "rl.no_such_key=1", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"elborl {command}: error:") and "no_such_key" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("rl.no_such_key=1", "rl: unknown key(s) ['no_such_key']"),
    ("no_such_section.x=1", "top level: unknown key(s) ['no_such_section']"),
    ("rl.lr=[", "rl.lr: the value '[' is not valid YAML"),
    ("rl.lr=fast", "rl.lr: expected float, got 'fast'"),
    ("rl.lr.x=1", "rl.lr.x: rl.lr is a value, not a section"),
    ("rl.lr", "override 'rl.lr': expected key=value"),
])
def test_override_mistakes_are_settings_errors_naming_the_key(override, message):
    # ParamsError is what the stages and the main job turn into one line; anything else would be a traceback
    with pytest.raises(ParamsError) as error:
        load_params_with_overrides(PARAMS, [override])
    assert message in str(error.value)


def test_overrides_are_read_as_yaml_into_nested_keys():
    params = load_params_with_overrides(PARAMS, ["rl.lr=1e-3", "rl.epochs=5", "pretrain.task_weights={colors: 2}"])
    assert params.rl.lr == 1e-3 and params.rl.epochs == 5 and params.pretrain.task_weights == {"colors": 2.0}
