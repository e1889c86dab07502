"""Writes the images' locks, at the versions installed in this environment, which the tests ran against, so a
build resolves nothing:

* containers/torch.lock: torch and torchvision at pyproject.toml's pins with everything they require (the CUDA
  libraries among them); base.Dockerfile installs it first, as its own layer, the largest and least often changed.
* containers/requirements.lock: every other package the project needs at run time (pyproject.toml's dependencies
  and what they require, extras followed); base.Dockerfile installs it next.
* containers/geneval.lock: what the `geneval` extra (GenEval's Mask2Former) adds to that; score.Dockerfile
  installs it. Without opencv-python: mmcv-lite asks for it, but the base's opencv-python-headless provides the
  same `cv2` module without the GUI libraries (libGL, GLib, X11) a server image has no use for.

    .venv/bin/python containers/lock.py      # after a change to the dependencies; tests/test_containers.py checks
"""

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TORCH_LOCK = ROOT / "containers" / "torch.lock"
LOCK = ROOT / "containers" / "requirements.lock"
GENEVAL_LOCK = ROOT / "containers" / "geneval.lock"
HEADLESS_SUBSTITUTES = {"opencv-python"}  # provided by opencv-python-headless in the base image


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


def locks() -> dict[Path, dict[str, str]]:
    """{lock file: {package: version}}: the base image's torch layer, the rest of its dependencies, the score
    image's GenEval additions; together the closure of the project's dependencies and the `geneval` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pins = [text for text in project["dependencies"] if Requirement(text).name in ("torch", "torchvision")]
    torch = runtime_closure(torch_pins)
    base = runtime_closure(project["dependencies"])
    geneval = runtime_closure(project["optional-dependencies"]["geneval"])
    rest = {name: version for name, version in base.items() if name not in torch}
    added = {name: version for name, version in geneval.items()
             if name not in base and name not in HEADLESS_SUBSTITUTES}
    return {TORCH_LOCK: torch, LOCK: rest, GENEVAL_LOCK: added}


def main() -> None:
    for path, versions in locks().items():
        lines = [f"{name}=={version}" for name, version in sorted(versions.items())]
        path.write_text("# Written by containers/lock.py from the environment the tests ran in; do not edit.\n"
                        + "\n".join(lines) + "\n")
        print(f"{path.relative_to(ROOT)}: {len(lines)} packages")


if __name__ == "__main__":
    main()
