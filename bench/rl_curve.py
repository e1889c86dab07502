"""Benchmark: RL from the embedded base model on the shapes world; held-out strict shapes-GenEval vs CPU time.

    .venv/bin/python bench/rl_curve.py --minutes 15 [--set rl.lr=1e-3 --set policy.finetune=full ...]

Prints one row per evaluation (training minutes, overall, per task), the gain over the base model, and the
time to +0.15 / +0.25, and writes curves.png and the final EMA policy's grid (final/grid.png). Wall-clock counts
rollout + reward + update, not the held-out evaluations.
"""

from dataclasses import replace
from pathlib import Path
import argparse
import json
import time

import torch
from elborl.config import load_params_with_overrides
from elborl.embedded import fine_tune, prepare_prompts
from elborl.evaluate import write_evaluation
from elborl.geneval.types import TASKS
from elborl.plots import plot_run, read_jsonl_rows
from elborl.pretrain import ensure_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. rl.lr=1e-3")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--out", default="artifacts/bench/rl_curve")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params_with_overrides(args.params, args.set)
    params = replace(params, rl=replace(params.rl, epochs=100_000))  # the time budget ends the run
    root = Path(params.artifacts)
    test, train_set = prepare_prompts(params, root / "prompts")
    model, _ = ensure_base_model(params.base_model, params.pretrain, root / "base_model")
    out = Path(args.out)
    start = time.time()
    _, final = fine_tune(model, train_set, test, params, out, max_train_seconds=args.minutes * 60)
    final_written = write_evaluation(out / "final", *final)
    evals = read_jsonl_rows(out / "eval.jsonl")
    base = evals[0]["overall"]
    print(f"\nsettings: {json.dumps(args.set)}  wall {time.time() - start:.0f} s (incl. evaluations)")
    print(f"{'minutes':>8} {'epoch':>6} {'overall':>8} {'gain':>7} " + " ".join(f"{t[:10]:>10}" for t in TASKS))
    for e in evals:
        tasks = " ".join(f"{e['tasks'][t]:>10.3f}" if e["tasks"][t] is not None else f"{'-':>10}" for t in TASKS)
        print(f"{e['train_seconds'] / 60:>8.1f} {e['epoch']:>6} {e['overall']:>8.3f} {e['overall'] - base:>+7.3f} {tasks}")
    for gain in (0.15, 0.25):
        reached = [e for e in evals if e["overall"] - base >= gain]
        print(f"time to +{gain:.2f}: " + (f"{reached[0]['train_seconds'] / 60:.1f} min" if reached else "not reached"))
    print(f"curves: {plot_run(out, out / 'curves.png')}")
    print(f"grid of the final EMA policy: {final_written['grid']}")


if __name__ == "__main__":
    main()
