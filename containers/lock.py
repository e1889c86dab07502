"""Writes containers/requirements.lock: every package the project needs at run time (pyproject.toml's
dependencies and what they require, extras followed), at the version installed in this environment, which the
tests ran against. The images install exactly these (base.Dockerfile), so a build resolves nothing.

    .venv/bin/python containers/lock.py      # after a change to the dependencies; tests/test_containers.py checks
"""

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "containers" / "requirements.lock"


def runtime_closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of `requirements` and everything they require here."""
    versions, seen, todo = {}, set(), [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), tuple(sorted(requirement.extras)))
        if key in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue  # a dependency of the top level for another platform or Python
        seen.add(key)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            sys.exit(f"lock.py: {requirement.name} is not installed here; install the project first (scripts/setup.sh)")
        versions[key[0]] = dist.version
        for text in dist.requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                            for extra in (*requirement.extras, "")):
                needed.marker = None
                todo.append(needed)
    return versions


def main() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    versions = runtime_closure(dependencies)
    lines = [f"{name}=={version}" for name, version in sorted(versions.items())]
    LOCK.write_text("# Written by containers/lock.py from the environment the tests ran in; do not edit.\n"
                    + "\n".join(lines) + "\n")
    print(f"{LOCK.relative_to(ROOT)}: {len(lines)} packages")


if __name__ == "__main__":
    main()
