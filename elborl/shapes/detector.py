"""A classical shapes detector and palette colour classifier, in the roles Mask2Former and CLIP play in GenEval.

No learning, but it is built to behave like a real instance-segmentation detector, because an
RL policy exploits every blind spot of its reward (a prototype policy painted extra colours
and melted triangles and squares into circles while a naive checker's score rose):

- every pixel that differs from the background is foreground, whatever its colour, and
  touching pixels form one instance (8-connectivity), so merged shapes stay merged;
- each instance is compared with the anti-aliased template of every class, fitted by
  moments, and the confidence is high only for a close fit that no other class matches
  about as well (melted, stretched or hybrid blobs score low);
- the confidence is discounted by colour purity, so blobs of several colours score low,
  but a uniformly painted shape is fitted by its own ink, so washed-out or off-palette
  shapes are still seen (and named by their nearest palette colour, as CLIP would);
- small but well-formed shapes stay detected (only specks of a few pixels are ignored), as do
  slightly noisy or blurry ones: fits ignore faint alpha, discount the background's noise
  level, try softened template edges and refine the best fit locally.

The constants below were calibrated on rendered scenes and hand-made adversarial blobs; see
tests/test_shapes_detector.py. On 2000 rendered scenes every object was found with the right
class and colour at confidence > 0.9 (mean 0.9997); 1000 uniform-noise images gave no
detection above 0.3.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from elborl.geneval.types import Detection
from elborl.shapes.render import centroid_offset, shape_coverage, size_from_area
from elborl.shapes.world import BACKGROUND, PALETTE, SHAPES

# A pixel is foreground when it is at least this far from the background, as a share of the
# way to its nearest palette colour (anti-aliased edges reach it from about half coverage).
FOREGROUND_ALPHA = 0.4
# Components whose alpha mass (in pixels) is below this are specks, not objects.
MIN_OBJECT_MASS = 4.0
# Alpha mass (pixels) a solid single-colour region needs to count as an object's body when a component is split
# into touching objects of different colours (the world's smallest objects, 8 px, hold about 32).
MIN_SPLIT_MASS = 12.0
# A component is split by colour only where a piece fits its class better than the whole fits by this much.
SPLIT_GAIN = 0.02
# The best class's soft IoU is refined by a local search only between these (above, the fit is already as
# good as a fit gets; far below, noise and merged blobs, no local search reaches a good one).
REFINE_FROM, REFINE_TO = 0.65, 0.97
# Edge softness (Gaussian sigma, pixels) the templates are also tried at, so slightly blurry
# but well-formed shapes still fit.
TEMPLATE_BLURS = (0.0, 0.45, 0.8)
# Fits compare alpha above this floor only (observed and template alike), so faint pixel noise
# around an object does not count against its shape.
FIT_ALPHA_FLOOR = 0.1
# Pixels up to this far (in pixels) from a component, and closer to it than to any other,
# belong to it when its shape is fitted: they hold its faint anti-aliased or blurred rim.
RIM_WIDTH = 2.0
# Local search after the moment fit: (centre step in pixels, relative size step), coarse to fine.
# The edge softness is refined too, in steps of BLUR_STEP within the range of TEMPLATE_BLURS.
REFINE_STEPS = ((0.25, 0.03), (0.1, 0.01))
BLUR_STEP = 0.05
# Margin (pixels) of the fitting window around a component and its rim.
FIT_MARGIN = 3


@dataclass(frozen=True)
class ConfidenceRamps:
    """Where each factor of the confidence rises from 0 to 1: (low, high) of a smooth step.

    - fit: the best class's soft IoU. Clean rendered shapes fit at >= 0.995, shapes people name with certainty
      in base-model samples at 0.89-0.96 (5th-95th percentile), half-and-half hybrids of two classes at 0.77-0.90
      (so the fit alone cannot reject them: separation and defect do).
    - separation: how many times worse the runner-up class fits, (1 - its IoU) / (1 - the best IoU). A blob two
      classes explain about equally well (a hybrid, a dome between circle and square) is near 1; a soft but
      recognisable shape is clearly above (measured on labelled model samples, calibration/shapes_judge/).
    - purity: the alpha share of the majority palette colour and its nearer hue neighbour (`color_purity`);
      blobs of two distant colours fall under it.
    - defect: the largest solid region where object and template differ, as a share of the template's area;
      the confidence falls from 1 to 0 across it (a hybrid's missing or extra half-class is one such region).
    - asymmetry: 1 - the object's overlap with its mirror image; every class is mirror-symmetric, a half-circle
      half-square is not (people's certain shapes in base samples: 0.16 at the 95th percentile, such hybrids ~0.37).

    The defaults are calibrated against people (bench/judge_calibration.py, calibration/shapes_judge/).
    """

    fit: tuple[float, float] = (0.84, 0.92)
    separation: tuple[float, float] = (1.15, 1.3)
    purity: tuple[float, float] = (0.70, 0.98)
    defect: tuple[float, float] = (0.035, 0.045)
    asymmetry: tuple[float, float] = (0.175, 0.475)


CALIBRATED_RAMPS = ConfidenceRamps()
# Classes that are mirror-symmetric about a horizontal axis as well as a vertical one.
HORIZONTALLY_SYMMETRIC = ("circle", "square")


def _ramp(value: float, low: float, high: float) -> float:
    """Smooth step from 0 (at or below `low`) to 1 (at or above `high`): flat at both ends, so
    near-misses just above `low` stay small and near-perfect fits stay near 1."""
    t = float(np.clip((value - low) / (high - low), 0.0, 1.0))
    return t * t * (3.0 - 2.0 * t)


class PixelColors:
    """Per pixel: foreground alpha and nearest palette colour.

    A pixel painted with colour c at coverage a is background + a (c - background); the nearest
    colour is the one whose background->colour segment passes closest to the pixel. Alpha is
    the pixel's distance from the background relative to that colour's, clipped to 1, so
    off-palette pixels (mixtures of two colours, gray, noise) still count as foreground.
    Off-palette colour in itself costs no confidence: like a real detector this one still sees
    a gray circle, and names it by its nearest colour, as CLIP would.
    """

    def __init__(self, image: np.ndarray, palette=PALETTE, background=BACKGROUND):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        self.names = tuple(palette)
        offset = image.astype(np.float32) - np.asarray(background, np.float32)  # H x W x 3
        self.offset = offset
        directions = np.asarray([palette[n] for n in self.names], np.float32) - np.asarray(background, np.float32)
        lengths = np.linalg.norm(directions, axis=1)  # K
        along = np.clip(offset @ directions.T / lengths**2, 0.0, 1.0)  # H x W x K
        residual = np.linalg.norm(offset[..., None, :] - along[..., None] * directions, axis=-1)
        self.nearest = residual.argmin(axis=-1)
        distance = np.linalg.norm(offset, axis=-1)
        self.alpha = np.clip(distance / lengths[self.nearest], 0.0, 1.0)

    def color_votes(self, mask: np.ndarray) -> np.ndarray:
        """Alpha mass per palette colour over the mask's pixels."""
        return np.bincount(self.nearest[mask], weights=self.alpha[mask], minlength=len(self.names))


def _above_floor(alpha: np.ndarray) -> np.ndarray:
    return np.clip((alpha - FIT_ALPHA_FLOOR) / (1.0 - FIT_ALPHA_FLOOR), 0.0, 1.0)


def _soft_iou(observed: np.ndarray, template: np.ndarray) -> float:
    """Soft IoU of an observed alpha map already passed through `_above_floor` and a template."""
    template = _above_floor(template)
    union = np.maximum(observed, template).sum()
    return float(np.minimum(observed, template).sum() / union) if union > 0 else 0.0


def _blur(alpha: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(alpha, sigma, mode="constant") if sigma > 0 else alpha


def _template(name: str, pose: tuple, shape: tuple) -> np.ndarray:
    """The anti-aliased template of a class at pose (cx, cy, size, edge blur sigma)."""
    cx, cy, size, sigma = pose
    return _blur(shape_coverage(name, cx, cy, size, *shape), sigma)


def moment_pose(name: str, alpha: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, size) of a class's template with the same alpha mass and centroid as `alpha`."""
    mass = alpha.sum()
    rows, cols = np.indices(alpha.shape)
    # +0.5: pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is at (j + 0.5, i + 0.5).
    centroid_x = (alpha * (cols + 0.5)).sum() / mass
    centroid_y = (alpha * (rows + 0.5)).sum() / mass
    size = size_from_area(name, mass)
    dx, dy = centroid_offset(name, size)
    return centroid_x - dx, centroid_y - dy, size


def _neighbours(pose: tuple, step: float, scale: float) -> list[tuple]:
    cx, cy, size, sigma = pose
    blurs = [b for b in (sigma - BLUR_STEP, sigma + BLUR_STEP) if 0 <= b <= max(TEMPLATE_BLURS)]
    return [(cx + step, cy, size, sigma), (cx - step, cy, size, sigma), (cx, cy + step, size, sigma),
            (cx, cy - step, size, sigma), (cx, cy, size * (1 + scale), sigma), (cx, cy, size * (1 - scale), sigma)
            ] + [(cx, cy, size, b) for b in blurs]


def _refine(floored: np.ndarray, name: str, pose: tuple, iou: float) -> tuple[tuple, float]:
    """Best pose and soft IoU of a greedy local search around `pose` (noise moves the moments a little)."""
    for step, scale in REFINE_STEPS:
        improved = True
        while improved:
            improved = False
            for candidate in _neighbours(pose, step, scale):
                candidate_iou = _soft_iou(floored, _template(name, candidate, floored.shape))
                if candidate_iou > iou + 1e-4:
                    pose, iou, improved = candidate, candidate_iou, True
    return pose, iou


def largest_defect(floored: np.ndarray, name: str, pose: tuple) -> float:
    """The largest connected region where the object and its fitted template differ by at least half a pixel's
    coverage, as a share of the template's area. A soft or slightly wobbly shape differs thinly all along its
    outline; a hybrid of two classes, a notch or a bump differs in one solid region."""
    template = _above_floor(_template(name, pose, floored.shape))
    difference = np.abs(floored - template)
    regions, n_regions = ndimage.label(difference >= 0.5, structure=np.ones((3, 3), bool))
    if n_regions == 0:
        return 0.0
    masses = ndimage.sum(difference, regions, index=np.arange(1, n_regions + 1))
    return float(masses.max() / max(template.sum(), 1.0))


def _soft_overlap(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def asymmetry(floored: np.ndarray, name: str) -> float:
    """1 - the soft IoU of the object with its own mirror image about its centroid's vertical axis (and, for the
    classes symmetric about a horizontal axis too, the worse of both mirrors). Every class is mirror-symmetric, and
    a soft or wobbly shape stays nearly so; a hybrid (half circle, half square) does not."""
    mass = floored.sum()
    if mass <= 0:
        return 1.0
    rows, cols = np.indices(floored.shape)
    cx, cy = (floored * (cols + 0.5)).sum() / mass, (floored * (rows + 0.5)).sum() / mass
    # pixel j's centre j + 0.5 mirrors to 2 cx - j - 0.5, i.e. index 2 cx - j - 1
    mirrored = [ndimage.map_coordinates(floored, [rows, 2 * cx - cols - 1], order=1, mode="constant")]
    if name in HORIZONTALLY_SYMMETRIC:
        mirrored.append(ndimage.map_coordinates(floored, [2 * cy - rows - 1, cols], order=1, mode="constant"))
    return max(1.0 - _soft_overlap(floored, m) for m in mirrored)


def fit_classes(observed: np.ndarray, moment_alpha: np.ndarray | None = None,
                classes=SHAPES) -> tuple[dict[str, float], float, float]:
    """Soft IoU of one instance's alpha with each class's template fitted by moments, the largest defect
    of the best class's fit (`largest_defect`) and the object's asymmetry for that class (`asymmetry`).

    The alpha mass gives the template's size for that class, the alpha centroid its centre
    (shifted by the class's centroid offset, for the triangle); `moment_alpha` (default
    `observed`) is the alpha the moments are taken from. Each template is tried sharp and
    slightly blurred; the best-fitting class is then refined by a local search.
    """
    moment_alpha = observed if moment_alpha is None else moment_alpha
    floored = _above_floor(observed)
    fits = {}
    for name in classes:
        pose = moment_pose(name, moment_alpha)
        sharp = shape_coverage(name, *pose, *observed.shape)
        ious = [_soft_iou(floored, _blur(sharp, sigma)) for sigma in TEMPLATE_BLURS]
        best = int(np.argmax(ious))
        fits[name] = (ious[best], (*pose, TEMPLATE_BLURS[best]))
    ious = {name: fit[0] for name, fit in fits.items()}
    # Refining only the best class can only widen its lead, i.e. sharpen the moments' decision
    # (refining the runner-up too cost twice as much and left hybrids' scores unchanged).
    best = max(ious, key=ious.get)
    pose = fits[best][1]
    if REFINE_FROM < ious[best] < REFINE_TO:
        pose, ious[best] = _refine(floored, best, pose, ious[best])
    return ious, largest_defect(floored, best, pose), asymmetry(floored, best)


def confidence(ious: dict[str, float], purity: float, defect: float = 0.0,
               ramps: ConfidenceRamps = CALIBRATED_RAMPS, asymmetric: float = 0.0) -> tuple[str, float]:
    """(label, score): fit quality x class certainty x colour purity x no solid defect x symmetry, each in [0, 1]."""
    names = list(ious)
    values = np.array([ious[n] for n in names])
    best = int(values.argmax())
    runner_up = np.partition(values, -2)[-2] if len(values) > 1 else 0.0
    # a perfect fit's misfit is 0: floor it at a tenth of a percent so the ratio stays finite
    class_certainty = _ramp((1.0 - runner_up) / max(1.0 - values[best], 1e-3), *ramps.separation)
    fit = _ramp(values[best], *ramps.fit)
    color = _ramp(purity, *ramps.purity)
    whole = 1.0 - _ramp(defect, *ramps.defect)
    symmetric = 1.0 - _ramp(asymmetric, *ramps.asymmetry)
    return names[best], fit * class_certainty * color * whole * symmetric


def _nearest_component(labels: np.ndarray) -> np.ndarray:
    """Per pixel, the label of the nearest component within RIM_WIDTH, else 0."""
    if labels.max() == 0:
        return labels
    distance, (rows, cols) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(distance <= RIM_WIDTH, labels[rows, cols], 0)


def split_by_colour(labels: np.ndarray, pixels: "PixelColors", candidates: set[int]) -> np.ndarray:
    """Components relabelled so that touching objects of different colours become separate components.

    Only the `candidates` (component labels) are split.

    Within a component, every connected region of one palette colour that is solid (it keeps pixels after a 3x3
    erosion) and holds at least MIN_SPLIT_MASS of alpha is an object's body; when a component has two or more,
    its pixels go to the nearest body. Thin regions (anti-aliased seams, a shaded rim) are never bodies, and a
    shape painted in two colours splits into two pieces that fit no class.
    """
    out = labels.copy()
    next_label = labels.max() + 1
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None or index not in candidates:
            continue
        component = labels[region] == index
        bodies = np.zeros(component.shape, np.int32)
        n_bodies = 0
        for colour in np.unique(pixels.nearest[region][component]):
            same = component & (pixels.nearest[region] == colour)
            pieces, n_pieces = ndimage.label(same, structure=np.ones((3, 3), bool))
            for piece in range(1, n_pieces + 1):
                body = pieces == piece
                solid = ndimage.binary_erosion(body, structure=np.ones((3, 3), bool)).any()
                if solid and pixels.alpha[region][body].sum() >= MIN_SPLIT_MASS:
                    n_bodies += 1
                    bodies[body] = n_bodies
        if n_bodies < 2:
            continue
        _, (rows, cols) = ndimage.distance_transform_edt(bodies == 0, return_indices=True)
        nearest_body = bodies[rows, cols]
        local = out[region]
        for body in range(2, n_bodies + 1):
            local[component & (nearest_body == body)] = next_label
            next_label += 1
    return out


def _best_fit(measurement) -> float:
    return max(measurement.ious.values())


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


@dataclass
class Measurement:
    """What the detector measures of one foreground component, before it turns that into a confidence."""

    core: np.ndarray  # bool H x W: the component's foreground pixels
    box: tuple[float, float, float, float]
    ious: dict[str, float]  # soft IoU with each class's fitted template
    purity: float  # alpha share of the majority palette colour
    defect: float  # largest solid region where the best class's template and the object differ, share of its area
    asymmetry: float  # 1 - overlap with its own mirror image (`asymmetry`)

    def detection(self, ramps: ConfidenceRamps = CALIBRATED_RAMPS) -> Detection:
        label, score = confidence(self.ious, self.purity, self.defect, ramps, self.asymmetry)
        return Detection(label=label, score=float(score), box=self.box, mask=self.core)


class ShapesDetector:
    """image (uint8 H x W x 3) -> one Detection per foreground component, most confident first."""

    def __init__(self, classes=SHAPES, palette=PALETTE, background=BACKGROUND, ramps: ConfidenceRamps = CALIBRATED_RAMPS):
        self.classes = tuple(classes)
        self.palette = palette
        self.background = background
        self.ramps = ramps

    def __call__(self, image: np.ndarray) -> list[Detection]:
        detections = [m.detection(self.ramps) for m in self.measure(image)]
        return sorted(detections, key=lambda d: d.score, reverse=True)

    def measure(self, image: np.ndarray) -> list[Measurement]:
        """Every foreground component's fit to each class and its colour purity, in component order."""
        pixels = PixelColors(image, self.palette, self.background)
        foreground = pixels.alpha >= FOREGROUND_ALPHA
        labels, _ = ndimage.label(foreground, structure=np.ones((3, 3), bool))
        whole = self._measure_components(pixels, labels)
        split = split_by_colour(labels, pixels, set(whole))
        if split.max() == labels.max():
            return list(whole.values())
        pieces = self._measure_components(pixels, split)
        measurements = []
        for index, measurement in whole.items():
            parts = [pieces[p] for p in np.unique(split[labels == index]) if p in pieces]
            # two touching objects: at least one piece is a better shape than the whole; a shape whose colour
            # drifts across it: the whole is the better shape
            if len(parts) > 1 and max(_best_fit(p) for p in parts) > _best_fit(measurement) + SPLIT_GAIN:
                measurements += parts
            else:
                measurements.append(measurement)
        return measurements

    def _measure_components(self, pixels: PixelColors, labels: np.ndarray) -> dict[int, Measurement]:
        owner = _nearest_component(labels)
        far_from_objects = owner == 0
        measurements = {}
        for index, region in enumerate(ndimage.find_objects(owner), start=1):
            if region is None:
                continue
            measurement = self._measure_component(pixels, labels, owner, index, region, far_from_objects)
            if measurement is not None:
                measurements[index] = measurement
        return measurements

    def _measure_component(self, pixels: PixelColors, labels, owner, index, region, far_from_objects):
        core = labels == index
        # its own ink sees a washed-out shape whole; the palette's alpha sees a shape of two colours whole
        alpha = np.maximum(ink_alpha(pixels, core), pixels.alpha)
        # Fit in a window around the component's region, with room for a misfitting template.
        window = tuple(slice(max(r.start - FIT_MARGIN, 0), r.stop + FIT_MARGIN) for r in region)
        mine = owner[window] == index
        observed = np.where(mine, alpha[window], 0.0)
        if observed.sum() < MIN_OBJECT_MASS:
            return None
        # Moments from the rim minus the background's noise level, which would inflate the mass
        # (unless that leaves little: then the whole "object" is noise and will fit nothing).
        background_level = float(alpha[far_from_objects].mean()) if far_from_objects.any() else 0.0
        rim = mine & ~core[window]
        moment_alpha = np.where(rim, observed - background_level, observed)
        if moment_alpha.sum() < 0.5 * observed.sum():
            moment_alpha = observed
        ious, defect, asymmetric = fit_classes(observed, moment_alpha, self.classes)
        return Measurement(core=core, box=_mask_box(core), ious=ious, purity=color_purity(pixels, core), defect=defect,
                           asymmetry=asymmetric)


def ink_alpha(pixels: PixelColors, core: np.ndarray) -> np.ndarray:
    """Every pixel's coverage by the component's own ink (its interior's median colour).

    A shape painted in a washed-out or off-palette colour is still a shape, as it is to a real
    detector, so its fit must not depend on the palette. Components too thin to have an
    interior keep the palette alpha.
    """
    interior = ndimage.binary_erosion(core, structure=np.ones((3, 3), bool))
    if not interior.any():
        return pixels.alpha
    ink = np.median(pixels.offset[interior], axis=0)
    strength = float(ink @ ink)
    if strength < 1.0:
        return pixels.alpha
    return np.clip(pixels.offset @ ink / strength, 0.0, 1.0)


def hue_neighbours(names) -> list[tuple[int, int]]:
    """For each palette colour (by index), the indices of the colours before and after it around the hue circle."""
    import colorsys

    hues = [colorsys.rgb_to_hsv(*(np.asarray(PALETTE[n]) / 255))[0] for n in names]
    order = list(np.argsort(hues))
    return [(int(order[order.index(i) - 1]), int(order[(order.index(i) + 1) % len(order)])) for i in range(len(names))]


def color_purity(pixels: PixelColors, mask: np.ndarray) -> float:
    """Share of the mask's alpha mass in one colour: the majority palette colour with the larger of its two hue
    neighbours. A generated shape often drifts into a neighbouring shade (red to orange, blue to purple, green to
    teal) and is still one object of one colour to a person; a shape painted in two distant colours is not."""
    total = pixels.alpha[mask].sum()
    if total <= 0:
        return 0.0
    votes = pixels.color_votes(mask)
    majority = int(votes.argmax())
    before, after = hue_neighbours(pixels.names)[majority]
    return float((votes[majority] + max(votes[before], votes[after])) / total)


class PaletteColorClassifier:
    """Names each detection's colour: the palette colour with most alpha mass over its mask.

    Plays CLIP's role in GenEval, so like CLIP it always answers, even for off-palette blobs.
    """

    def __init__(self, palette=PALETTE, background=BACKGROUND):
        self.palette = palette
        self.background = background

    def __call__(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]:
        pixels = PixelColors(image, self.palette, self.background)
        colors = []
        for detection in detections:
            mask = np.asarray(detection.mask, bool)
            if not mask.any():
                mask = np.zeros(mask.shape, bool)
                x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
                mask[y0:y1, x0:x1] = True
            colors.append(pixels.names[int(pixels.color_votes(mask).argmax())])
        return colors
