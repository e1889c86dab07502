"""Benchmark: pretrain the embedded base model (or reuse the cached one) and print its held-out table.

    .venv/bin/python bench/base_model.py [--set pretrain.steps=800 --set base_model.pooled_text=false ...]
    .venv/bin/python bench/base_model.py --timing-steps 200   # time 200 steps, project the full pretraining
    .venv/bin/python bench/base_model.py --pass-at 16          # 16 images per test prompt: accuracy and pass@k

Prints the pretraining wall-clock (from the model's pretrain_log.json; the bar is 15 minutes on the 2-core
CPU) and held-out strict shapes-GenEval per task. Evaluation writes scores and a grid under --out.
`--pass-at N` samples N images per test prompt instead of GenEval's 4 and adds, per task, how likely k of a prompt's
images hold at least one correct one (pass@k, the unbiased estimator over the N): what a group of k rollouts can
find for RL to reinforce, and the accuracy measured with less noise than 4 images give.
"""

from dataclasses import replace
from pathlib import Path
import argparse
import json
import math
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
    parser.add_argument("--pass-at", type=int, default=0, metavar="N",
                        help="sample N images per test prompt and print accuracy (pass@1) and pass@k per task for "
                             "k = 2, 4, 8, ... up to N")
    args = parser.parse_args()
    if args.pass_at < 0:
        parser.error(f"--pass-at must be a number of images per prompt >= 1, got {args.pass_at}")
    torch.set_num_threads(args.threads)
    params = load_params_with_overrides(args.params, args.set)
    if args.timing_steps:
        return project_pretraining_time(params, args.timing_steps, params.pretrain.threads)
    root = Path(params.artifacts)
    test, _ = prepare_prompts(params, root / "prompts")
    model, path = ensure_base_model(params.base_model, params.pretrain, root / "base_model", runtime=params.runtime)
    log = json.loads((path / "pretrain_log.json").read_text())
    evaluation = replace(params.evaluate, images_per_prompt=args.pass_at) if args.pass_at else params.evaluate
    summary, records, images = evaluate(model, test, evaluation)
    written = write_evaluation(args.out, summary, records, images)
    print(f"\nsettings: {json.dumps(args.set)}  model {path}")
    print(f"pretraining: {log['seconds']:.0f} s ({log['seconds'] / 60:.2f} min) at "
          f"{log['config'].get('threads', 'unrecorded')} threads when it was trained")
    print(format_table({"base": summary}))
    print(f"grid: {written['grid']}")
    if args.pass_at:
        print(f"\n{args.pass_at} images per test prompt\n" + pass_at_k_table(records, args.pass_at))


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The chance that k of n images (drawn without replacement) hold at least one of the `correct` ones."""
    return 1.0 if n - correct < k else 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def pass_at_k_table(records: list[dict], n: int) -> str:
    """Per task (and overall, the mean of the tasks): the accuracy, then pass@k over each prompt's n images."""
    correct: dict[str, dict[str, int]] = {}
    for r in records:
        correct.setdefault(r["tag"], {}).setdefault(r["prompt"], 0)
        correct[r["tag"]][r["prompt"]] += int(r["correct"])
    ks = [2 ** i for i in range(1, int(math.log2(n)) + 1)]
    table = {tag: [sum(c.values()) / (n * len(c))] + [sum(pass_at_k(n, x, k) for x in c.values()) / len(c) for k in ks]
             for tag, c in correct.items()}
    table["overall"] = [sum(col) / len(correct) for col in zip(*table.values())]
    prompts = {tag: len(c) for tag, c in correct.items()}
    prompts["overall"] = sum(prompts.values())
    header = "| task | prompts | accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    rows = [f"| {tag} | {prompts[tag]} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
            for tag, values in table.items()]
    return "\n".join([header, "|" + "---|" * (len(ks) + 3), *rows])


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
