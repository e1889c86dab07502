"""The training flow: RL rounds of rollout -> score -> update (elborl/rounds.py), from the first incomplete round.

    python -m flows.training --run artifacts/runs/a --base-model artifacts/base --prompts artifacts/prompts \\
        [--params params.yaml] [--rounds N] [--mode process|container] [--reward NAME] [--reward-url URL]

Each round is three Prefect tasks, each publishing one artifact under `<run>/round-R/<stage>`; a stage whose
artifact is published is skipped, so a killed or failed flow run resumes where it stopped when run again.
Per round the flow measures its wall time against the compute time the stages record in their manifests
(`meta.seconds`) and publishes the orchestration overhead (Prefect + artifact I/O, + process start in
container mode) as a table artifact. The reward is the params file's `rewards:` section, or `reward` (one
registered reward) alone; with `reward_url` a reward service computes it (token from $ELBORL_REWARD_TOKEN only).
"""

from __future__ import annotations

import argparse
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.common import (
    ROUND_STAGES, TASK_OPTIONS, check_mode, display_command, publish_run_report, published_seconds, resolve_path,
    run_job, stage_argv, stage_command,
)


class RoundJobs:
    """Everything a round's stages need, built once per flow run (one policy per run in process mode)."""

    def __init__(self, run, base_model, prompts, params_path, reward, mode, launcher, threads, cache, reward_url=None):
        from elborl.config import load_params
        from elborl.rounds import RunContext

        check_mode(mode)
        self.run, self.base_model, self.prompts = run, base_model, prompts
        self.params_path, self.reward, self.reward_url = params_path, reward, reward_url
        self.mode, self.launcher = mode, launcher
        self.threads, self.cache = threads, cache
        self.ctx = RunContext(run, load_params(params_path), base_model, prompts, cache=cache)
        self._reward_fn = None

    def options(self, stage: str, round_index: int) -> dict:
        common = {"run": self.run, "round": round_index, "cache": self.cache}
        return {"rollout": {**common, "base_model": self.base_model, "prompts": self.prompts},
                "score": {**common, "reward": self.reward, "reward_url": self.reward_url},
                "update": {**common, "base_model": self.base_model}}[stage]

    def reward_fn(self):
        if self._reward_fn is None:
            from elborl.rewards import reward_from_params

            self._reward_fn = reward_from_params(self.ctx.params.rewards, url=self.reward_url, only=self.reward)
        return self._reward_fn

    def execute(self, stage: str, round_index: int) -> dict:
        """Runs one stage of one round; returns its URI, whether it was skipped, its wall and compute seconds."""
        from elborl.rounds import round_uri, rollout_stage, score_stage, update_stage

        logger = get_run_logger()
        uri = round_uri(self.run, round_index, stage)
        argv = stage_argv(stage, self.params_path, self.threads, **self.options(stage, round_index))
        skipped = self.ctx.store.exists(uri)
        logger.info(f"round {round_index} {stage}{' (already published, skipped)' if skipped else ''}: "
                    f"{display_command(stage, argv)}")
        start = time.perf_counter()
        if not skipped:
            if self.mode == "process":
                self.ctx.log = logger.info
                if stage == "rollout":
                    rollout_stage(self.ctx, round_index)
                elif stage == "score":
                    score_stage(self.ctx, round_index, self.reward_fn())
                else:
                    update_stage(self.ctx, round_index)
            else:
                run_job(stage_command(stage, argv, self.launcher), logger)
        seconds = time.perf_counter() - start
        compute = 0.0 if skipped else published_seconds(self.ctx.store, uri)
        return {"stage": stage, "round": round_index, "uri": uri, "skipped": skipped, "seconds": seconds,
                "compute": compute}


def _round_task(stage: str):
    @task(name=stage, task_run_name=stage + "-round-{round_index}", **TASK_OPTIONS)
    def run_stage(jobs: RoundJobs, round_index: int) -> dict:
        return jobs.execute(stage, round_index)

    run_stage.__doc__ = f"Round R's {stage} stage (elborl.rounds.{stage}_stage or `python -m stages.{stage}`)."
    return run_stage


rollout_task, score_task, update_task = (_round_task(stage) for stage in ROUND_STAGES)


def overhead_row(round_index: int, wall: float, results: list[dict]) -> dict:
    """One round's wall time split into compute (the stages' own timers), stage I/O and Prefect."""
    compute = sum(r["compute"] for r in results)
    in_tasks = sum(r["seconds"] for r in results)
    return {"round": round_index, "wall_s": round(wall, 3), "compute_s": round(compute, 3),
            "stage_io_s": round(in_tasks - compute, 3), "prefect_s": round(wall - in_tasks, 3),
            "overhead_s": round(wall - compute, 3), "overhead_pct": round(100 * (wall - compute) / wall, 1),
            "skipped": ",".join(r["stage"] for r in results if r["skipped"])}


def _scalar_metrics(rows: list[dict]) -> list[dict]:
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items() if isinstance(v, (int, float))}
            for row in rows]


@flow(name="train-rounds", log_prints=True)
def train_rounds(run: str, base_model: str, prompts: str, params_path: str = "params.yaml", rounds: int | None = None,
                 mode: str = "process", reward: str | None = None, launcher: str | None = None,
                 threads: int | None = None, cache: str | None = None, reward_url: str | None = None) -> dict:
    """RL rounds from the first incomplete one up to `rounds` (default: rl.epochs of the params file).

    The reward is the params file's `rewards:` section, or `reward` alone; with `reward_url` a reward service
    computes it (the score stage's --reward-url; token from $ELBORL_REWARD_TOKEN).

    mode="process" runs the stages in this process; mode="container" runs each as a job (`launcher`, default
    the local `python -m stages.<stage>`; see flows/common.py). Returns the run, the round it resumed at, the
    rounds completed, the per-round overhead rows (also published as the `train-overhead` table artifact) and
    the run report's path (published as the `run-report` and `run-report-summary` artifacts).
    """
    from elborl.rounds import round_metrics

    logger = get_run_logger()
    params_path, run, base_model, prompts = map(resolve_path, (params_path, run, base_model, prompts))
    cache = resolve_path(cache) if cache else None
    if threads and mode == "process":
        import torch

        torch.set_num_threads(threads)
    jobs = RoundJobs(run, base_model, prompts, params_path, reward, mode, launcher, threads, cache, reward_url)
    total = rounds if rounds is not None else jobs.ctx.params.rl.epochs
    start = jobs.ctx.completed_rounds()
    if start:
        logger.info(f"{run}: {start} round(s) already published, resuming at round {start}")
    if start >= total:
        logger.info(f"{run}: nothing to do ({start} of {total} rounds published)")

    overhead = []
    for r in range(start, total):
        began = time.perf_counter()
        results = [rollout_task(jobs, r), score_task(jobs, r), update_task(jobs, r)]
        row = overhead_row(r, time.perf_counter() - began, results)
        overhead.append(row)
        logger.info(f"round {r}: {row['wall_s']:.2f} s wall, {row['compute_s']:.2f} s compute, "
                    f"overhead {row['overhead_s']:.2f} s ({row['overhead_pct']:.0f}%: stage I/O {row['stage_io_s']:.2f} s, "
                    f"Prefect {row['prefect_s']:.2f} s)")

    if overhead:
        create_table_artifact(overhead, key="train-overhead",
                              description=f"Orchestration overhead per round of `{run}` ({mode} mode): wall time "
                                          "minus the stages' compute time (Prefect + artifact I/O).")
    metrics = round_metrics(jobs.ctx)
    if metrics:
        create_table_artifact(_scalar_metrics(metrics), key="train-metrics",
                              description=f"Training metrics per round of `{run}`.")
    report = publish_run_report(jobs.ctx)
    return {"run": run, "resumed_at": start, "rounds_completed": max(start, total), "overhead": overhead,
            "report": str(report) if report else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--mode", default="process", choices=("process", "container"))
    parser.add_argument("--reward", default=None, help="one reward alone (default: the params file's rewards)")
    parser.add_argument("--reward-url", default=None, help="a reward service (token from $ELBORL_REWARD_TOKEN)")
    parser.add_argument("--launcher", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args(argv)
    result = train_rounds(args.run, args.base_model, args.prompts, args.params, args.rounds, args.mode, args.reward,
                          args.launcher, args.threads, args.cache, args.reward_url)
    for row in result["overhead"]:
        print(row)


if __name__ == "__main__":
    main()
