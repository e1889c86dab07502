"""dvc.yaml's code dependencies are complete: every module a stage's command imports, directly or through other
project modules (imports inside functions included), lies under one of the stage's `deps`, so a change to any
of them makes `dvc repro` run the stage again."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PROJECT_PACKAGES = ("elborl", "stages")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (None for a module outside the project)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names a file imports (absolute and relative, at any depth of the file)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def import_closure(module: str) -> set[Path]:
    """Every project file the module needs: itself, its packages' __init__ files and what they import, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return seen


def stage_module(command: str) -> str:
    words = command.split()
    return words[words.index("-m") + 1]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    spec = PIPELINE[stage]
    command = spec["cmd"] if isinstance(spec["cmd"], str) else " ".join(spec["cmd"])
    missing = sorted(p.relative_to(ROOT).as_posix() for p in import_closure(stage_module(command))
                     if not covered(p, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} lacks deps on {missing}"


def test_the_closure_follows_imports_inside_functions_and_packages():
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.train")}
    assert {"stages/train.py", "stages/_common.py", "elborl/__init__.py", "elborl/rounds.py",
            "elborl/distributed.py", "elborl/rl.py", "elborl/config.py"} <= closure
    assert not covered(ROOT / "elborl" / "rounds.py", ["elborl/rl.py", "elborl/models"])
    assert covered(ROOT / "elborl" / "models" / "sd3.py", ["elborl/models"])
