"""The two data types every GenEval detector and scorer share.

Prompt metadata follows GenEval's JSONL format, one dict per prompt::

    {"tag": "position", "prompt": "a photo of a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": []}

`position` is (relation, index of the other include clause); `color` is optional;
counting prompts exclude `count + 1` or more of their class.
"""

from dataclasses import dataclass

import numpy as np

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Detection:
    """One detected instance, in the form Mask2Former's output is adapted to."""

    label: str  # class name
    score: float  # confidence in [0, 1]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    mask: np.ndarray  # bool, H x W
