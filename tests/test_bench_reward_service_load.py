"""bench/reward_service_load.py, tiny: a few seconds of clients against the service on loopback; it reports
throughput, latency, 429s and errors per row, where back-pressure starts, and that every score matched in-process."""

import json

import pytest

from conftest import load_bench

load = load_bench("reward_service_load")
COLUMNS = ("requests_per_s", "images_per_s", "p50_ms", "p99_ms", "rejected_429", "errors", "ok_per_client",
           "scores_checked", "score_mismatches", "scores_exact", "max_abs_diff")


def check_rows(report: dict, rewards: list[str], clients: list[int], batch: int) -> None:
    assert [(row["reward"], row["clients"]) for row in report["rows"]] == [(r, c) for r in rewards for c in clients]
    for row in report["rows"]:
        assert set(COLUMNS) <= set(row), row
        assert row["requests"] > 0 and row["requests_per_s"] > 0 and row["errors"] == 0, row
        assert row["images_per_s"] == pytest.approx(row["requests_per_s"] * batch)
        assert row["images"] == row["requests"] * batch
        assert 0 < row["p50_ms"] <= row["p99_ms"], row
        assert row["scores_checked"] == row["requests"] and row["score_mismatches"] == 0, row
        assert row["rejected_429"] == row["server_rejected_busy"], row  # the clients saw what the service counted
        if row["reward"] == "shapes_geneval":
            assert row["scores_exact"] and row["max_abs_diff"] == 0, row
    assert report["scores_match"] is True


def test_the_load_bench_reports_throughput_latency_back_pressure_and_matching_scores(tmp_path, capsys):
    """Served from a thread (fast): shapes and the tiny CLIP reward, 1 and 6 clients against max_pending 2."""
    out = tmp_path / "load.json"
    report = load.main(["--server", "thread", "--clients", "6,1", "--seconds", "1.5", "--batch", "4",
                        "--max-pending", "2", "--retry-after", "0.2", "--json-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    check_rows(report, ["shapes_geneval", "hpsv2"], [1, 6], 4)
    for row in report["rows"]:
        assert row["rejected_429"] == 0 if row["clients"] == 1 else row["rejected_429"] > 0, row  # 1 < 2 <= 6
    assert report["backpressure_starts_at"] == {"shapes_geneval": 6, "hpsv2": 6}
    assert report["tolerance"] == {"shapes_geneval": None, "hpsv2": [1e-5, 1e-6]}
    printed = capsys.readouterr().out
    assert ("| reward | clients | requests/s | images/s | p50 ms | p99 ms | 429s | errors | scored per client (min-max) "
            "| scores vs in-process |") in printed
    assert "| shapes_geneval | 6 |" in printed and "| hpsv2 | 1 |" in printed and "exact (" in printed
    assert "shapes_geneval: 429 back-pressure starts at 6 clients (max_pending 2)" in printed


def test_the_load_bench_runs_the_service_as_its_own_process(capsys):
    """The default: `python -m elborl.rewards.service` on a free loopback port, stopped at the end."""
    report = load.main(["--reward", "shapes", "--clients", "1", "--seconds", "1", "--batch", "2"])
    check_rows(report, ["shapes_geneval"], [1], 2)
    assert report["config"]["server"] == "process" and report["backpressure_starts_at"] == {"shapes_geneval": None}
    assert "at none of the client counts run" in capsys.readouterr().out
