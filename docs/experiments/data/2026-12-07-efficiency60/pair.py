"""Paired differences of the 16-image finals of docs/experiments/2026-12-07-method-fidelity.md (run from the repository
root, with the reevaluate --out files copied into finals/ beside it): each final and each sitting's base model with its
95% interval, and each pair. A sitting is one machine: its runs trained side by side and are compared within it; the
base model was evaluated again in each sitting (same weights, same seeds)."""

import json
from pathlib import Path

from elborl.stats import bootstrap_overall, overall, paired_difference, task_table

finals = Path(__file__).parent / "finals"  # copies of the reevaluate --out files
SITTINGS = {  # sitting -> (its files, the pairs compared within it)
    "Xeon (AVX-512 BF16, AMX), session 17": (
        ["base-and-flow_grpo-seed0.json", "elbo-seed0.json"],
        [("elbo seed0", "base"), ("flow_grpo seed0", "base"), ("elbo seed0", "flow_grpo seed0")]),
    "EPYC (AVX-512 BF16), session 18": (
        ["base-and-nft-seed0.json", "elbo-seed1.json"],
        [("elbo seed1", "base"), ("nft seed0", "base"), ("elbo seed1", "nft seed0")]),
    "EPYC (AVX-512 BF16), session 19": (
        ["base-and-flow_grpo-seed1.json", "nft-seed1.json"],
        [("flow_grpo seed1", "base"), ("nft seed1", "base"), ("nft seed1", "flow_grpo seed1")]),
}


def label(path: str) -> str:
    """'artifacts/bench/efficiency60/runs/elbo/seed0' -> 'elbo seed0'; the base model -> 'base'."""
    return "base" if path == "base" else " ".join(path.rstrip("/").split("/")[-2:])


def seeds_mean(runs: list[list[dict]]) -> list[dict]:
    """One record per test image holding the mean of several runs' verdicts on it (one method's seeds; the
    evaluation's prompts and seeds are the same in every run, so records align)."""
    return [{**first, "correct": sum(run[i]["correct"] for run in runs) / len(runs)} for i, first in enumerate(runs[0])]


def across_sittings(every: dict[str, list[dict]]) -> None:
    """Each method's seeds averaged image by image, then paired over the same 976 images: the interval is over
    prompts, not over RL seeds (two or three seeds cannot give one)."""
    methods = sorted({name.split()[0] for name in every if name != "base"})
    means = {m: seeds_mean([recs for name, recs in sorted(every.items()) if name.split()[0] == m]) for m in methods}
    means["base"] = every["base"]
    print("\nacross sittings (each method's seeds averaged per image)")
    for name, recs in means.items():
        seeds = sorted(n.split()[1] for n in every if n.split()[0] == name) if name != "base" else []
        low, high = bootstrap_overall(recs)
        print(f"  {name} {'+'.join(seeds)}: {overall(recs):.3f} ({low:.3f}-{high:.3f})")
    for a, b in [(m, "base") for m in methods] + [("elbo", "flow_grpo"), ("elbo", "nft"), ("nft", "flow_grpo")]:
        if a in means and b in means:
            d = paired_difference(means[a], means[b])
            print(f"  {a} - {b}: {d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})")


def main() -> None:
    bases, every = {}, {}
    for sitting, (files, pairs) in SITTINGS.items():
        present = [name for name in files if (finals / name).exists()]
        if len(present) < len(files):
            print(f"{sitting}: missing {sorted(set(files) - set(present))}")
            continue
        kept = {k: v for name in files for k, v in json.loads((finals / name).read_text()).items()}
        records = {label(path): value["records"] for path, value in kept.items()}
        bases[sitting] = records["base"]
        every.update(records)
        print(f"\n{sitting}")
        for name, recs in records.items():
            low, high = bootstrap_overall(recs)
            tasks = {t: round(v[0], 3) for t, v in task_table(recs).items() if t != "overall"}
            print(f"  {name}: {overall(recs):.3f} ({low:.3f}-{high:.3f}) n={len(recs)} {tasks}")
        for a, b in pairs:
            d = paired_difference(records[a], records[b])
            print(f"  {a} - {b}: {d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})")
    across_sittings(every)
    (name, first), *others = bases.items()
    for other, records in others:
        same = sum(x["correct"] == y["correct"] for x, y in zip(first, records))
        print(f"\nthe base model's verdicts agree between {name} and {other} on {same} of {len(first)} images")


if __name__ == "__main__":
    main()
