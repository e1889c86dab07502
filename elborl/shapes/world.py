"""The vocabulary of the shapes world.

Small on purpose: three shapes, six colours (orange and red are the easily confused pair),
counts one to four, GenEval's four relations. Images are 32x32 RGB on a light gray background.
"""

from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle")

# RGB of each colour as the renderer paints it. Orange sits between red and yellow on purpose.
PALETTE = {
    "red": (214, 39, 40),
    "orange": (247, 129, 25),
    "yellow": (235, 205, 30),
    "green": (44, 160, 64),
    "blue": (31, 90, 210),
    "purple": (140, 60, 185),
}
COLORS = tuple(PALETTE)
BACKGROUND = (232, 232, 232)

RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

IMAGE_SIZE = 32
# Side of an object's bounding square, in pixels.
MIN_OBJECT_SIZE = 8
MAX_OBJECT_SIZE = 12


@dataclass(frozen=True)
class Vocabulary:
    """What a GenEval-style prompt generator draws from; the real GenEval uses COCO's 80 classes."""

    classes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    relations: tuple[str, ...] = RELATIONS
    counting_numbers: tuple[int, ...] = (2, 3, 4)
    number_words: dict = field(default_factory=lambda: dict(NUMBER_WORDS))


SHAPES_VOCABULARY = Vocabulary()
