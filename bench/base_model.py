"""Benchmark: pretrain the embedded base model (or reuse the cached one) and print its held-out table.

    .venv/bin/python bench/base_model.py [--set pretrain.steps=800 --set base_model.pooled_text=false ...]

Prints the pretraining wall-clock (from the model's pretrain_log.json; the bar is 15 minutes on the 2-core
CPU) and held-out strict shapes-GenEval per task. Evaluation writes scores and a grid under --out.
"""

from pathlib import Path
import argparse
import json

import torch

from elborl.config import load_params_with_overrides
from elborl.embedded import prepare_prompts
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.pretrain import ensure_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. pretrain.steps=800")
    parser.add_argument("--out", default="artifacts/bench/base_model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params_with_overrides(args.params, args.set)
    root = Path(params.artifacts)
    test, _ = prepare_prompts(params, root / "prompts")
    model, path = ensure_base_model(params.base_model, params.pretrain, root / "base_model")
    log = json.loads((path / "pretrain_log.json").read_text())
    summary, records, images = evaluate(model, test, params.evaluate)
    written = write_evaluation(args.out, summary, records, images)
    print(f"\nsettings: {json.dumps(args.set)}  model {path}")
    print(f"pretraining: {log['seconds']:.0f} s ({log['seconds'] / 60:.2f} min) at {args.threads} threads"
          " when it was trained")
    print(format_table({"base": summary}))
    print(f"grid: {written['grid']}")


if __name__ == "__main__":
    main()
