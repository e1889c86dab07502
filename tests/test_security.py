"""The reliability issue's two security checks.

1. No pickle anywhere. Unpickling runs code chosen by whoever wrote the file, so the source of elborl/, stages/,
   flows/ and bench/ (parsed with `ast`, so aliases and imports inside functions count) neither imports a
   pickle-family module nor reads or writes a pickle, and torch.load is only ever called with a literal
   weights_only=True. Every file the main job and the stage chain write is scanned for pickle streams.
2. Credentials never leak. The stage chain runs against a real S3 server (tests/s3server.py) and a reward service,
   with the server's key pair and a reward token as sentinels, and some stages fail on purpose (refused signature,
   refused token, missing input). The sentinels, raw, URL-encoded or base64, must appear in none of the stages'
   output, the objects in the bucket, the local cache, home and temp directories, the run's run.json and the reward
   service's log; nor in the Prefect logs, artifacts, flow run parameters and state messages of a training flow
   that runs its stages as jobs against the same bucket, once refused by the reward service and once served.
"""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import secrets
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import numpy as np
import pytest
import yaml

from test_embedded_job import TINY_PARAMS
from test_flows import flow_logs

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("elborl", "stages", "flows", "bench")
SUBPROCESS_TIMEOUT = 600

# =============================================================================================================
# 1a. No pickle in the source
PICKLE_MODULES = frozenset({"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"})
TORCH_LOADS = frozenset({"torch.load", "torch.serialization.load"})
TORCH_SAVES = frozenset({"torch.save", "torch.serialization.save"})
TORCH_ALLOW_LIST_WIDENERS = frozenset({"torch.serialization.safe_globals", "torch.serialization.add_safe_globals"})
PANDAS_PICKLE_METHODS = frozenset({"read_pickle", "to_pickle"})
DYNAMIC_IMPORTS = frozenset({"importlib.import_module", "__import__"})

# (file, the finding's line as written, stripped) -> why it is safe. Keyed by line so that any other pickle use in
# the same file, or a changed line, is a finding again.
ALLOWED_PICKLE_USES = {
    ("elborl/geneval/mask2former.py", "import pickle"):
        "only for `except pickle.UnpicklingError`, the error torch.load(weights_only=True) raises on a refused "
        "global; a call into pickle anywhere in the file would be a finding of its own",
    ("elborl/geneval/mask2former.py", "with torch.serialization.safe_globals(_numpy_globals()):"):
        "the weights_only retry for mmengine checkpoints (numpy values in their meta) admits numpy's dtype classes "
        "and array/scalar reconstructors only: test_the_mmengine_retry_admits_only_numpy_reconstructors",
    ("elborl/rewards/clip_family.py", 'torch.save({"state_dict": state, "epoch": 1}, directory / weights_name)'):
        "tests' tiny stand-in of a published .pt checkpoint (HPS v2.1's form), tensors only, so that the "
        "torch.load(weights_only=True) path is tested; only with a .pt weights_name, which only tests ask for: "
        "test_the_pickle_writing_test_doubles_write_pickles_for_tests_only",
    ("elborl/rewards/clip_family.py", "torch.save(state, directory / head_name)"):
        "tests' tiny stand-in of the LAION aesthetic head's .pth, tensors only, for the weights_only loading path; "
        "only with a .pth head_name, which only tests ask for",
}
# the test doubles that write a torch pickle when asked to: their file-name argument (keyword, position)
PICKLE_WRITING_TEST_DOUBLES = {"build_tiny_open_clip": ("weights_name", 2), "build_tiny_aesthetic": ("head_name", 2)}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    code: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.code}"


def source_files(root: Path = ROOT) -> list[Path]:
    return sorted(path for name in SOURCE_DIRS for path in (root / name).rglob("*.py"))


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, so that `import torch as th; th.load` is still torch.load."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                bound = alias.asname or alias.name.split(".")[0]
                names[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def qualified_name(node: ast.AST, names: dict[str, str]) -> str | None:
    """`th.serialization.load` -> 'torch.serialization.load'; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def passes_literal(call: ast.Call, keyword: str, value) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def may_allow_pickle(call: ast.Call) -> bool:
    """numpy.load unpickles unless allow_pickle is False: a third positional argument, `**options` or any
    allow_pickle but a literal False might be True."""
    if len(call.args) >= 3 or any(k.arg is None for k in call.keywords):
        return True
    return any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in call.keywords)


def imports_pickle_dynamically(call: ast.Call, qualified: str | None) -> bool:
    first = call.args[0] if call.args else None
    return (qualified in DYNAMIC_IMPORTS and isinstance(first, ast.Constant) and isinstance(first.value, str)
            and first.value.split(".")[0] in PICKLE_MODULES)


def call_rule(call: ast.Call, names: dict[str, str]) -> str | None:
    """Why this call reads or writes a pickle (None: it does not)."""
    qualified = qualified_name(call.func, names)
    method = call.func.attr if isinstance(call.func, ast.Attribute) else None
    if qualified in TORCH_LOADS and not passes_literal(call, "weights_only", True):
        return "torch.load without a literal weights_only=True"
    if qualified in TORCH_SAVES:
        return "torch.save writes a pickle"
    if qualified in TORCH_ALLOW_LIST_WIDENERS:
        return "widens what torch.load(weights_only=True) unpickles"
    if qualified == "numpy.load" and may_allow_pickle(call):
        return "numpy.load that may allow_pickle"
    if method in PANDAS_PICKLE_METHODS or qualified == "pandas.read_pickle":
        return "pandas pickle I/O"
    if qualified and qualified.split(".")[0] in PICKLE_MODULES:
        return f"calls {qualified}"
    if imports_pickle_dynamically(call, qualified):
        return "imports a pickle-family module dynamically"
    return None


def import_rule(node: ast.AST) -> str | None:
    if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules = [node.module]
    else:
        return None
    pickled = [module for module in modules if module.split(".")[0] in PICKLE_MODULES]
    return f"imports {', '.join(pickled)}" if pickled else None


def reference_rule(node: ast.AST, names: dict[str, str], checked_elsewhere: set[int]) -> str | None:
    """A loader handed around uncalled (`partial(torch.load, ...)`, `load = pickle.loads`): where it is called cannot
    be checked. Pickle's exception classes may be named (`except pickle.UnpicklingError`)."""
    if id(node) in checked_elsewhere or not isinstance(node, (ast.Attribute, ast.Name)):
        return None
    qualified = qualified_name(node, names) or ""
    module, _, member = qualified.partition(".")
    if qualified in TORCH_LOADS | TORCH_SAVES or (module in PICKLE_MODULES and member and not member.endswith("Error")):
        return f"{qualified} used as a value"
    return None


def pickle_findings(path: Path, root: Path = ROOT) -> list[Finding]:
    """Every pickle use in one source file, allowed or not."""
    source = path.read_text(encoding="utf-8")
    tree, lines = ast.parse(source, filename=str(path)), source.splitlines()
    names = imported_names(tree)
    # a call's function is checked with its arguments, an attribute's object as part of the attribute
    checked_elsewhere = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    checked_elsewhere |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    relative, findings = path.relative_to(root).as_posix(), []
    for node in ast.walk(tree):
        rule = (call_rule(node, names) if isinstance(node, ast.Call) else None) or import_rule(node) \
            or reference_rule(node, names, checked_elsewhere)
        if rule:
            findings.append(Finding(relative, node.lineno, lines[node.lineno - 1].strip(), rule))
    return findings


def is_allowed(finding: Finding) -> bool:
    return (finding.path, finding.code) in ALLOWED_PICKLE_USES


def test_the_source_neither_reads_nor_writes_pickles():
    """Every pickle use is a finding unless its exact line is allow-listed with a reason; an entry that matches
    nothing any more must go, so that it cannot later let a new line through."""
    files = source_files()
    findings = [finding for path in files for finding in pickle_findings(path)]
    print(f"\nparsed {len(files)} source files under {', '.join(SOURCE_DIRS)}: {len(findings)} pickle use(s), "
          f"{sum(map(is_allowed, findings))} allow-listed")
    assert len(files) > 50, "the scan found too few files: wrong root?"
    violations = [str(finding) for finding in findings if not is_allowed(finding)]
    assert not violations, "pickle use outside the allow-list:\n" + "\n".join(violations)
    used = {(finding.path, finding.code) for finding in findings}
    stale = [f"{path}: {code}" for path, code in ALLOWED_PICKLE_USES if (path, code) not in used]
    assert not stale, "allow-list entries that match nothing any more (remove them):\n" + "\n".join(stale)


def test_the_scanner_finds_each_kind_of_pickle_use(tmp_path):
    """The source scan is only as good as its rules: each planted use must be found (aliases and `from` imports too)."""
    planted = {
        "import pickle": "imports pickle",
        "import cloudpickle as cp": "imports cloudpickle",
        "from joblib import load": "imports joblib",
        "import torch as th; th.load(path)": "torch.load without a literal weights_only=True",
        "import torch; torch.load(path, weights_only=flag)": "torch.load without a literal weights_only=True",
        "from torch import load; load(path, weights_only=True)": None,
        "from torch.serialization import load; load(path)": "torch.load without a literal weights_only=True",
        "import torch; torch.save(state, path)": "torch.save writes a pickle",
        "import functools, torch; functools.partial(torch.load, weights_only=False)": "torch.load used as a value",
        "import pickle as p; loader = p.loads": "pickle.loads used as a value",
        "from dill import loads; loader = loads": "dill.loads used as a value",
        "import numpy as np; np.load(path, allow_pickle=True)": "numpy.load that may allow_pickle",
        "import numpy as np; np.load(path, None, True)": "numpy.load that may allow_pickle",
        "import numpy as np; np.load(path, allow_pickle=False)": None,
        "import pandas as pd; pd.read_pickle(path)": "pandas pickle I/O",
        "frame.to_pickle(path)": "pandas pickle I/O",
        "import importlib; importlib.import_module('dill')": "imports a pickle-family module dynamically",
        "import torch; torch.serialization.add_safe_globals([object])":
            "widens what torch.load(weights_only=True) unpickles",
    }
    for source, expected in planted.items():
        (tmp_path / "planted.py").write_text(f"def f(path, state, flag, frame):\n    {source}\n")
        rules = [finding.rule for finding in pickle_findings(tmp_path / "planted.py", tmp_path)]
        assert (expected in rules) if expected else not rules, f"{source!r}: found {rules}"


def test_the_mmengine_retry_admits_only_numpy_reconstructors():
    """The allow-listed safe_globals line is only as safe as `_numpy_globals()`: numpy's dtype classes, ndarray and
    the array/scalar reconstructors rebuild values from bytes and call nothing else (object arrays' items still come
    through torch's restricted unpickler)."""
    from numpy._core import multiarray

    from elborl.geneval.mask2former import _numpy_globals

    reconstructors = {multiarray.scalar: "scalar", multiarray._reconstruct: "_reconstruct"}
    for entry in _numpy_globals():
        value, name = entry if isinstance(entry, tuple) else (entry, None)
        is_dtype_class = isinstance(value, type) and issubclass(value, np.dtype)
        assert is_dtype_class or value is np.ndarray or value in reconstructors, f"not a numpy reconstructor: {entry}"
        if name is not None:  # an alias under numpy 1's module name
            assert name == f"numpy.core.multiarray.{reconstructors.get(value)}", f"aliased to another name: {entry}"


def called_name(call: ast.Call) -> str | None:
    """`f` of `f(...)` or `module.f(...)`."""
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)


def picks_the_pickle_format(call: ast.Call) -> bool:
    """A test double's call that names its weights file other than as a literal .safetensors (the default)."""
    keyword, position = PICKLE_WRITING_TEST_DOUBLES[called_name(call)]
    given = [k.value for k in call.keywords if k.arg in (keyword, None)] + call.args[position:position + 1]
    return any(not (isinstance(value, ast.Constant) and str(value.value).endswith(".safetensors")) for value in given)


def calls_to_test_doubles(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and called_name(node) in PICKLE_WRITING_TEST_DOUBLES]


def test_the_pickle_writing_test_doubles_write_pickles_for_tests_only():
    """The torch.save calls allowed in clip_family.py build tests' stand-ins of published .pt/.pth checkpoints; the
    pipeline and the benchmarks may build the tiny models too, but only as safetensors."""
    callers = [f"{path.relative_to(ROOT)}:{call.lineno}" for path in source_files()
               for call in calls_to_test_doubles(ast.parse(path.read_text(encoding="utf-8")))
               if picks_the_pickle_format(call)]
    assert not callers, f"pickle-writing test doubles asked for a pickle outside tests: {callers}"


# =============================================================================================================
# 1b. No pickle in what the pipeline writes
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt"})


def starts_with_pickle_header(head: bytes) -> bool:
    """Pickle protocols 2-5 open with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file opens with its header's length, which may look like a pickle header: parse it instead."""
    data = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError):
        return "not a valid safetensors file"
    return None if isinstance(header, dict) and 8 + length <= len(data) else "not a valid safetensors file"


def numpy_problem(path: Path) -> str | None:
    """np.load(allow_pickle=False) refuses object arrays, the only numpy arrays stored as pickles."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):  # arrays are read on access
            with loaded:
                [loaded[name] for name in loaded.files]
    except ValueError as error:
        return f"np.load(allow_pickle=False) refused it: {error}"
    return None


def zip_problem(path: Path) -> str | None:
    """torch.save's format is a zip holding data.pkl; any member that is a pickle counts."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as opened:
                if member.filename.endswith(".pkl") or starts_with_pickle_header(opened.read(2)):
                    return f"zip member {member.filename} is a pickle"
    return None


def pickle_problem(path: Path) -> str | None:
    """Why `path` holds a pickle stream (None: it does not)."""
    if path.suffix in PICKLE_SUFFIXES:
        return f"a pickle format ({path.suffix})"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    with path.open("rb") as file:
        if starts_with_pickle_header(file.read(2)):
            return "starts with a pickle protocol header"
    if path.suffix in (".npy", ".npz"):
        return numpy_problem(path)
    return zip_problem(path) if zipfile.is_zipfile(path) else None


def written_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def scan_for_pickles(root: Path, label: str) -> tuple[Counter, list[str]]:
    """(files scanned per extension, what holds a pickle) under `root`; prints the counts."""
    files = written_files(root)
    counts = Counter(path.suffix or "(none)" for path in files)
    print(f"\n{label}: scanned {len(files)} files: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return counts, [f"{path.relative_to(root)}: {problem}" for path in files if (problem := pickle_problem(path))]


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """This environment with home, temp and cache directories under `root`, so that everything a pipeline process
    writes, wherever it puts it, is under `root` to be scanned; no AWS configuration of the machine's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    for name in ("home", "tmp", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), ELBORL_CACHE=str(root / "cache"),
               OMP_NUM_THREADS="1", AWS_CONFIG_FILE=str(root / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"), **extra)
    return env


def write_safetensors_opening_like_pickle(path: Path) -> None:
    """A valid safetensors file whose header is 640 bytes long: its first two bytes are 0x80 0x02."""
    from safetensors.numpy import load_file

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).ljust(640).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.float32(1).tobytes())
    assert path.read_bytes()[:2] == b"\x80\x02" and load_file(str(path))["w"].tolist() == [1.0]


def test_the_pickle_scan_finds_each_kind_of_pickle_stream(tmp_path):
    """Each planted pickle must be found, and safe formats (including a safetensors header that opens with 0x80 0x02)
    must not be."""
    import pickle  # noqa: S403 - writes the planted pickles; never loads one

    import torch

    pickled = ["objects.npy", "plain.bin", "renamed.json", "state.pt", "weights.npz"]
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"w": torch.zeros(2)}, tmp_path / "renamed.json")  # a zip with data.pkl, whatever its name
    np.savez(tmp_path / "weights.npz", ok=np.zeros(2), bad=np.array([None], dtype=object))
    safe = {"array.npy": lambda p: np.save(p, np.zeros(3)), "arrays.npz": lambda p: np.savez(p, a=np.zeros(3)),
            "notes.json": lambda p: p.write_text("{}"), "weights.safetensors": write_safetensors_opening_like_pickle}
    for name, write in safe.items():
        write(tmp_path / name)
    _, found = scan_for_pickles(tmp_path, "planted")
    assert sorted(line.split(":")[0] for line in found) == pickled, found


def test_nothing_the_main_job_writes_is_a_pickle(tmp_path):
    """The embedded main job at the tiny test scale writes prompts, a base model, RL rounds, evaluations and the run
    report under its artifacts root (and caches under home): no file anywhere under them may be a pickle."""
    params = {**TINY_PARAMS, "artifacts": str(tmp_path / "artifacts")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    job = subprocess.run([sys.executable, "-m", "elborl.embedded", "--params", str(tmp_path / "params.yaml"),
                          "--threads", "1"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                         env=isolated_env(tmp_path), cwd=ROOT)
    assert job.returncode == 0, job.stderr[-2000:]
    counts, pickles = scan_for_pickles(tmp_path, "main job")
    assert counts[".safetensors"] >= 2 and counts[".json"] >= 10, "the job wrote less than a run: nothing to scan"
    assert not pickles, "pickle streams written by the main job:\n" + "\n".join(pickles)


# =============================================================================================================
# 2. Credentials never leak
REWARD_TOKEN = f"sentinel-reward-token/{secrets.token_hex(8)}+Tk="
WRONG_REWARD_TOKEN = f"sentinel-wrong-token/{secrets.token_hex(8)}+Wr="
WRONG_S3_SECRET = f"sentinelWrongSecret{secrets.token_hex(10)}"
ROUND = "0"


@dataclass
class StageRun:
    """One stage process: its command line and everything it printed."""
    command: str
    returncode: int
    output: str


@dataclass
class S3Chain:
    """What the stage chain against S3 left behind, for the tests to grep."""
    bucket: str
    root: Path  # every local directory the stages used: cache, home, temp, the report
    mirror: Path  # every object of the bucket, downloaded
    object_metadata: str  # keys and user metadata of every object
    stages: list[StageRun]
    service_log: str


def encoded_forms(secret: str) -> dict[str, bytes]:
    """How a secret may appear in a text: raw, URL-encoded, base64 (standard and URL-safe). A secret inside a longer
    base64 text is encoded at one of three byte alignments; each form keeps the characters the secret alone
    decides (at most two bytes at either end are lost)."""
    raw = secret.encode()
    forms = {"raw": raw, "url-encoded": quote(secret, safe="").encode(), "url-encoded+": quote_plus(secret).encode()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        middle = encoded[4 if offset else 0:(offset + len(raw)) // 3 * 4]
        forms[f"base64@{offset}"] = middle
        forms[f"urlsafe-base64@{offset}"] = middle.replace(b"+", b"-").replace(b"/", b"_")
    distinct = {}
    for name, form in forms.items():  # a hex secret is its own URL encoding: one name per distinct form
        if len(form) >= 12 and form not in distinct.values():
            distinct[name] = form
    return distinct


def leaks(haystacks: dict[str, bytes], sentinels: dict[str, str]) -> list[str]:
    """Where any form of any sentinel appears: 'what (form) in where'."""
    return [f"{label} ({form}) in {where}" for label, secret in sentinels.items()
            for form, needle in encoded_forms(secret).items() for where, text in haystacks.items() if needle in text]


def sentinels(server) -> dict[str, str]:
    return {"S3 access key": server.access_key, "S3 secret key": server.secret_key, "reward token": REWARD_TOKEN,
            "wrong reward token": WRONG_REWARD_TOKEN, "wrong S3 secret": WRONG_S3_SECRET}


def run_stage(name: str, args: list, params: Path, env: dict[str, str]) -> StageRun:
    command = [sys.executable, "-m", f"stages.{name}", "--params", str(params), "--threads", "1", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    return StageRun(" ".join(command[2:]), result.returncode, result.stdout + result.stderr)


def succeeded(stage: StageRun) -> StageRun:
    assert stage.returncode == 0, f"{stage.command}\n{stage.output[-3000:]}"
    return stage


def failed(stage: StageRun, reason: str) -> StageRun:
    """A stage meant to fail must fail for `reason`, or the test would not see the error path it means to."""
    assert stage.returncode != 0 and reason in stage.output, f"{stage.command}\n{stage.output[-3000:]}"
    return stage


class ListHandler(logging.Handler):
    """Keeps every record it is given as a formatted line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def reward_service_logging():
    """Everything the in-process reward service and its web server log, at every level, as one growing list."""
    handler = ListHandler()
    loggers = [logging.getLogger(name) for name in ("elborl", "uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


@contextmanager
def reward_service(token: str):
    """The reward service on a free loopback port, requiring `token`; yields its URL and its log."""
    from elborl.rewards.service import RewardService, ServiceConfig, create_app, serve_in_background

    service = RewardService(ServiceConfig(("shapes_geneval",), token=token))
    with reward_service_logging() as log, serve_in_background(create_app(service)) as url:
        yield url, log
    service.close()


def run_chain(store: str, params: Path, env: dict[str, str], reward_url: str, root: Path, server) -> list[StageRun]:
    """One round of the pipeline stage by stage with every artifact under `store`, and the failures on the way:
    a refused reward token, a refused S3 signature, a missing input."""
    prompts, base, run, cache = f"{store}/prompts", f"{store}/base", f"{store}/run", root / "cache"
    in_round = ["--run", run, "--round", ROUND]
    wrong_token = {**env, "ELBORL_REWARD_TOKEN": WRONG_REWARD_TOKEN}
    wrong_secret = {**env, "AWS_SECRET_ACCESS_KEY": WRONG_S3_SECRET}
    stages = [
        succeeded(run_stage("prepare_prompts", ["--out", prompts], params, env)),
        succeeded(run_stage("pretrain", ["--out", base, "--cache", cache], params, env)),
        succeeded(run_stage("rollout", [*in_round, "--base-model", base, "--prompts", prompts, "--cache", cache],
                            params, env)),
        failed(run_stage("score", [*in_round, "--reward-url", reward_url, "--cache", cache], params, wrong_token),
               "invalid bearer token"),
        succeeded(run_stage("score", [*in_round, "--reward-url", reward_url, "--cache", cache], params, env)),
        succeeded(run_stage("update", [*in_round, "--base-model", base, "--cache", cache], params, env)),
        succeeded(run_stage("evaluate", ["--model", base, "--policy-state", f"{run}/round-00000/update", "--prompts",
                                         prompts, "--out", f"{store}/eval", "--cache", cache], params, env)),
        succeeded(run_stage("report", ["--run", run, "--html", root / "report.html", "--cache", cache], params, env)),
        failed(run_stage("score", ["--run", f"{store}/missing", "--round", ROUND, "--cache", cache], params, env),
               "no published artifact"),
    ]
    refused = run_stage("prepare_prompts", ["--out", f"{store}/refused"], params, wrong_secret)
    stages.append(failed(refused, "(403)") if server.checks_signatures else refused)
    return stages


def mirror_bucket(client, bucket: str, target: Path) -> str:
    """Downloads every object of `bucket` under `target`; returns their keys and user metadata as text."""
    described = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            response = client.get_object(Bucket=bucket, Key=item["Key"])
            (target / item["Key"]).parent.mkdir(parents=True, exist_ok=True)
            (target / item["Key"]).write_bytes(response["Body"].read())
            described.append(f"{item['Key']} {json.dumps(response.get('Metadata', {}))}")
    return "\n".join(described)


@pytest.fixture(scope="module")
def s3_chain(s3_server, tmp_path_factory) -> S3Chain:
    root, mirror = tmp_path_factory.mktemp("s3-chain"), tmp_path_factory.mktemp("s3-bucket")
    bucket = s3_server.create_bucket()
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    env = isolated_env(root, **s3_server.env(), ELBORL_REWARD_TOKEN=REWARD_TOKEN)
    with reward_service(REWARD_TOKEN) as (url, service_log):
        stages = run_chain(f"s3://{bucket}", root / "params.yaml", env, url, root, s3_server)
    metadata = mirror_bucket(s3_server.client(), bucket, mirror)
    return S3Chain(bucket, root, mirror, metadata, stages, "\n".join(service_log))


def files_as_haystacks(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in written_files(root)}


def assert_no_leak(haystacks: dict[str, bytes], server) -> None:
    found = leaks(haystacks, sentinels(server))
    assert not found, "credentials leaked:\n" + "\n".join(found)


def test_no_credential_in_what_the_stages_printed(s3_chain, s3_server):
    """stdout and stderr of every stage, the failed ones included (their errors are where a key would show)."""
    failures = [stage for stage in s3_chain.stages if stage.returncode != 0]
    print(f"\ngrepped the output of {len(s3_chain.stages)} stage runs ({len(failures)} failed on purpose, "
          f"{sum(len(stage.output) for stage in s3_chain.stages)} characters)")
    assert len(failures) == (3 if s3_server.checks_signatures else 2)
    assert_no_leak({stage.command: stage.output.encode() for stage in s3_chain.stages}, s3_server)


def test_no_credential_in_any_object_of_the_bucket(s3_chain, s3_server):
    haystacks = {**files_as_haystacks(s3_chain.mirror), "object keys and metadata": s3_chain.object_metadata.encode()}
    print(f"\ngrepped {len(haystacks) - 1} objects of s3://{s3_chain.bucket} and their metadata")
    assert len(haystacks) > 20, "the chain published less than a round: nothing to grep"
    assert_no_leak(haystacks, s3_server)


def test_no_credential_in_the_local_cache_home_or_temp(s3_chain, s3_server):
    haystacks = files_as_haystacks(s3_chain.root)
    cached = [name for name in haystacks if name.startswith("cache/")]
    print(f"\ngrepped {len(haystacks)} local files ({len(cached)} in the --cache directory)")
    assert cached and "report.html" in haystacks, "the stages cached nothing: nothing to grep"
    assert_no_leak(haystacks, s3_server)


def test_no_credential_in_the_runs_settings(s3_chain, s3_server):
    """run.json is the run's identity, read back by every later stage and shown in the report."""
    run_json = s3_chain.mirror / "run" / "run.json"
    assert run_json.is_file(), "the chain wrote no run.json"
    assert_no_leak({"run/run.json": run_json.read_bytes()}, s3_server)


def test_no_credential_in_the_reward_services_log(s3_chain, s3_server):
    """The service refused a wrong token and served the right one; neither may be in its log."""
    print(f"\ngrepped {len(s3_chain.service_log.splitlines())} lines of the reward service's log")
    assert_no_leak({"reward service log": s3_chain.service_log.encode()}, s3_server)


def test_nothing_the_stage_chain_published_to_s3_is_a_pickle(s3_chain):
    counts, pickles = scan_for_pickles(s3_chain.mirror, f"s3://{s3_chain.bucket}")
    assert counts[".safetensors"] >= 2, "the chain published no weights: nothing to scan"
    assert not pickles, "pickle streams published to S3:\n" + "\n".join(pickles)
    _, cached = scan_for_pickles(s3_chain.root, "stage chain's local directories")
    assert not cached, "pickle streams in the stages' local directories:\n" + "\n".join(cached)


def test_the_leak_grep_finds_every_form_of_a_sentinel():
    """A secret inside a longer base64 text, or URL-encoded in a query string, must be found like a raw one."""
    secret = REWARD_TOKEN
    planted = {"raw": f"token={secret}".encode(), "url": f"?t={quote(secret, safe='')}&x=1".encode(),
               **{f"b64-{n}": base64.b64encode(b"Bearer "[:n] + secret.encode() + b"!") for n in range(3)},
               "urlsafe": base64.urlsafe_b64encode(b"ab" + secret.encode())}
    for where, text in planted.items():
        assert leaks({where: text}, {"token": secret}), f"missed in {where}: {text!r}"
    assert not leaks({"clean": b"token=<redacted>"}, {"token": secret})


# --- the Prefect training flow ---------------------------------------------------------------------------------
def prefect_records(flow_run_id) -> dict[str, bytes]:
    """What Prefect keeps of a flow run: its logs, artifacts, parameters and the state messages of it and its tasks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    records = {f"logs of {flow_run_id}": "\n".join(flow_logs(flow_run_id)).encode()}
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    records[f"parameters of {flow_run_id}"] = json.dumps(flow_run.parameters, default=str).encode()
    states = [flow_run.state, *(task_run.state for task_run in task_runs)]
    records[f"state messages of {flow_run_id}"] = "\n".join(str(state.message) for state in states if state).encode()
    for artifact in artifacts:
        records[f"artifact {artifact.key} of {flow_run_id}"] = json.dumps(
            [artifact.description, artifact.data, artifact.metadata_], default=str).encode()
    return records


def test_no_credential_in_what_prefect_keeps_of_a_training_flow(prefect_server, s3_chain, s3_env, monkeypatch,
                                                                 tmp_path):
    """The training flow runs its stages as jobs (their output goes to the Prefect log) against the chain's bucket
    with the reward service: first with a wrong token (the flow fails, its error in the log and state), then with
    the right one (the round completes; the overhead, metrics and run report artifacts are published)."""
    from flows.training import train_rounds

    store, cache = f"s3://{s3_chain.bucket}", tmp_path / "cache"
    monkeypatch.setenv("ELBORL_CACHE", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    arguments = dict(run=f"{store}/flow-run", base_model=f"{store}/base", prompts=f"{store}/prompts",
                     params_path=str(s3_chain.root / "params.yaml"), rounds=1, mode="container", threads=1,
                     cache=str(cache), return_state=True)
    with reward_service(REWARD_TOKEN) as (url, service_log):
        monkeypatch.setenv("ELBORL_REWARD_TOKEN", WRONG_REWARD_TOKEN)
        refused = train_rounds(**arguments, reward_url=url)
        monkeypatch.setenv("ELBORL_REWARD_TOKEN", REWARD_TOKEN)
        served = train_rounds(**arguments, reward_url=url)
    assert refused.is_failed() and served.is_completed(), (refused.message, served.message)
    mirror_bucket(s3_env.client(), s3_chain.bucket, tmp_path / "bucket")
    records = {**prefect_records(refused.state_details.flow_run_id),
               **prefect_records(served.state_details.flow_run_id)}
    cached, published = files_as_haystacks(cache), files_as_haystacks(tmp_path / "bucket" / "flow-run")
    assert "invalid bearer token" in records[f"logs of {refused.state_details.flow_run_id}"].decode()
    assert sum(name.startswith("artifact ") for name in records) >= 3 and published, sorted(records)
    print(f"\ngrepped {len(records)} Prefect records of two flow runs (logs, parameters, state messages, "
          f"{sum(name.startswith('artifact ') for name in records)} artifacts), {len(cached)} cached files, "
          f"{len(published)} objects the flow published and {len(service_log)} lines of the reward service's log")
    assert_no_leak({**records, **{f"cache/{name}": text for name, text in cached.items()},
                    **{f"s3/{name}": text for name, text in published.items()},
                    "reward service log": "\n".join(service_log).encode()}, s3_env)


def test_the_reward_services_settings_never_show_the_token():
    from elborl.rewards.service import ServiceConfig

    token = "sentinel-" + "x" * 24
    config = ServiceConfig(("shapes_geneval",), token=token)
    assert token not in repr(config) and token not in str(config) and config.token == token
