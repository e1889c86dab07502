"""Renders shapes-world images that satisfy a GenEval prompt's metadata.

The shape geometry lives here once (`inside_shape`, `shape_area`, `centroid_offset`); the
detector fits the same anti-aliased templates (`shape_coverage`) that the renderer paints.

Coordinates are continuous pixel units: pixel (row i, column j) covers [j, j+1) x [i, i+1),
so an object's box (x0, y0, x1, y1) is its exact geometric extent. Anti-aliasing is by
supersampling: each pixel's coverage is the share of SUPERSAMPLE x SUPERSAMPLE sample points
(at sub-pixel centres) inside the shape, i.e. drawing at 8x and box-filtering down. The
inside test is analytic rather than PIL's rasteriser, whose pixel-centre conventions would
shift shapes by a fraction of a pixel relative to the templates.
"""

import math

import numpy as np

from elborl.geneval.scoring import relative_position
from elborl.shapes.world import BACKGROUND, IMAGE_SIZE, MAX_OBJECT_SIZE, MIN_OBJECT_SIZE, PALETTE, SHAPES

SUPERSAMPLE = 8
# Empty space between two objects' boxes, so that no pixel touches both: at 2 px at least one
# whole pixel column or row of background separates them and detection sees two components.
OBJECT_GAP = 2.0
# Objects stay this far from the image border.
BORDER_MARGIN = 1.0
PLACEMENT_TRIES = 50  # random centres tried per object before the scene restarts
SCENE_TRIES = 1000  # scenes tried before giving up (position prompts reject ~3 in 4)


# --- geometry: the one definition of every shape -----------------------------------------

def inside_shape(shape: str, x, y, cx: float, cy: float, size: float) -> np.ndarray:
    """Whether points (x, y) lie in a shape of the given centre and size (all shapes span size x size).

    circle: disc of diameter size; square: axis-aligned; triangle: upward-pointing, base and
    height equal to size; diamond: the square turned 45 degrees, diagonals equal to size.
    """
    dx, dy = x - cx, y - cy
    half = size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        depth = dy + half  # distance below the apex
        return (depth >= 0) & (depth <= size) & (np.abs(dx) <= depth / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_area(shape: str, size: float) -> float:
    if shape == "circle":
        return math.pi * size * size / 4
    if shape == "square":
        return size * size
    if shape in ("triangle", "diamond"):
        return size * size / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def size_from_area(shape: str, area: float) -> float:
    """Inverse of `shape_area`."""
    return math.sqrt(max(area, 0.0) / shape_area(shape, 1.0))


def centroid_offset(shape: str, size: float) -> tuple[float, float]:
    """Area centroid minus box centre: the triangle's centroid sits 2/3 of its height below the apex."""
    if shape == "triangle":
        return 0.0, size / 6
    return 0.0, 0.0


def shape_box(cx: float, cy: float, size: float) -> tuple[float, float, float, float]:
    half = size / 2
    return (cx - half, cy - half, cx + half, cy + half)


def shape_coverage(
    shape: str, cx: float, cy: float, size: float, height: int, width: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32, height x width) of one shape."""
    coverage = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = shape_box(cx, cy, size)
    col0, row0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
    col1, row1 = min(int(math.ceil(x1)), width), min(int(math.ceil(y1)), height)
    if col1 <= col0 or row1 <= row0:
        return coverage
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(col0, col1)[:, None] + offsets).reshape(-1)
    ys = (np.arange(row0, row1)[:, None] + offsets).reshape(-1)
    inside = inside_shape(shape, xs[None, :], ys[:, None], cx, cy, size)
    blocks = inside.reshape(row1 - row0, supersample, col1 - col0, supersample)
    coverage[row0:row1, col0:col1] = blocks.sum(axis=(1, 3), dtype=np.float32) / supersample**2
    return coverage


# --- painting ------------------------------------------------------------------------------

def draw_objects(objects, size: int = IMAGE_SIZE, background=BACKGROUND) -> np.ndarray:
    """Paints objects {class, color, center: (cx, cy), size} over a uniform background, in order.

    `color` is a palette name or an RGB triple; later objects cover earlier ones.
    """
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = background
    for obj in objects:
        rgb = np.asarray(PALETTE[obj["color"]] if isinstance(obj["color"], str) else obj["color"], np.float32)
        alpha = shape_coverage(obj["class"], *obj["center"], obj["size"], size, size)[..., None]
        canvas += alpha * (rgb - canvas)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --- scenes that satisfy a prompt --------------------------------------------------------

def _object_specs(meta: dict, rng: np.random.Generator) -> tuple[list[dict], list[tuple]]:
    """Objects to draw (class, colour) and the position constraints between include clauses."""
    colors = tuple(PALETTE)
    objects, clause_objects, constraints = [], [], []
    for index, clause in enumerate(meta["include"]):
        if clause["class"] not in SHAPES:
            raise ValueError(f"the shapes world has no {clause['class']!r}; expected one of {SHAPES}")
        if "color" in clause and clause["color"] not in PALETTE:
            raise ValueError(f"the shapes world has no colour {clause['color']!r}; expected one of {colors}")
        members = []
        for _ in range(int(clause["count"])):
            color = clause.get("color") or colors[rng.integers(len(colors))]
            members.append(len(objects))
            objects.append({"class": clause["class"], "color": color})
        clause_objects.append(members)
        if "position" in clause:
            relation, target = clause["position"]
            constraints.append((index, int(target), relation))
    pairs = [(clause_objects[a], clause_objects[b], relation) for a, b, relation in constraints]
    return objects, pairs


def _boxes_apart(box, others, gap: float) -> bool:
    """True when `box` keeps at least `gap` from every other box along x or along y."""
    for other in others:
        apart_x = box[0] >= other[2] + gap or other[0] >= box[2] + gap
        apart_y = box[1] >= other[3] + gap or other[1] >= box[3] + gap
        if not (apart_x or apart_y):
            return False
    return True


def _place(sizes, rng: np.random.Generator, image_size: int) -> list[tuple] | None:
    """Random non-overlapping centres for objects of the given sizes, or None when stuck."""
    centers, boxes = [], []
    for s in sizes:
        low, high = BORDER_MARGIN + s / 2, image_size - BORDER_MARGIN - s / 2
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(low, high, size=2)
            box = shape_box(cx, cy, s)
            if _boxes_apart(box, boxes, OBJECT_GAP):
                centers.append((float(cx), float(cy)))
                boxes.append(box)
                break
        else:
            return None
    return centers


def _relations_hold(boxes, pairs) -> bool:
    return all(
        relation in relative_position(boxes[a], boxes[b]) for group_a, group_b, relation in pairs
        for a in group_a for b in group_b
    )


def render(meta: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[dict]]:
    """An image (uint8 size x size x 3) satisfying the prompt, and its objects.

    Each object is {class, color, box, center, size}; box = (x0, y0, x1, y1), the shape's exact
    extent in pixels. Exclude clauses need nothing: exactly the asked objects are drawn.
    """
    objects, pairs = _object_specs(meta, rng)
    for _ in range(SCENE_TRIES):
        sizes = rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE, size=len(objects))
        centers = _place(sizes, rng, size)
        if centers is None:
            continue
        boxes = [shape_box(cx, cy, s) for (cx, cy), s in zip(centers, sizes)]
        if not _relations_hold(boxes, pairs):
            continue
        for obj, center, s, box in zip(objects, centers, sizes, boxes):
            obj.update(center=center, size=float(s), box=tuple(float(v) for v in box))
        return draw_objects(objects, size), objects
    raise RuntimeError(f"no scene for {meta['prompt']!r} after {SCENE_TRIES} tries")


def render_batch(metas, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Images (uint8 N x size x size x 3) for a list of prompt metadata; deterministic given seed."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(metas), size, size, 3), dtype=np.uint8)
    for i, meta in enumerate(metas):
        images[i] = render(meta, rng, size)[0]
    return images
