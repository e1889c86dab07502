"""Uncertainty of held-out scores: a score is a sample of images, so every number comes with its 95% interval.

- `wilson_interval`: a proportion (a task's correct rate, an agreement rate).
- `bootstrap_overall`: GenEval's overall score (the unweighted mean of task scores), resampling prompts within each
  task, so the interval reflects which prompts happened to be in the test set as well as which images were drawn.
- `paired_difference`: two models (or two judges) scored on the same prompts and seeds; the difference is
  bootstrapped over the same prompt resamples, which cancels what the two share.
- `bootstrap_mean`: the mean of independent units, e.g. a training round's prompt groups (the images of one
  prompt are not independent of each other, so a round's interval resamples its groups).
"""

import numpy as np

from elborl.geneval.types import TASKS

Z95 = 1.959964


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95% interval for a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return (0.0, 1.0)
    p, z = successes / n, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def _per_prompt(records: list[dict], key: str = "correct") -> dict[str, dict[str, list[float]]]:
    """task -> prompt -> values of `key` (a verdict counts 1 or 0), from records {prompt, tag, key}."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in records:
        out.setdefault(r["tag"], {}).setdefault(r["prompt"], []).append(float(r[key]))
    return out


def _overall_samples(groups: list[dict[str, dict[str, list[bool]]]], n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the overall score of each of `groups` (same prompts), resampled jointly."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in TASKS if t in groups[0]]
    replicates = np.zeros((len(groups), n_boot))
    for task in tasks:
        prompts = sorted(groups[0][task])
        means = np.array([[np.mean(g[task][p]) for p in prompts] for g in groups])  # groups x prompts
        picks = rng.integers(len(prompts), size=(n_boot, len(prompts)))
        replicates += means[:, picks].mean(axis=2) / len(tasks)
    return replicates


def bootstrap_overall(records: list[dict], n_boot: int = 4000, seed: int = 0, key: str = "correct") -> tuple[float, float]:
    """95% interval of the overall score (unweighted mean of tasks), resampling prompts within tasks."""
    replicates = _overall_samples([_per_prompt(records, key)], n_boot, seed)[0]
    return (float(np.quantile(replicates, 0.025)), float(np.quantile(replicates, 0.975)))


def bootstrap_mean(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values`, one per independent unit, by resampling the units."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:  # one unit says nothing about the spread
        return (float("nan"), float("nan"))
    picks = np.random.default_rng(seed).integers(len(values), size=(n_boot, len(values)))
    replicates = values[picks].mean(axis=1)
    return (float(np.quantile(replicates, 0.025)), float(np.quantile(replicates, 0.975)))


def paired_difference(after: list[dict], before: list[dict], n_boot: int = 4000, seed: int = 0,
                      key: str = "correct") -> dict:
    """Overall(after) - overall(before) on the same prompts, with its 95% paired-bootstrap interval (`key`: the
    per-image value averaged, the strict verdict by default)."""
    groups = [_per_prompt(after, key), _per_prompt(before, key)]
    if {t: sorted(p) for t, p in groups[0].items()} != {t: sorted(p) for t, p in groups[1].items()}:
        raise ValueError("a paired difference needs both score sets on the same prompts")
    replicates = _overall_samples(groups, n_boot, seed)
    difference = replicates[0] - replicates[1]
    point = overall(after, key) - overall(before, key)
    return {"difference": point, "low": float(np.quantile(difference, 0.025)),
            "high": float(np.quantile(difference, 0.975))}


def overall(records: list[dict], key: str = "correct") -> float:
    by_task = _per_prompt(records, key)
    return float(np.mean([np.mean([v for verdicts in by_task[t].values() for v in verdicts])
                          for t in TASKS if t in by_task]))


def task_table(records: list[dict], n_boot: int = 4000, seed: int = 0) -> dict[str, tuple[float, float, float, int]]:
    """task -> (score, 95% low, 95% high, images), and "overall"; intervals resample prompts (a prompt's images
    are not independent of each other)."""
    rng = np.random.default_rng(seed)
    by_task = _per_prompt(records)
    table = {}
    for task in [t for t in TASKS if t in by_task]:
        prompts = sorted(by_task[task])
        means = np.array([np.mean(by_task[task][p]) for p in prompts])
        replicates = means[rng.integers(len(prompts), size=(n_boot, len(prompts)))].mean(axis=1)
        n_images = sum(len(v) for v in by_task[task].values())
        score = float(np.mean([v for vs in by_task[task].values() for v in vs]))
        table[task] = (score, float(np.quantile(replicates, 0.025)), float(np.quantile(replicates, 0.975)), n_images)
    table["overall"] = (overall(records), *bootstrap_overall(records, n_boot, seed), len(records))
    return table
