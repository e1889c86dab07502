"""Every entry of the bad-input corpus (tests/bad_inputs.py) makes its stage fail with one line naming the problem,
a non-zero exit, and nothing in the store changed."""

from __future__ import annotations

import hashlib
import importlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from bad_inputs import CORPUS
from test_embedded_job import TINY_PARAMS


def _stage(name: str, argv: list[str]) -> None:
    from stages._common import run_stage

    module = importlib.import_module(f"stages.{name}")
    run_stage(module.main, module.build_parser(), argv)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A tiny store: prompts, a base model, round 0 rolled out, scored and updated."""
    root = tmp_path_factory.mktemp("good") / "store"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    common = ["--params", str(root / "params.yaml"), "--threads", "1"]
    _stage("prepare_prompts", [*common, "--out", str(root / "prompts")])
    _stage("pretrain", [*common, "--out", str(root / "base"), "--cache", str(root.parent / "cache")])
    round0 = ["--run", str(root / "run"), "--round", "0"]
    _stage("rollout", [*common, *round0, "--base-model", str(root / "base"), "--prompts", str(root / "prompts")])
    _stage("score", [*common, *round0])
    _stage("update", [*common, *round0, "--base-model", str(root / "base")])
    return root


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name.replace(" ", "-"))
def test_bad_input_fails_in_one_line_naming_it_and_changes_nothing(case, published, tmp_path, capsys):
    root = tmp_path / "store"
    shutil.copytree(published, root)
    argv = case.setup(root)
    before = _snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        _stage(case.stage, ["--params", str(root / "params.yaml"), "--threads", "1", *argv])
    stderr = capsys.readouterr().err
    code = raised.value.code
    assert code not in (0, None), f"{case.name}: exit code {code!r}"
    message = code if isinstance(code, str) else stderr.strip().splitlines()[-1]  # argparse: usage, then the error
    assert "Traceback" not in stderr and "\n" not in message.strip(), f"{case.name}: {message}"
    assert re.search(case.error, message), f"{case.name}: {message!r} does not match {case.error!r}"
    assert _snapshot(root) == before, f"{case.name}: the store changed"
