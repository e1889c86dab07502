"""GenEval's CLIP colour classifier: prompts, gray compositing and crops, zero-shot classification."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from elborl.geneval.clip_colors import (
    BACKGROUND,
    COLOR_TEMPLATES,
    ClipColorClassifier,
    color_prompts,
    composite_crop,
    load_clip_weights,
)
from elborl.geneval.prompts import GENEVAL_COLORS
from elborl.geneval.scoring import GenEvalScorer
from elborl.geneval.types import Detection

GRAY = np.array([0x99, 0x99, 0x99], np.uint8)


TINY_TOWERS = {
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip(seed: int = 0):
    """An open_clip CLIP with GenEval's tokenizer and a 32 px, one-layer vision and text tower."""
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=16, quick_gelu=True, **TINY_TOWERS).eval()


@pytest.fixture(scope="module")
def classifier():
    preprocess = open_clip.image_transform(32, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return ClipColorClassifier(tiny_clip(), open_clip.get_tokenizer("ViT-L-14"), preprocess)


def test_prompts_are_genevals_three_templates():
    prompts = color_prompts("hair drier")
    assert len(prompts) == 10
    assert prompts[0] == ["a photo of a red hair drier", "a photo of a red-colored hair drier", "a photo of a red object"]
    # GenEval writes "a" before every colour, "orange" included
    assert prompts[1] == ["a photo of a orange hair drier", "a photo of a orange-colored hair drier",
                          "a photo of a orange object"]
    assert [p[2] for p in prompts] == [f"a photo of a {c} object" for c in GENEVAL_COLORS]
    assert COLOR_TEMPLATES == ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")


def test_composite_over_gray_and_crop_to_box():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[4:12, 6:20] = True
    mask[5, 6] = False  # a hole inside the box
    crop = np.asarray(composite_crop(image, mask, (6, 4, 20, 12)))
    assert crop.shape == (8, 14, 3)  # exactly the box
    inside = mask[4:12, 6:20]
    np.testing.assert_array_equal(crop[inside], image[4:12, 6:20][inside])
    assert (crop[~inside] == GRAY).all()
    assert BACKGROUND == (153, 153, 153)
    # fractional boxes round as PIL's crop (GenEval crops with PIL)
    assert np.asarray(composite_crop(image, mask, (5.6, 3.6, 19.6, 11.6))).shape == (8, 14, 3)
    # without a mask the whole box is kept; a box of no area leaves the composite whole
    np.testing.assert_array_equal(np.asarray(composite_crop(image, None, (6, 4, 20, 12))), image[4:12, 6:20])
    empty = np.asarray(composite_crop(image, np.zeros((20, 30), bool), (0, 0, 0, 0)))
    assert empty.shape == (20, 30, 3) and (empty == GRAY).all()
    with pytest.raises(ValueError, match="mask shape"):
        composite_crop(image, mask[:10], (6, 4, 20, 12))


def test_text_weights_average_normalised_template_embeddings(classifier):
    weights = classifier.text_weights("car")
    assert weights.shape == (10, 16)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("ViT-L-14")(color_prompts("car")[3])
        mean = F.normalize(classifier.model.encode_text(tokens), dim=-1).mean(0)
    torch.testing.assert_close(weights[3], mean / mean.norm())
    assert classifier.text_weights("car") is weights  # cached per class


def test_classifier_names_one_of_the_ten_colours_per_detection(classifier):
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :20] = (220, 30, 30)
    image[:, 20:] = (30, 30, 220)
    left, right = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    left[5:35, 2:18], right[5:35, 22:38] = True, True
    detections = [Detection("car", 0.9, (2, 5, 18, 35), left), Detection("car", 0.8, (22, 5, 38, 35), right),
                  Detection("car", 0.7, (0, 0, 0, 0), np.zeros((40, 40), bool))]
    colors = classifier(image, detections, "car")
    assert len(colors) == 3 and set(colors) <= set(GENEVAL_COLORS)
    logits = classifier.logits(image, detections, "car")
    assert logits.shape == (3, 10)
    assert colors == [GENEVAL_COLORS[i] for i in logits.argmax(1)]
    # the crop, not the rest of the image, decides: same crop, same colour whatever lies outside the mask
    other = image.copy()
    other[~left] = 0
    assert classifier(other, detections[:1], "car") == colors[:1]
    assert classifier(image, [], "car") == []


def test_classifier_in_the_scorer_checks_colour_clauses(classifier):
    image = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    detection = Detection("car", 0.95, (8, 8, 24, 24), mask)
    (named,) = classifier(image, [detection], "car")
    scorer = GenEvalScorer(lambda img: [detection], classifier)
    right = {"tag": "colors", "prompt": "", "include": [{"class": "car", "count": 1, "color": named}], "exclude": []}
    wrong_color = next(c for c in GENEVAL_COLORS if c != named)
    wrong = {**right, "include": [{"class": "car", "count": 1, "color": wrong_color}]}
    ok, bad = scorer.score([image, image], [right, wrong])
    assert ok.correct and ok.reward == 1.0
    assert not bad.correct and bad.reward == 0.5


def test_from_weights_loads_safetensors_and_names_what_is_missing(tmp_path):
    # a named open_clip config as small as tiny_clip's, so from_weights runs as it does for ViT-L-14
    (tmp_path / "elborl-tiny-clip.json").write_text(json.dumps({"embed_dim": 16, **TINY_TOWERS}))
    open_clip.add_model_config(tmp_path / "elborl-tiny-clip.json")
    torch.manual_seed(1)
    model = open_clip.create_model("elborl-tiny-clip", pretrained=None)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = ClipColorClassifier.from_weights(path, model_name="elborl-tiny-clip")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    # QuickGELU forced, as OpenAI trained CLIP with it (the config itself does not ask for it)
    assert type(loaded.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ != "QuickGELU"
    assert loaded.preprocess.transforms[-1].mean == OPENAI_DATASET_MEAN
    with pytest.raises(FileNotFoundError, match="timm/vit_large_patch14_clip_224.openai"):
        load_clip_weights(model, tmp_path / "absent.safetensors")
    save_file({"visual.proj": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="not loadable as elborl-tiny-clip weights"):
        load_clip_weights(model, tmp_path / "wrong.safetensors", "elborl-tiny-clip")
