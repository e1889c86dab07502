"""The default base model's weights ship in the package: they must be what params.yaml describes, verified on every
copy, and never stand in for a rebuild or for other settings."""

from dataclasses import asdict
from pathlib import Path
import json

import numpy as np
import pytest
import torch

from elborl.config import load_params
from elborl.models.shapes_model import ShapesFlowModel
from elborl.pretrain import (SHIPPED_BASE_MODELS, PretrainConfig, RenderedPrompts, cache_key, ensure_base_model,
                             flow_matching_loss, pretrain, ship_base_model, training_times)
from elborl.store import MANIFEST, ArtifactStore, ChecksumError

from conftest import TINY

PARAMS = load_params(Path(__file__).parents[1] / "params.yaml")
TINY_PRETRAIN = PretrainConfig(steps=3, batch_size=4, threads=1)


def held_out_loss(model, n: int = 256) -> float:
    """Flow-matching loss on n fresh rendered scenes, the same draws for every model."""
    prompts, x0 = RenderedPrompts(seed=12345, colour_captions=0.5).batch(n)
    generator = torch.Generator().manual_seed(0)
    t = training_times(n, 1.0, generator)
    with torch.no_grad():
        return float(flow_matching_loss(model, x0, prompts, t, generator))


@pytest.fixture(scope="module")
def shipped_default(tmp_path_factory) -> Path:
    """The shipped default base model, copied (and its checksums verified) by the store."""
    copy = tmp_path_factory.mktemp("shipped") / "model"
    ArtifactStore().get_artifact(SHIPPED_BASE_MODELS / cache_key(PARAMS.base_model, PARAMS.pretrain), copy)
    return copy


def test_the_shipped_weights_are_trained_with_the_default_settings(shipped_default):
    stored = json.loads((shipped_default / "shapes_model.json").read_text())
    assert stored == json.loads(json.dumps(asdict(PARAMS.base_model)))
    log = json.loads((shipped_default / "pretrain_log.json").read_text())
    assert log["config"] == json.loads(json.dumps(asdict(PARAMS.pretrain)))
    assert len(log["losses"]) == PARAMS.pretrain.steps
    torch.set_num_threads(1)
    trained = held_out_loss(ShapesFlowModel.from_pretrained(shipped_default).eval())
    untrained = held_out_loss(ShapesFlowModel.from_config(PARAMS.base_model, seed=0).eval())
    # the model the log describes: as good on fresh scenes as its last training batches, far from untrained
    assert trained < 1.25 * float(np.mean(log["losses"][-200:]))  # measured: 0.033 against 0.038
    assert trained < 0.3 * untrained


def test_the_default_settings_find_shipped_weights():
    shipped = SHIPPED_BASE_MODELS / cache_key(PARAMS.base_model, PARAMS.pretrain)
    meta = ArtifactStore().read_manifest(shipped)["meta"]
    assert meta["trained_on"] and meta["torch"]


@pytest.fixture
def tiny_shipped(tmp_path) -> tuple[Path, Path]:
    """Tiny settings pretrained once and shipped into a temporary package folder: (shipped root, the weights)."""
    _, path = ensure_base_model(TINY, TINY_PRETRAIN, tmp_path / "first-cache", progress=False, log=lambda *_: None)
    root = tmp_path / "package"
    return root, ship_base_model(path, root)


def no_pretraining(*args, **kwargs):
    raise AssertionError("pretrained although shipped weights exist")


def test_shipped_weights_are_copied_into_the_cache_instead_of_pretraining(tiny_shipped, tmp_path, monkeypatch):
    root, shipped = tiny_shipped
    monkeypatch.setattr("elborl.pretrain.pretrain", no_pretraining)
    model, path = ensure_base_model(TINY, TINY_PRETRAIN, tmp_path / "cache", progress=False, log=lambda *_: None,
                                    shipped_root=root)
    assert path == tmp_path / "cache" / shipped.name and (path / "pretrain_log.json").exists()
    reference = ShapesFlowModel.from_pretrained(shipped)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_corrupted_shipped_file_is_refused_and_leaves_no_cache_entry(tiny_shipped, tmp_path):
    root, shipped = tiny_shipped
    weights = next(shipped.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ChecksumError):
        ensure_base_model(TINY, TINY_PRETRAIN, tmp_path / "cache", progress=False, log=lambda *_: None,
                          shipped_root=root)
    assert not (tmp_path / "cache" / shipped.name).exists()


def test_rebuild_pretrains_and_replaces_the_cached_copy(tiny_shipped, tmp_path, monkeypatch):
    root, shipped = tiny_shipped
    cache = tmp_path / "cache"
    ensure_base_model(TINY, TINY_PRETRAIN, cache, progress=False, log=lambda *_: None, shipped_root=root)
    assert (cache / shipped.name / MANIFEST).exists()  # the copy of the shipped artifact
    calls = []
    monkeypatch.setattr("elborl.pretrain.pretrain", lambda *a, **k: calls.append(1) or pretrain(*a, **k))
    ensure_base_model(TINY, TINY_PRETRAIN, cache, progress=False, log=lambda *_: None, shipped_root=root,
                      rebuild=True)
    assert calls == [1] and not (cache / shipped.name / MANIFEST).exists()  # pretrained here, not copied
    assert sorted(p.name for p in cache.iterdir()) == [shipped.name]  # nothing staged or set aside is left


def test_other_settings_pretrain_although_weights_ship_for_the_default(tiny_shipped, tmp_path):
    root, _ = tiny_shipped
    other = PretrainConfig(steps=2, batch_size=4, threads=1)
    log = []
    ensure_base_model(TINY, other, tmp_path / "cache", progress=False, log=log.append, shipped_root=root)
    assert any("pretraining" in line for line in log)
