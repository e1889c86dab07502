"""Paired differences of the 16-image finals of docs/experiments/2026-12-07-method-fidelity.md (run from the repository
root, with the reevaluate --out files copied into finals/ beside it): each final and the base model with its 95% interval, and each pair."""

import json
from pathlib import Path
from elborl.stats import bootstrap_overall, overall, paired_difference, task_table
finals = Path(__file__).parent / "finals"  # copies of the reevaluate --out files
kept = {**json.load(open(f"{finals}/base-and-flow_grpo-seed0.json")), **json.load(open(f"{finals}/elbo-seed0.json"))}
records = {("base" if label == "base" else label.rstrip("/").split("/")[-2]): v["records"] for label, v in kept.items()}
for name, recs in records.items():
    low, high = bootstrap_overall(recs)
    tasks = {t: round(v[0], 3) for t, v in task_table(recs).items() if t != "overall"}
    print(f"{name}: {overall(recs):.3f} ({low:.3f}-{high:.3f}) n={len(recs)} {tasks}")
for a, b in (("elbo", "base"), ("flow_grpo", "base"), ("elbo", "flow_grpo")):
    d = paired_difference(records[a], records[b])
    print(f"{a} - {b}: {d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})")
