"""GenEval's Mask2Former Swin-S detector: built from mmdet's config, random weights, through the adapter and scorer."""

import pickle
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet (the geneval extra) is not installed: pip install -e .[geneval]")

from elborl.geneval import mask2former  # noqa: E402
from elborl.geneval.mask2former import (  # noqa: E402
    GENEVAL_CHECKPOINT,
    Mask2FormerDetector,
    adapt_instances,
    load_checkpoint_weights_only,
    load_weights,
)
from elborl.geneval.prompts import GENEVAL_CLASSES  # noqa: E402
from elborl.geneval.scoring import GenEvalScorer, filter_detections  # noqa: E402
from elborl.geneval.types import Detection  # noqa: E402

SIZE = (96, 128)  # H, W: one small image keeps the random Swin-S fast on one CPU thread


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Mask2FormerDetector(None, test_scale=(SIZE[1], SIZE[0]))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    picture = np.full((*SIZE, 3), 230, np.uint8)
    picture[20:70, 10:60] = (200, 30, 30)
    picture[30:80, 70:120] = (30, 60, 200)
    return np.clip(picture + rng.normal(0, 8, picture.shape), 0, 255).astype(np.uint8)


class Sentinel:
    """Anything that is not a tensor or plain container: weights_only loading must refuse it."""


def test_mmcv_ext_stand_in():
    mask2former.import_mmdet()  # installs the stand-in before mmcv.ops is first imported
    from mmcv.utils.ext_loader import check_ops_exist

    ext = sys.modules["mmcv._ext"]
    if not isinstance(ext, mask2former._MissingOps):
        pytest.skip("compiled mmcv ops are installed; the stand-in is not used")
    assert ext.__spec__.loader is None and not check_ops_exist()
    assert {"ms_deform_attn_forward", "nms", "roi_align_forward"} <= ext.requested
    with pytest.raises(NotImplementedError, match="mmcv._ext.nms: compiled mmcv ops are not installed"):
        ext.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    with pytest.raises(AttributeError):
        ext.__wrapped__  # noqa: B018 - dunders are not ops
    from mmcv.ops import multi_scale_deform_attn

    assert multi_scale_deform_attn.IS_CUDA_AVAILABLE is False  # PyTorch deformable attention everywhere


def test_genevals_names_are_mmdets_coco_classes_in_order():
    from mmdet.datasets import CocoDataset

    renamed = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    assert tuple(renamed.get(c, c) for c in CocoDataset.METAINFO["classes"]) == GENEVAL_CLASSES


def test_built_from_the_wheels_config(detector):
    assert mask2former.config_path().name == "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
    model = detector.model
    assert type(model).__name__ == "Mask2Former" and type(model.backbone).__name__ == "SwinTransformer"
    assert [len(stage.blocks) for stage in model.backbone.stages] == [2, 2, 18, 2]  # Swin-S
    assert model.panoptic_head.num_things_classes == 80
    assert 68e6 < sum(p.numel() for p in model.parameters()) < 70e6


def test_random_mask2former_through_the_adapter(detector, image):
    sample = detector.predict(image)
    instances = sample.pred_instances
    n = len(instances)
    assert n == 100  # one instance per query, GenEval's test_cfg max_per_image
    assert instances.masks.shape == (n, *SIZE) and instances.bboxes.shape == (n, 4)
    detections = detector(image)
    assert len(detections) == n and all(isinstance(d, Detection) for d in detections)
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for d in detections:
        assert d.label in GENEVAL_CLASSES and isinstance(d.score, float)
        assert d.mask.dtype == bool and d.mask.shape == SIZE
        assert len(d.box) == 4 and all(isinstance(v, float) for v in d.box)
        if d.mask.any():  # mmdet's boxes are the masks' extents, in the original image's pixels
            rows, cols = np.flatnonzero(d.mask.any(1)), np.flatnonzero(d.mask.any(0))
            assert d.box == (cols[0], rows[0], cols[-1] + 1.0, rows[-1] + 1.0)
    # the same image twice gives the same detections; the RGB input is handed to mmdet as BGR
    again = detector(image)
    assert [(d.label, d.score) for d in again] == [(d.label, d.score) for d in detections]
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        detector(image.astype(np.float32))


def test_adapter_on_hand_made_instances():
    from mmengine.structures import InstanceData

    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    instances = InstanceData(
        labels=torch.tensor([64, 0]), scores=torch.tensor([0.4, 0.95]),
        bboxes=torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]), masks=masks,
    )
    first, second = adapt_instances(instances)
    assert (first.label, first.score, first.box) == ("person", pytest.approx(0.95), (0.0, 0.0, 0.0, 0.0))
    assert (second.label, second.box) == ("computer mouse", (2.0, 1.0, 5.0, 3.0))
    np.testing.assert_array_equal(second.mask, masks[0].numpy())


def test_end_to_end_through_the_scorer(detector, image):
    from test_clip_colors import tiny_clip  # the tiny random CLIP of the colour tests

    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from elborl.geneval.clip_colors import ClipColorClassifier

    preprocess = open_clip.image_transform(32, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    colors = ClipColorClassifier(tiny_clip(), open_clip.get_tokenizer("ViT-L-14"), preprocess)
    detections = detector(image)
    top = detections[0].label
    # Random weights score far below GenEval's thresholds, so keep everything to exercise every rule.
    scorer = GenEvalScorer(detector, colors, score_threshold=0.0, counting_threshold=0.0)
    other = next(c for c in GENEVAL_CLASSES if c != top)
    metas = [
        {"tag": "single_object", "prompt": "", "include": [{"class": top, "count": 1}], "exclude": []},
        {"tag": "colors", "prompt": "", "include": [{"class": top, "count": 1, "color": "red"}], "exclude": []},
        {"tag": "position", "prompt": "", "include": [{"class": other, "count": 1},
                                                      {"class": top, "count": 1, "position": ["left of", 0]}],
         "exclude": []},
        {"tag": "counting", "prompt": "", "include": [{"class": top, "count": 2}], "exclude": [{"class": top, "count": 3}]},
    ]
    results = scorer.score([image] * len(metas), metas)
    kept = filter_detections(detections, "single_object", 0.0, 0.0)
    n_kept = sum(len(group) for group in kept.values())
    assert all(r.n_detections == n_kept for r in results)
    assert results[0].correct and results[0].reward == max(0.0, 1.0 - abs(1 - len(kept[top])))
    assert all(0.0 <= r.reward <= 1.0 for r in results)
    (named,) = colors(image, kept[top][:1], top)
    assert named in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    # GenEval's own thresholds (a random model's scores rarely pass 0.3)
    strict = GenEvalScorer(detector, colors).score([image], metas[:1])[0]
    assert strict.n_detections == sum(d.score > 0.3 for d in detections)
    if strict.n_detections == 0:
        assert not strict.correct and strict.reward == 0.0


def test_weights_load_reproduces_the_model(detector, image, tmp_path):
    path = tmp_path / "m2f.pth"
    torch.save({"meta": {"seed": np.int64(0), "classes": list(GENEVAL_CLASSES)},
                "state_dict": detector.model.state_dict()}, path)
    loaded = Mask2FormerDetector(path, test_scale=(SIZE[1], SIZE[0]))
    path.unlink()
    assert [(d.label, d.score) for d in loaded(image)] == [(d.label, d.score) for d in detector(image)]


def test_weights_are_loaded_without_running_pickled_code(tmp_path):
    module = torch.nn.Linear(3, 2)
    torch.save({"state_dict": {f"module.{k}": torch.ones_like(v) for k, v in module.state_dict().items()},
                "meta": {"epoch": np.int64(50), "hist": np.arange(3)}}, tmp_path / "ok.pth")
    load_weights(module, tmp_path / "ok.pth")  # numpy values in meta are allowed, "module." prefixes dropped
    assert module.weight.eq(1).all()
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, tmp_path / "ok.safetensors")
    load_weights(module, tmp_path / "ok.safetensors")
    assert module.weight.eq(0).all()
    torch.save({"state_dict": module.state_dict(), "hook": Sentinel()}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="refused to load with torch.load\\(weights_only=True\\)"):
        load_checkpoint_weights_only(tmp_path / "code.pth")
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump({"state_dict": Sentinel()}, f)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint_weights_only(tmp_path / "raw.pth")
    torch.save({"weight": torch.zeros(2, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=f"1 of the model's tensors are missing .*{GENEVAL_CHECKPOINT}"):
        load_weights(module, tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match=f"GenEval uses {GENEVAL_CHECKPOINT}"):
        mask2former.resolve_weights(tmp_path / "absent.pth")


def test_reward_factory_errors_name_what_to_supply(monkeypatch):
    from elborl.rewards.geneval import mask2former_geneval_reward

    with pytest.raises(ValueError, match=f"detector_weights.*{GENEVAL_CHECKPOINT}"):
        mask2former_geneval_reward(clip_weights="x.safetensors")
    with pytest.raises(ValueError, match="clip_weights.*timm/vit_large_patch14_clip_224.openai"):
        mask2former_geneval_reward(detector_weights="x.pth")
    with pytest.raises(TypeError):
        mask2former_geneval_reward(detector_weights="x.pth", clip_weights="y", unknown=1)

    monkeypatch.setitem(sys.modules, "mmdet", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"needs mmdet: install the geneval extra: pip install -e \.\[geneval\]"):
        mask2former_geneval_reward("x.pth", "y.safetensors")


def test_reward_factory_builds_the_reward(tmp_path, monkeypatch, image):
    import json

    import open_clip

    from elborl.geneval.clip_colors import ClipColorClassifier
    from elborl.rewards.geneval import GenEvalReward, mask2former_geneval_reward

    from test_clip_colors import TINY_TOWERS

    (tmp_path / "elborl-tiny-clip.json").write_text(json.dumps({"embed_dim": 16, **TINY_TOWERS}))
    open_clip.add_model_config(tmp_path / "elborl-tiny-clip.json")
    torch.manual_seed(0)
    reward = mask2former_geneval_reward("random", "random", clip_model="elborl-tiny-clip", test_scale=(SIZE[1], SIZE[0]))
    assert isinstance(reward, GenEvalReward)
    metas = [{"tag": "single_object", "prompt": "a photo of a car", "include": [{"class": "car", "count": 1}], "exclude": []},
             {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}],
              "exclude": []}]
    values = reward(np.stack([image, image]), metas)
    assert values.dtype == np.float32 and values.shape == (2,) and ((0 <= values) & (values <= 1)).all()

    # path=: a directory (or store artifact) holding both files
    seen = {}
    monkeypatch.setattr(mask2former, "Mask2FormerDetector", lambda weights, **kw: seen.setdefault("detector", weights))
    monkeypatch.setattr(ClipColorClassifier, "from_weights", classmethod(lambda cls, w, **kw: seen.setdefault("clip", w)))
    with pytest.raises(FileNotFoundError, match="none of mask2former.safetensors, mask2former.pth in"):
        mask2former_geneval_reward(path=tmp_path)
    (tmp_path / "mask2former.pth").write_bytes(b"x")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"y")
    mask2former_geneval_reward(path=tmp_path)
    assert seen == {"detector": tmp_path / "mask2former.pth", "clip": tmp_path / "open_clip_model.safetensors"}


def test_convert_to_safetensors(tmp_path):
    from safetensors.torch import load_file

    torch.save({"state_dict": {"a": torch.arange(3.0)}, "meta": {"epoch": np.int64(1)}}, tmp_path / "in.pth")
    mask2former.main([str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")])
    assert load_file(tmp_path / "out.safetensors")["a"].tolist() == [0.0, 1.0, 2.0]
