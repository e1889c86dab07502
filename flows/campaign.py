"""The campaign flow: prepare (or take) prompts -> pretrain (or take) the base model -> train -> evaluate -> publish
metrics.

    python -m flows.campaign [--root artifacts/campaign] [--params params.yaml] [--rounds N] [--mode process|container]
                             [--base-model URI] [--prompts URI]

Artifacts live under `root`:  prompts/ (unless `prompts` is given), base/ (unless `base_model` is given), runs/<run_name>/round-R/...,
eval/<run_name>/{base,round-R}/. Every step is skipped when its artifact is already published, so a scheduled
campaign re-run continues a killed one and a finished campaign costs only the checks.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import check_mode, publish_run_report, resolve_path, stage_task
from flows.evaluation import evaluate_models, scores_table
from flows.training import train_rounds


@flow(name="campaign", log_prints=True)
def campaign(root: str = "artifacts/campaign", params_path: str = "params.yaml", rounds: int | None = None,
             mode: str = "process", reward: str | None = None, base_model: str | None = None,
             run_name: str = "run", launcher: str | None = None, threads: int | None = None,
             pretrain_cache: str = "artifacts/base_model", cache: str | None = None,
             reward_url: str | None = None, prompts: str | None = None) -> dict:
    """The whole pipeline; returns the URIs, the training flow's result and the evaluation summaries."""
    from elborl.rounds import RunContext, join, round_metrics
    from elborl.config import load_params

    check_mode(mode)
    logger = get_run_logger()
    root, params_path = resolve_path(root), resolve_path(params_path)
    run, eval_out = join(root, "runs", run_name), join(root, "eval", run_name)

    if prompts is None:  # the shapes world's; production gives its own (GenEval's training prompts)
        prompts = join(root, "prompts")
        stage_task.with_options(task_run_name="prepare_prompts")(
            "prepare_prompts", params_path, mode, launcher, threads, out=prompts)
    else:
        prompts = resolve_path(prompts)
        logger.info(f"prompts given: {prompts}")
    if base_model is None:
        base_model = join(root, "base")
        stage_task.with_options(task_run_name="pretrain")(
            "pretrain", params_path, mode, launcher, threads, out=base_model, cache=resolve_path(pretrain_cache))
    else:
        base_model = resolve_path(base_model)
        logger.info(f"base model given: {base_model}")

    training = train_rounds(run, base_model, prompts, params_path, rounds, mode, reward, launcher, threads, cache,
                            reward_url)
    summaries = evaluate_models(base_model, prompts, eval_out, params_path, run=run, mode=mode, launcher=launcher,
                                threads=threads, cache=cache)

    # metrics: the whole run's training curve (not only this flow run's rounds) and before/after scores
    ctx = RunContext(run, load_params(params_path), base_model, prompts, cache=cache)
    metrics = round_metrics(ctx)
    columns = ("epoch", "reward_mean", "reward_std", "kl", "seconds_update")
    create_table_artifact([{k: row.get(k) for k in columns} for row in metrics], key="campaign-training-curve",
                          description=f"Per-round training reward of `{run}`.")
    lines = ["# Campaign", "", f"- run: `{run}` ({training['rounds_completed']} rounds, resumed at round "
             f"{training['resumed_at']})", f"- base model: `{base_model}`", f"- evaluations: `{eval_out}`", "",
             "| task | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
    for row in scores_table(summaries):
        lines.append(f"| {row['task']} | " + " | ".join("" if row[n] is None else f"{row[n]:.3f}" for n in summaries) + " |")
    if training["overhead"]:
        mean = sum(r["overhead_s"] for r in training["overhead"]) / len(training["overhead"])
        lines += ["", f"Orchestration overhead: {mean:.2f} s per round on average (table artifact `train-overhead`)."]
    create_markdown_artifact("\n".join(lines), key="campaign-summary", description="Campaign summary")
    # the run report again, now comparing the base model with the final policy (the training flow's has no evaluations)
    names = list(summaries)
    report = publish_run_report(ctx, join(eval_out, names[0]), join(eval_out, names[-1]) if len(names) > 1 else None)
    return {"prompts": prompts, "base_model": base_model, "run": run, "eval": eval_out, "training": training,
            "scores": summaries, "report": str(report) if report else None}


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="artifacts/campaign")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to reach (default: rl.epochs)")
    parser.add_argument("--mode", default="process", choices=("process", "container"))
    parser.add_argument("--reward", default=None, help="one reward alone (default: the params file's rewards)")
    parser.add_argument("--reward-url", default=None, help="a reward service (token from $ELBORL_REWARD_TOKEN)")
    parser.add_argument("--base-model", default=None, help="a published base model (default: pretrain one)")
    parser.add_argument("--prompts", default=None, help="a published prompt set: train.jsonl and test.jsonl "
                        "(default: the shapes world's, prepared)")
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--launcher", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = campaign(args.root, args.params, args.rounds, args.mode, args.reward, args.base_model, args.run_name,
                      args.launcher, args.threads, reward_url=args.reward_url, prompts=args.prompts)
    print(json.dumps({name: summary["overall"] for name, summary in result["scores"].items()}))


if __name__ == "__main__":
    main()
