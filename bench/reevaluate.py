"""Benchmark: re-evaluate the EMA policy of finished benchmark runs with more images per test prompt.

    .venv/bin/python bench/reevaluate.py artifacts/bench/s8_rl60_bf16 artifacts/bench/s10_mt06 --images-per-prompt 16
    .venv/bin/python bench/reevaluate.py RUN --set pretrain.steps=5600 --epoch 30   # a run from another base, epoch 30

GenEval's 4 images per prompt (244 held-out images) move the overall score by about +-0.04 between evaluations;
16 per prompt (976 images) measure a run's end point, and the base model's, four times as precisely. Each run's
last published round (or, with `--epoch N`, the state after N rounds) is loaded onto the cached base model of
`params.yaml` with the `--set` overrides (a run recorded with another base is refused) and its EMA weights (or, with
`--weights current`, θ itself) are evaluated with the evaluation's sampler and seeds. Every overall score comes
with its 95% interval (prompts resampled within tasks) and, when the base model is evaluated too, each run's gain
over it as a paired difference on the same prompts and seeds; `--out FILE.json` keeps every image's verdict, so
runs evaluated in other sittings can be paired later (elborl.stats.paired_difference).
"""

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
import argparse
import copy
import json

import torch

from elborl.benchmark import load_bench_params, prepare_bench, recorded_identity
from elborl.checkpoint import read_state
from elborl.evaluate import evaluate, format_table
from elborl.policy import Policy
from elborl.pretrain import cache_key
from elborl.stats import bootstrap_overall, paired_difference
from elborl.rounds import RunContext, round_metrics, round_uri


def load_run_policy(run: str | Path, base_model, params, epoch: int | None = None) -> tuple[Policy, dict]:
    """A rounds run's policy (after its last round, or after `epoch` rounds) on a copy of the base model, and
    where it stands: {"epoch": rounds done, "train_seconds": training seconds until then}."""
    rounds = rounds_done(run) if epoch is None else epoch
    if rounds < 1:
        raise ValueError(f"{run}: no published round to load")
    policy = Policy(copy.deepcopy(base_model), params.policy)
    read_state(Path(round_uri(str(run), rounds - 1, "update")), policy)
    train_seconds = round_metrics(RunContext(str(run), None))[rounds - 1]["train_seconds"]
    return policy, {"epoch": rounds, "train_seconds": train_seconds}


def rounds_done(run: str | Path) -> int:
    return RunContext(str(run), None).completed_rounds()


def runs_on_other_bases(runs: list[str], base_name: str) -> list[str]:
    """The runs whose recorded base model (run.json's "base") is not `base_name`: their adapters would be
    evaluated on the wrong weights."""
    other = []
    for run in runs:
        recorded = (recorded_identity(run) or {}).get("base")
        if recorded is not None and recorded != base_name:
            other.append(f"{run} (base {recorded})")
    return other


def evaluated_weights(policy: Policy, weights: str):
    """The weights to evaluate in place: the EMA of θ ("ema") or θ itself ("current")."""
    if weights not in ("ema", "current"):
        raise ValueError(f"weights must be ema or current, got {weights!r}")
    return policy.ema_weights() if weights == "ema" else nullcontext()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of bench/rl_curve.py (rounds runs)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[],
                        help="override as the run had it, e.g. pretrain.steps=5600 (the base model it started from)")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", choices=("ema", "current"), default="ema",
                        help="the EMA of θ (what the benchmark evaluates) or θ itself: the EMA trails θ by about "
                             "rl.ema_decay / (1 - rl.ema_decay) optimizer steps")
    parser.add_argument("--epoch", type=int, default=None,
                        help="the policy after this many rounds instead of after the last")
    parser.add_argument("--skip-base", action="store_true", help="evaluate only the runs (no paired gains)")
    parser.add_argument("--out", default=None, help="write every summary and per-image verdict to this JSON file")
    args = parser.parse_args(argv)
    if args.images_per_prompt < 1:
        parser.error(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    missing = [run for run in args.runs if rounds_done(run) < max(1, args.epoch or 0)]
    if missing:  # refused before minutes of evaluation, not after
        shortfall = "no published round" if args.epoch is None else f"fewer than {args.epoch} published rounds"
        parser.error(f"{shortfall} in {', '.join(missing)}")
    params = load_bench_params(args.params, args.set)
    evaluation = replace(params.evaluate, images_per_prompt=args.images_per_prompt)
    base_name = cache_key(params.base_model, params.pretrain)
    other_bases = runs_on_other_bases(args.runs, base_name)
    if other_bases:  # before pretraining or evaluating anything
        parser.error(f"{', '.join(other_bases)} started from another base model than {base_name}: pass the --set "
                     "overrides the run was trained with (e.g. --set pretrain.steps=5600)")
    bench = prepare_bench(params, args.threads)
    print(f"evaluating {'' if args.skip_base else 'the base model, then '}{len(args.runs)} run(s), "
          f"{args.images_per_prompt} images per test prompt")
    results = {} if args.skip_base else {"base": evaluate(bench.base_model, bench.test, evaluation)[:2]}
    for run in args.runs:
        policy, state = load_run_policy(run, bench.base_model, params, args.epoch)
        with evaluated_weights(policy, args.weights), torch.no_grad():
            results[run] = evaluate(policy.backbone, bench.test, evaluation)[:2]
        print(f"{run}: {results[run][0]['overall']:.3f} (epoch {state['epoch']}, "
              f"{state['train_seconds'] / 60:.1f} training minutes, {args.weights} weights)", flush=True)
    print(f"\n{args.images_per_prompt} images per test prompt\n"
          + format_table({label: summary for label, (summary, _) in results.items()}))
    print("\n" + uncertainty_lines(results))
    if args.out:
        Path(args.out).write_text(json.dumps({label: {"summary": summary, "records": verdicts(records)}
                                              for label, (summary, records) in results.items()}))
        print(f"written: {args.out}")


def verdicts(records: list[dict]) -> list[dict]:
    """What pairing needs of each image: its prompt, task, seed and strict verdict."""
    return [{key: record[key] for key in ("prompt", "tag", "seed", "correct")} for record in records]


def uncertainty_lines(results: dict[str, tuple[dict, list[dict]]]) -> str:
    """Each overall score with its 95% interval, and each run's paired gain over the base model when present."""
    lines = []
    for label, (summary, records) in results.items():
        low, high = bootstrap_overall(records)
        line = f"{label}: overall {summary['overall']:.3f} ({low:.3f}-{high:.3f})"
        if label != "base" and "base" in results:
            gain = paired_difference(records, results["base"][1])
            line += f", gain over base {gain['difference']:+.3f} ({gain['low']:+.3f} to {gain['high']:+.3f})"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
