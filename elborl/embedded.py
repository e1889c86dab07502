"""The main job on the embedded default: prompts -> base model (cached) -> RL fine-tuning -> evaluation.

    python -m elborl.embedded [--params params.yaml] [--skip-rl]

Every phase resumes: the base model is cached by its settings, the RL run by its settings too (a killed run
continues from its last checkpoint), and the final table compares the base model with the EMA policy.
"""

from dataclasses import asdict
from pathlib import Path
import argparse
import hashlib
import json
import time

import torch

from elborl.config import load_params
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import shapes_test_set, shapes_train_set, write_jsonl
from elborl.plots import plot_run
from elborl.policy import Policy
from elborl.pretrain import ensure_base_model
from elborl.rewards import reward_from_params
from elborl.rl import train
from elborl.runtime import place, precision_choice, resolve_device


def prepare_prompts(params, out_dir: Path) -> tuple[list[dict], list[dict]]:
    test = shapes_test_set()
    train_set = shapes_train_set(params.prompts.train_per_task, params.prompts.train_seed,
                                 params.prompts.coloured_variants)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "test.jsonl", test)
    write_jsonl(out_dir / "train.jsonl", train_set)
    return test, train_set


def run_settings(base_path: Path, params) -> dict:
    """Everything that defines an RL run from a base model (as plain JSON values): runs agree iff these do."""
    settings = {"base": base_path.name, "prompts": asdict(params.prompts), "policy": asdict(params.policy),
                "rl": asdict(params.rl), "rewards": asdict(params.rewards), "evaluate": asdict(params.evaluate),
                "eval_every": params.eval_every, "device": resolve_device(params.runtime.device).type}
    return json.loads(json.dumps(settings))


def run_key(base_path: Path, params) -> str:
    blob = json.dumps(run_settings(base_path, params), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def fine_tune(model, train_set, test, params, run_dir: Path, max_train_seconds: float | None = None,
              base_summary: dict | None = None):
    """RL from the base model with held-out evaluations of the EMA policy every `params.eval_every` epochs
    and after the last one (`base_summary`, when given, is the base model's and is not recomputed).
    Returns the policy and the final evaluation (summary, records, images)."""
    rl = params.rl
    likelihood = f"{rl.weighting} ELBO" if rl.estimator == "elbo" else "trajectory log-prob"
    print(f"RL fine-tuning ({rl.recipe or 'no recipe'}): {rl.objective} + {likelihood} + {rl.steps}-step "
          f"{rl.sampler}, {rl.epochs} epochs -> {run_dir}")
    print(precision_choice(rl.rollout_precision, rl.update_precision, model.device.type))
    policy = Policy(model, params.policy)
    latest = []

    def held_out(p: Policy) -> dict:
        latest[:] = evaluate(p.backbone, test, params.evaluate, progress=False)
        return latest[0]

    train(policy, train_set, reward_from_params(params.rewards), params.rl, run_dir, held_out, params.eval_every,
          max_train_seconds=max_train_seconds, initial_eval=base_summary)
    if not latest:  # a finished run was resumed: nothing trained, nothing evaluated in this process
        with policy.ema_weights(), torch.no_grad():
            latest[:] = evaluate(policy.backbone, test, params.evaluate, progress=False)
    return policy, tuple(latest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-rl", action="store_true", help="only pretrain (or reuse) and evaluate the base model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    root = Path(params.artifacts)

    test, train_set = prepare_prompts(params, root / "prompts")
    print(f"prompts: {len(test)} test, {len(train_set)} train -> {root / 'prompts'}")
    model, base_path = ensure_base_model(params.base_model, params.pretrain, root / "base_model")
    model = place(model, params.runtime)

    start = time.time()
    base_summary, records, images = evaluate(model, test, params.evaluate)
    written = {"base": write_evaluation(root / "eval" / "base", base_summary, records, images)}
    print(f"evaluated the base model on {len(records)} images in {time.time() - start:.0f} s")
    summaries = {"base": base_summary}

    if not args.skip_rl:
        run_dir = root / "runs" / run_key(base_path, params)
        _, (tuned_summary, records, images) = fine_tune(model, train_set, test, params, run_dir,
                                                        base_summary=base_summary)
        written["fine-tuned"] = write_evaluation(run_dir / "eval", tuned_summary, records, images)
        summaries["fine-tuned"] = tuned_summary
        curves = plot_run(run_dir, run_dir / "curves.png")

    print("\nshapes-GenEval (strict), held-out test prompts\n" + format_table(summaries))
    for name, paths in written.items():
        print(f"{name:>10}: scores {paths['scores']}  grid {paths['grid']}")
    if not args.skip_rl:
        print(f"    curves: {curves}\n   metrics: {run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
