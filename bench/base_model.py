"""Benchmark: pretrain the embedded base model (or reuse the cached one) and print its held-out table.

    .venv/bin/python bench/base_model.py [--set pretrain.steps=800 --set base_model.pooled_text=false ...]
    .venv/bin/python bench/base_model.py --timing-steps 200   # time 200 steps, project the full pretraining

Prints the pretraining wall-clock (from the model's pretrain_log.json; the bar is 15 minutes on the 2-core
CPU) and held-out strict shapes-GenEval per task. Evaluation writes scores and a grid under --out.
"""

from dataclasses import replace
from pathlib import Path
import argparse
import json
import time

import torch

from elborl.config import load_params_with_overrides
from elborl.embedded import prepare_prompts
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.pretrain import ensure_base_model, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. pretrain.steps=800")
    parser.add_argument("--out", default="artifacts/bench/base_model")
    parser.add_argument("--threads", type=int, default=2, help="for the evaluation; pretraining runs on pretrain.threads")
    parser.add_argument("--timing-steps", type=int, default=0,
                        help="only time this many pretraining steps (nothing cached) and project the full run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params_with_overrides(args.params, args.set)
    if args.timing_steps:
        return project_pretraining_time(params, args.timing_steps, params.pretrain.threads)
    root = Path(params.artifacts)
    test, _ = prepare_prompts(params, root / "prompts")
    model, path = ensure_base_model(params.base_model, params.pretrain, root / "base_model")
    log = json.loads((path / "pretrain_log.json").read_text())
    summary, records, images = evaluate(model, test, params.evaluate)
    written = write_evaluation(args.out, summary, records, images)
    print(f"\nsettings: {json.dumps(args.set)}  model {path}")
    print(f"pretraining: {log['seconds']:.0f} s ({log['seconds'] / 60:.2f} min) at "
          f"{log['config'].get('threads', 'unrecorded')} threads when it was trained")
    print(format_table({"base": summary}))
    print(f"grid: {written['grid']}")


def project_pretraining_time(params, steps: int, threads: int) -> None:
    """Times `steps` steps of the configured pretraining (after 20 warm-up steps) and projects all of them:
    a measurement of the 15-minute bar that costs a minute or two instead of a full pretraining."""
    warmup = 20
    config = replace(params.pretrain, steps=warmup + steps + 1)  # on_step(warmup + steps) marks the end
    marks = []
    pretrain(params.base_model, config, progress=False, log=lambda *_: None,
             on_step=lambda step: marks.append(time.perf_counter()) if step in (warmup, warmup + steps) else None)
    per_step = (marks[1] - marks[0]) / steps
    total = per_step * params.pretrain.steps
    print(f"pretraining at {threads} threads: {per_step:.3f} s/step x {params.pretrain.steps} steps of "
          f"{params.pretrain.batch_size} = {total:.0f} s ({total / 60:.1f} min) projected from {steps} timed steps")


if __name__ == "__main__":
    main()
