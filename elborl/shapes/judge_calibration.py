"""The shapes judge against people: a labelled calibration set, the judge's agreement with it, and the reliability
of its per-object confidence.

A labelled image holds every thing a person sees in it, each with how sure the person is:

- `certain`: the person names its shape and colour without hesitation;
- `ambiguous`: it could be named, but a careful person would hesitate (half cut off, smeared, between two shapes);
- `none`: a blob, smear or hybrid no person would call any of the shapes.

The person's verdict on an image is GenEval's own rules applied to what the person saw, reported as a detector
would report it: certain objects at confidence 1, ambiguous ones at 0.5 (kept by the 0.3 threshold, dropped by
counting's 0.9), `none` at 0, with the person's colours. So the judge agrees with people exactly when its
detector reports what they see; nothing in GenEval's rules changes.

The set lives in `calibration/shapes_judge/` (`labels.jsonl` + PNGs), see `bench/judge_calibration.py`.
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import io
import json

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from elborl.geneval.scoring import GenEvalScorer, evaluate_image, filter_detections
from elborl.geneval.types import TASKS, Detection
from elborl.shapes.detector import CALIBRATED_RAMPS, PaletteColorClassifier, ShapesDetector, hue_neighbours
from elborl.shapes.render import SUPERSAMPLE, inside_shape, render
from elborl.shapes.world import BACKGROUND, COLORS, PALETTE, SHAPES

CERTAINTY_SCORES = {"certain": 1.0, "ambiguous": 0.5, "none": 0.0}
SPLITS = ("fit", "held_out")


@dataclass
class LabelledObject:
    at: tuple[int, int]  # (column, row) of a pixel of the object
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of its visible extent
    certainty: str
    shape: str | None = None  # None for `none`
    colour: str | None = None

    def validate(self, where: str) -> None:
        if self.certainty not in CERTAINTY_SCORES:
            raise ValueError(f"{where}: certainty {self.certainty!r} is not one of {tuple(CERTAINTY_SCORES)}")
        if self.certainty != "none" and (self.shape not in SHAPES or self.colour not in COLORS):
            raise ValueError(f"{where}: a {self.certainty} object needs a shape in {SHAPES} and a colour in "
                             f"{COLORS}, got {self.shape!r} {self.colour!r}")


@dataclass
class LabelledImage:
    image: str  # PNG path relative to the set's directory
    meta: dict  # GenEval prompt metadata (prompt, tag, include, exclude)
    source: str  # where the image came from (model and sampler, or the render and its degradation)
    split: str  # fit (the detector's constants are chosen on it) or held_out (agreement is reported on it)
    objects: list[LabelledObject] = field(default_factory=list)

    @classmethod
    def from_json(cls, row: dict) -> "LabelledImage":
        objects = [LabelledObject(tuple(o["at"]), tuple(o["box"]), o["certainty"], o.get("shape"), o.get("colour"))
                   for o in row["objects"]]
        labelled = cls(row["image"], row["meta"], row["source"], row["split"], objects)
        labelled.validate()
        return labelled

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"{self.image}: split {self.split!r} is not one of {SPLITS}")
        if self.meta.get("tag") not in TASKS:
            raise ValueError(f"{self.image}: task {self.meta.get('tag')!r} is not one of {TASKS}")
        for i, obj in enumerate(self.objects):
            obj.validate(f"{self.image} object {i}")

    def to_json(self) -> dict:
        return asdict(self)


def read_set(directory: str | Path) -> list[tuple[LabelledImage, np.ndarray]]:
    """Every labelled image of a calibration set with its pixels (uint8 H x W x 3)."""
    directory = Path(directory)
    rows = [json.loads(line) for line in (directory / "labels.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        labelled = LabelledImage.from_json(row)
        out.append((labelled, np.asarray(Image.open(directory / labelled.image).convert("RGB"))))
    return out


def write_set(directory: str | Path, items: list[tuple[LabelledImage, np.ndarray]]) -> None:
    """Writes the images and `labels.jsonl` (replacing both), in the order given."""
    directory = Path(directory)
    for labelled, pixels in items:
        labelled.validate()
        path = directory / labelled.image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (directory / "labels.jsonl").write_text("".join(json.dumps(l.to_json()) + "\n" for l, _ in items))


# --- the person's verdict ---------------------------------------------------------------------------------
class _NamedColours:
    """A colour classifier that answers with the colours a person named."""

    def __init__(self, colours: dict[int, str]):
        self.colours = colours

    def __call__(self, image, detections, class_name):
        return [self.colours[id(d)] for d in detections]


def person_detections(labelled: LabelledImage, shape: tuple[int, int]) -> tuple[list[Detection], dict[int, str]]:
    """What the person saw, as detections scored by certainty, and the colour they named for each."""
    detections, colours = [], {}
    for obj in labelled.objects:
        if obj.certainty == "none":
            continue
        mask = np.zeros(shape, bool)
        x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
        mask[y0:y1, x0:x1] = True
        detection = Detection(obj.shape, CERTAINTY_SCORES[obj.certainty], tuple(map(float, obj.box)), mask)
        detections.append(detection)
        colours[id(detection)] = obj.colour
    return detections, colours


def person_verdict(labelled: LabelledImage, image: np.ndarray) -> bool:
    """GenEval's verdict on what the person saw."""
    detections, colours = person_detections(labelled, image.shape[:2])
    kept = filter_detections(detections, labelled.meta["tag"])
    return evaluate_image(image, kept, labelled.meta, _NamedColours(colours))[0]


# --- the judge against people --------------------------------------------------------------------------
def matched_scores(labelled: LabelledImage, detections: list[Detection]) -> list[tuple[LabelledObject, float, bool]]:
    """Per labelled object: the judge's confidence in it (0 when nothing detected covers its pixel) and whether
    the judge named the shape the person named."""
    out = []
    for obj in labelled.objects:
        col, row = obj.at
        covering = [d for d in detections if d.mask[row, col]]
        if covering:
            best = max(covering, key=lambda d: d.score)
            out.append((obj, best.score, best.label == obj.shape))
        else:
            out.append((obj, 0.0, False))
    return out


@dataclass
class Agreement:
    per_task: dict[str, dict]  # task -> {n, person, judge, agree}
    n: int
    agree: float

    def worst_gap(self) -> float:
        return max(abs(t["person"] - t["judge"]) for t in self.per_task.values())


def agreement(items: list[tuple[LabelledImage, np.ndarray]], scorer: GenEvalScorer | None = None) -> Agreement:
    """Per task, the share of images people call correct, the judge calls correct, and where both agree."""
    scorer = scorer or GenEvalScorer(ShapesDetector(), PaletteColorClassifier())
    rows: dict[str, list[tuple[bool, bool]]] = {}
    for labelled, image in items:
        judged = scorer.score_one(image, labelled.meta).correct
        rows.setdefault(labelled.meta["tag"], []).append((person_verdict(labelled, image), judged))
    per_task = {}
    for task in TASKS:
        if task in rows:
            person, judge = np.array(rows[task]).T
            per_task[task] = {"n": len(person), "person": float(person.mean()), "judge": float(judge.mean()),
                              "agree": float((person == judge).mean())}
    pairs = np.array([p for r in rows.values() for p in r])
    return Agreement(per_task, len(pairs), float((pairs[:, 0] == pairs[:, 1]).mean()) if len(pairs) else 0.0)


def object_scores(items: list[tuple[LabelledImage, np.ndarray]], detector=None) -> list[tuple[str, float, bool]]:
    """(person's certainty, judge's confidence, same shape named) for every labelled object."""
    detector = detector or ShapesDetector()
    return [(obj.certainty, score, same)
            for labelled, image in items for obj, score, same in matched_scores(labelled, detector(image))]


# --- rendered scenes under graded degradations (ground truth known) -------------------------------------
# Up to which level a person still names every object with certainty; beyond it, the degraded objects are
# ambiguous. Chosen by eye on contact sheets of these renders (bench/judge_calibration.py sheet).
DEGRADATIONS = {
    "blur": ((0.5, 0.8, 1.2, 1.6), 1.2),  # Gaussian sigma, pixels
    "gradient": ((0.2, 0.35, 0.5), 0.5),  # colour ramp across the object, as a share of the way to black/white
    "deform": ((0.4, 0.8, 1.4), 0.8),  # amplitude of a smooth random warp, pixels
    "small": ((6.0, 5.0, 4.0), 5.0),  # object size, pixels (the world draws 8-12); certain down to this size
    "border": ((0.15, 0.3, 0.5), 0.3),  # share of one object's box outside the image
    "tint": ((6.0, 12.0), 12.0),  # background shift per channel, up to
    "noise": ((4.0, 8.0, 12.0), 12.0),  # pixel noise sigma
    "touching": ((1.0, 0.0), 0.0),  # gap between two objects' boxes, pixels (0: their outlines touch)
}


def _certain_at(kind: str, level: float) -> bool:
    limit = DEGRADATIONS[kind][1]
    return level >= limit if kind in ("small", "touching") else level <= limit


def _smooth_field(rng: np.random.Generator, amplitude: float):
    """A smooth random displacement (dx, dy) as a function of position: a few low-frequency waves."""
    waves = [(rng.uniform(0.15, 0.45, size=2) * rng.choice([-1, 1], size=2), rng.uniform(0, 2 * np.pi))
             for _ in range(6)]

    def displacement(x, y):
        dx = sum(np.sin(k[0] * x + k[1] * y + p) for k, p in waves[:3]) / np.sqrt(3)
        dy = sum(np.sin(k[0] * x + k[1] * y + p) for k, p in waves[3:]) / np.sqrt(3)
        return amplitude * dx, amplitude * dy

    return displacement


def _coverage(obj: dict, size: int, warp=None) -> np.ndarray:
    """An object's anti-aliased coverage, its outline optionally warped by `warp(x, y) -> (dx, dy)`."""
    def inside(x, y):
        if warp is not None:
            dx, dy = warp(x, y)
            x, y = x + dx, y + dy
        return inside_shape(obj["class"], x, y, *obj["center"], obj["size"])

    return _supersampled(inside, size)


def _paint(objects: list[dict], size: int, background, colour_fields=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Composites objects over the background; `colour_fields[i]` (H x W x 3) replaces object i's flat colour."""
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = background
    coverages = []
    for i, obj in enumerate(objects):
        coverage = obj.get("coverage")
        coverage = _coverage(obj, size) if coverage is None else coverage
        colour = np.asarray(PALETTE[obj["color"]], np.float32)
        if colour_fields is not None and colour_fields[i] is not None:
            colour = colour_fields[i]
        canvas += coverage[..., None] * (colour - canvas)
        coverages.append(coverage)
    return canvas, coverages


def _gradient_field(obj: dict, amount: float, size: int, rng) -> np.ndarray:
    colour = np.asarray(PALETTE[obj["color"]], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.indices((size, size)) + 0.5
    along = ((cols - obj["center"][0]) * np.cos(angle) + (rows - obj["center"][1]) * np.sin(angle)) / (obj["size"] / 2)
    t = np.clip(along, -1, 1)[..., None] * amount  # -amount (towards black) .. +amount (towards white)
    return np.where(t > 0, colour + t * (255 - colour), colour * (1 + t))


def degraded_scene(meta: dict, kind: str, level: float, rng: np.random.Generator, size: int = 32):
    """A rendered scene for `meta` under one degradation, and the labelled objects a person sees in it.

    Returns (uint8 image, [LabelledObject]), or None when the degradation cannot be applied to this scene
    (e.g. touching needs two objects).
    """

    _, objects = render(meta, rng, size)
    background = np.asarray(BACKGROUND, np.float32)
    degraded = set(range(len(objects)))  # which objects the degradation touches
    colour_fields = None
    if kind == "small":
        for obj in objects:
            obj["size"] = min(obj["size"], level)
    elif kind == "border":
        target = objects[rng.integers(len(objects))]
        degraded = {objects.index(target)}
        _push_over_border(target, level, size, rng)
    elif kind == "touching":
        if len(objects) < 2:
            return None
        degraded = {0, 1}
        _make_touch(objects[0], objects[1], level)
    elif kind == "deform":
        for obj in objects:
            obj["coverage"] = _coverage(obj, size, _smooth_field(rng, level))
    elif kind == "gradient":
        colour_fields = [_gradient_field(obj, level, size, rng) for obj in objects]
    elif kind == "tint":
        background = background + rng.uniform(-level, level, size=3).astype(np.float32)
    canvas, coverages = _paint(objects, size, background, colour_fields)
    if kind == "blur":
        offset = canvas - background
        canvas = background + np.stack([ndimage.gaussian_filter(offset[..., c], level, mode="constant")
                                        for c in range(3)], axis=-1)
    elif kind == "noise":
        canvas = canvas + rng.normal(0, level, size=canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    certain = _certain_at(kind, level)
    labelled = []
    for i, (obj, coverage) in enumerate(zip(objects, coverages)):
        visible = coverage.copy()
        for later in coverages[i + 1:]:
            visible *= 1 - later
        if visible.max() < 0.5:
            continue
        row, col = np.unravel_index(int(visible.argmax()), visible.shape)
        rows, cols = np.nonzero(visible >= 0.5)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        certainty = "certain" if certain or i not in degraded else "ambiguous"
        labelled.append(LabelledObject((int(col), int(row)), box, certainty, obj["class"], obj["color"]))
    return image, labelled


def _push_over_border(obj: dict, share: float, size: int, rng) -> None:
    """Moves the object so `share` of its box width (or height) lies outside the image, on a random side."""
    cx, cy = obj["center"]
    half = obj["size"] / 2
    inside = half - share * obj["size"]  # signed distance from the centre to the border
    side = rng.integers(4)
    if side == 0:
        cx = inside
    elif side == 1:
        cx = size - inside
    elif side == 2:
        cy = inside
    else:
        cy = size - inside
    obj["center"] = (float(cx), float(cy))


def _make_touch(a: dict, b: dict, gap: float) -> None:
    """Moves b along the line of centres until the two boxes are `gap` pixels apart on that axis."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    reach = (a["size"] + b["size"]) / 2 + gap
    if abs(bx - ax) >= abs(by - ay):
        b["center"] = (ax + np.sign(bx - ax or 1) * reach, by)
    else:
        b["center"] = (bx, ay + np.sign(by - ay or 1) * reach)


# --- contact sheets: how people label and check the set -----------------------------------------------------
SHEET_SCALE = 8


def contact_sheet(items: list[tuple[LabelledImage, np.ndarray]], columns: int = 6, notes: list[str] | None = None,
                  first_index: int = 0):
    """Images enlarged (nearest neighbour) with their index and prompt, each labelled object numbered at its
    pixel and listed below ("1 certain red circle"); `notes` adds a line per image (e.g. the judge's verdict)."""
    tile = 32 * SHEET_SCALE
    text_height = 14 * 6
    cell_w, cell_h = tile + 12, tile + text_height
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (labelled, image) in enumerate(items):
        x, y = (k % columns) * cell_w + 6, (k // columns) * cell_h
        big = Image.fromarray(image).resize((image.shape[1] * SHEET_SCALE, image.shape[0] * SHEET_SCALE), Image.NEAREST)
        sheet.paste(big, (x, y))
        lines = [f"#{first_index + k} {labelled.meta['prompt'].removeprefix('a photo of ')}"]
        for n, obj in enumerate(labelled.objects, 1):
            col, row = obj.at
            px, py = x + col * SHEET_SCALE, y + row * SHEET_SCALE
            draw.rectangle([px, py, px + 9, py + 11], fill="white")
            draw.text((px + 2, py), str(n), fill="black")
            lines.append(f"{n} {obj.certainty} {obj.colour or ''} {obj.shape or ''}".replace("  ", " "))
        if notes:
            lines.append(notes[k])
        draw.text((x, y + tile + 2), "\n".join(_wrap(lines)), fill="black")
    return sheet


def _wrap(lines: list[str], width: int = 40) -> list[str]:
    out = []
    for line in lines:
        while len(line) > width:
            out.append(line[:width])
            line = "  " + line[width:]
        out.append(line)
    return out[:6]


def reliability_diagram(groups: dict[str, list[tuple[str, float, bool]]]):
    """Per group of (certainty, confidence, same shape) object scores: the distribution of the judge's confidence
    for each certainty a person gave, against GenEval's 0.3 and 0.9 thresholds (a PIL image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    bins = np.linspace(0, 1, 21)
    colours = {"certain": "tab:green", "ambiguous": "tab:orange", "none": "tab:red"}
    for axis, (title, scores) in zip(axes[0], groups.items()):
        for certainty, colour in colours.items():
            values = [s for c, s, _ in scores if c == certainty]
            if values:
                weights = np.full(len(values), 1 / len(values))
                axis.hist(values, bins=bins, weights=weights, histtype="step", linewidth=2, color=colour,
                          label=f"{certainty} ({len(values)})")
        for threshold in (0.3, 0.9):
            axis.axvline(threshold, color="gray", linestyle=":")
        axis.set(title=title, xlabel="judge's confidence", ylabel="share of the person's objects", ylim=(0, 1))
        axis.legend(fontsize=8, loc="upper center")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue()))


# --- reward-hacking artefacts: things a policy paints that no person would name -----------------------------
HACKS = ("hybrid", "two_colour", "stretched", "merged")


def _supersampled(predicate, size: int) -> np.ndarray:
    offsets = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(offsets, offsets)
    return predicate(x, y).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def _artefact(kind: str, obj: dict, rng, size: int) -> list[tuple[np.ndarray, str]]:
    """(coverage, colour) layers of one artefact painted where `obj` would be."""
    (cx, cy), s, colour = obj["center"], obj["size"], obj["color"]
    if kind == "hybrid":  # part one class, part another
        a, b = rng.choice(SHAPES, size=2, replace=False)
        vertical, cut = rng.random() < 0.5, rng.uniform(-0.05, 0.05) * s
        return [(_supersampled(lambda x, y: np.where((x < cx + cut) if vertical else (y < cy + cut),
                                                     inside_shape(a, x, y, cx, cy, s), inside_shape(b, x, y, cx, cy, s)),
                               size), colour)]
    if kind == "two_colour":  # one shape, 30-70 % of it in a colour that is not a neighbouring shade
        other = rng.choice(distant_colours(colour))
        shape = obj["class"]
        whole = _supersampled(lambda x, y: inside_shape(shape, x, y, cx, cy, s), size)
        while True:
            angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.2, 0.2) * s
            part = _supersampled(lambda x, y: inside_shape(shape, x, y, cx, cy, s)
                                 & ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle) < offset), size)
            if 0.3 <= part.sum() / whole.sum() <= 0.7:
                return [(whole, colour), (part, other)]
    if kind == "stretched":  # an ellipse, neither circle nor square
        rx, ry = (0.65 * s, 0.4 * s) if rng.random() < 0.5 else (0.4 * s, 0.65 * s)
        return [(_supersampled(lambda x, y: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1, size), colour)]
    if kind == "merged":  # two shapes of one colour melted together
        a, b = rng.choice(SHAPES, size=2)
        s1, s2 = rng.uniform(0.7, 1.0, size=2) * s
        gap = rng.uniform(0.4, 0.65) * (s1 + s2) / 2  # centre distance: the shapes overlap
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = gap * np.cos(angle) / 2, gap * np.sin(angle) / 2
        return [(_supersampled(lambda x, y: inside_shape(a, x, y, cx - dx, cy - dy, s1)
                               | inside_shape(b, x, y, cx + dx, cy + dy, s2), size), colour)]
    raise ValueError(f"unknown artefact {kind!r}; expected one of {HACKS}")


def distant_colours(colour: str) -> list[str]:
    """The palette colours that are neither `colour` nor its neighbours around the hue circle."""
    index = COLORS.index(colour)
    near = {index, *hue_neighbours(COLORS)[index]}
    return [c for i, c in enumerate(COLORS) if i not in near]


def hacked_scene(meta: dict, kind: str, rng: np.random.Generator, size: int = 32):
    """A rendered scene whose first object is replaced by a reward-hacking artefact (labelled `none`)."""
    _, objects = render(meta, rng, size)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = BACKGROUND
    layers = [_artefact(kind, objects[0], rng, size)] + [[(_coverage(o, size), o["color"])] for o in objects[1:]]
    for object_layers in layers:
        for coverage, colour in object_layers:
            canvas += coverage[..., None] * (np.asarray(PALETTE[colour], np.float32) - canvas)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    labelled = []
    for i, (obj, object_layers) in enumerate(zip(objects, layers)):
        coverage = np.max([c for c, _ in object_layers], axis=0)
        row, col = np.unravel_index(int(coverage.argmax()), coverage.shape)
        rows, cols = np.nonzero(coverage >= 0.5)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        if i == 0:
            labelled.append(LabelledObject((int(col), int(row)), box, "none"))
        else:
            labelled.append(LabelledObject((int(col), int(row)), box, "certain", obj["class"], obj["color"]))
    return image, labelled


# --- choosing the confidence ramps on the fit split ---------------------------------------------------------
RAMP_GRID = {
    "fit": np.round(np.arange(0.50, 0.96, 0.02), 2),
    "separation": np.round(np.arange(1.0, 3.01, 0.05), 2),
    "purity": np.round(np.arange(0.40, 0.99, 0.02), 2),
    "defect": np.round(np.concatenate([np.arange(0.005, 0.1, 0.005), [0.2, 0.5, 1.0]]), 3),
    "asymmetry": np.round(np.arange(0.10, 0.52, 0.025), 3),
}


class _Measured:
    """A labelled image with the detector's measurements cached, so confidences can be recomputed cheaply."""

    def __init__(self, labelled: LabelledImage, image: np.ndarray, detector: ShapesDetector):
        self.labelled, self.image = labelled, image
        self.measurements = detector.measure(image)
        self.colours = {}  # measurement index -> palette colour (depends on its mask only)
        classify = PaletteColorClassifier()
        for k, m in enumerate(self.measurements):
            self.colours[k] = classify(image, [m.detection()], "")[0]
        self.person = person_verdict(labelled, image)

    def judge(self, ramps) -> tuple[bool, list[tuple[str, float]]]:
        detections = [m.detection(ramps) for m in self.measurements]
        colours = {id(d): self.colours[k] for k, d in enumerate(detections)}
        kept = filter_detections(detections, self.labelled.meta["tag"])
        correct = evaluate_image(self.image, kept, self.labelled.meta, _NamedColours(colours))[0]
        objects = [(obj.certainty, score) for obj, score, _ in matched_scores(self.labelled, detections)]
        return correct, objects


def calibration_objective(measured: list[_Measured], ramps) -> tuple[float, float, float]:
    """(share of images where judge and person agree, mean share of objects in their certainty's band:
    certain > 0.9, ambiguous in 0.3-0.9, none <= 0.3, share of `none` objects scored above 0.3)."""
    agree, bands = [], {c: [] for c in CERTAINTY_SCORES}
    for item in measured:
        correct, objects = item.judge(ramps)
        agree.append(correct == item.person)
        for certainty, score in objects:
            in_band = {"certain": score > 0.9, "ambiguous": 0.3 < score <= 0.9, "none": score <= 0.3}[certainty]
            bands[certainty].append(in_band)
    band_shares = [np.mean(v) for v in bands.values() if v]
    let_through = 1.0 - float(np.mean(bands["none"])) if bands["none"] else 0.0
    return float(np.mean(agree)), float(np.mean(band_shares)), let_through


# How much the share of objects in their certainty's band counts beside image agreement in the ramp search. With
# agreement alone the search picks step functions (ambiguous objects then score 0 or 1, never in between); a
# fifth is enough to prefer smooth ramps among those of about equal agreement.
BAND_WEIGHT = 0.2
# What letting a `none` object (a blob, a hybrid, a two-colour shape) through GenEval's 0.3 threshold costs: it
# is a reward a policy can hack, so it weighs more than the images it would win.
HACK_WEIGHT = 10.0


def fit_ramps(items: list[tuple[LabelledImage, np.ndarray]], start=None, sweeps: int = 3, log=print):
    """Coordinate search over each ramp's (low, high) on RAMP_GRID, maximising image agreement with people plus
    BAND_WEIGHT x the share of objects in their certainty's band, minus HACK_WEIGHT x the share of `none` objects
    let through. Returns (ramps, (agreement, band share, none let through))."""

    ramps = start or CALIBRATED_RAMPS
    detector = ShapesDetector(ramps=ramps)
    measured = [_Measured(labelled, image, detector) for labelled, image in items]
    def value(result):
        return result[0] + BAND_WEIGHT * result[1] - HACK_WEIGHT * result[2]

    best = calibration_objective(measured, ramps)
    log(f"start {ramps}: agreement {best[0]:.3f}, objects in band {best[1]:.3f}, none let through {best[2]:.3f}")
    for sweep in range(sweeps):
        improved = False
        for name, grid in RAMP_GRID.items():
            for low in grid:
                for high in grid[grid > low]:
                    candidate = replace(ramps, **{name: (float(low), float(high))})
                    result = calibration_objective(measured, candidate)
                    if value(result) > value(best):
                        ramps, best, improved = candidate, result, True
        log(f"sweep {sweep + 1}: {ramps}: agreement {best[0]:.3f}, objects in band {best[1]:.3f}, "
            f"none let through {best[2]:.3f}")
        if not improved:
            break
    return ramps, best
