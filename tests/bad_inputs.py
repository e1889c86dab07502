"""The corpus of bad input: each entry breaks one thing a stage reads and names the error the stage must give.

An entry's `setup(root)` breaks a copy of a tiny published store (prompts, base model, round 0 rolled out, scored
and updated: tests/test_bad_input.py builds it) and returns the stage's arguments; `error` is a regular
expression the one-line error must match. Paths in the arguments are relative to `root`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROUND0 = "run/round-00000"


@dataclass(frozen=True)
class BadInput:
    name: str
    stage: str
    setup: Callable[[Path], list[str]]
    error: str


def rollout_round_1(root: Path) -> list[str]:
    return ["--run", str(root / "run"), "--round", "1", "--base-model", str(root / "base"),
            "--prompts", str(root / "prompts")]


def rollout_with_prompts(lines: str) -> Callable[[Path], list[str]]:
    """Round 1's rollout over prompts whose train.jsonl is `lines` (republished: the store checks checksums)."""
    def setup(root: Path) -> list[str]:
        _rewrite(root / "prompts", "train.jsonl", lines.encode())
        return rollout_round_1(root)
    return setup


def _rewrite(artifact: Path, name: str, data: bytes) -> None:
    """Replaces a file of a published artifact and its manifest entry, as a (careless) producer would."""
    import hashlib

    (artifact / name).write_bytes(data)
    manifest = json.loads((artifact / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _train_line(prompt: str) -> str:
    return json.dumps({"tag": "single_object", "prompt": prompt, "include": [{"class": "circle", "count": 1}],
                       "exclude": [], "include_strict": []}) + "\n"


def truncated(name: str) -> Callable[[Path], list[str]]:
    """Round 0's update with `name` cut to half its bytes behind its manifest's back."""
    def setup(root: Path) -> list[str]:
        path = root / ROUND0 / "update" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return rollout_round_1(root)
    return setup


def tampered_manifest(change: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        path = root / ROUND0 / "update" / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
        return rollout_round_1(root)
    return setup


def score_round_0_with_image(make_image) -> Callable[[Path], list[str]]:
    """Round 0 scored again (its score removed) after its first image is replaced by `make_image()`."""
    def setup(root: Path) -> list[str]:
        import io
        import shutil

        buffer = io.BytesIO()
        make_image().save(buffer, format="PNG")
        _rewrite(root / ROUND0 / "rollout", "images/00000.png", buffer.getvalue())
        shutil.rmtree(root / ROUND0 / "score")
        return ["--run", str(root / "run"), "--round", "0"]
    return setup


def _image(mode: str, size: int):
    from PIL import Image

    return Image.new(mode, (size, size))


def with_args(*args: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        return [arg.replace("{root}", str(root)) for arg in args]
    return setup


CORPUS = [
    BadInput("empty training prompts", "rollout", rollout_with_prompts(""), r"train\.jsonl: no prompts"),
    BadInput("malformed prompt line", "rollout", rollout_with_prompts('{"prompt": "a circle"\n'),
             r"train\.jsonl:1: not valid JSON"),
    BadInput("prompt without its fields", "rollout", rollout_with_prompts('{"text": "a circle"}\n'),
             r"train\.jsonl:1: record lacks tag, prompt, include"),
    BadInput("duplicate prompts", "rollout",
             rollout_with_prompts(_train_line("a photo of a circle") * 2), r"train\.jsonl:2: duplicate of line 1's prompt 'a photo of a circle'"),
    BadInput("unknown reward", "score", with_args("--run", "{root}/run", "--round", "0", "--reward", "beauty"),
             r"invalid choice: 'beauty'"),
    BadInput("unknown objective", "update",
             with_args("--run", "{root}/run", "--round", "0", "--base-model", "{root}/base", "--set",
                       "rl.objective=magic"), r"rl\.objective.*'magic'"),
    BadInput("unknown recipe", "rollout",
             with_args("--run", "{root}/run", "--round", "1", "--base-model", "{root}/base", "--prompts",
                       "{root}/prompts", "--set", "rl.recipe=fastest"), r"rl\.recipe.*'fastest'"),
    BadInput("learning rate out of range", "update",
             with_args("--run", "{root}/run", "--round", "0", "--base-model", "{root}/base", "--set", "rl.lr=-1"),
             r"rl\.lr: must be > 0, got -1"),
    BadInput("a group of one", "rollout",
             with_args("--run", "{root}/other", "--round", "0", "--base-model", "{root}/base", "--prompts",
                       "{root}/prompts", "--set", "rl.group_size=1"), r"rl\.group_size.*2"),
    BadInput("missing checkpoint", "rollout",
             with_args("--run", "{root}/run", "--round", "2", "--base-model", "{root}/base", "--prompts",
                       "{root}/prompts"), r"round-00001/update.*(missing|no published)"),
    BadInput("truncated checkpoint", "rollout", truncated("policy.safetensors"),
             r"policy\.safetensors.*(size|checksum|sha256)"),
    BadInput("tampered checkpoint digest", "rollout",
             tampered_manifest(lambda m: m["files"][0].update(sha256="0" * 64)), r"(checksum|sha256)"),
    BadInput("manifest naming a file outside its artifact", "rollout",
             tampered_manifest(lambda m: m["files"].append({"path": "../../prompts/train.jsonl", "size": 1,
                                                            "sha256": "0" * 64})), r"\.\./\.\./prompts/train\.jsonl"),
    BadInput("truncated manifest", "rollout",
             tampered_manifest(lambda m: m.pop("files")), r"manifest"),
    BadInput("rollout image of the wrong size", "score", score_round_0_with_image(lambda: _image("RGB", 48)),
             r"00001\.png is 32x32 RGB.*00000\.png: 48x48 RGB"),
    BadInput("rollout image with an alpha channel", "score", score_round_0_with_image(lambda: _image("RGBA", 32)),
             r"00000\.png is 32x32 RGBA; the rollout's images are RGB"),
    BadInput("s3 URI climbing out of its prefix", "score",
             with_args("--run", "s3://bucket/runs/../../etc", "--round", "0"), r"s3://bucket/runs/\.\./\.\./etc"),
    BadInput("s3 URI with an absolute key", "score", with_args("--run", "s3://bucket//etc/passwd", "--round", "0"),
             r"s3://bucket//etc/passwd"),
    BadInput("missing params file", "score",
             with_args("--params", "{root}/nowhere.yaml", "--run", "{root}/run", "--round", "0"), r"nowhere\.yaml"),
    BadInput("unknown setting", "score",
             with_args("--set", "rl.learning_rate=1", "--run", "{root}/run", "--round", "0"), r"rl\.learning_rate"),
]
