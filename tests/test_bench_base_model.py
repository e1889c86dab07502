"""bench/base_model.py --pass-at: the pass@k estimator and its per-task table."""

from conftest import load_bench


def test_pass_at_k_is_the_chance_that_k_images_hold_a_correct_one():
    bench = load_bench("base_model")
    assert bench.pass_at_k(4, 0, 2) == 0.0 and bench.pass_at_k(4, 3, 2) == 1.0
    assert abs(bench.pass_at_k(4, 1, 2) - 0.5) < 1e-12  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert abs(bench.pass_at_k(4, 1, 1) - 0.25) < 1e-12  # pass@1 is the accuracy


def test_pass_at_k_table_per_task_and_overall():
    bench = load_bench("base_model")
    records = ([{"tag": "a", "prompt": "p", "correct": c} for c in (True, False, False, False)]
               + [{"tag": "a", "prompt": "q", "correct": False} for _ in range(4)]
               + [{"tag": "b", "prompt": "r", "correct": c} for c in (True, True, False, False)])
    lines = bench.pass_at_k_table(records, 4).splitlines()
    assert lines[0] == "| task | prompts | accuracy | pass@2 | pass@4 |"
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[3:-1]] for line in lines[2:]}
    assert rows["a"] == [0.125, 0.25, 0.5]  # p: 1 of 4 correct (pass@2 0.5, pass@4 1); q: none
    assert rows["b"] == [0.5, round(1 - 1 / 6, 3), 1.0]
    assert rows["overall"] == [round((0.125 + 0.5) / 2, 3), round((0.25 + 5 / 6) / 2, 3), 0.75]
