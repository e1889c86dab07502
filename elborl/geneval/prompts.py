"""GenEval prompt generator: the six task templates over any vocabulary.

The shapes world uses `elborl.shapes.world.SHAPES_VOCABULARY`; the real GenEval is the same
generator over COCO's 80 classes and ten colours (`GENEVAL_VOCABULARY`, `geneval_test_set`,
`geneval_train_set`). Every record follows the metadata format of
`elborl.geneval.types`: {"tag", "prompt", "include", "exclude"}.

Sampling is deterministic given the seed: each task draws from its own numpy Generator seeded
with (seed, task index), over the task's prompts enumerated in vocabulary order, so nothing
depends on hash randomisation, set order or the order of the caller's dict.
"""

import itertools
import json
from pathlib import Path

import numpy as np

from elborl.geneval.types import TASKS
from elborl.shapes.world import RELATIONS, SHAPES_VOCABULARY, Vocabulary

# GenEval never asks for the colour of a person (neither in colors nor in color_attr prompts).
CLASSES_WITHOUT_COLOR_PROMPT = ("person",)

# Words that start with a vowel letter but a consonant sound ("a unicorn", "a one-way sign").
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "eu", "one")

SHAPES_TEST_COUNTS = {
    "single_object": 3,
    "two_object": 4,
    "counting": 6,
    "colors": 12,
    "position": 12,
    "color_attr": 24,
}
SHAPES_TEST_SEED = 0

# --- the real GenEval: COCO's 80 classes ------------------------------------------------

# GenEval's object names, in COCO's category order, which is also the order of Mask2Former's
# COCO label indices. They are COCO's names except three GenEval renamed to read naturally in a
# prompt: "computer mouse" (COCO "mouse"), "tv remote" ("remote"), "computer keyboard" ("keyboard").
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_VOCABULARY = Vocabulary(
    classes=GENEVAL_CLASSES,
    colors=GENEVAL_COLORS,
    relations=RELATIONS,
    counting_numbers=(2, 3, 4),
    number_words={2: "two", 3: "three", 4: "four"},
)
# The official test set's prompts per task (553 in all; single_object is every class once).
GENEVAL_TEST_COUNTS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
# GenEval's own default generation seed; our draws differ from its prompt file (another
# sampling procedure), but the templates, vocabulary, metadata and per-task counts are its own.
GENEVAL_TEST_SEED = 43


# --- words -----------------------------------------------------------------------------

def article(word: str) -> str:
    """'an' before a vowel sound, else 'a' (by spelling, with the common exceptions)."""
    lowered = word.lower()
    if lowered.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if lowered[:1] in "aeiou" else "a"


def with_article(word: str) -> str:
    return f"{article(word)} {word}"


def plural(word: str) -> str:
    """GenEval's plural rule: +'es' after a trailing 's', else +'s'."""
    return word + "es" if word.endswith("s") else word + "s"


# --- one task's prompts ----------------------------------------------------------------

def _ordered_pairs(items):
    return [(a, b) for a, b in itertools.permutations(items, 2)]


def task_parameters(vocab: Vocabulary, task: str) -> list[tuple]:
    """Every distinct parameter tuple of a task, in a fixed order given by the vocabulary."""
    classes, colors = vocab.classes, vocab.colors
    if task == "single_object":
        return [(c,) for c in classes]
    if task == "two_object":
        return _ordered_pairs(classes)
    if task == "counting":
        return [(c, n) for c in classes for n in vocab.counting_numbers]
    if task == "colors":
        return [(col, c) for c in classes if c not in CLASSES_WITHOUT_COLOR_PROMPT for col in colors]
    if task == "position":
        return [(a, rel, b) for a, b in _ordered_pairs(classes) for rel in vocab.relations]
    if task == "color_attr":
        colorable = [c for c in classes if c not in CLASSES_WITHOUT_COLOR_PROMPT]
        return [(c1, a, c2, b) for a, b in _ordered_pairs(colorable) for c1, c2 in _ordered_pairs(colors)]
    raise ValueError(f"unknown GenEval task {task!r}; expected one of {TASKS}")


def make_record(vocab: Vocabulary, task: str, params: tuple) -> dict:
    """The GenEval metadata record of one parameter tuple of `task_parameters`."""
    exclude: list[dict] = []
    if task == "single_object":
        (name,) = params
        include = [{"class": name, "count": 1}]
    elif task == "two_object":
        a, b = params
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif task == "counting":
        name, n = params
        include = [{"class": name, "count": n}]
        exclude = [{"class": name, "count": n + 1}]  # exactly n: n + 1 or more fails
    elif task == "colors":
        color, name = params
        include = [{"class": name, "count": 1, "color": color}]
    elif task == "position":
        a, relation, b = params
        # GenEval lists the reference object first; A's position points at clause 0.
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
    elif task == "color_attr":
        c1, a, c2, b = params
        include = [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}]
    else:
        raise ValueError(f"unknown GenEval task {task!r}; expected one of {TASKS}")
    return {"tag": task, "prompt": caption(task, include, vocab), "include": include, "exclude": exclude}


def caption(task: str, include: list[dict], vocab: Vocabulary) -> str:
    """A task's template filled from its include clauses; a clause with a colour is named with it."""

    def named(clause: dict) -> str:
        return with_article(f"{clause['color']} {clause['class']}" if clause.get("color") else clause["class"])

    if task in ("single_object", "colors"):
        return f"a photo of {named(include[0])}"
    if task in ("two_object", "color_attr"):
        return f"a photo of {named(include[0])} and {named(include[1])}"
    if task == "counting":
        (clause,) = include
        words = [vocab.number_words[clause["count"]], clause.get("color"), plural(clause["class"])]
        return "a photo of " + " ".join(w for w in words if w)
    if task == "position":  # A (clause 1) relative to the reference B (clause 0)
        return f"a photo of {named(include[1])} {include[1]['position'][0]} {named(include[0])}"
    raise ValueError(f"unknown GenEval task {task!r}; expected one of {TASKS}")


def describe_colours(record: dict, colours: list[str], vocab: Vocabulary = SHAPES_VOCABULARY) -> dict:
    """The record recaptioned to name its objects' colours, one per include clause (a counted group shares one):
    "a photo of three circles" -> "a photo of three red circles". Colours and colour attribution already name
    theirs and come back unchanged. A pretraining caption, not a GenEval prompt: the metadata keeps the
    record's tag, and the include clauses gain the colours so the rendered image matches the caption.
    """
    task = record["tag"]
    if task in ("colors", "color_attr"):
        return record
    if len(colours) != len(record["include"]):
        raise ValueError(f"{len(record['include'])} include clauses but {len(colours)} colours")
    include = [{**clause, "color": colour} for clause, colour in zip(record["include"], colours)]
    return {**record, "prompt": caption(task, include, vocab), "include": include}


def enumerate_prompts(vocab: Vocabulary, task: str) -> list[dict]:
    """All distinct prompts of a task (for COCO's color_attr that is ~570k records)."""
    return [make_record(vocab, task, p) for p in task_parameters(vocab, task)]


def sample_prompts(
    vocab: Vocabulary, task: str, n: int, rng: np.random.Generator, exclude_prompts=frozenset()
) -> list[dict]:
    """Up to `n` distinct prompts of a task, drawn without replacement, none in `exclude_prompts`.

    Fewer than `n` come back when the task has fewer prompts left after the exclusion.
    """
    if n < 0:
        raise ValueError(f"cannot draw {n} prompts")
    params = task_parameters(vocab, task)
    records: list[dict] = []
    for index in rng.permutation(len(params)):
        if len(records) == n:
            break
        record = make_record(vocab, task, params[index])
        if record["prompt"] not in exclude_prompts:
            records.append(record)
    return records


# --- prompt sets -----------------------------------------------------------------------

def generate(vocab: Vocabulary, counts_per_task: dict, seed: int, exclude_prompts=frozenset()) -> list[dict]:
    """A prompt set: `counts_per_task[task]` distinct prompts per task, tasks in GenEval's order.

    Each task has its own random stream (seed, task index), so changing one task's count leaves
    the others' draws unchanged. A task asking for more prompts than exist gets all of them.
    """
    unknown = set(counts_per_task) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown GenEval tasks {sorted(unknown)}; expected some of {TASKS}")
    exclude = frozenset(exclude_prompts)
    records: list[dict] = []
    for task_index, task in enumerate(TASKS):
        if task not in counts_per_task:
            continue
        rng = np.random.default_rng([seed, task_index])
        records += sample_prompts(vocab, task, int(counts_per_task[task]), rng, exclude)
    return records


def shapes_test_set() -> list[dict]:
    """The fixed test set of the shapes world (61 prompts; all 3 single-object prompts)."""
    return generate(SHAPES_VOCABULARY, SHAPES_TEST_COUNTS, SHAPES_TEST_SEED)


# Tasks whose colour-free prompts the shapes world's test set nearly uses up (counting keeps 3 of 9 for training,
# none with "four"), and whose templates can name colours without turning into another task.
COLOURED_VARIANT_TASKS = ("counting", "position")


def coloured_variants(vocab: Vocabulary, task: str) -> list[dict]:
    """Every colour-naming of every prompt of `task` ("a photo of four circles" -> "... four red circles", one
    colour per include clause, two clauses may share one): the task's skill (a count, a relation) asked with the
    colours named, scored by the same rules (the colours become clause conditions)."""
    records = []
    for record in enumerate_prompts(vocab, task):
        for colours in itertools.product(vocab.colors, repeat=len(record["include"])):
            records.append(describe_colours(record, list(colours), vocab))
    return records


def shapes_train_set(n_per_task, seed: int, coloured: bool = False) -> list[dict]:
    """Training prompts of the shapes world: never a test prompt, whatever the seed.

    `n_per_task` is one count for every task or a {task: count} dict. Tasks whose prompts are
    used up by the test set get fewer (single_object gets none). `coloured` adds the colour-named variants of
    COLOURED_VARIANT_TASKS (`coloured_variants`), up to the task's count in all, the colour-free prompts first.
    """
    counts = n_per_task if isinstance(n_per_task, dict) else {task: n_per_task for task in TASKS}
    test_prompts = {record["prompt"] for record in shapes_test_set()}
    records = generate(SHAPES_VOCABULARY, counts, seed, exclude_prompts=test_prompts)
    if not coloured:
        return records
    for task in COLOURED_VARIANT_TASKS:
        room = int(counts.get(task, 0)) - sum(r["tag"] == task for r in records)
        variants = [v for v in coloured_variants(SHAPES_VOCABULARY, task) if v["prompt"] not in test_prompts]
        rng = np.random.default_rng([seed, TASKS.index(task), 1])
        records += [variants[i] for i in rng.permutation(len(variants))[:max(room, 0)]]
    return records


def geneval_test_set() -> list[dict]:
    """GenEval's test set over COCO: 553 prompts, 80 / 99 / 80 / 94 / 100 / 100 per task."""
    return generate(GENEVAL_VOCABULARY, GENEVAL_TEST_COUNTS, GENEVAL_TEST_SEED)


def geneval_train_set(n_per_task, seed: int) -> list[dict]:
    """Training prompts over COCO from another seed, never a test prompt (single_object gets none:
    the test set holds all 80 classes). `n_per_task`: one count for every task or a {task: count} dict."""
    counts = n_per_task if isinstance(n_per_task, dict) else {task: n_per_task for task in TASKS}
    test_prompts = {record["prompt"] for record in geneval_test_set()}
    return generate(GENEVAL_VOCABULARY, counts, seed, exclude_prompts=test_prompts)


# --- JSONL -----------------------------------------------------------------------------

REQUIRED_KEYS = ("tag", "prompt", "include")


def write_jsonl(path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    """Prompt records from a GenEval-style JSONL file; blank lines are skipped.

    A record without "exclude" gets an empty one. Malformed lines, a prompt repeated (it would count twice in
    scores and be drawn twice as often in training) and a file without prompts raise ValueError naming the file
    and the 1-based line numbers.
    """
    records, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_record(line, Path(path), line_number)
            if record["prompt"] in first_line:
                raise ValueError(f"{path}:{line_number}: duplicate of line {first_line[record['prompt']]}'s prompt "
                                 f"{record['prompt']!r}")
            first_line[record["prompt"]] = line_number
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def _parse_record(line: str, path: Path, line_number: int) -> dict:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: record lacks {', '.join(missing)}")
    if not isinstance(record["include"], list):
        raise ValueError(f"{where}: 'include' must be a list")
    record.setdefault("exclude", [])
    return record
