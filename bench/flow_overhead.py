"""Benchmark: the Prefect training flow's orchestration overhead per round against the round's compute time.

    .venv/bin/python bench/flow_overhead.py [--rounds 3] [--mode process|container] [--threads 1]
    .venv/bin/python bench/flow_overhead.py --base-model artifacts/base_model/<hash> --params params.yaml

Without --base-model it runs the tests' tiny configuration (a random 2-level UNet, 4 samples per round). Rounds
run through flows/training.py against PREFECT_API_URL, or a temporary local server when that is unset; the
table splits each round's wall time into compute (the seconds the stages record in their manifests), stage I/O
(artifact reads, hashing and publishing; in container mode also each job's process start) and Prefect (task
orchestration, API calls, retry waits).
"""

from pathlib import Path
import argparse
import sys
import tempfile
import time

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import flows  # noqa: E402,F401  - offline Prefect settings before Prefect is imported


def tiny_inputs(directory: Path) -> tuple[str, str, str]:
    from conftest import TINY
    from test_embedded_job import TINY_PARAMS
    from test_rl_loop import METAS

    from elborl.geneval.prompts import write_jsonl
    from elborl.models.shapes_model import ShapesFlowModel
    from elborl.store import ArtifactStore

    (directory / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    ShapesFlowModel.from_config(TINY, seed=0).save_pretrained(directory / "src" / "base")
    (directory / "src" / "prompts").mkdir()
    write_jsonl(directory / "src" / "prompts" / "train.jsonl", [{**m, "include": []} for m in METAS])
    ArtifactStore().put_artifact(directory / "src" / "base", str(directory / "store" / "base"))
    ArtifactStore().put_artifact(directory / "src" / "prompts", str(directory / "store" / "prompts"))
    return str(directory / "params.yaml"), str(directory / "store" / "base"), str(directory / "store" / "prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default="process", choices=("process", "container"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-model", default=None, help="a local model directory (default: the tiny test model)")
    parser.add_argument("--prompts", default="artifacts/prompts", help="directory with train.jsonl (with --base-model)")
    parser.add_argument("--params", default="params.yaml", help="settings (with --base-model)")
    args = parser.parse_args()

    import torch

    from elborl.store import ArtifactStore
    from flows.training import train_rounds

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.base_model is None:
            params, base, prompts = tiny_inputs(tmp)
        else:
            base, prompts, params = str(tmp / "store" / "base"), str(tmp / "store" / "prompts"), args.params
            ArtifactStore().put_artifact(args.base_model, base)
            ArtifactStore().put_artifact(args.prompts, prompts)
        start = time.perf_counter()
        result = train_rounds(str(tmp / "store" / "run"), base, prompts, params, rounds=args.rounds, mode=args.mode,
                              threads=args.threads)
        total = time.perf_counter() - start

    rows = result["overhead"]
    columns = ("round", "wall_s", "compute_s", "stage_io_s", "prefect_s", "overhead_s", "overhead_pct")
    print(f"\n{args.mode} mode, {len(rows)} rounds, {total:.1f} s in all (with Prefect's start when no server was running)")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    later = rows[1:] or rows  # round 0 also pays for building the policy and first-call warm-up
    for name in ("wall_s", "compute_s", "stage_io_s", "prefect_s", "overhead_s"):
        print(f"mean {name} (rounds {later[0]['round']}..{later[-1]['round']}): "
              f"{sum(r[name] for r in later) / len(later):.3f}")


if __name__ == "__main__":
    main()
