"""Rewards: OCR (real RapidOCR weights), JPEG, CLIP family (tiny random models through the real loaders,
local and s3://), the registry and multi-reward aggregation."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from elborl.config import ParamsError, load_params, parse_params
from elborl.geneval.prompts import shapes_test_set
from elborl.objectives import group_advantages
from elborl.rewards import REWARDS, MultiReward, RewardsConfig, make_reward, prompt_groups, reward_from_params
from elborl.rewards import clip_family as cf
from elborl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from elborl.rewards.ocr import (OCR_TAG, is_test_text, levenshtein, normalise_text, ocr_prompts, ocr_test_set,
                                target_text, text_reward)
from elborl.shapes.render import render_batch

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
METAS = [{"prompt": "a photo of a cat"}, {"prompt": "a wooden sign that says \"OPEN LATE\" " * 12},
         {"prompt": "x"}]


def sign(text: str, size: int = 256) -> np.ndarray:
    image = Image.new("RGB", (size, size), (236, 224, 196))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 90, size - 10, 170), fill=(250, 250, 245), outline=(60, 40, 20), width=4)
    draw.text((size // 2, 130), text, fill=(15, 15, 15), font=ImageFont.load_default(size=36), anchor="mm")
    return np.asarray(image)


# --- OCR ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ocr():
    return make_reward("ocr", threads=1)


def test_ocr_reads_a_rendered_sign_and_not_noise(ocr):
    meta = {"tag": OCR_TAG, "prompt": 'a wooden sign that says "Open Late"'}
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    images = np.stack([sign("OPEN LATE"), noise, sign("OPEN LANE")])
    rewards = ocr(images, [meta] * 3)
    assert rewards.dtype == np.float32 and rewards.shape == (3,)
    assert rewards[0] == pytest.approx(1.0, abs=0.05), ocr.read(images[0])
    assert rewards[1] == pytest.approx(0.0, abs=0.05), ocr.read(images[1])
    assert rewards[2] == pytest.approx(1 - 1 / 8, abs=0.05), ocr.read(images[2])  # one letter of 8 wrong


def test_text_reward_normalisation_and_edit_distance():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert normalise_text(" Hello\n  World ") == "helloworld"
    assert text_reward("Hello World", "HELLO  WORLD") == 1.0  # case and whitespace are free
    assert text_reward("hello", "sign: hello there") == 1.0  # the target inside more text counts as read
    assert text_reward("abcd", "abxd") == 0.75
    assert text_reward("abc", "zzzzzzzzzzzz") == 0.0  # distance capped at len(target)
    assert text_reward("abc", "") == 0.0
    assert target_text({"prompt": 'a sign that says "HELLO" and "BYE"'}) == "HELLO"
    assert target_text({"prompt": "whatever", "text": "Fresh"}) == "Fresh"
    with pytest.raises(ValueError, match="no quoted text"):
        target_text({"prompt": "a photo of a cat"})


def test_ocr_prompt_sets_hold_out_their_texts(tmp_path):
    from elborl.geneval.prompts import read_jsonl, write_jsonl

    train, test = ocr_prompts(300, seed=3), ocr_test_set()
    assert ocr_prompts(300, seed=3) == train and ocr_prompts(300, seed=4) != train
    assert len({r["prompt"] for r in train}) == 300 and len(test) == 100
    assert not any(is_test_text(r["text"]) for r in train) and all(is_test_text(r["text"]) for r in test)
    assert not {normalise_text(r["text"]) for r in train} & {normalise_text(r["text"]) for r in test}
    assert all(target_text({"prompt": r["prompt"]}) == r["text"] and r["tag"] == OCR_TAG for r in train + test)
    write_jsonl(tmp_path / "ocr.jsonl", test)
    assert read_jsonl(tmp_path / "ocr.jsonl") == test


# --- JPEG -----------------------------------------------------------------------------------------
def test_jpeg_rewards_order_flat_above_noise():
    import io

    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    images, metas = np.stack([flat, noise]), [{"prompt": "a"}] * 2
    compress, incompress = jpeg_compressibility()(images, metas), jpeg_incompressibility()(images, metas)
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    np.testing.assert_array_equal(compress, -incompress)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    assert incompress[1] == pytest.approx(len(buffer.getvalue()) / 1000)


# --- CLIP family: tiny random models saved to disk and loaded by the real loaders -----------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    cf.build_tiny_open_clip(root / "clipscore", seed=0)  # HF-hub open_clip layout, safetensors
    cf.build_tiny_open_clip(root / "hpsv2", seed=0, weights_name="HPS_v2.1_compressed.pt")  # {"state_dict"} pickle
    cf.build_tiny_hf_clip(root / "pickscore", seed=1)  # CLIPModel + CLIPProcessor in one directory
    cf.build_tiny_aesthetic(root / "aesthetic", seed=2)  # clip/ + aesthetic_head.safetensors
    cf.build_tiny_aesthetic(root / "aesthetic_pth", seed=2, head_name="sac+logos+ava1-l14-linearMSE.pth")
    return root


def test_every_clip_family_reward_gives_finite_scores_per_image(saved):
    scores = {}
    for name, directory in [("clipscore", "clipscore"), ("hpsv2", "hpsv2"), ("pickscore", "pickscore"),
                            ("aesthetic", "aesthetic"), ("aesthetic", "aesthetic_pth")]:
        reward = make_reward(name, path=str(saved / directory), device="cpu")
        scores[directory] = values = reward(NOISE, METAS)
        assert values.dtype == np.float32 and values.shape == (3,) and np.isfinite(values).all(), (directory, values)
        assert reward(NOISE[:0], []).shape == (0,)
    # a weights file alone, its architecture from the open_clip_config.json beside it
    hps_file = make_reward("hpsv2", path=str(saved / "hpsv2" / "HPS_v2.1_compressed.pt"), device="cpu")
    np.testing.assert_allclose(hps_file(NOISE, METAS), scores["hpsv2"], rtol=1e-6)
    # same open_clip weights: CLIPScore = 100 · max(HPS-style cosine, 0)
    np.testing.assert_allclose(scores["clipscore"], 100 * np.maximum(scores["hpsv2"], 0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores["aesthetic"], scores["aesthetic_pth"], rtol=1e-6)  # .pth head = safetensors head
    assert np.abs(scores["pickscore"]).max() > 0 and len(set(scores["hpsv2"].tolist())) == 3


def test_pickscore_is_logit_scale_times_cosine(saved):
    from transformers import CLIPModel

    reward = make_reward("pickscore", path=str(saved / "pickscore"), device="cpu")
    model = CLIPModel.from_pretrained(saved / "pickscore").eval()
    inputs = reward.processor(text=[m["prompt"] for m in METAS], images=list(NOISE), padding=True, truncation=True,
                              max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    np.testing.assert_allclose(reward(NOISE, METAS), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert inputs["input_ids"].shape[1] == 77  # the long prompt is truncated to CLIP's 77 tokens


def test_aesthetic_ignores_the_prompt_and_loads_from_separate_paths(saved):
    reward = make_reward("aesthetic", clip_path=str(saved / "aesthetic" / "clip"),
                         head_path=str(saved / "aesthetic" / "aesthetic_head.safetensors"), device="cpu")
    np.testing.assert_allclose(reward(NOISE, METAS), reward(NOISE, [{"prompt": "other"}] * 3), rtol=1e-6)


def test_clip_family_rewards_load_from_s3_artifacts(saved, s3_env, tmp_path):
    from elborl.store import ArtifactStore

    bucket, store = s3_env.create_bucket(), ArtifactStore()
    for name in ("clipscore", "pickscore", "aesthetic"):
        uri = f"s3://{bucket}/rewards/{name}"
        store.put_artifact(saved / name, uri)
        local = make_reward(name, path=str(saved / name), device="cpu")(NOISE, METAS)
        remote = make_reward(name, path=uri, device="cpu", cache_dir=tmp_path / "cache")
        np.testing.assert_allclose(remote(NOISE, METAS), local, rtol=1e-6)
        again = make_reward(name, path=uri, device="cpu", cache_dir=tmp_path / "cache")  # cached copy reused
        np.testing.assert_allclose(again(NOISE, METAS), local, rtol=1e-6)


def test_missing_weights_are_named(saved, tmp_path):
    with pytest.raises(ValueError, match=r"rewards\.paths\.pickscore"):
        make_reward("pickscore")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        make_reward("clipscore", path=str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        make_reward("aesthetic", clip_path=str(saved / "aesthetic" / "clip"), head_path=str(tmp_path / "empty"))


# --- multi-reward ---------------------------------------------------------------------------------
class Fixed:
    def __init__(self, values):
        self.values = np.array(values, dtype=np.float32)

    def __call__(self, images, metas):
        return self.values[: len(images)]


R1, R2 = [1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 10.0, 0.0]
GROUPED = [{"prompt": "p"}, {"prompt": "p"}, {"prompt": "q"}, {"prompt": "q"}]
IMAGES = np.zeros((4, 2, 2, 3), dtype=np.uint8)


def test_weighted_sum():
    multi = MultiReward({"a": Fixed(R1), "b": Fixed(R2)}, {"a": 0.5, "b": 2.0})
    np.testing.assert_allclose(multi(IMAGES, GROUPED), [20.5, 1.0, 21.5, 2.0])
    np.testing.assert_allclose(multi.last_scores["a"], R1)
    np.testing.assert_allclose(multi.last_scores["b"], R2)


def test_per_reward_normalised_advantages():
    multi = MultiReward({"a": Fixed(R1), "b": Fixed(R2)}, {"a": 0.5, "b": 2.0}, aggregate="advantages")
    # a: group means 1.5, 3.5 -> centred ±0.5, batch std sqrt(1.25); b: centred ±5, batch std 5
    z_a = np.array([-0.5, 0.5, -0.5, 0.5]) / math.sqrt(1.25)
    z_b = np.array([1.0, -1.0, 1.0, -1.0])
    values = multi(IMAGES, GROUPED)
    np.testing.assert_allclose(values, 0.5 * z_a + 2.0 * z_b, rtol=1e-6)
    # the training loop's recipe advantages on top: 0.1 · Σ w_i z_i (the values already have zero group mean)
    looped = group_advantages(torch.tensor(values), prompt_groups(GROUPED), "recipe", 0.1)
    np.testing.assert_allclose(looped.numpy(), 0.1 * (0.5 * z_a + 2.0 * z_b), rtol=1e-5)
    # explicit group ids, any advantage mode: Σ w_i · group_advantages(R_i)
    scores = multi.scores(IMAGES, GROUPED)
    recipe = multi.advantages(scores, [0, 0, 1, 1], mode="recipe", scale=0.1)
    np.testing.assert_allclose(recipe.numpy(), 0.1 * (0.5 * np.array([-0.5, 0.5, -0.5, 0.5])
                                                      + 2.0 * np.array([5, -5, 5, -5])), rtol=1e-6)
    clipped = multi.advantages(scores, [0, 0, 1, 1], mode="std", clip=0.5)
    np.testing.assert_allclose(clipped.numpy(), 0.5 * np.clip(z_a, -0.5, 0.5) + 2.0 * np.clip(z_b, -0.5, 0.5), rtol=1e-6)


def test_multi_reward_checks_its_inputs():
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        MultiReward({"a": Fixed(R1)}, {"a": 1.0}, aggregate="max")
    with pytest.raises(ValueError, match=r"\['b'\]"):
        MultiReward({"a": Fixed(R1)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="reward 'a' returned 2 values for 4 images"):
        MultiReward({"a": Fixed(R1[:2])}, {"a": 1.0})(IMAGES, GROUPED)


def test_rewards_from_params():
    config = RewardsConfig(weights={"jpeg_compressibility": 1.0, "jpeg_incompressibility": 1.0})
    flat_and_noise = np.stack([np.zeros((16, 16, 3), np.uint8), NOISE[0, :16, :16]])
    np.testing.assert_allclose(reward_from_params(config)(flat_and_noise, [{"prompt": "a"}] * 2), 0.0, atol=1e-6)
    single = reward_from_params(load_params("params.yaml").rewards)
    assert single.names == ["shapes_geneval"] and single.aggregate == "weighted_sum"
    # the default params train on exactly the shapes-GenEval reward, bit for bit
    metas = shapes_test_set()[::4]
    images = render_batch(metas, seed=3)
    images[::2] = images[1::2]  # half the images show another prompt: rewards vary
    expected = make_reward("shapes_geneval")(images, metas)
    assert len(set(expected.tolist())) > 1 and np.array_equal(single(images, metas), expected)
    alone = reward_from_params(config, only="jpeg_incompressibility")  # a stage's --reward override
    assert alone.names == ["jpeg_incompressibility"] and alone.weights.tolist() == [1.0]


def test_the_strict_shapes_reward_is_the_held_out_verdict():
    from elborl.evaluate import shapes_scorer

    metas = shapes_test_set()[::4]
    images = render_batch(metas, seed=3)
    images[::2] = images[1::2]  # half the images show another prompt: some verdicts fail
    verdicts = [s.correct for s in shapes_scorer().score(images, metas)]
    strict = make_reward("shapes_geneval_strict")(images, metas)
    assert True in verdicts and False in verdicts
    assert strict.tolist() == [float(v) for v in verdicts]
    both = reward_from_params(RewardsConfig(weights={"shapes_geneval": 1.0, "shapes_geneval_strict": 0.5}))
    np.testing.assert_allclose(both(images, metas), make_reward("shapes_geneval")(images, metas) + 0.5 * strict)


# --- registry and params --------------------------------------------------------------------------
def test_registry_names_unknown_rewards():
    assert {"shapes_geneval", "geneval", "ocr", "clipscore", "pickscore", "hpsv2", "aesthetic",
            "jpeg_compressibility", "jpeg_incompressibility"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'imagereward'"):
        make_reward("imagereward")


def test_every_registered_factory_resolves_to_a_function_of_its_module():
    import importlib
    import inspect

    for name, factory in REWARDS.items():
        module, function = inspect.getclosurevars(factory).nonlocals["module"], factory.__name__
        assert callable(getattr(importlib.import_module(f"elborl.rewards.{module}"), function)), name


def test_params_rewards_section():
    assert load_params("params.yaml").rewards == RewardsConfig(weights={"shapes_geneval": 1.0})
    params = parse_params({"rewards": {"aggregate": "advantages", "weights": {"ocr": 1, "aesthetic": "5e-1"},
                                       "paths": {"aesthetic": "s3://bucket/aesthetic"}}})
    assert params.rewards.weights == {"ocr": 1.0, "aesthetic": 0.5}
    for raw, message in [
        ({"weights": {"ocr": 1.0, "imagereward": 1.0}}, "rewards.weights.imagereward: unknown reward 'imagereward'"),
        ({"paths": {"hps": "x"}}, "rewards.paths.hps: unknown reward 'hps'"),
        ({"weights": {"ocr": "high"}}, "rewards.weights.ocr: expected float"),
        ({"weights": [1.0]}, "rewards.weights: expected a mapping"),
        ({"weights": {}}, "rewards.weights: name at least one reward"),
        ({"weights": {"ocr": 0.0}}, "every weight is 0"),
        ({"weights": {"pickscore": 1.0}}, "rewards.paths.pickscore"),
        ({"aggregate": "mean"}, "rewards.aggregate: unknown aggregation 'mean'"),
        ({"weigths": {}}, "unknown key(s) ['weigths']"),
    ]:
        with pytest.raises(ParamsError) as error:
            parse_params({"rewards": raw})
        assert message in str(error.value)


def test_registry_import_is_light():
    code = ("import sys, elborl.rewards; heavy = {'torch', 'transformers', 'open_clip', 'rapidocr', 'mmdet'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
