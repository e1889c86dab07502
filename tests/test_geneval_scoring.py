"""GenEval's scoring rules on hand-built detections; no detector, no renderer.

Every expectation is worked out by hand in the comment next to it.
"""

import numpy as np
import pytest

from elborl.geneval.scoring import (
    GenEvalScorer,
    ImageScore,
    dense_reward,
    evaluate_image,
    filter_detections,
    relative_position,
    summarize,
)
from elborl.geneval.types import TASKS, Detection

SIZE = 64
IMAGE = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)


def box_at(cx, cy, w=10.0, h=10.0):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


class Scene:
    """Builds detections and plays the colour classifier, reading the colour given to each."""

    def __init__(self):
        self.color_of: dict[int, str] = {}
        self.calls: list[tuple[str, int]] = []  # (class asked, number of detections)

    def add(self, label, cx, cy, score=0.95, color=None, w=10.0, h=10.0):
        box = box_at(cx, cy, w, h)
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        detection = Detection(label=label, score=score, box=box, mask=mask)
        self.color_of[id(detection)] = color
        return detection

    def colors(self, image, detections, class_name):
        self.calls.append((class_name, len(detections)))
        return [self.color_of[id(d)] for d in detections]


def kept(detections, tag):
    return filter_detections(detections, tag)


def verdict(scene, detections, meta):
    return evaluate_image(IMAGE, kept(detections, meta["tag"]), meta, scene.colors)


def reward(scene, detections, meta):
    return dense_reward(IMAGE, kept(detections, meta["tag"]), meta, scene.colors)


def position_meta(relation="left of", count_a=1, count_b=1, color_b=None):
    square = {"class": "square", "count": count_b}
    if color_b:
        square["color"] = color_b
    circle = {"class": "circle", "count": count_a, "position": [relation, 0]}
    return {"tag": "position", "include": [square, circle], "exclude": []}


def counting_meta(n, name="circle"):
    return {"tag": "counting", "include": [{"class": name, "count": n}], "exclude": [{"class": name, "count": n + 1}]}


TWO_OBJECT = {
    "tag": "two_object",
    "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
    "exclude": [],
}
RED_CIRCLE = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "exclude": []}


# --- relative_position -----------------------------------------------------------------

# Two 10x10 boxes: each axis is shrunk by 0.1 * (10 + 10) = 2 pixels.
@pytest.mark.parametrize(
    "dx, expected",
    [
        (-4.2, {"left of"}),  # (4.2 - 2) / 4.2 = 0.524 > 0.5
        (-3.8, set()),  # (3.8 - 2) / 3.8 = 0.474: inside the margin
        (4.2, {"right of"}),
        (3.8, set()),
        (-20.0, {"left of"}),  # 18 / 20 = 0.9
    ],
)
def test_horizontal_margin(dx, expected):
    assert relative_position(box_at(30 + dx, 30), box_at(30, 30)) == expected


@pytest.mark.parametrize(
    "dy, expected",
    [
        (-4.2, {"above"}),  # A's centre has a smaller y: higher in the image
        (4.2, {"below"}),
        (-3.8, set()),
        (3.8, set()),
    ],
)
def test_vertical_margin_with_y_downward(dy, expected):
    assert relative_position(box_at(30, 30 + dy), box_at(30, 30)) == expected


@pytest.mark.parametrize(
    "offset, expected",
    [
        ((-10, -10), {"left of", "above"}),  # (-8, -8) / 14.14 = (-0.566, -0.566)
        ((-10, -9), {"left of", "above"}),  # (-8, -7) / 13.45 = (-0.595, -0.520)
        ((-10, -7), {"left of"}),  # (-8, -5) / 12.21 = (-0.655, -0.410)
        ((10, 4), {"right of"}),  # (8, 2) / 10.77 = (0.743, 0.186)
        ((6, 10), {"below"}),  # (4, 8) / 11.66 = (0.343, 0.686)
    ],
)
def test_diagonal_offsets(offset, expected):
    ox, oy = offset
    assert relative_position(box_at(30 + ox, 30 + oy), box_at(30, 30)) == expected


def test_overlapping_centres_give_no_relation():
    assert relative_position(box_at(30, 30), box_at(30, 30)) == set()
    # (1.5, -1.5) is smaller than the 2-pixel shrink on both axes: all clamped to 0
    assert relative_position(box_at(31.5, 28.5), box_at(30, 30)) == set()


def test_shrink_uses_each_axis_own_sizes():
    # Wide boxes (40 x 10): x shrinks by 0.1 * 80 = 8, so an offset of 10 keeps 2 / 10 = 0.2: no relation
    assert relative_position(box_at(20, 30, w=40), box_at(30, 30, w=40)) == set()
    # Tall boxes (10 x 40): x still shrinks by 2, so 8 / 10 = 0.8: left of
    assert relative_position(box_at(20, 30, h=40), box_at(30, 30, h=40)) == {"left of"}


def test_relation_is_antisymmetric():
    a, b = box_at(10, 10), box_at(40, 40)
    assert relative_position(a, b) == {"left of", "above"}
    assert relative_position(b, a) == {"right of", "below"}


# --- filter_detections -----------------------------------------------------------------

def test_score_threshold_is_strict():
    s = Scene()
    dets = [s.add("circle", 10, 10, score=0.3), s.add("circle", 30, 10, score=0.31), s.add("square", 10, 30, score=0.2)]
    groups = kept(dets, "single_object")
    assert [d.score for d in groups["circle"]] == [0.31]  # 0.3 is not > 0.3
    assert "square" not in groups


def test_counting_uses_the_strict_threshold():
    s = Scene()
    dets = [s.add("circle", 10, 10, score=s_) for s_ in (0.85, 0.9, 0.95)]
    assert [d.score for d in kept(dets, "counting")["circle"]] == [0.95]  # 0.9 is not > 0.9
    assert [d.score for d in kept(dets, "two_object")["circle"]] == [0.95, 0.9, 0.85]


def test_at_most_16_per_class_most_confident_first_no_suppression():
    s = Scene()
    scores = [0.4 + 0.03 * i for i in range(20)]  # 0.40 .. 0.97, all at the same place
    dets = [s.add("circle", 30, 30, score=x) for x in scores] + [s.add("square", 30, 30, score=0.5)]
    groups = kept(dets, "single_object")
    # identical boxes are all kept (no overlap suppression) up to the cap; the 4 least confident go
    assert [d.score for d in groups["circle"]] == sorted(scores, reverse=True)[:16]
    assert len(groups["square"]) == 1  # the cap is per class


# --- evaluate_image: counting and thresholds -------------------------------------------

def test_counting_exclude_n_plus_one_fails_n_passes():
    s = Scene()
    three = [s.add("circle", x, 30) for x in (10, 30, 50)]
    ok, reasons = verdict(s, three[:2], counting_meta(2))
    assert ok and reasons == []
    ok, reasons = verdict(s, three, counting_meta(2))
    assert not ok and any("circle < 3" in r for r in reasons)  # 3 >= exclude count 3


def test_low_confidence_extra_is_ignored_for_counting():
    s = Scene()
    dets = [s.add("circle", 10, 30), s.add("circle", 30, 30), s.add("circle", 50, 30, score=0.85)]
    ok, _ = verdict(s, dets, counting_meta(2))
    assert ok  # the 0.85 third circle is dropped at the 0.9 threshold, so no exclude fires


def test_low_confidence_object_counts_for_two_object_not_for_counting():
    s = Scene()
    assert verdict(s, [s.add("circle", 10, 30, score=0.85), s.add("square", 40, 30)], TWO_OBJECT)[0]
    ok, reasons = verdict(s, [s.add("circle", 10, 30), s.add("circle", 40, 30, score=0.85)], counting_meta(2))
    assert not ok and reasons == ["expected circle >= 2, found 1"]


def test_missing_object_fails():
    s = Scene()
    ok, reasons = verdict(s, [s.add("circle", 10, 30)], TWO_OBJECT)
    assert not ok and reasons == ["expected square >= 1, found 0"]


# --- evaluate_image: colour ------------------------------------------------------------

def test_colour_is_read_from_the_most_confident_detection():
    s = Scene()
    blue_first = [s.add("circle", 10, 30, 0.95, "blue"), s.add("circle", 40, 30, 0.6, "red")]
    ok, reasons = verdict(s, blue_first, RED_CIRCLE)
    assert not ok and "red circle" in reasons[0]  # the top-1 circle is blue
    assert s.calls == [("circle", 1)]  # only the top-`count` detections are classified
    red_first = [s.add("circle", 10, 30, 0.95, "red"), s.add("circle", 40, 30, 0.6, "blue")]
    assert verdict(s, red_first, RED_CIRCLE)[0]


def test_colour_must_hold_for_the_asked_count_among_the_top_ones():
    s = Scene()
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 2, "color": "red"}], "exclude": []}

    def circles(*colors):  # confidences 0.9, 0.8, 0.7 in the order given
        return [s.add("circle", 10 + 20 * i, 30, 0.9 - 0.1 * i, c) for i, c in enumerate(colors)]

    # two red circles exist, but the top two by confidence are red and blue: 1 red < 2
    assert not verdict(s, circles("red", "blue", "red"), meta)[0]
    # top two red, red: 2 >= 2, the less confident blue one is not looked at
    assert verdict(s, circles("red", "red", "blue"), meta)[0]


def test_colour_classifier_is_not_called_when_no_colour_is_asked_or_count_fails():
    s = Scene()
    verdict(s, [s.add("circle", 10, 30, color="red"), s.add("square", 40, 30, color="red")], TWO_OBJECT)
    verdict(s, [], RED_CIRCLE)
    assert s.calls == []


# --- evaluate_image: position ----------------------------------------------------------

def test_position_holds_and_fails():
    s = Scene()
    square = s.add("square", 40, 30)
    assert verdict(s, [square, s.add("circle", 10, 30)], position_meta("left of"))[0]
    ok, reasons = verdict(s, [square, s.add("circle", 10, 30)], position_meta("right of"))
    assert not ok and reasons == ["expected circle right of square, found left of"]


def test_position_with_missing_target_fails():
    s = Scene()
    ok, reasons = verdict(s, [s.add("circle", 10, 30)], position_meta())
    assert not ok
    assert reasons == ["expected square >= 1, found 0", "no target for circle to be left of"]


def test_position_target_that_failed_its_colour_counts_as_missing():
    s = Scene()
    dets = [s.add("square", 40, 30, color="blue"), s.add("circle", 10, 30)]
    ok, reasons = verdict(s, dets, position_meta(color_b="red"))
    assert not ok and reasons[-1] == "no target for circle to be left of"


def test_every_a_must_hold_against_every_b():
    s = Scene()
    square = s.add("square", 30, 30)
    # offsets (-25, 0) -> (-23, 0) / 25 = (-0.92, 0): left; (-20, 20) -> (-18, 18) / 28.3 = (-0.64, 0.64):
    # left of and below, so left holds for both
    both_left = [square, s.add("circle", 5, 30), s.add("circle", 10, 50)]
    assert verdict(s, both_left, position_meta(count_a=2))[0]
    # the second circle at (+25, 0) is right of the square
    one_right = [square, s.add("circle", 5, 30), s.add("circle", 55, 30)]
    assert not verdict(s, one_right, position_meta(count_a=2))[0]
    two_squares = [s.add("square", 30, 10), s.add("square", 30, 50, score=0.9), s.add("circle", 10, 30)]
    # circle vs the squares: (-20, 20) and (-20, -20), both left of
    assert verdict(s, two_squares, position_meta(count_b=2))[0]
    # circle vs a square at (5, 50): (5, -20) -> (3, -18) / 20.6 = (0.15, -0.87): above only
    two_squares[1] = s.add("square", 5, 50, score=0.9)
    assert not verdict(s, two_squares, position_meta(count_b=2))[0]


def test_only_the_top_count_a_objects_are_checked():
    s = Scene()
    # the strict rule looks at the top-1 circle only; the less confident one on the wrong side is not checked
    dets = [s.add("square", 30, 30), s.add("circle", 10, 30, 0.95), s.add("circle", 50, 30, 0.5)]
    assert verdict(s, dets, position_meta())[0]


# --- dense_reward ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "n_found, expected",
    [(3, 1.0), (4, 2 / 3), (2, 2 / 3), (1, 1 / 3), (0, 0.0), (7, 0.0)],  # max(0, 1 - |3 - n| / 3)
)
def test_dense_count_term(n_found, expected):
    s = Scene()
    dets = [s.add("circle", 5 + 7 * i, 30) for i in range(n_found)]
    assert reward(s, dets, counting_meta(3)) == pytest.approx(expected)


def test_dense_colour_only_when_count_is_exact():
    s = Scene()
    assert reward(s, [s.add("circle", 10, 30, color="red")], RED_CIRCLE) == pytest.approx(1.0)  # [1, 1]
    assert reward(s, [s.add("circle", 10, 30, color="blue")], RED_CIRCLE) == pytest.approx(0.5)  # [1, 0]
    s.calls.clear()
    two_red = [s.add("circle", 10, 30, color="red"), s.add("circle", 40, 30, color="red")]
    assert reward(s, two_red, RED_CIRCLE) == pytest.approx(0.0)  # count 1 - 1/1 = 0, colour term 0 unscored
    assert s.calls == []


def test_dense_colour_fraction_and_fixed_number_of_terms():
    s = Scene()
    meta = {
        "tag": "color_attr",
        "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
        "exclude": [],
    }
    right = [s.add("circle", 10, 30, color="red")]
    # square found twice: terms [1, 1, 0 (count 1 - 1/1), 0 (colour, count not exact)] -> 0.5
    two_squares = [s.add("square", 40, 30, color="blue"), s.add("square", 50, 50, color="blue")]
    assert reward(s, right + two_squares, meta) == pytest.approx(0.5)
    # square exact but green: [1, 1, 1, 0] -> 0.75
    assert reward(s, right + [s.add("square", 40, 30, color="green")], meta) == pytest.approx(0.75)
    two = {"tag": "colors", "include": [{"class": "circle", "count": 2, "color": "red"}], "exclude": []}
    # two circles, one red: [1, 1/2] -> 0.75
    red_and_blue = [s.add("circle", 10, 30, color="red"), s.add("circle", 40, 30, color="blue")]
    assert reward(s, red_and_blue, two) == pytest.approx(0.75)


def test_dense_position_terms():
    s = Scene()
    square = s.add("square", 30, 30)
    assert reward(s, [square, s.add("circle", 10, 30)], position_meta()) == pytest.approx(1.0)  # [1, 1, 1]
    assert reward(s, [square, s.add("circle", 50, 30)], position_meta()) == pytest.approx(2 / 3)  # [1, 1, 0]
    # circles at (-25, 0): left; (+25, 0): right -> 1 of 2 pairs: [1, 1, 0.5]
    mixed = [square, s.add("circle", 5, 30), s.add("circle", 55, 30)]
    assert reward(s, mixed, position_meta(count_a=2)) == pytest.approx(2.5 / 3)


def test_dense_failed_position_gets_zero_not_half():
    s = Scene()
    # no square: [0 (square count), 1 (circle count), 0 (no target)] -> 1/3; half credit would give 0.5
    assert reward(s, [s.add("circle", 10, 30)], position_meta()) == pytest.approx(1 / 3)


def test_correct_image_gets_full_reward_and_wrong_one_less():
    s = Scene()
    dets = [s.add("square", 40, 30, color="blue"), s.add("circle", 10, 30, color="red")]
    assert verdict(s, dets, TWO_OBJECT)[0] and reward(s, dets, TWO_OBJECT) == 1.0
    assert reward(s, dets[:1], TWO_OBJECT) == pytest.approx(0.5)  # [0, 1]


# --- summarize -------------------------------------------------------------------------

def test_summarize_is_the_unweighted_mean_of_task_means():
    tags = ["single_object"] * 2 + ["counting"] * 4 + ["position"]
    correct = [True, False, True, False, False, False, True]
    summary = summarize(tags, correct)
    assert summary["tasks"]["single_object"] == pytest.approx(0.5)
    assert summary["tasks"]["counting"] == pytest.approx(0.25)
    assert summary["tasks"]["position"] == pytest.approx(1.0)
    assert summary["tasks"]["colors"] is None and set(summary["tasks"]) == set(TASKS)
    # (0.5 + 0.25 + 1) / 3 = 0.5833; weighting by images would give 3 / 7 = 0.4286
    assert summary["overall"] == pytest.approx(1.75 / 3)
    assert summary["n_images"] == 7


def test_summarize_rejects_unknown_tasks_and_length_mismatch():
    with pytest.raises(ValueError):
        summarize(["shapes"], [True])
    with pytest.raises(ValueError):
        summarize(["counting"], [True, False])


# --- GenEvalScorer ---------------------------------------------------------------------

def test_scorer_end_to_end_and_colour_asked_once_per_group():
    s = Scene()
    images = [np.full((SIZE, SIZE, 3), i, dtype=np.uint8) for i in range(3)]
    detections = {
        0: [s.add("circle", 10, 30, color="red"), s.add("circle", 40, 30, 0.2, color="red")],
        1: [s.add("circle", 10, 30, color="blue")],
        2: [s.add("circle", x, 30, score=0.95) for x in (10, 30)] + [s.add("circle", 50, 30, score=0.85)],
    }
    scorer = GenEvalScorer(lambda image: detections[int(image[0, 0, 0])], s.colors)
    scores = scorer.score(images, [RED_CIRCLE, RED_CIRCLE, counting_meta(2)])
    assert scores[0] == ImageScore(correct=True, reward=1.0, reasons=[], n_detections=1)  # 0.2 circle dropped
    assert not scores[1].correct and scores[1].reward == pytest.approx(0.5) and scores[1].n_detections == 1
    assert scores[2] == ImageScore(correct=True, reward=1.0, reasons=[], n_detections=2)  # 0.85 dropped
    # both the strict check and the dense reward want the colours; each image asks once
    assert s.calls == [("circle", 1), ("circle", 1)]


def test_scorer_rejects_mismatched_lengths():
    scorer = GenEvalScorer(lambda image: [], lambda image, dets, name: [])
    with pytest.raises(ValueError):
        scorer.score([IMAGE], [])
