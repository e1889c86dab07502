"""Training curves as PNG (rendered here with matplotlib: works offline, unlike vega-from-CDN HTML)."""

from pathlib import Path
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Left: dense training reward per epoch. Right: held-out strict shapes-GenEval against training minutes."""
    run_dir = Path(run_dir)
    metrics, evals = read_jsonl_rows(run_dir / "metrics.jsonl"), read_jsonl_rows(run_dir / "eval.jsonl")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if metrics:
        left.plot([m["epoch"] for m in metrics], [m["reward_mean"] for m in metrics], lw=1)
    left.set(xlabel="epoch", ylabel="training reward (dense)", title="rollout reward")
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
