"""GenEval prompt generator: templates, metadata, determinism, train/test split, JSONL."""

import json

import pytest

from elborl.geneval import prompts
from elborl.geneval.prompts import (
    describe_colours,
    enumerate_prompts,
    generate,
    read_jsonl,
    shapes_test_set,
    shapes_train_set,
    write_jsonl,
)
from elborl.geneval.types import TASKS
from elborl.shapes.world import SHAPES_VOCABULARY, Vocabulary

COCO_LIKE = Vocabulary(
    classes=("person", "orange", "bus", "umbrella", "dog", "apple"),
    colors=("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"),
)


def by_prompt(records):
    return {r["prompt"]: r for r in records}


def test_articles_and_plurals():
    assert prompts.with_article("orange") == "an orange"
    assert prompts.with_article("umbrella") == "an umbrella"
    assert prompts.with_article("circle") == "a circle"
    assert prompts.with_article("unicorn") == "a unicorn"
    assert prompts.plural("bus") == "buses"
    assert prompts.plural("circle") == "circles"
    assert prompts.plural("glass") == "glasses"


def test_single_object_and_two_object_records():
    single = by_prompt(enumerate_prompts(COCO_LIKE, "single_object"))
    assert single["a photo of an orange"] == {
        "tag": "single_object",
        "prompt": "a photo of an orange",
        "include": [{"class": "orange", "count": 1}],
        "exclude": [],
    }
    two = by_prompt(enumerate_prompts(COCO_LIKE, "two_object"))
    assert two["a photo of an apple and a dog"]["include"] == [
        {"class": "apple", "count": 1},
        {"class": "dog", "count": 1},
    ]
    assert all(r["include"][0]["class"] != r["include"][1]["class"] for r in two.values())
    n = len(COCO_LIKE.classes)
    assert len(two) == n * (n - 1)


def test_counting_records_exclude_one_more():
    counting = enumerate_prompts(SHAPES_VOCABULARY, "counting")
    assert len(counting) == len(SHAPES_VOCABULARY.classes) * len(SHAPES_VOCABULARY.counting_numbers)
    record = by_prompt(counting)["a photo of three triangles"]
    assert record["include"] == [{"class": "triangle", "count": 3}]
    assert record["exclude"] == [{"class": "triangle", "count": 4}]
    buses = by_prompt(enumerate_prompts(COCO_LIKE, "counting"))["a photo of four buses"]
    assert buses["exclude"] == [{"class": "bus", "count": 5}]
    for r in counting:
        assert r["exclude"][0]["count"] == r["include"][0]["count"] + 1


def test_colors_records_and_no_person():
    colors = by_prompt(enumerate_prompts(COCO_LIKE, "colors"))
    assert colors["a photo of an orange dog"]["include"] == [{"class": "dog", "count": 1, "color": "orange"}]
    assert colors["a photo of a red orange"]["include"] == [{"class": "orange", "count": 1, "color": "red"}]
    assert not any(r["include"][0]["class"] == "person" for r in colors.values())


def test_position_records_reference_first():
    position = by_prompt(enumerate_prompts(SHAPES_VOCABULARY, "position"))
    record = position["a photo of a circle left of a square"]
    assert record["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    n = len(SHAPES_VOCABULARY.classes)
    assert len(position) == n * (n - 1) * len(SHAPES_VOCABULARY.relations)


def test_color_attr_records_distinct_classes_and_colours():
    color_attr = enumerate_prompts(SHAPES_VOCABULARY, "color_attr")
    record = by_prompt(color_attr)["a photo of an orange circle and a blue square"]
    assert record["include"] == [
        {"class": "circle", "count": 1, "color": "orange"},
        {"class": "square", "count": 1, "color": "blue"},
    ]
    for r in color_attr:
        a, b = r["include"]
        assert a["class"] != b["class"] and a["color"] != b["color"]


def test_every_record_has_exactly_the_geneval_keys():
    for task in TASKS:
        for r in enumerate_prompts(SHAPES_VOCABULARY, task):
            assert set(r) == {"tag", "prompt", "include", "exclude"}
            assert r["tag"] == task
            json.dumps(r)  # serialisable as is


def test_generate_is_deterministic_and_seed_dependent():
    counts = {"two_object": 6, "colors": 10, "position": 10, "color_attr": 20}
    first = generate(SHAPES_VOCABULARY, counts, seed=7)
    assert first == generate(SHAPES_VOCABULARY, counts, seed=7)
    assert first == generate(SHAPES_VOCABULARY, dict(reversed(list(counts.items()))), seed=7)
    assert [r["prompt"] for r in first] != [r["prompt"] for r in generate(SHAPES_VOCABULARY, counts, seed=8)]


def test_generate_draws_distinct_prompts_in_task_order():
    counts = {task: 5 for task in TASKS}
    records = generate(COCO_LIKE, counts, seed=3)
    prompts_ = [r["prompt"] for r in records]
    assert len(prompts_) == len(set(prompts_)) == 5 * len(TASKS)
    assert [r["tag"] for r in records] == [task for task in TASKS for _ in range(5)]


def test_generate_caps_at_available_and_honours_exclusions():
    records = generate(SHAPES_VOCABULARY, {"single_object": 10}, seed=0)
    assert sorted(r["prompt"] for r in records) == sorted(
        r["prompt"] for r in enumerate_prompts(SHAPES_VOCABULARY, "single_object")
    )
    excluded = {"a photo of a circle", "a photo of a square"}
    kept = generate(SHAPES_VOCABULARY, {"single_object": 10}, seed=0, exclude_prompts=excluded)
    assert {r["prompt"] for r in kept} == {"a photo of a triangle"}


def test_generate_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown"):
        generate(SHAPES_VOCABULARY, {"counting": 2, "spelling": 3}, seed=0)


def test_shapes_test_set_counts():
    test = shapes_test_set()
    counts = {task: sum(r["tag"] == task for r in test) for task in TASKS}
    assert counts == prompts.SHAPES_TEST_COUNTS
    assert test == shapes_test_set()


def test_held_out_prompt_sets_by_name():
    from elborl.prompt_sets import DRAWBENCH, PROMPT_SETS, prompt_set
    from elborl.rewards.ocr import target_text

    assert set(PROMPT_SETS) == {"shapes_geneval", "geneval", "ocr", "drawbench"}
    assert prompt_set("shapes_geneval") == shapes_test_set() and len(prompt_set("geneval")) == 553
    assert {r["tag"] for r in prompt_set("ocr")} == {"ocr"}
    drawbench = prompt_set("drawbench")
    assert len(drawbench) == 40 and len({r["prompt"] for r in drawbench}) == 40
    assert [r["tag"] for r in drawbench[::4]] == list(DRAWBENCH) and len(DRAWBENCH) == 10
    assert all(set(r) == {"tag", "prompt", "include", "exclude"} for r in drawbench)
    assert all(target_text(r) for r in drawbench if r["tag"] == "text")  # the OCR reward can score them
    with pytest.raises(ValueError, match="unknown prompt set 'parti'"):
        prompt_set("parti")


def test_train_set_is_disjoint_from_test_set():
    test_prompts = {r["prompt"] for r in shapes_test_set()}
    for seed in (0, 1, 2):
        train = shapes_train_set(1000, seed)
        train_prompts = {r["prompt"] for r in train}
        assert not train_prompts & test_prompts
        # with counts this large every non-test prompt is drawn: train + test = everything
        for task in TASKS:
            all_task = {r["prompt"] for r in enumerate_prompts(SHAPES_VOCABULARY, task)}
            task_train = {r["prompt"] for r in train if r["tag"] == task}
            assert task_train == all_task - test_prompts
    assert not any(r["tag"] == "single_object" for r in shapes_train_set(5, 1))


def test_coloured_variants_name_the_colours_as_clause_conditions_and_never_a_test_prompt():
    plain = shapes_train_set(1000, 1)
    train = shapes_train_set(1000, 1, coloured=True)
    assert train[:len(plain)] == plain  # the colour-free prompts stay, first
    test_prompts = {r["prompt"] for r in shapes_test_set()}
    assert not {r["prompt"] for r in train} & test_prompts
    assert len({r["prompt"] for r in train}) == len(train)
    colours = SHAPES_VOCABULARY.colors
    counting = [r for r in train[len(plain):] if r["tag"] == "counting"]
    assert len(counting) == 9 * len(colours)  # 3 shapes x 3 numbers, every colour
    four = by_prompt(counting)[f"a photo of four {colours[0]} circles"]
    assert four["include"] == [{"class": "circle", "count": 4, "color": colours[0]}]
    assert four["exclude"] == [{"class": "circle", "count": 5}]
    position = [r for r in train[len(plain):] if r["tag"] == "position"]
    assert len(position) == 24 * len(colours) ** 2
    assert all(len(r["include"]) == 2 and all("color" in c for c in r["include"]) for r in position)
    assert {r["tag"] for r in train[len(plain):]} == {"counting", "position"}
    capped = shapes_train_set({"counting": 10, "position": 0}, 1, coloured=True)
    assert sum(r["tag"] == "counting" for r in capped) == 10 and not any(r["tag"] == "position" for r in capped)


def test_jsonl_round_trip(tmp_path):
    records = shapes_test_set()
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records


def test_read_jsonl_fills_missing_exclude_and_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"tag": "single_object", "prompt": "a photo of a circle", "include": []}\n\n')
    assert read_jsonl(path) == [
        {"tag": "single_object", "prompt": "a photo of a circle", "include": [], "exclude": []}
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "JSON object"),
        ('{"tag": "colors", "include": []}', "prompt"),
        ('{"prompt": "x", "include": []}', "tag"),
        ('{"tag": "colors", "prompt": "x"}', "include"),
    ],
)
def test_read_jsonl_names_file_and_line_of_malformed_record(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    first, second = (json.dumps(record) for record in shapes_test_set()[:2])
    path.write_text(f"{first}\n{second}\n{bad_line}\n")
    with pytest.raises(ValueError, match=message) as error:
        read_jsonl(path)
    assert f"{path}:3" in str(error.value)


def test_read_jsonl_refuses_a_repeated_prompt_and_an_empty_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = shapes_test_set()[:3]
    write_jsonl(path, [*records, records[1]])
    with pytest.raises(ValueError, match=rf"{path}:4: duplicate of line 2's prompt '{records[1]['prompt']}'"):
        read_jsonl(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{path}: no prompts"):
        read_jsonl(path)


def test_describe_colours_names_each_clause_colour_in_the_caption_and_metadata():
    records = {task: by_prompt(enumerate_prompts(SHAPES_VOCABULARY, task)) for task in TASKS}
    cases = [
        (records["single_object"]["a photo of a circle"], ["orange"], "a photo of an orange circle"),
        (records["two_object"]["a photo of a circle and a square"], ["red", "blue"],
         "a photo of a red circle and a blue square"),
        (records["counting"]["a photo of three triangles"], ["green"], "a photo of three green triangles"),
        # position records list the reference (B) first; the caption reads A first
        (records["position"]["a photo of a circle left of a square"], ["red", "yellow"],
         "a photo of a yellow circle left of a red square"),
    ]
    for record, colours, caption in cases:
        described = describe_colours(record, colours)
        assert described["prompt"] == caption
        assert [c["color"] for c in described["include"]] == colours
        assert described["tag"] == record["tag"] and described["exclude"] == record["exclude"]
        assert "color" not in record["include"][0]  # the enumerated record is not modified
    coloured = records["colors"]["a photo of a red circle"]
    assert describe_colours(coloured, ["blue"]) is coloured
    with pytest.raises(ValueError, match="2 include clauses but 1 colours"):
        describe_colours(cases[1][0], ["red"])
