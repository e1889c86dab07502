"""The shapes renderer and the classical detector that stands in for Mask2Former + CLIP.

The detector must see every well-formed rendered object with the confidence GenEval's
counting threshold asks for (> 0.9), and must not be fooled by what an RL policy could paint
instead: noise, merged shapes, hybrids of two classes, shapes in two colours.
"""

import numpy as np
import pytest

from elborl.geneval.prompts import generate
from elborl.geneval.scoring import relative_position
from elborl.geneval.types import TASKS
from elborl.shapes.detector import PaletteColorClassifier, ShapesDetector
from elborl.shapes.render import (
    OBJECT_GAP,
    SUPERSAMPLE,
    draw_objects,
    inside_shape,
    render,
    render_batch,
    shape_area,
    shape_box,
    shape_coverage,
)
from elborl.shapes.world import (
    BACKGROUND,
    IMAGE_SIZE,
    MAX_OBJECT_SIZE,
    MIN_OBJECT_SIZE,
    PALETTE,
    SHAPES,
    SHAPES_VOCABULARY,
)

DETECTOR = ShapesDetector()
CLASSIFY_COLORS = PaletteColorClassifier()
GENEVAL_THRESHOLD = 0.3  # detections kept by GenEval
COUNTING_THRESHOLD = 0.9  # detections kept for counting prompts


@pytest.fixture(scope="module")
def scenes():
    """~330 rendered scenes over every task: (meta, image, ground-truth objects)."""
    metas = generate(SHAPES_VOCABULARY, {task: 60 for task in TASKS}, seed=11)
    rng = np.random.default_rng(5)
    return [(meta, *render(meta, rng)) for meta in metas + metas[::-1]]


def box_iou(a, b):
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def best_match(obj, detections):
    ious = [box_iou(obj["box"], d.box) for d in detections]
    return detections[int(np.argmax(ious))] if ious and max(ious) > 0.5 else None


def supersampled(predicate, size=IMAGE_SIZE):
    """Coverage of an arbitrary region given by predicate(x, y), the renderer's way."""
    offsets = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(offsets, offsets)
    return predicate(x, y).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def paint(layers):
    """Composites (coverage, colour name) layers over the background, like the renderer."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = BACKGROUND
    for coverage, color in layers:
        canvas += coverage[..., None] * (np.asarray(PALETTE[color], np.float32) - canvas)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def random_pose(rng, margin=8.0):
    size = rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE)
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    return float(cx), float(cy), float(size)


def max_score(image):
    return max((d.score for d in DETECTOR(image)), default=0.0)


# --- renderer -----------------------------------------------------------------------------

def test_scenes_satisfy_their_prompts(scenes):
    for meta, image, objects in scenes:
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        for clause in meta["include"]:
            matching = [o for o in objects if o["class"] == clause["class"]]
            assert len(matching) == clause["count"], meta["prompt"]
            if "color" in clause:
                assert all(o["color"] == clause["color"] for o in matching), meta["prompt"]
            if "position" in clause:
                relation, target = clause["position"]
                reference = [o for o in objects if o["class"] == meta["include"][target]["class"]]
                for a in matching:
                    for b in reference:
                        assert relation in relative_position(a["box"], b["box"]), meta["prompt"]
        assert len(objects) == sum(c["count"] for c in meta["include"])


def test_objects_inside_image_apart_and_of_allowed_size(scenes):
    for _, _, objects in scenes:
        for i, a in enumerate(objects):
            assert MIN_OBJECT_SIZE <= a["size"] <= MAX_OBJECT_SIZE
            assert a["box"][0] >= 0 and a["box"][1] >= 0
            assert a["box"][2] <= IMAGE_SIZE and a["box"][3] <= IMAGE_SIZE
            for b in objects[i + 1:]:
                gap_x = max(b["box"][0] - a["box"][2], a["box"][0] - b["box"][2])
                gap_y = max(b["box"][1] - a["box"][3], a["box"][1] - b["box"][3])
                assert max(gap_x, gap_y) >= OBJECT_GAP - 1e-9


def test_reported_box_is_the_drawn_extent_and_area_matches():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for _ in range(5):
            cx, cy, size = random_pose(rng)
            coverage = shape_coverage(shape, cx, cy, size, IMAGE_SIZE, IMAGE_SIZE)
            assert coverage.sum() == pytest.approx(shape_area(shape, size), rel=0.02)
            rows, cols = np.nonzero(coverage > 0)
            x0, y0, x1, y1 = shape_box(cx, cy, size)
            # the touched pixels are exactly those the box overlaps (to within one sample)
            assert cols.min() == pytest.approx(x0, abs=1.0) and cols.max() + 1 == pytest.approx(x1, abs=1.0)
            assert rows.min() == pytest.approx(y0, abs=1.0) and rows.max() + 1 == pytest.approx(y1, abs=1.0)


def test_shape_geometry():
    # centre (10, 10), size 8: box 6..14 on both axes
    assert inside_shape("square", 13.9, 13.9, 10, 10, 8) and not inside_shape("circle", 13.9, 13.9, 10, 10, 8)
    assert inside_shape("triangle", 10, 6.1, 10, 10, 8) and not inside_shape("triangle", 6.5, 6.5, 10, 10, 8)
    assert inside_shape("triangle", 6.1, 13.9, 10, 10, 8)  # base corners at the bottom
    assert inside_shape("diamond", 13.9, 10, 10, 10, 8) and not inside_shape("diamond", 12.5, 12.5, 10, 10, 8)


def test_images_are_anti_aliased_over_a_uniform_background(scenes):
    # an axis-aligned square may sit on whole pixels; a circle or triangle never does
    _, image, objects = next(scene for scene in scenes if any(o["class"] != "square" for o in scene[2]))
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    assert tuple(BACKGROUND) in colors
    assert len(colors) > len(objects) + 1 + 5  # edge pixels blend shape and background
    corner = image[0, 0]
    assert tuple(corner) == tuple(BACKGROUND)


def test_render_batch_is_deterministic():
    metas = generate(SHAPES_VOCABULARY, {"counting": 6, "position": 6}, seed=2)
    first = render_batch(metas, seed=3)
    assert first.shape == (len(metas), IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_batch(metas, seed=3))
    assert not np.array_equal(first, render_batch(metas, seed=4))


def test_render_rejects_words_outside_the_world():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no 'dog'"):
        render({"tag": "single_object", "prompt": "a dog", "include": [{"class": "dog", "count": 1}]}, rng)


# --- detector on ground truth ------------------------------------------------------------

def test_detector_finds_every_rendered_object(scenes):
    found, confidences, box_errors, n_objects, spurious = 0, [], [], 0, 0
    for _, image, objects in scenes:
        detections = DETECTOR(image)
        colors = CLASSIFY_COLORS(image, detections, "")
        color_of = {id(d): c for d, c in zip(detections, colors)}
        matched = set()
        for obj in objects:
            n_objects += 1
            detection = best_match(obj, detections)
            if detection is None:
                continue
            matched.add(id(detection))
            confidences.append(detection.score)
            box_errors.append(max(abs(a - b) for a, b in zip(detection.box, obj["box"])))
            right = detection.label == obj["class"] and color_of[id(detection)] == obj["color"]
            found += right and detection.score > COUNTING_THRESHOLD
        spurious += sum(d.score > GENEVAL_THRESHOLD for d in detections if id(d) not in matched)
    assert n_objects > 400
    assert found / n_objects >= 0.99
    assert np.mean(confidences) > 0.95
    assert np.quantile(box_errors, 0.99) <= 1.5
    assert spurious <= 0.01 * len(scenes)


def test_detections_are_well_formed(scenes):
    _, image, _ = scenes[1]
    for detection in DETECTOR(image):
        assert detection.label in SHAPES and 0.0 <= detection.score <= 1.0
        assert isinstance(detection.score, float)
        assert detection.mask.dtype == bool and detection.mask.shape == image.shape[:2]
        rows, cols = np.nonzero(detection.mask)
        assert detection.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_empty_background_has_no_detection():
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    assert DETECTOR(image) == []


def test_an_extra_small_object_is_still_detected(scenes):
    rng = np.random.default_rng(1)
    checked = 0
    for meta, _, objects in scenes:
        if meta["tag"] != "counting":
            continue
        extra = _free_small_object(objects, rng, size=5.0)
        if extra is None:
            continue
        image = draw_objects(objects + [extra])
        strong = [d for d in DETECTOR(image) if d.score > COUNTING_THRESHOLD]
        assert len(strong) == len(objects) + 1, meta["prompt"]
        match = best_match({"box": shape_box(*extra["center"], extra["size"])}, strong)
        assert match is not None and match.label == extra["class"]
        checked += 1
    assert checked >= 10


def _free_small_object(objects, rng, size):
    """A small object placed clear of the others (or None when none fits)."""
    for _ in range(200):
        cx, cy = rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1, size=2)
        box = shape_box(cx, cy, size)
        if all(
            box[0] >= o["box"][2] + OBJECT_GAP or o["box"][0] >= box[2] + OBJECT_GAP
            or box[1] >= o["box"][3] + OBJECT_GAP or o["box"][1] >= box[3] + OBJECT_GAP
            for o in objects
        ):
            shape = SHAPES[rng.integers(len(SHAPES))]
            return {"class": shape, "color": "blue", "center": (float(cx), float(cy)), "size": size}
    return None


def test_off_palette_shape_is_seen_and_named_by_nearest_colour():
    image = draw_objects([{"class": "circle", "color": (150, 20, 20), "center": (12.3, 14.1), "size": 9.0}])
    detections = DETECTOR(image)
    assert len(detections) == 1 and detections[0].label == "circle"
    assert detections[0].score > COUNTING_THRESHOLD
    assert CLASSIFY_COLORS(image, detections, "circle") == ["red"]


# --- what a policy could paint instead ---------------------------------------------------

def test_uniform_noise_yields_no_confident_detection():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(100, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    fooled = sum(max_score(image) > GENEVAL_THRESHOLD for image in images)
    assert fooled <= 2


def overlapping_pairs(same_color: bool, n: int = 40):
    """Two shapes whose centres are 0.6 x the summed half-sizes apart (every pair overlaps), the second in front:
    (front class, image)."""
    rng = np.random.default_rng(2)
    colors = list(PALETTE)
    for _ in range(n):
        (cx, cy, s1), s2 = random_pose(rng, margin=12.0), rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE)
        a, b = (SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
        c1, c2 = rng.choice(colors, size=2, replace=False)
        dx = 0.6 * (s1 + s2) / 2
        yield b, paint([
            (shape_coverage(a, cx - dx / 2, cy, s1, IMAGE_SIZE, IMAGE_SIZE), c1),
            (shape_coverage(b, cx + dx / 2, cy, s2, IMAGE_SIZE, IMAGE_SIZE), c1 if same_color else c2),
        ])


def test_overlapping_shapes_of_one_colour_merge_into_one_unconvincing_detection():
    for _, image in overlapping_pairs(same_color=True):
        detections = DETECTOR(image)
        assert len(detections) == 1, "touching shapes of one colour must form one instance"
        assert detections[0].score < GENEVAL_THRESHOLD, detections[0].score


def test_overlapping_shapes_of_two_colours_show_the_front_one_whole_and_never_count_the_hidden_one():
    """What a person sees: the shape in front, whole, and a partly hidden one that is never sure enough to count."""
    for front, image in overlapping_pairs(same_color=False):
        detections = DETECTOR(image)
        assert len(detections) == 2
        assert detections[0].label == front and detections[0].score > COUNTING_THRESHOLD
        assert detections[1].score <= COUNTING_THRESHOLD


@pytest.mark.parametrize("left, right", [("circle", "square"), ("square", "circle")])
@pytest.mark.parametrize("split_vertically", [True, False])
def test_half_circle_half_square_blob_is_rarely_counted(left, right, split_vertically):
    """A half-circle half-square is, to the calibrated judge, about as good a rounded square as the ones the base
    model draws and people call ambiguous or even certain (calibration/shapes_judge/): it may pass 0.3, but it is
    only by exception sure enough for counting's 0.9 (measured: 1 of 60 over the four cases, at 0.96)."""
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(15):
        cx, cy, size = random_pose(rng)

        def hybrid(x, y):
            first_half = x < cx if split_vertically else y < cy
            return np.where(first_half, inside_shape(left, x, y, cx, cy, size), inside_shape(right, x, y, cx, cy, size))

        scores.append(max_score(paint([(supersampled(hybrid), "green")])))
    assert sum(s > COUNTING_THRESHOLD for s in scores) <= 1 and np.mean(scores) < 0.6, np.round(scores, 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_painted_in_two_colours_is_unconvincing(shape):
    """Half in a distant colour (red and blue, say); a neighbouring shade (red and orange) is one colour to a person."""
    from elborl.shapes.judge_calibration import distant_colours

    rng = np.random.default_rng(4)
    colors = list(PALETTE)
    for _ in range(10):
        cx, cy, size = random_pose(rng)
        c1 = rng.choice(colors)
        c2 = rng.choice(distant_colours(c1))
        whole = shape_coverage(shape, cx, cy, size, IMAGE_SIZE, IMAGE_SIZE)
        left_half = supersampled(lambda x, y: inside_shape(shape, x, y, cx, cy, size) & (x < cx))
        image = paint([(whole, c1), (left_half, c2)])
        assert max_score(image) < GENEVAL_THRESHOLD


def test_a_shape_shading_into_a_neighbouring_colour_is_one_confident_object():
    rng = np.random.default_rng(8)
    for c1, c2 in [("red", "orange"), ("blue", "purple"), ("green", "yellow"), ("purple", "red")]:
        cx, cy, size = random_pose(rng)
        whole = shape_coverage("square", cx, cy, size, IMAGE_SIZE, IMAGE_SIZE)
        left_half = supersampled(lambda x, y: inside_shape("square", x, y, cx, cy, size) & (x < cx))
        [detection] = DETECTOR(paint([(whole, c1), (left_half, c2)]))
        assert detection.label == "square" and detection.score > COUNTING_THRESHOLD, (c1, c2, detection.score)


def test_stretched_shapes_are_unconvincing():
    rng = np.random.default_rng(6)
    for _ in range(10):
        cx, cy, size = random_pose(rng)
        ellipse = supersampled(lambda x, y: ((x - cx) / (0.65 * size)) ** 2 + ((y - cy) / (0.4 * size)) ** 2 <= 1)
        assert max_score(paint([(ellipse, "purple")])) < GENEVAL_THRESHOLD
