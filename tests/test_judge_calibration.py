"""The shapes judge against people: the labelled set, the person's verdict, and the calibrated judge's agreement.

The person's verdict is checked by hand-made cases against GenEval's rules; the agreement test reads the labelled
set kept in calibration/shapes_judge/ and holds the judge to the calibration target on its held-out split.
"""

from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, load_bench
from elborl.geneval.prompts import shapes_test_set
from elborl.shapes import judge_calibration as jc
from elborl.shapes.detector import ShapesDetector
from elborl.shapes.render import render
from elborl.shapes.world import BACKGROUND

SET = ROOT / "calibration" / "shapes_judge"
BLANK = np.full((32, 32, 3), BACKGROUND, np.uint8)


def meta_for(prompt: str) -> dict:
    return next(m for m in shapes_test_set() if m["prompt"] == prompt)


def labelled(prompt: str, *objects) -> jc.LabelledImage:
    return jc.LabelledImage("x.png", meta_for(prompt), "hand-made", "fit", list(objects))


def thing(certainty, colour=None, shape=None, box=(2, 2, 10, 10)):
    return jc.LabelledObject((box[0] + 1, box[1] + 1), box, certainty, shape, colour)


# ------------------------------------------------------------------------------ the person's verdict
def test_counting_needs_every_object_certain_and_no_extra_certain_one():
    prompt = next(m["prompt"] for m in shapes_test_set() if m["tag"] == "counting" and m["include"][0]["count"] == 3)
    shape = meta_for(prompt)["include"][0]["class"]
    boxes = [(1, 1, 9, 9), (12, 1, 20, 9), (23, 1, 31, 9), (1, 20, 9, 28)]
    three = [thing("certain", "red", shape, box) for box in boxes[:3]]
    assert jc.person_verdict(labelled(prompt, *three), BLANK)
    # an ambiguous one is not sure enough to count (GenEval keeps > 0.9 for counting) ...
    assert not jc.person_verdict(labelled(prompt, *three[:2], thing("ambiguous", "red", shape, boxes[2])), BLANK)
    # ... nor to break the count; a fourth certain one does; a blob nobody would name never counts
    assert jc.person_verdict(labelled(prompt, *three, thing("ambiguous", "red", shape, boxes[3])), BLANK)
    assert not jc.person_verdict(labelled(prompt, *three, thing("certain", "red", shape, boxes[3])), BLANK)
    assert jc.person_verdict(labelled(prompt, *three, thing("none", box=boxes[3])), BLANK)


def test_colour_and_position_use_what_the_person_named_and_where():
    colours = next(m for m in shapes_test_set() if m["tag"] == "colors")
    clause = colours["include"][0]
    other = next(c for c in ("red", "blue") if c != clause["color"])
    assert jc.person_verdict(labelled(colours["prompt"], thing("certain", clause["color"], clause["class"])), BLANK)
    assert not jc.person_verdict(labelled(colours["prompt"], thing("certain", other, clause["class"])), BLANK)
    position = next(m for m in shapes_test_set() if m["tag"] == "position" and m["include"][1]["position"][0] == "left of")
    a, b = position["include"][1]["class"], position["include"][0]["class"]
    left, right = (1, 10, 9, 18), (20, 10, 28, 18)
    assert jc.person_verdict(labelled(position["prompt"], thing("certain", "red", a, left),
                                      thing("certain", "blue", b, right)), BLANK)
    assert not jc.person_verdict(labelled(position["prompt"], thing("certain", "red", a, right),
                                          thing("certain", "blue", b, left)), BLANK)


def test_a_label_must_name_a_shape_and_colour_of_the_world():
    with pytest.raises(ValueError, match="needs a shape"):
        labelled("a photo of a circle", thing("certain", "red", "hexagon")).validate()
    with pytest.raises(ValueError, match="certainty 'sure'"):
        labelled("a photo of a circle", thing("sure", "red", "circle")).validate()


# ------------------------------------------------------------------------------ corrections by eye
def test_corrections_change_add_and_drop_and_name_the_bad_line():
    bench = load_bench("judge_calibration")
    items = [(labelled("a photo of a circle", thing("certain", "red", "circle"), thing("certain", "red", "square")), BLANK),
             (labelled("a photo of a circle", thing("certain", "blue", "circle")), BLANK)]
    text = "0 2 none  # a smear\n0 1 certain orange circle\n0 add ambiguous red square 20,20\n1 drop\n"
    [(first, _)] = bench.apply_corrections(items, text, "c.txt")
    assert [(o.certainty, o.colour, o.shape) for o in first.objects] == [
        ("certain", "orange", "circle"), ("none", None, None), ("ambiguous", "red", "square")]
    assert first.objects[2].at == (20, 20)
    with pytest.raises(SystemExit, match="c.txt:2: cannot apply '0 9 none'"):
        bench.apply_corrections(items, "# fine\n0 9 none\n", "c.txt")
    with pytest.raises(SystemExit, match="c.txt:1"):
        bench.apply_corrections(items, "0 1 certain pink circle\n", "c.txt")


# ------------------------------------------------------------------------------ rendered ground truth
@pytest.mark.parametrize("kind", sorted(jc.DEGRADATIONS))
def test_degraded_scenes_label_every_object_at_one_of_its_pixels(kind):
    rng = np.random.default_rng(3)
    metas = [m for m in shapes_test_set() if len(m["include"]) == 2]
    levels, limit = jc.DEGRADATIONS[kind]
    for level in levels:
        image, objects = jc.degraded_scene(metas[0], kind, level, rng)
        assert image.shape == (32, 32, 3) and len(objects) >= 1
        for obj in objects:
            col, row = obj.at
            assert np.abs(image[row, col].astype(int) - BACKGROUND).max() > 40, "the labelled pixel is the object's"
            x0, y0, x1, y1 = obj.box
            assert x0 <= col < x1 and y0 <= row < y1
        assert {o.certainty for o in objects} <= {"certain", "ambiguous"}


# (share above 0.3 at most, share above 0.9 at most) per artefact, measured on 60 draws with the calibrated judge:
# two-colour shapes and ellipses never pass 0.3; hybrids pass it in 18 % (max 0.81), merged pairs in 5 % (one, a
# pair whose smaller shape hides in the larger, at 1.0): the price of accepting the soft shapes people accept.
HACK_BARS = {"two_colour": (0.0, 0.0), "stretched": (0.0, 0.0), "hybrid": (0.25, 0.0), "merged": (0.1, 1 / 60)}


@pytest.mark.parametrize("kind", jc.HACKS)
def test_reward_hacking_artefacts_stay_under_genevals_thresholds(kind):
    """The calibrated judge still refuses most of what a policy could paint instead of a shape."""
    rng = np.random.default_rng(4)
    detector = ShapesDetector()
    metas = shapes_test_set()
    scores = []
    for k in range(60):
        image, objects = jc.hacked_scene(metas[k * 3 % len(metas)], kind, rng)
        artefact = jc.LabelledImage("x", metas[0], "", "fit", objects[:1])
        [(_, score, _)] = jc.matched_scores(artefact, detector(image))
        scores.append(score)
    above_kept, above_counted = HACK_BARS[kind]
    assert np.mean(np.array(scores) > 0.3) <= above_kept, np.round(sorted(scores)[-6:], 2)
    assert np.mean(np.array(scores) > 0.9) <= above_counted, np.round(sorted(scores)[-6:], 2)


# ------------------------------------------------------------------------------ the labelled set
@pytest.fixture(scope="module")
def labelled_set():
    return jc.read_set(SET)


def test_the_set_holds_model_samples_and_renders_in_both_splits(labelled_set):
    sources = {(l.split, l.source.startswith("render")) for l, _ in labelled_set}
    assert sources == {("fit", True), ("fit", False), ("held_out", True), ("held_out", False)}
    model = [l for l, _ in labelled_set if not l.source.startswith("render")]
    assert len(model) >= 200
    assert {l.meta["tag"] for l in model} == set(jc.TASKS)
    assert all((SET / l.image).exists() for l, _ in labelled_set)


def test_the_calibrated_judge_agrees_with_people_on_held_out_model_samples(labelled_set):
    """The target: agreement >= 95% and no task's correct rate more than 0.10 from people's, on base-model and RL
    samples never used to fit it. Measured: 0.956 (216 of 226) and 0.075 (two objects)
    (docs/experiments/2026-12-07-shapes-judge-calibration.md)."""
    held_out = [(l, im) for l, im in labelled_set if l.split == "held_out" and not l.source.startswith("render")]
    assert any(l.image.startswith("rl15-test/") for l, _ in held_out), "RL-policy samples are part of the check"
    result = jc.agreement(held_out)
    assert result.agree >= 0.95, result.per_task
    assert result.worst_gap() <= 0.10, result.per_task


def test_objects_people_are_sure_of_score_above_counting_threshold(labelled_set):
    scores = jc.object_scores([(l, im) for l, im in labelled_set if l.split == "held_out"])
    certain = np.array([s for c, s, _ in scores if c == "certain"])
    nothing = np.array([s for c, s, _ in scores if c == "none"])
    assert np.mean(certain > 0.9) >= 0.9
    assert np.mean(nothing <= 0.3) >= 0.95


def test_the_hack_monitor_flags_the_sign_of_each_artefact_and_not_a_clean_shape():
    bench = load_bench("judge_calibration")
    meta = next(m for m in shapes_test_set() if m["tag"] == "single_object")
    rng = np.random.default_rng(0)
    clean, _ = render(meta, rng)
    [measurement] = ShapesDetector().measure(clean)
    assert not any(bench.hack_signs(measurement).values())
    flagged = {"two_colour": "two-colour", "hybrid": "asymmetric"}
    for kind, sign in flagged.items():
        signs = [bench.hack_signs(ShapesDetector().measure(jc.hacked_scene(meta, kind, rng)[0])[0])[sign]
                 for _ in range(10)]
        assert sum(signs) >= 7, f"{kind}: {sign} in {sum(signs)} of 10"
