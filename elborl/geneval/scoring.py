"""GenEval's scoring rules, written once for any detector.

The detector (Mask2Former in production, a classical shapes detector here) only has to
produce `Detection`s; the colour classifier (CLIP ViT-L/14 in production) only has to name
one colour per detection. Everything else -- thresholds, the position rule, the per-clause
logic, the RL partial credit and the task summary -- lives here.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from elborl.geneval.types import TASKS, Detection

# Share of the two boxes' summed size by which a centre offset is shrunk before it counts,
# so that barely separated or overlapping objects get no relation.
POSITION_MARGIN = 0.1
# A shrunk offset component must carry more than half the offset's length to name a relation.
RELATION_THRESHOLD = 0.5


def relative_position(box_a, box_b) -> set[str]:
    """Relations of box A relative to box B (boxes x0, y0, x1, y1; image y grows downward)."""
    a = np.asarray(box_a, dtype=float).reshape(2, 2)  # rows: corner 0, corner 1; cols: x, y
    b = np.asarray(box_b, dtype=float).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    summed_size = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - POSITION_MARGIN * summed_size, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -RELATION_THRESHOLD:
        relations.add("left of")
    if dx > RELATION_THRESHOLD:
        relations.add("right of")
    if dy < -RELATION_THRESHOLD:
        relations.add("above")
    if dy > RELATION_THRESHOLD:
        relations.add("below")
    return relations


# --- detections ------------------------------------------------------------------------

def filter_detections(
    detections: Sequence[Detection],
    tag: str,
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_per_class: int = 16,
) -> dict[str, list[Detection]]:
    """GenEval's kept detections: by class, most confident first, no overlap suppression.

    Counting prompts use the stricter threshold because a spurious extra instance flips the
    answer. Classes with nothing kept are absent from the result.
    """
    threshold = counting_threshold if tag == "counting" else score_threshold
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score <= threshold:
            continue
        kept = by_class.setdefault(detection.label, [])
        if len(kept) < max_per_class:
            kept.append(detection)
    return by_class


# --- colour ----------------------------------------------------------------------------

class ColorClassifier(Protocol):
    """Names one colour per detection (CLIP ViT-L/14 zero-shot over GenEval's ten in production)."""

    def __call__(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]: ...


class _OncePerGroup:
    """Wraps a colour classifier so one image asks it at most once per group of detections.

    The strict check and the dense reward look at the same top detections; in production
    each call is a CLIP forward pass, so the second one is served from here.
    """

    def __init__(self, classifier: ColorClassifier):
        self.classifier = classifier
        self.cache: dict[tuple, list[str]] = {}

    def __call__(self, image, detections, class_name):
        key = (id(image), class_name, tuple(id(d) for d in detections))
        if key not in self.cache:
            colors = list(self.classifier(image, list(detections), class_name))
            if len(colors) != len(detections):
                raise ValueError(f"colour classifier gave {len(colors)} colours for {len(detections)} detections")
            self.cache[key] = colors
        return self.cache[key]


# --- strict GenEval correctness --------------------------------------------------------

def _position_target(clause: dict, clause_index: int) -> tuple[str, int]:
    """(relation, index of the target clause); the target must be an earlier clause, as in GenEval."""
    relation, target = clause["position"]
    if not 0 <= int(target) < clause_index:
        raise ValueError(f"include clause {clause_index} targets clause {target}; only earlier clauses are allowed")
    return relation, int(target)


def _first_relation_failure(group_a, group_b, relation) -> tuple[Detection, Detection] | None:
    """The first (A, B) pair that lacks the relation, or None when every pair has it."""
    for a in group_a:
        for b in group_b:
            if relation not in relative_position(a.box, b.box):
                return a, b
    return None


def _check_include(image, clause, index, kept, groups, color_classifier) -> tuple[list | None, str | None]:
    """One include clause: (its found group or None when it fails, the reason it failed)."""
    name, count = clause["class"], int(clause["count"])
    found = kept.get(name, [])[:count]
    if len(found) < count:
        return None, f"expected {name} >= {count}, found {len(found)}"
    if "color" in clause:
        colors = color_classifier(image, found, name)
        if colors.count(clause["color"]) < count:
            return None, f"expected {clause['color']} {name} >= {count}, found colours {colors}"
    if "position" in clause:
        relation, target = _position_target(clause, index)
        if groups[target] is None:
            return None, f"no target for {name} to be {relation}"
        failure = _first_relation_failure(found, groups[target], relation)
        if failure is not None:
            a, b = failure
            actual = sorted(relative_position(a.box, b.box)) or ["no clear relation"]
            return None, f"expected {name} {relation} {b.label}, found {', '.join(actual)}"
    return found, None


def evaluate_image(image, detections, meta, color_classifier) -> tuple[bool, list[str]]:
    """GenEval's verdict on one image: every include clause holds and no exclude clause does.

    `detections` are the kept ones (`filter_detections`), grouped by class. Reasons are empty
    when the image is correct.
    """
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []  # found objects per include clause; None when it failed
    for index, clause in enumerate(meta.get("include", [])):
        group, reason = _check_include(image, clause, index, detections, groups, color_classifier)
        groups.append(group)
        if reason is not None:
            reasons.append(reason)
    for clause in meta.get("exclude", []):
        name, count = clause["class"], int(clause["count"])
        n_found = len(detections.get(name, []))
        if n_found >= count:
            reasons.append(f"expected {name} < {count}, found {n_found}")
    return not reasons, reasons


# --- dense RL reward -------------------------------------------------------------------

def _count_term(n_asked: int, n_found: int) -> float:
    return max(0.0, 1.0 - abs(n_asked - n_found) / n_asked)


def _clause_terms(image, clause, index, detections, meta, color_classifier) -> list[float]:
    """Partial-credit terms of one include clause.

    A clause always contributes the same number of terms (count, plus colour and position if
    asked), so a wrong count cannot raise the mean by dropping a failing colour or position
    term; those terms score 0 unless the count is exact.
    """
    name, count = clause["class"], int(clause["count"])
    found = detections.get(name, [])
    exact = len(found) == count
    terms = [_count_term(count, len(found))]
    if "color" in clause:
        terms.append(_color_term(image, clause, found, color_classifier) if exact else 0.0)
    if "position" in clause:
        terms.append(_position_term(clause, index, found, detections, meta) if exact else 0.0)
    return terms


def _color_term(image, clause, found, color_classifier) -> float:
    colors = color_classifier(image, found, clause["class"])
    return colors.count(clause["color"]) / len(found)


def _position_term(clause, index, found, detections, meta) -> float:
    """Share of (A, B) pairs with the relation; 0 -- not half credit -- when the target is missing.

    The target group is the target clause's top-`count` detections, missing when fewer exist.
    """
    relation, target = _position_target(clause, index)
    target_clause = meta["include"][target]
    target_count = int(target_clause["count"])
    targets = detections.get(target_clause["class"], [])[:target_count]
    if len(targets) < target_count:
        return 0.0
    pairs = [(a, b) for a in found for b in targets]
    held = sum(relation in relative_position(a.box, b.box) for a, b in pairs)
    return held / len(pairs)


def dense_reward(image, detections, meta, color_classifier) -> float:
    """RL partial credit in [0, 1]: the mean of every include clause's terms.

    `detections` are the kept ones, grouped by class. Exclude clauses add no term: GenEval's
    only ones (counting's "n + 1 or more") are already priced by the count term.
    """
    terms: list[float] = []
    for index, clause in enumerate(meta.get("include", [])):
        terms += _clause_terms(image, clause, index, detections, meta, color_classifier)
    return float(np.mean(terms)) if terms else 1.0


# --- summary ---------------------------------------------------------------------------

def summarize(tags: Sequence[str], correct: Sequence[bool]) -> dict:
    """Task scores (share of correct images) and the overall score, GenEval's way.

    Overall is the unweighted mean of the task scores, so a task's weight does not depend on
    its number of prompts. Tasks with no images are listed as None and left out of the mean.
    """
    if len(tags) != len(correct):
        raise ValueError(f"{len(tags)} tags but {len(correct)} verdicts")
    unknown = set(tags) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown GenEval tasks: {sorted(unknown)}")
    tasks: dict[str, float | None] = {}
    for task in TASKS:
        verdicts = [bool(c) for t, c in zip(tags, correct) if t == task]
        tasks[task] = float(np.mean(verdicts)) if verdicts else None
    present = [score for score in tasks.values() if score is not None]
    overall = float(np.mean(present)) if present else None
    return {"tasks": tasks, "overall": overall, "n_images": len(tags)}


# --- end to end ------------------------------------------------------------------------

@dataclass
class ImageScore:
    correct: bool  # GenEval's strict verdict
    reward: float  # dense partial credit in [0, 1]
    reasons: list[str]  # why the image is not correct; empty when it is
    n_detections: int  # detections kept after thresholds and the per-class cap


class GenEvalScorer:
    """Detector + colour classifier + GenEval's rules -> a verdict and a reward per image."""

    def __init__(
        self,
        detector: Callable[[np.ndarray], list[Detection]],
        color_classifier: ColorClassifier,
        score_threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_per_class: int = 16,
    ):
        self.detector = detector
        self.color_classifier = color_classifier
        self.score_threshold = score_threshold
        self.counting_threshold = counting_threshold
        self.max_per_class = max_per_class

    def score(self, images: Sequence[np.ndarray], metas: Sequence[dict]) -> list[ImageScore]:
        """Images are uint8 H x W x 3 arrays; metas are GenEval prompt metadata, one per image."""
        if len(images) != len(metas):
            raise ValueError(f"{len(images)} images but {len(metas)} metadata entries")
        return [self.score_one(image, meta) for image, meta in zip(images, metas)]

    def score_one(self, image: np.ndarray, meta: dict) -> ImageScore:
        kept = filter_detections(
            self.detector(image), meta["tag"], self.score_threshold, self.counting_threshold, self.max_per_class
        )
        colors = _OncePerGroup(self.color_classifier)  # colour is asked only by clauses that need it
        correct, reasons = evaluate_image(image, kept, meta, colors)
        reward = dense_reward(image, kept, meta, colors)
        n_kept = sum(len(group) for group in kept.values())
        return ImageScore(correct=correct, reward=reward, reasons=reasons, n_detections=n_kept)
