"""The run report: one self-contained HTML page that shows how a run went (docs/pipeline.md, "The run report").

It is read from the run's published artifacts (through `RunContext`, so a local and an `s3://` run alike):

- training reward against training time, each round's mean with its 95% interval (resampling the round's prompt
  groups), and the held-out score against training time with its 95% interval (resampling prompts within tasks);
- per-task held-out scores before and after with their intervals, and the overall change with its paired interval;
- the before/after grids, which sample the same prompts with the same seeds;
- the reward-hacking monitors per round: KL to the reference and the diversity within groups;
- the settings and the lineage (git commit, base model, prompt set, params hash).

Charts are matplotlib PNGs and the grids PNGs, embedded as base64: the page loads nothing from anywhere, so it
opens offline, from a CI attachment or a Prefect artifact alike.
"""

from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
import base64
import hashlib
import io
import json
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from elborl.evaluate import before_after  # noqa: E402
from elborl.plots import trailing_mean  # noqa: E402
from elborl.rounds import RunContext, evaluation_uri, evaluations, join, round_metrics, round_uri  # noqa: E402
from elborl.stats import bootstrap_mean, bootstrap_overall, paired_difference, task_table  # noqa: E402

TREND_WINDOW = 10  # rounds in the training reward's trailing mean (one round's prompts swing its mean a lot)
PACKAGE_DIR = Path(__file__).resolve().parent


# --- what the page shows, read from the run ------------------------------------------------------------
@dataclass
class Evaluation:
    """One held-out evaluation artifact: its summary (scores.json), per-image records (images.jsonl) and grid."""

    name: str
    uri: str
    train_seconds: float
    summary: dict
    records: list[dict]
    grid: bytes | None

    @property
    def strict(self) -> bool:
        """Per-image GenEval verdicts are there, so intervals can be computed."""
        return bool(self.records) and all("correct" in r for r in self.records)

    def interval(self) -> tuple[float, float] | None:
        return bootstrap_overall(self.records) if self.strict else None


@dataclass
class RunData:
    run: str
    rounds: list[dict]  # elborl.rounds.round_metrics rows
    reward_intervals: list[tuple[float, float]]  # per round
    evaluations: list[Evaluation]  # held-out scores against training time
    before: Evaluation | None
    after: Evaluation | None
    settings: dict
    lineage: dict[str, str]


def read_evaluation(ctx: RunContext, uri: str, name: str, train_seconds: float) -> Evaluation:
    directory = ctx.local(uri)
    records_file, grid_file = directory / "images.jsonl", directory / "grid.png"
    lines = records_file.read_text().splitlines() if records_file.exists() else []
    records = [json.loads(line) for line in lines if line]
    return Evaluation(name, uri, train_seconds, json.loads((directory / "scores.json").read_text()), records,
                      grid_file.read_bytes() if grid_file.exists() else None)


def run_evaluations(ctx: RunContext) -> list[Evaluation]:
    """The run's own held-out evaluations (<run>/evals/NNNNN), in round order, with their images' verdicts."""
    return [read_evaluation(ctx, evaluation_uri(ctx.run, row["epoch"]),
                            "base" if row["epoch"] == 0 else f"after {row['epoch']} rounds", row["train_seconds"])
            for row in evaluations(ctx)]


def round_reward_intervals(ctx: RunContext, rounds: list[dict], group_size: int) -> list[tuple[float, float]]:
    """Each round's 95% interval of the mean training reward, resampling its prompt groups (a rollout holds
    its samples group by group: `group_size` consecutive rewards per prompt)."""
    intervals = []
    for r in range(len(rounds)):
        rewards = json.loads((ctx.local(round_uri(ctx.run, r, "score")) / "rewards.json").read_text())["rewards"]
        means = [float(np.mean(rewards[i:i + group_size])) for i in range(0, len(rewards), group_size)]
        intervals.append(bootstrap_mean(means, seed=r))
    return intervals


def collect(ctx: RunContext, before: str | None = None, after: str | None = None, base_model: str | None = None,
            prompts: str | None = None) -> RunData:
    """Everything the page shows. `before`/`after`: evaluation artifacts to compare (default: the run's first
    and last held-out evaluations); given, they join the held-out curve at 0 and at the run's training time."""
    recorded = _recorded_settings(ctx)
    rounds = round_metrics(ctx)
    group_size = recorded.get("rl", {}).get("group_size")
    intervals = round_reward_intervals(ctx, rounds, group_size) if group_size else [(np.nan, np.nan)] * len(rounds)
    held_out = run_evaluations(ctx)
    if not (recorded or rounds or held_out):  # most likely a mistyped run: say so rather than draw empty charts
        raise FileNotFoundError(f"{ctx.run}: no run there (no run.json, round or held-out evaluation published)")
    trained = rounds[-1]["train_seconds"] if rounds else 0.0
    given = {uri: seconds for uri, seconds in ((before, 0.0), (after, trained)) if uri}
    known = {e.uri for e in held_out}
    held_out += [read_evaluation(ctx, uri, uri.rstrip("/").rsplit("/", 1)[-1], seconds)  # e.g. eval/base
                    for uri, seconds in given.items() if uri not in known]
    held_out.sort(key=lambda e: e.train_seconds)
    by_uri = {e.uri: e for e in held_out}
    first, last = (by_uri[before] if before else held_out[0] if held_out else None,
                   by_uri[after] if after else held_out[-1] if len(held_out) > 1 else None)
    settings = {**_params_settings(ctx.params), **recorded}  # run.json wins: the run was started with it
    lineage = run_lineage(ctx, settings, base_model or ctx.base_model or _evaluated(ctx, first or last, "model"),
                          prompts or ctx.prompts or _evaluated(ctx, first or last, "prompts"))
    return RunData(ctx.run, rounds, intervals, held_out, first, last, settings, lineage)


def _recorded_settings(ctx: RunContext) -> dict:
    """run.json: the settings the run was started with (none before its first stage)."""
    try:
        return ctx.store.read_json(join(ctx.run, "run.json"))
    except FileNotFoundError:
        return {}


def _params_settings(params) -> dict:
    """The full settings as plain JSON values (dataclasses or pydantic models); {} when the caller had none.
    The recipes are left out: `rl.recipe` names the one used, and its values are in `rl` already."""
    if params is None:
        return {}
    plain = params.model_dump(mode="json") if hasattr(params, "model_dump") else asdict(params) if is_dataclass(
        params) else dict(params)
    plain.pop("recipes", None)
    return json.loads(json.dumps(plain, default=str))


def _evaluated(ctx: RunContext, evaluation: Evaluation | None, key: str) -> str | None:
    """What an evaluation artifact's manifest records it sampled (the evaluate stage's `model`, `prompts`)."""
    if evaluation is None:
        return None
    return ctx.store.read_manifest(evaluation.uri)["meta"].get(key)


# --- lineage ------------------------------------------------------------------------------------------------
def run_lineage(ctx: RunContext, settings: dict, base_model: str | None, prompts: str | None) -> dict[str, str]:
    params_hash = f"{settings_hash(settings)} (sha256 of the settings in the report)" if settings else "unknown"
    return {"run": ctx.run, "git commit": git_commit(), "base model": describe_artifact(ctx, base_model),
            "prompt set": describe_artifact(ctx, prompts), "params hash": params_hash}


def git_commit(directory: Path = PACKAGE_DIR) -> str:
    """The commit of the checkout the code ran from, marked when it had uncommitted changes; "unknown" when the
    code is not in a git checkout (an installed package, a container) or git is missing."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # --no-optional-locks: a report never takes the index lock from someone committing meanwhile
        return subprocess.run(["git", "--no-optional-locks", "-C", str(directory), *args], capture_output=True,
                              text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def describe_artifact(ctx: RunContext, uri: str | None) -> str:
    """The URI and, for a published artifact, a digest of its files (the manifest's sha256s: the same weights or
    prompts give the same digest wherever they were published)."""
    if not uri:
        return "unknown"
    try:
        files = ctx.store.read_manifest(uri)["files"]
    except (FileNotFoundError, ValueError, OSError):
        return str(uri)  # not a published artifact (e.g. the main job's cache directory, named by its settings)
    digest = hashlib.sha256(json.dumps(sorted((f["path"], f["sha256"]) for f in files)).encode()).hexdigest()
    return f"{uri} (files sha256 {digest[:12]})"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# --- charts -------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def progress_chart(data: RunData) -> bytes:
    """Left: training reward per round against training minutes; right: the held-out score against them."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)  # the same minutes side by side
    if data.rounds:
        minutes = [r["train_seconds"] / 60 for r in data.rounds]
        means = [r["reward_mean"] for r in data.rounds]
        low, high = zip(*data.reward_intervals)
        left.fill_between(minutes, low, high, alpha=0.2, label="95% interval of a round's mean")
        left.plot(minutes, means, marker="o", ms=3, lw=0.8, label="round mean")
        left.plot(minutes, trailing_mean(means, TREND_WINDOW), lw=2, label=f"mean of the last {TREND_WINDOW}")
        left.legend(fontsize=7)
    else:
        _empty(left, "no round published yet")
    left.set(xlabel="training minutes", ylabel="training reward", title="training reward")
    if data.evaluations:
        minutes = [e.train_seconds / 60 for e in data.evaluations]
        intervals = [e.interval() for e in data.evaluations]
        if all(intervals):
            right.fill_between(minutes, *zip(*intervals), alpha=0.2, label="95% interval")
        right.plot(minutes, [e.summary.get("overall") for e in data.evaluations], marker="o", label="overall")
        right.legend(fontsize=7)
    else:
        _empty(right, "no held-out evaluation published")
    right.set(xlabel="training minutes", ylabel="held-out GenEval (strict)", title="held-out score", ylim=(0, 1))
    fig.tight_layout()
    return _png(fig)


def task_chart(before: Evaluation | None, after: Evaluation | None) -> bytes | None:
    """Grouped bars per task and overall, before and after, with 95% intervals where per-image verdicts exist."""
    shown = [e for e in (before, after) if e is not None]
    if not shown:
        return None
    tasks = list(dict.fromkeys(t for e in shown for t in e.summary.get("tasks", {}))) + ["overall"]
    fig, axis = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(shown)
    for index, evaluation in enumerate(shown):
        table = task_table(evaluation.records) if evaluation.strict else {}
        scores = [evaluation.summary["overall"] if t == "overall" else evaluation.summary["tasks"].get(t, 0.0)
                  for t in tasks]
        errors = None
        if table:
            errors = np.array([[s - table[t][1], table[t][2] - s] if t in table else [0, 0]
                               for t, s in zip(tasks, scores)]).T
        xs = np.arange(len(tasks)) + (index - (len(shown) - 1) / 2) * width
        bars = axis.bar(xs, scores, width, yerr=errors, capsize=3, label=evaluation.name, color=f"C{index}")
        axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    axis.set_xticks(range(len(tasks)), tasks, fontsize=8)
    axis.set(ylabel="held-out GenEval (strict)", ylim=(0, 1.1), title="per task, with 95% intervals")
    axis.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def monitors_chart(rounds: list[dict], settings: dict) -> bytes:
    """Reward-hacking monitors per round: KL to the reference and the diversity within groups."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    kl_missing = "not recorded: rl.kl_beta is 0, and the KL costs a forward pass of the reference"
    if settings.get("rl", {}).get("kl_beta", 1) != 0:
        kl_missing = "not recorded in these rounds"
    for axis, key, title, missing in ((axes[0], "kl", "KL to the reference", kl_missing),
                                      (axes[1], "group_diversity", "diversity within groups (RMS distance)",
                                       "not recorded in these rounds")):
        points = [(r["train_seconds"] / 60, r[key]) for r in rounds if key in r]
        if points:
            axis.plot(*zip(*points), marker="o", ms=3)
        else:
            _empty(axis, missing)
        axis.set(xlabel="training minutes", title=title)
    fig.tight_layout()
    return _png(fig)


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, wrap=True, transform=axis.transAxes)
    axis.set_xticks([])
    axis.set_yticks([])


def grids(before: Evaluation | None, after: Evaluation | None) -> list[tuple[str, bytes]]:
    """The before/after grids side by side (the same prompts and seeds), or each alone when they differ."""
    shown = [e for e in (before, after) if e is not None and e.grid]
    if len(shown) == 2:
        try:
            pair = before_after(*(Image.open(io.BytesIO(e.grid)) for e in shown), (before.name, after.name))
        except ValueError:  # different prompt sets: not comparable side by side
            return [(e.name, e.grid) for e in shown]
        buffer = io.BytesIO()
        pair.save(buffer, format="PNG")
        return [(f"{before.name} | {after.name}", buffer.getvalue())]
    return [(e.name, e.grid) for e in shown]


# --- the page -----------------------------------------------------------------------------------------------
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 16px 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.muted { color: #666; } .good { color: #1a7f37; } .bad { color: #c0392b; }
.settings { columns: 3 300px; font-size: 12px; } .settings div { break-inside: avoid; }
code { font-size: 12px; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _number(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def headline(data: RunData) -> list[tuple[str, str, str]]:
    """The numbers that say how the run went, as (what, value, tone) rows; tone: "good", "bad" or "" (neutral)."""
    rows = []
    if data.before and data.after:
        change, tone = _held_out_change(data.before, data.after)
        rows.append(("held-out score (strict)", f"{data.before.name} {_number(data.before.summary.get('overall'))} → "
                                                f"{data.after.name} {_number(data.after.summary.get('overall'))}"
                                                f"{change}", tone))
    elif data.before:
        rows.append(("held-out score (strict)", f"{data.before.name} {_number(data.before.summary.get('overall'))}",
                     ""))
    if data.rounds:
        rewards = [r["reward_mean"] for r in data.rounds]
        trend = trailing_mean(rewards, TREND_WINDOW)
        rows.append(("training reward", f"{_number(rewards[0])} in the first round → {_number(trend[-1])} "
                                        f"(mean of the last {min(TREND_WINDOW, len(rewards))} rounds)", ""))
        rows.append(("rounds", f"{len(data.rounds)} in {data.rounds[-1]['train_seconds'] / 60:.1f} training minutes",
                     ""))
        for key, name in (("kl", "KL to the reference"), ("group_diversity", "diversity within groups")):
            values = [r[key] for r in data.rounds if key in r]
            if values:
                rows.append((name, f"{_number(values[0], 4)} in the first round → {_number(values[-1], 4)} "
                                   "in the last", ""))
    return rows


def _held_out_change(before: Evaluation, after: Evaluation) -> tuple[str, str]:
    """The overall change with its paired 95% interval and whether it is more than noise, and its tone."""
    if not (before.strict and after.strict):
        return "", ""
    try:
        change = paired_difference(after.records, before.records)
    except ValueError:  # other prompts: no paired comparison
        return "", ""
    tone, verdict = ("good", "a clear gain") if change["low"] > 0 else ("bad", "a clear loss") if change[
        "high"] < 0 else ("", "within noise")
    return (f" ({change['difference']:+.3f}, 95% interval {change['low']:+.3f} to {change['high']:+.3f}: "
            f"{verdict})"), tone


def _flat(settings: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", json.dumps(value)))
    return rows


def render(data: RunData) -> str:
    """The page as one HTML string."""
    table = "".join(f'<tr><th>{escape(what)}</th><td class="{tone}">{escape(value)}</td></tr>'
                    for what, value, tone in headline(data))
    sections = [f"<h1>Run report</h1><p class=muted><code>{escape(data.run)}</code> · written "
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
                f"<table>{table}</table>" if table else "<p>Nothing published yet.</p>",
                "<h2>Training reward and held-out score</h2>", _img(progress_chart(data), "training and held-out")]
    bars = task_chart(data.before, data.after)
    if bars:
        sections += ["<h2>Per task, before and after</h2>", _img(bars, "per-task scores")]
    shown = grids(data.before, data.after)
    if shown:
        sections.append("<h2>Samples on the same prompts and seeds</h2><p class=muted>Frame: green = GenEval-correct, "
                        "red = not.</p>")
        sections += [_img(png, f"grid: {name}") for name, png in shown]
    sections += ["<h2>Reward-hacking monitors</h2><p class=muted>A rising training reward with a flat held-out score, "
                 "a climbing KL or collapsing diversity within groups says the policy is learning the reward's blind "
                 "spots rather than the task.</p>", _img(monitors_chart(data.rounds, data.settings), "monitors")]
    settings = "".join(f"<div><code>{escape(k)}</code> = <code>{escape(v)}</code></div>"
                       for k, v in _flat(data.settings))
    sections += ["<h2>Settings</h2>", f'<div class="settings">{settings or "not recorded"}</div>', "<h2>Lineage</h2>",
                 "<table>" + "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(v)}</code></td></tr>"
                                     for k, v in data.lineage.items()) + "</table>"]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Run report: {escape(data.run)}'
            f"</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")


def summary_markdown(data: RunData, page: Path) -> str:
    """The headline, the training and held-out chart and the lineage as markdown (a Prefect artifact's body)."""
    rows = [f"| {what} | {value} |" for what, value, _ in headline(data)]
    rows += [f"| {what} | `{value}` |" for what, value in data.lineage.items()]
    chart = base64.b64encode(progress_chart(data)).decode()
    return "\n".join([f"# Run report: `{data.run}`", "", f"The whole report: `{page}`", "", "| | |", "|---|---|",
                      *rows, "", f"![training reward and held-out score](data:image/png;base64,{chart})"])


def write_page(data: RunData, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render(data))
    return out_path


def write_run_report(run: RunContext | str, out_path: str | Path, before: str | None = None, after: str | None = None,
                     base_model: str | None = None, prompts: str | None = None) -> Path:
    """Writes the run's report to `out_path` (one HTML file) and returns its path. `run`: a RunContext or a run's
    URI; `before`/`after`: evaluation artifacts to compare (default: the run's first and last evaluations);
    `base_model`/`prompts`: what the run started from, for the lineage (default: the context's, else what the
    evaluations record)."""
    ctx = run if isinstance(run, RunContext) else RunContext(run, None)
    return write_page(collect(ctx, before, after, base_model, prompts), out_path)
