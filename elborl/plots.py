"""Training curves as PNG (rendered here with matplotlib: works offline, unlike vega-from-CDN HTML), and the
DVC pipeline's report: metrics JSON for `dvc metrics show`, CSVs for `dvc plots`, and the same plots as PNGs."""

from pathlib import Path
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_run(metrics: list[dict], evals: list[dict], out_png: str | Path) -> Path:
    """Left: dense training reward per round. Right: held-out strict shapes-GenEval against training minutes.
    `metrics` and `evals` are a run's rows (elborl.rounds.round_metrics and evaluations)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if metrics:
        epochs, rewards = [m["epoch"] for m in metrics], [m["reward_mean"] for m in metrics]
        left.plot(epochs, rewards, lw=0.8, alpha=0.5, label="per epoch")
        # each epoch draws other prompts, so one epoch's mean swings by ±0.1; the trailing mean shows the trend
        left.plot(epochs, trailing_mean(rewards, 10), lw=2, label="mean of the last 10")
        left.legend(fontsize=7)
    left.set(xlabel="round", ylabel="training reward (dense)", title="rollout reward")
    if evals:
        minutes = [e["train_seconds"] / 60 for e in evals]
        right.plot(minutes, [e["overall"] for e in evals], marker="o", label="overall")
        for task in evals[0].get("tasks", {}):
            values = [e["tasks"].get(task) for e in evals]
            if all(v is not None for v in values):
                right.plot(minutes, values, lw=0.8, alpha=0.6, label=task)
        right.legend(fontsize=7)
    right.set(xlabel="training minutes (CPU)", ylabel="held-out GenEval (strict)", title="evaluation", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to `window - 1` values before it."""
    means = []
    for end in range(1, len(values) + 1):
        recent = values[max(0, end - window):end]
        means.append(sum(recent) / len(recent))
    return means


Curve = list[tuple[float, float]]  # (training seconds, value)


def plot_efficiency(held_out: dict[str, tuple[list[Curve], Curve]], reward: dict[str, tuple[list[Curve], Curve]],
                    out_png: str | Path) -> Path:
    """Methods head to head against training minutes (bench/efficiency.py). Left: held-out strict GenEval;
    right: training reward (each method's own rollouts). Per method: (one curve per seed, their mean), drawn
    as thin lines per seed and a thick line for the mean, in one colour."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, curves, marker in ((left, held_out, "o"), (right, reward, None)):
        for index, (method, (per_seed, mean)) in enumerate(curves.items()):
            colour = f"C{index}"
            for seed_curve in per_seed:
                axis.plot([s / 60 for s, _ in seed_curve], [v for _, v in seed_curve], color=colour, lw=0.7,
                          alpha=0.35)
            axis.plot([s / 60 for s, _ in mean], [v for _, v in mean], color=colour, lw=2, marker=marker, ms=3,
                      label=f"{method} ({len(per_seed)} seed{'s' if len(per_seed) != 1 else ''})")
        axis.legend(fontsize=7)
    left.set(xlabel="training minutes (CPU)", ylabel="held-out GenEval (strict, overall)",
             title="held-out score vs training time", ylim=(0, 1))
    right.set(xlabel="training minutes (CPU)", ylabel="training reward (dense, rollout mean)",
              title="training reward (each method's own sampler)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


# --- the DVC pipeline's report: metrics JSON, plot CSVs and their PNGs ---------------------------------
def _rounded(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def _scores(summary: dict) -> dict:
    """A scores.json of elborl.evaluate as flat metrics: overall, each task, the dense mean reward."""
    out = {"overall": _rounded(summary["overall"])}
    out.update({task: _rounded(value) for task, value in summary["tasks"].items()})
    if "mean_reward" in summary:
        out["mean_reward"] = _rounded(summary["mean_reward"])
    return out


def training_rows(round_metrics: list[dict]) -> tuple[list[str], list[dict]]:
    """Per-round training metrics as CSV columns and rows: `round` first, then every numeric metric except
    timings (seconds differ between identical runs; the plots and metrics stay reproducible without them)."""
    columns: list[str] = []
    rows = []
    for metrics in round_metrics:
        row = {"round": metrics["epoch"]}
        for key, value in metrics.items():
            if key == "epoch" or "seconds" in key or not isinstance(value, (int, float)):
                continue
            row[key] = value
            if key not in columns:
                columns.append(key)
        rows.append(row)
    preferred = [c for c in ("reward_mean", "reward_std", "kl", "grad_norm") if c in columns]
    return ["round", *preferred, *sorted(c for c in columns if c not in preferred)], rows


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    """CSV with a fixed column order; a value a row lacks is left empty."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def report_metrics(base: dict, final: dict, round_metrics: list[dict], pretrain_log: dict | None = None) -> dict:
    """`dvc metrics show` content: base and fine-tuned held-out scores per task and overall, their difference,
    the training reward of the first and last rounds, and (given the base model's pretrain_log.json) its
    pretraining loss: the mean of the first and of the last 50 steps."""
    base, final = _scores(base), _scores(final)
    delta = {key: _rounded(final[key] - base[key]) for key in base
             if base.get(key) is not None and final.get(key) is not None}
    train = {"rounds": len(round_metrics)}
    if round_metrics:
        train["reward_first"] = _rounded(round_metrics[0]["reward_mean"])
        train["reward_last"] = _rounded(round_metrics[-1]["reward_mean"])
    metrics = {"base": base, "fine_tuned": final, "delta": delta, "train": train}
    if pretrain_log and pretrain_log.get("losses"):
        losses = pretrain_log["losses"]
        window = min(50, len(losses))
        metrics["pretrain"] = {"steps": len(losses), "loss_first": _rounded(sum(losses[:window]) / window, 6),
                               "loss_last": _rounded(sum(losses[-window:]) / window, 6)}
    return metrics


def plot_training(columns: list[str], rows: list[dict], out_png: str | Path) -> Path:
    """Training reward per round (mean ± std, and per task where present), KL and gradient norm."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [r["round"] for r in rows]
    if rows:
        mean = [r["reward_mean"] for r in rows]
        left.plot(rounds, mean, marker="o", ms=3, lw=1.5, label="mean")
        if "reward_std" in columns:
            std = [r["reward_std"] for r in rows]
            left.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              alpha=0.15)
        for column in (c for c in columns if c.startswith("reward/")):
            points = [(r["round"], r[column]) for r in rows if column in r]
            left.plot(*zip(*points), lw=0.8, alpha=0.6, label=column.removeprefix("reward/"))
        left.legend(fontsize=7)
        for column, axis in (("kl", right), ("grad_norm", right.twinx())):
            if column in columns:
                axis.plot(rounds, [r[column] for r in rows], lw=1, color="C0" if column == "kl" else "C3")
                axis.set_ylabel(column, color="C0" if column == "kl" else "C3")
    left.set(xlabel="round", ylabel="training reward (dense)", title="rollout reward")
    right.set(xlabel="round", title="KL to reference / gradient norm")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def heldout_rows(metrics: dict) -> tuple[list[str], list[dict]]:
    """Held-out strict scores per task and overall, base beside fine-tuned (from `report_metrics`)."""
    keys = [k for k in metrics["base"] if k != "mean_reward"]
    rows = [{"task": k, "base": metrics["base"][k], "fine_tuned": metrics["fine_tuned"].get(k)} for k in keys]
    return ["task", "base", "fine_tuned"], rows


def plot_heldout(rows: list[dict], out_png: str | Path) -> Path:
    """Grouped bars: held-out strict shapes-GenEval per task and overall, base vs fine-tuned."""
    fig, axis = plt.subplots(figsize=(8, 3.6))
    width, xs = 0.4, range(len(rows))
    for offset, column in ((-0.2, "base"), (0.2, "fine_tuned")):
        values = [r[column] if r[column] is not None else 0.0 for r in rows]
        bars = axis.bar([x + offset for x in xs], values, width, label=column.replace("_", "-"))
        axis.bar_label(bars, fmt="%.2f", fontsize=6)
    axis.set_xticks(list(xs), [r["task"] for r in rows], fontsize=8, rotation=20)
    axis.set(ylabel="held-out GenEval (strict)", ylim=(0, 1.05), title="base vs fine-tuned")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def write_report(base_scores: str | Path, final_scores: str | Path, train_metrics: str | Path,
                 metrics_out: str | Path, plots_dir: str | Path, pretrain_log: str | Path | None = None) -> dict:
    """The pipeline's report from two scores.json files, the training JSONL and optionally the base model's
    pretrain_log.json: metrics JSON at `metrics_out`; train.csv, heldout.csv, training.png and heldout.png
    under `plots_dir`."""
    for path in (base_scores, final_scores, train_metrics, pretrain_log):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{path} not found")
    round_metrics = read_jsonl_rows(train_metrics)
    metrics = report_metrics(json.loads(Path(base_scores).read_text()), json.loads(Path(final_scores).read_text()),
                             round_metrics, json.loads(Path(pretrain_log).read_text()) if pretrain_log else None)
    Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
    plots_dir = Path(plots_dir)
    columns, rows = training_rows(round_metrics)
    write_csv(plots_dir / "train.csv", columns, rows)
    plot_training(columns, rows, plots_dir / "training.png")
    columns, rows = heldout_rows(metrics)
    write_csv(plots_dir / "heldout.csv", columns, rows)
    plot_heldout(rows, plots_dir / "heldout.png")
    return metrics
