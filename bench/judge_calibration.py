"""The shapes judge against people: build and label the calibration set, then measure the judge on it.

    .venv/bin/python bench/judge_calibration.py render                       # degraded renders, labels known
    .venv/bin/python bench/judge_calibration.py sample --name base-test --prompts test --split held_out
    .venv/bin/python bench/judge_calibration.py sample --name rl --run RUN_DIR --prompts train --split fit
    .venv/bin/python bench/judge_calibration.py label --name base-test       # after writing its corrections file
    .venv/bin/python bench/judge_calibration.py fit                          # choose the confidence ramps
    .venv/bin/python bench/judge_calibration.py report                       # agreement, reliability diagram

`sample` draws images from the base model (or a run's EMA policy), writes them with labels prefilled from what
the detector segments (every component a `certain` object of the shape and colour the detector names) to
`pending/<name>.jsonl`, and contact sheets to `sheets/<name>-K.png`, each component numbered. A person looks at
the sheets and writes `corrections/<name>.txt`, one line per change (image index, then object number):

    12 2 none                       object 2 of image 12 is no shape a person would name
    12 1 ambiguous                  a person hesitates over it
    12 1 certain red square         it is a red square (the detector named it otherwise)
    12 add certain blue circle 20,7 an object the detector's segmentation missed, at column 20, row 7
                                    (optionally its box after it: 16,3,25,12)
    12 1 box 3,4,11,12              object 1's extent is x 3-11, y 4-12 (two touching shapes, one component)
    12 drop                         leave image 12 out (say why in a comment)
    # comments and blank lines are ignored

`label` applies it and moves the images into `labels.jsonl`; `report` prints, per split, the judge's correct rate
per task beside people's, their agreement with a 95% interval, the confidence the judge gives objects by the
person's certainty, and writes `reliability.png`.
"""

from pathlib import Path
import argparse
import json
import sys

import numpy as np

from elborl.geneval.scoring import GenEvalScorer
from elborl.geneval.types import TASKS
from elborl.shapes.detector import CALIBRATED_RAMPS, PaletteColorClassifier, ShapesDetector
from elborl.shapes import judge_calibration as jc
from elborl.stats import wilson_interval

SET = Path(__file__).resolve().parents[1] / "calibration" / "shapes_judge"


def prefilled(meta: dict, image: np.ndarray, source: str, split: str, name: str) -> jc.LabelledImage:
    """Every component the detector segments as a `certain` object of the shape and colour it names."""
    objects = []
    colours = PaletteColorClassifier()
    for measurement in ShapesDetector().measure(image):
        detection = measurement.detection()
        rows, cols = np.nonzero(measurement.core)
        centre = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        colour = colours(image, [detection], detection.label)[0]
        objects.append(jc.LabelledObject((int(cols[centre]), int(rows[centre])), measurement.box, "certain",
                                         detection.label, colour))
    return jc.LabelledImage(name, meta, source, split, objects)


def write_pending(name: str, items: list[tuple[jc.LabelledImage, np.ndarray]], root: Path = SET) -> None:
    from PIL import Image

    for k, (labelled, image) in enumerate(items):
        labelled.image = f"{name}/{k:04d}.png"
        (root / labelled.image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / labelled.image)
    (root / "pending").mkdir(parents=True, exist_ok=True)
    (root / "pending" / f"{name}.jsonl").write_text("".join(json.dumps(l.to_json()) + "\n" for l, _ in items))
    (root / "sheets").mkdir(parents=True, exist_ok=True)
    per_sheet = 24
    for start in range(0, len(items), per_sheet):
        chunk = items[start:start + per_sheet]
        sheet = jc.contact_sheet(chunk, columns=6, first_index=start)
        sheet.save(root / "sheets" / f"{name}-{start // per_sheet}.png")
    print(f"{len(items)} images -> {root / 'pending' / (name + '.jsonl')}, sheets in {root / 'sheets'}")


def cmd_sample(args) -> None:
    from elborl.benchmark import load_bench_params
    from elborl.evaluate import EvalConfig, sample_images
    from elborl.geneval.prompts import shapes_test_set, shapes_train_set

    model, source = load_model(args)
    params = load_bench_params(args.params, args.set)
    if args.prompts == "test":
        metas = shapes_test_set()
    else:
        rng = np.random.default_rng(args.seed)
        pool = shapes_train_set(params.prompts.train_per_task, params.prompts.train_seed, params.prompts.coloured_variants)
        by_task = {t: [m for m in pool if m["tag"] == t] for t in TASKS}
        # every single-object prompt of the world is a test prompt, so that task has no training prompts
        metas = [by_task[t][i] for t in TASKS if by_task[t]
                 for i in rng.choice(len(by_task[t]), min(args.prompts_per_task, len(by_task[t])), replace=False)]
    if args.tasks:
        metas = [m for m in metas if m["tag"] in args.tasks]
    config = EvalConfig(images_per_prompt=args.images_per_prompt, seed=args.seed * 1000 + 7_000_000)
    expanded, seeds, images = sample_images(model, metas, config)
    sampler = f"{config.steps}-step {config.sampler}, seed {{}}"
    items = [(prefilled(meta, image, f"{source}, {sampler.format(seed)}", args.split, args.name), image)
             for meta, seed, image in zip(expanded, seeds, images)]
    write_pending(args.name, items)


def cmd_prefill(args) -> None:
    """Prefilled labels and sheets again for a sample's images (after a change to the detector's segmentation)."""
    from PIL import Image

    rows = [json.loads(line) for line in (SET / "pending" / f"{args.name}.jsonl").read_text().splitlines() if line]
    items = []
    for row in rows:
        image = np.asarray(Image.open(SET / row["image"]).convert("RGB"))
        items.append((prefilled(row["meta"], image, row["source"], row["split"], args.name), image))
    write_pending(args.name, items)


def cmd_render(args) -> None:
    from elborl.geneval.prompts import shapes_test_set

    rng = np.random.default_rng(args.seed)
    metas = shapes_test_set()
    items = []
    for kind, (levels, _) in jc.DEGRADATIONS.items():
        for level in levels:
            for _ in range(args.per_level):
                meta = metas[rng.integers(len(metas))]
                scene = jc.degraded_scene(meta, kind, level, rng)
                while scene is None:  # touching needs two objects
                    meta = metas[rng.integers(len(metas))]
                    scene = jc.degraded_scene(meta, kind, level, rng)
                image, objects = scene
                split = "fit" if len(items) % 2 == 0 else "held_out"
                items.append((jc.LabelledImage("", meta, f"render, {kind} {level:g}", split, objects), image))
    for kind in jc.HACKS:
        for _ in range(15 * args.per_level):
            meta = metas[rng.integers(len(metas))]
            image, objects = jc.hacked_scene(meta, kind, rng)
            split = "fit" if len(items) % 2 == 0 else "held_out"
            items.append((jc.LabelledImage("", meta, f"render, artefact {kind}", split, objects), image))
    for k, (labelled, _) in enumerate(items):
        labelled.image = f"renders/{k:04d}.png"
    corrections = SET / "corrections" / "renders.txt"
    if corrections.exists():  # labels changed by eye where the degradation level misjudges a person
        items = apply_corrections(items, corrections.read_text(), str(corrections))
    merge_into_set(items, replace_prefix="renders/")


def merge_into_set(items, replace_prefix: str, root: Path = SET) -> None:
    """Adds labelled images to the set, replacing those whose image path starts with `replace_prefix`."""
    existing = jc.read_set(root) if (root / "labels.jsonl").exists() else []
    kept = [(l, im) for l, im in existing if not l.image.startswith(replace_prefix)]
    jc.write_set(root, kept + items)
    print(f"{len(items)} labelled images under {replace_prefix} -> {root / 'labels.jsonl'} ({len(kept) + len(items)} in all)")


def apply_corrections(items: list[tuple[jc.LabelledImage, np.ndarray]], text: str, where: str):
    """The pending items with a corrections file applied (see the module's docstring for its lines)."""
    dropped = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        try:
            index = int(line[0])
            labelled = items[index][0]
            if line[1] == "drop":
                dropped.add(index)
            elif len(line) > 2 and line[2] == "box":
                labelled.objects[int(line[1]) - 1].box = tuple(float(v) for v in line[3].split(","))
            elif line[1] == "add":
                certainty, colour, shape = line[2:5]
                col, row = (int(v) for v in line[5].split(","))
                box = tuple(float(v) for v in line[6].split(",")) if len(line) > 6 else (col - 4, row - 4, col + 5, row + 5)
                labelled.objects.append(jc.LabelledObject((col, row), box, certainty, shape, colour))
            else:
                obj = labelled.objects[int(line[1]) - 1]
                obj.certainty = line[2]
                if line[2] == "none":
                    obj.shape = obj.colour = None
                elif len(line) >= 5:
                    obj.colour, obj.shape = line[3], line[4]
            labelled.validate()
        except (IndexError, ValueError) as error:
            raise SystemExit(f"{where}:{number}: cannot apply {raw.strip()!r}: {error}") from None
    return [item for k, item in enumerate(items) if k not in dropped]


def cmd_label(args) -> None:
    pending = SET / "pending" / f"{args.name}.jsonl"
    corrections = SET / "corrections" / f"{args.name}.txt"
    if not corrections.exists():
        raise SystemExit(f"no corrections file {corrections}: look at sheets/{args.name}-*.png and write it "
                         "(an empty file says every prefilled label is right)")
    rows = [json.loads(line) for line in pending.read_text().splitlines() if line]
    from PIL import Image

    items = [(jc.LabelledImage.from_json(r), np.asarray(Image.open(SET / r["image"]).convert("RGB"))) for r in rows]
    items = apply_corrections(items, corrections.read_text(), str(corrections))
    merge_into_set(items, replace_prefix=f"{args.name}/")


def report_split(items, title: str) -> dict:
    result = jc.agreement(items, GenEvalScorer(ShapesDetector(), PaletteColorClassifier()))
    agree_count = round(result.agree * result.n)
    low, high = wilson_interval(agree_count, result.n)
    print(f"\n{title}: {result.n} images, judge agrees with people on {agree_count} "
          f"({result.agree:.3f}, 95% CI {low:.3f}-{high:.3f}); largest task gap {result.worst_gap():.3f}")
    print(f"{'task':<15}{'n':>5}{'people':>9}{'judge':>9}{'agree':>9}")
    for task, row in result.per_task.items():
        print(f"{task:<15}{row['n']:>5}{row['person']:>9.3f}{row['judge']:>9.3f}{row['agree']:>9.3f}")
    scores = jc.object_scores(items)
    print("judge's confidence by the person's certainty (objects): share > 0.9 / in 0.3-0.9 / < 0.3, named alike")
    for certainty in jc.CERTAINTY_SCORES:
        values = np.array([s for c, s, _ in scores if c == certainty])
        named = np.array([same for c, _, same in scores if c == certainty])
        if len(values):
            print(f"  {certainty:<10} {len(values):>4}: {np.mean(values > 0.9):.2f} / "
                  f"{np.mean((values > 0.3) & (values <= 0.9)):.2f} / {np.mean(values <= 0.3):.2f}, {np.mean(named):.2f}")
    return {"agreement": result, "scores": scores}


def cmd_report(args) -> None:
    items = jc.read_set(SET)
    by_split = {split: [(l, im) for l, im in items if l.split == split] for split in jc.SPLITS}
    results = {}
    for split, chosen in by_split.items():
        for kind in ("model samples", "renders"):
            subset = [(l, im) for l, im in chosen if l.source.startswith("render") == (kind == "renders")]
            if subset:
                results[(split, kind)] = report_split(subset, f"{split}, {kind}")
    out = Path(args.out)
    jc.reliability_diagram({f"{s}, {k}": r["scores"] for (s, k), r in results.items()}).save(out)
    print(f"\nreliability diagram -> {out}")


def cmd_fit(args) -> None:
    items = [(l, im) for l, im in jc.read_set(SET) if l.split == "fit"]
    print(f"choosing the confidence ramps on the fit split: {len(items)} images")
    ramps, (agree, in_band, let_through) = jc.fit_ramps(items)
    print(f"\nbest: {ramps}\n  fit-split agreement {agree:.3f}, objects in their band {in_band:.3f}, "
          f"none let through {let_through:.3f}; put it in "
          "elborl/shapes/detector.py (ConfidenceRamps defaults), then run `report` for the held-out split")


def load_model(args):
    """The base model of `--params`/`--set`, or a run's EMA policy on it (`--run`): (model, description)."""
    import torch

    from elborl.benchmark import load_bench_params
    from elborl.pretrain import ensure_base_model

    torch.set_num_threads(args.threads)
    params = load_bench_params(args.params, args.set)
    model, base_path = ensure_base_model(params.base_model, params.pretrain, Path(params.artifacts) / "base_model",
                                         runtime=params.runtime)
    if not args.run:
        return model, f"base model {base_path.name}"
    sys.path.insert(0, str(Path(__file__).parent))
    from reevaluate import load_run_policy

    policy, state = load_run_policy(args.run, model, params)
    policy.ema_weights().__enter__()  # the EMA policy, as evaluation samples it
    return policy.backbone, f"EMA policy of {args.run} after {state['epoch']} epochs"


def cmd_measure(args) -> None:
    """The held-out strict score with the judge as it is now, per task with 95% intervals; images are kept, so
    the same images can be scored again (by another judge) and compared pairwise."""
    from elborl.evaluate import EvalConfig, sample_images
    from elborl.geneval.prompts import shapes_test_set
    from elborl.evaluate import shapes_scorer
    from elborl.stats import paired_difference, task_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images_path = out / f"{args.name}-images.npz"
    if images_path.exists():
        saved = np.load(images_path, allow_pickle=False)
        images, seeds = saved["images"], saved["seeds"].tolist()
        expanded = [json.loads(m) for m in saved["metas"]]
        print(f"reusing {len(images)} images of {images_path}")
    else:
        model, source = load_model(args)
        config = EvalConfig(images_per_prompt=args.images_per_prompt)
        expanded, seeds, images = sample_images(model, shapes_test_set(), config)
        np.savez_compressed(images_path, images=images, seeds=np.array(seeds),
                            metas=np.array([json.dumps(m) for m in expanded]), source=np.array(source))
    scores = shapes_scorer().score(images, expanded)
    records = [{"prompt": m["prompt"], "tag": m["tag"], "seed": s, "correct": sc.correct, "reward": sc.reward}
               for m, s, sc in zip(expanded, seeds, scores)]
    (out / f"{args.name}-records.json").write_text(json.dumps(records))
    print(f"\n{args.name}: {len(records)} images, {args.images_per_prompt} per test prompt")
    print(f"{'task':<15}{'score':>7}  95% interval (prompts resampled)   images")
    for task, (score, low, high, n) in task_table(records).items():
        print(f"{task:<15}{score:>7.3f}  {low:.3f}-{high:.3f}{n:>24}")
    print(f"mean dense reward {np.mean([r['reward'] for r in records]):.3f}")
    for other in args.compare:
        before = json.loads(Path(other).read_text())
        diff = paired_difference(records, before)
        print(f"minus {other}: {diff['difference']:+.3f} (95% paired interval {diff['low']:+.3f} to {diff['high']:+.3f})")


SIGNS = ("asymmetric", "defect", "two-colour", "ambiguous class")


def hack_signs(measurement) -> dict[str, bool]:
    """Which of an object's measurements sit inside a confidence ramp, where reward-hacking artefacts live: an
    asymmetric blob (half one class, half another), a solid defect, a second colour, two classes fitting alike."""
    ramps, ious = CALIBRATED_RAMPS, sorted(measurement.ious.values(), reverse=True)
    separation = (1 - ious[1]) / max(1 - ious[0], 1e-6)
    return {"asymmetric": measurement.asymmetry > ramps.asymmetry[0],
            "defect": measurement.defect > ramps.defect[0],
            "two-colour": measurement.purity < ramps.purity[1],
            "ambiguous class": separation < ramps.separation[1]}


def cmd_hacks(args) -> None:
    """Of the objects GenEval would keep (confidence > 0.3), the share showing each sign of a known hack, per image
    set with 95% intervals: a policy drifting toward an artefact the judge tolerates shows as a rising share."""
    detector = ShapesDetector()
    print(f"{'images':<40}{'objects/img':>12}{'kept > 0.9':>12}" + "".join(f"{k:>22}" for k in SIGNS))
    for path in args.images:
        images = np.load(path, allow_pickle=False)["images"]
        kept, counted, signs = 0, 0, dict.fromkeys(SIGNS, 0)
        for image in images:
            for measurement in detector.measure(image):
                score = measurement.detection().score
                if score <= 0.3:
                    continue
                kept, counted = kept + 1, counted + (score > 0.9)
                for sign, present in hack_signs(measurement).items():
                    signs[sign] += present
        cells = "".join(f"{signs[k] / kept:>8.3f} ({low:.3f}-{high:.3f})"
                        for k in SIGNS for low, high in [wilson_interval(signs[k], kept)])
        print(f"{Path(path).name:<40}{kept / len(images):>12.2f}{counted / kept:>12.3f}{cells}")


def cmd_sheet(args) -> None:
    items = [(l, im) for l, im in jc.read_set(SET) if l.image.startswith(args.prefix)]
    scorer = GenEvalScorer(ShapesDetector(), PaletteColorClassifier())
    notes = []
    for labelled, image in items:
        judged = scorer.score_one(image, labelled.meta).correct
        notes.append(f"people {'OK' if jc.person_verdict(labelled, image) else 'no'}, judge {'OK' if judged else 'no'}")
    if args.disagreements:
        chosen = [k for k, n in enumerate(notes) if n.split(",")[0][7:] != n.split(",")[1][7:]]
        items, notes = [items[k] for k in chosen], [notes[k] for k in chosen]
    jc.contact_sheet(items[:args.limit], columns=8, notes=notes[:args.limit]).save(args.out)
    print(f"{min(len(items), args.limit)} images -> {args.out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="sample images with prefilled labels and contact sheets")
    sample.add_argument("--name", required=True)
    sample.add_argument("--prompts", choices=("test", "train"), default="test")
    sample.add_argument("--prompts-per-task", type=int, default=10, help="training prompts drawn per task")
    sample.add_argument("--images-per-prompt", type=int, default=2)
    sample.add_argument("--split", choices=jc.SPLITS, required=True)
    sample.add_argument("--tasks", nargs="*", choices=TASKS, help="only these tasks' prompts")
    sample.add_argument("--run", help="a bench run directory: sample its EMA policy instead of the base model")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--params", default="params.yaml")
    sample.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    sample.add_argument("--threads", type=int, default=2)
    render = commands.add_parser("render", help="rendered scenes under graded degradations, labels known")
    render.add_argument("--per-level", type=int, default=8)
    render.add_argument("--seed", type=int, default=0)
    prefill = commands.add_parser("prefill", help="prefill a sample's labels again from the detector as it is now")
    prefill.add_argument("--name", required=True)
    label = commands.add_parser("label", help="apply corrections/<name>.txt to pending/<name>.jsonl")
    label.add_argument("--name", required=True)
    report = commands.add_parser("report", help="agreement with people and the reliability diagram")
    report.add_argument("--out", default=str(SET / "reliability.png"))
    commands.add_parser("fit", help="choose the detector's confidence ramps on the fit split")
    hacks = commands.add_parser("hacks", help="share of kept objects with each sign of a known hack, per image set")
    hacks.add_argument("images", nargs="+", help="images .npz written by `measure`")
    measure = commands.add_parser("measure", help="held-out strict score with 95%% intervals, images kept")
    measure.add_argument("--name", required=True)
    measure.add_argument("--run", help="a bench run directory: its EMA policy instead of the base model")
    measure.add_argument("--images-per-prompt", type=int, default=16)
    measure.add_argument("--compare", nargs="*", default=[], help="records.json of the same images or prompts")
    measure.add_argument("--out", default="artifacts/judge")
    measure.add_argument("--params", default="params.yaml")
    measure.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    measure.add_argument("--threads", type=int, default=2)
    sheet = commands.add_parser("sheet", help="a contact sheet of labelled images with both verdicts")
    sheet.add_argument("--prefix", default="")
    sheet.add_argument("--disagreements", action="store_true")
    sheet.add_argument("--limit", type=int, default=48)
    sheet.add_argument("--out", default="/tmp/judge_sheet.png")
    args = parser.parse_args(argv)
    {"sample": cmd_sample, "render": cmd_render, "label": cmd_label, "report": cmd_report,
     "sheet": cmd_sheet, "fit": cmd_fit, "measure": cmd_measure, "prefill": cmd_prefill, "hacks": cmd_hacks}[args.command](args)


if __name__ == "__main__":
    main()
