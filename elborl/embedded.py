"""The main job on the embedded default: prompts -> base model (cached) -> evaluation -> table.

    python -m elborl.embedded [--params params.yaml]
"""

import argparse
from pathlib import Path
import time

import torch

from elborl.config import load_params
from elborl.evaluate import evaluate, format_table, write_evaluation
from elborl.geneval.prompts import shapes_test_set, shapes_train_set, write_jsonl
from elborl.pretrain import ensure_base_model


def prepare_prompts(params, out_dir: Path) -> tuple[list[dict], list[dict]]:
    test = shapes_test_set()
    train = shapes_train_set(params.prompts.train_per_task, params.prompts.train_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "test.jsonl", test)
    write_jsonl(out_dir / "train.jsonl", train)
    return test, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    root = Path(params.artifacts)

    test, train = prepare_prompts(params, root / "prompts")
    print(f"prompts: {len(test)} test, {len(train)} train -> {root / 'prompts'}")
    model, model_path = ensure_base_model(params.base_model, params.pretrain, root / "base_model")

    start = time.time()
    summary, records, images = evaluate(model, test, params.evaluate)
    written = write_evaluation(root / "eval" / "base", summary, records, images)
    print(f"evaluated {len(records)} images in {time.time() - start:.0f} s")
    print("\nshapes-GenEval (strict), held-out test prompts\n" + format_table({"base": summary}))
    print(f"\nscores: {written['scores']}\ngrid:   {written['grid']}\nmodel:  {model_path}")


if __name__ == "__main__":
    main()
