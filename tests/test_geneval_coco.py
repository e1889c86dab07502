"""The real GenEval prompt sets over COCO: vocabulary, the 553-prompt test set, training prompts."""

from collections import Counter

from elborl.geneval.prompts import (
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    GENEVAL_VOCABULARY,
    enumerate_prompts,
    geneval_test_set,
    geneval_train_set,
    shapes_test_set,
)
from elborl.geneval.types import TASKS

OFFICIAL_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_vocabulary_is_genevals():
    assert len(GENEVAL_CLASSES) == 80 == len(set(GENEVAL_CLASSES))
    assert GENEVAL_CLASSES[:3] == ("person", "bicycle", "car") and GENEVAL_CLASSES[-1] == "toothbrush"
    for name in ("dining table", "hair drier", "potted plant", "tv", "cell phone", "computer mouse", "tv remote",
                 "computer keyboard", "couch", "motorcycle", "airplane"):
        assert name in GENEVAL_CLASSES
    assert GENEVAL_COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    assert GENEVAL_VOCABULARY.relations == ("left of", "right of", "above", "below")
    assert [GENEVAL_VOCABULARY.number_words[n] for n in GENEVAL_VOCABULARY.counting_numbers] == ["two", "three", "four"]


def test_test_set_has_the_official_553_prompts_per_task():
    test = geneval_test_set()
    assert len(test) == 553
    assert Counter(r["tag"] for r in test) == OFFICIAL_COUNTS
    assert [r["tag"] for r in test] == sorted((r["tag"] for r in test), key=TASKS.index)  # GenEval's task order
    assert len({r["prompt"] for r in test}) == 553
    single = [r["include"][0]["class"] for r in test if r["tag"] == "single_object"]
    assert sorted(single) == sorted(GENEVAL_CLASSES)
    assert test == geneval_test_set()  # deterministic


def test_test_set_records_follow_genevals_templates():
    test = geneval_test_set()
    for r in test:
        assert r["prompt"].startswith("a photo of ")
        classes = [c["class"] for c in r["include"]]
        assert set(classes) <= set(GENEVAL_CLASSES)
        if r["tag"] == "counting":
            (clause,) = r["include"]
            assert clause["count"] in (2, 3, 4)
            assert r["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
            word = {2: "two", 3: "three", 4: "four"}[clause["count"]]
            assert r["prompt"].startswith(f"a photo of {word} ")
        else:
            assert r["exclude"] == []
        if r["tag"] in ("colors", "color_attr"):
            assert "person" not in classes  # GenEval never asks a person's colour
            assert all(c["color"] in GENEVAL_COLORS for c in r["include"])
        if r["tag"] in ("two_object", "position", "color_attr"):
            assert classes[0] != classes[1]
        if r["tag"] == "position":
            assert r["include"][1]["position"][1] == 0


def test_coco_records_read_as_genevals():
    by_prompt = {r["prompt"]: r for r in enumerate_prompts(GENEVAL_VOCABULARY, "counting")}
    assert by_prompt["a photo of four buses"]["include"] == [{"class": "bus", "count": 4}]
    assert "a photo of two wine glasses" in by_prompt
    colors = {r["prompt"] for r in enumerate_prompts(GENEVAL_VOCABULARY, "colors")}
    assert "a photo of an orange umbrella" in colors and "a photo of a white computer keyboard" in colors
    assert len(colors) == 79 * 10
    single = {r["prompt"] for r in enumerate_prompts(GENEVAL_VOCABULARY, "single_object")}
    assert {"a photo of an airplane", "a photo of an umbrella", "a photo of a hair drier"} <= single


def test_train_set_is_deterministic_and_disjoint_from_test():
    test_prompts = {r["prompt"] for r in geneval_test_set()}
    train = geneval_train_set(40, seed=7)
    assert train == geneval_train_set(40, seed=7)
    assert train != geneval_train_set(40, seed=8)
    counts = Counter(r["tag"] for r in train)
    assert counts == {task: 40 for task in TASKS if task != "single_object"}  # every class is a test prompt
    assert not {r["prompt"] for r in train} & test_prompts
    assert len({r["prompt"] for r in train}) == len(train)
    # the test set's own seed still yields no test prompt
    from elborl.geneval.prompts import GENEVAL_TEST_SEED

    same_seed = geneval_train_set({"counting": 30, "colors": 30}, seed=GENEVAL_TEST_SEED)
    assert len(same_seed) == 60 and not {r["prompt"] for r in same_seed} & test_prompts
    for r in train:
        if r["tag"] == "counting":
            assert r["exclude"][0]["count"] == r["include"][0]["count"] + 1


def test_shapes_sets_unchanged_by_the_coco_vocabulary():
    assert len(shapes_test_set()) == 61
