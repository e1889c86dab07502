"""Held-out prompt sets by name, for evaluation (`stages.evaluate --prompt-set NAME`).

| name           | prompts | tags                                   | scored by (e.g.)                                    |
|----------------|---------|----------------------------------------|-----------------------------------------------------|
| shapes_geneval | 61      | GenEval's six tasks                    | shapes-GenEval strict (default), shapes_geneval     |
| geneval        | 553     | GenEval's six tasks                    | geneval (Mask2Former)                               |
| ocr            | 100     | ocr                                    | ocr                                                 |
| drawbench      | 40      | DrawBench's ten categories             | clipscore, pickscore, hpsv2, aesthetic              |

Every record follows the GenEval metadata format ({"tag", "prompt", "include", "exclude"}); `tag` is the task
or category an evaluation reports per.

`DRAWBENCH` is a DrawBench-style set written for this project (not DrawBench's own prompts): four prompts in each
of DrawBench's categories. Text prompts quote their text, so the OCR reward can score them too.
"""

from elborl.geneval.prompts import geneval_test_set, shapes_test_set
from elborl.rewards.ocr import ocr_test_set

DRAWBENCH = {
    "colors": (
        "a blue bird perched on a yellow fence",
        "a green bicycle leaning against a red brick wall",
        "a purple umbrella next to an orange suitcase",
        "a white cat asleep on a black sofa",
    ),
    "counting": (
        "three apples on a wooden table",
        "five red balloons tied to a chair",
        "two dogs and one cat sitting on a porch",
        "four candles burning on a birthday cake",
    ),
    "conflicting": (
        "a horse riding an astronaut",
        "a fish flying high above the clouds",
        "an elephant balancing on a teacup",
        "a snowman sunbathing in the desert",
    ),
    "dalle": (
        "an armchair in the shape of a pineapple",
        "a lamp shaped like a giant strawberry",
        "a hedgehog made of pine cones wearing a knitted scarf",
        "a teapot made of glass with a tiny galaxy swirling inside",
    ),
    "descriptions": (
        "a small wooden cabin at the edge of a frozen lake, smoke rising from the chimney under a pink evening sky",
        "a crowded night market with paper lanterns, steaming food stalls and people in raincoats",
        "an old library with tall shelves, a rolling ladder and dust glittering in a beam of sunlight",
        "a red vintage car parked on a cobblestone street beside a flower shop with open shutters",
    ),
    "misspellings": (
        "a giraff eating leafs from a tall tree",
        "a bowl of spagetti with meatbals",
        "a wooden brige over a rivr at sunset",
        "a yelow school bus parked in front of a libary",
    ),
    "positional": (
        "a cup to the left of a laptop",
        "a dog sleeping under a table",
        "a red ball on top of a blue box",
        "a tree behind a white picket fence",
    ),
    "rare_words": (
        "a brass astrolabe on a desk",
        "a zoetrope spinning in a dark room",
        "a musician playing a theremin",
        "a sailor holding a sextant on the deck of a ship",
    ),
    "reddit": (
        "my cat judging me from the top of the fridge",
        "a corgi in a tiny yellow raincoat waiting for the bus",
        "grandpa's garden tomato that is bigger than his hand",
        "the moment you open the oven and the pizza is perfect",
    ),
    "text": (
        'a coffee cup with "Good Morning" written on the side',
        'a neon sign in a window that reads "Late Night Noodles"',
        'a yellow road sign with the word "Detour"',
        'a hand-painted banner saying "Welcome Home"',
    ),
}


def drawbench_set() -> list[dict]:
    """The DrawBench-style set: 40 prompts, tagged by category."""
    return [{"tag": tag, "prompt": prompt, "include": [], "exclude": []}
            for tag, prompts in DRAWBENCH.items() for prompt in prompts]


PROMPT_SETS = {
    "shapes_geneval": shapes_test_set,
    "geneval": geneval_test_set,
    "ocr": ocr_test_set,
    "drawbench": drawbench_set,
}


def prompt_set(name: str) -> list[dict]:
    """The held-out prompt set registered as `name`."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]()
