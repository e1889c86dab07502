"""Benchmark: does a model draw the colour its prompt asks for?

    .venv/bin/python bench/colour_binding.py [--model DIR] [--set base_model.KEY=VALUE ...] [--guidance 1 4]

Without --model it measures the base model params.yaml (with --set) describes, pretraining it if it is not cached.
Two measurements, both printed:

1. **Sampled colours.** "a photo of a {colour} {shape}" for every colour and shape, --per-pair seeds each, sampled
   with params.yaml's `evaluate:` sampler, steps and shift; the first confident detection's colour is named by the
   palette classifier the GenEval scorer uses. Reports the share drawn in the asked colour against chance (1 / colours)
   and the confusion (asked -> drawn).
2. **Prompt sensitivity.** On one fixed x_t, how far (L2 over the image) the model's clean-image estimate
   x0-hat = x_t - t v moves when one word of "a photo of a red circle" changes: the colour, the shape, the count.
   A model that ignores colour words moves little for the colour.
"""

from collections import Counter
from pathlib import Path
import argparse
import json

import torch

from elborl.config import load_params_with_overrides
from elborl.evaluate import EvalConfig
from elborl.geneval.prompts import with_article
from elborl.models import load_backbone
from elborl.pretrain import ensure_base_model
from elborl.sampling import sample
from elborl.shapes.detector import PaletteColorClassifier, ShapesDetector
from elborl.shapes.world import COLORS, SHAPES

PROBE_BASE = "a photo of a red circle"
PROBE_SWAPS = {"colour": "a photo of a blue circle", "shape": "a photo of a red square",
               "count": "a photo of four circles", "no colour": "a photo of a circle"}


def drawn_colours(model, per_pair: int, guidance: float, settings: EvalConfig = EvalConfig(),
                  first_seed: int = 5000) -> list[tuple[str, str]]:
    """(asked, drawn) per sample, sampled as `settings` says; drawn is 'none' when no detection clears GenEval's
    0.3 threshold."""
    asked, prompts = [], []
    for colour in COLORS:
        for shape in SHAPES:
            prompts += [f"a photo of {with_article(colour)} {shape}"] * per_pair
            asked += [colour] * per_pair
    x0 = sample(model, prompts, list(range(first_seed, first_seed + len(prompts))), settings.sampler, settings.steps,
                settings.shift, guidance, batch_size=settings.batch_size, progress=True)
    detector, classify = ShapesDetector(), PaletteColorClassifier()
    pairs = []
    for image, colour in zip(model.to_images(x0), asked):
        detections = [d for d in detector(image) if d.score > 0.3]
        pairs.append((colour, classify(image, detections[:1], detections[0].label)[0] if detections else "none"))
    return pairs


@torch.no_grad()
def prompt_sensitivity(model, times=(0.99, 0.9, 0.7), seed: int = 0) -> dict[float, dict[str, float]]:
    x_t = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(seed))

    def x0_hat(prompt: str, t: float) -> torch.Tensor:
        return x_t - t * model.velocity(x_t, torch.tensor([t]), model.encode_prompts([prompt]))

    return {t: {word: (x0_hat(prompt, t) - x0_hat(PROBE_BASE, t)).norm().item() for word, prompt in PROBE_SWAPS.items()}
            for t in times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved backbone directory (default: the params.yaml base model)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. pretrain.task_weights={colors: 2}")
    parser.add_argument("--per-pair", type=int, default=6, help="samples per (colour, shape)")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="artifacts/bench/colour_binding", help="writes colour_binding.json here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params_with_overrides(args.params, args.set)
    if args.model:
        model, where = load_backbone(args.model, params.runtime), args.model
    else:
        model, where = ensure_base_model(params.base_model, params.pretrain, Path(params.artifacts) / "base_model",
                                         runtime=params.runtime)
    model.requires_grad_(False)
    report = {"model": str(where), "chance": 1 / len(COLORS), "guidance": {}}
    print(f"model {where}; chance {1 / len(COLORS):.3f}")
    for guidance in args.guidance:
        pairs = drawn_colours(model, args.per_pair, guidance, params.evaluate)
        right = sum(a == d for a, d in pairs) / len(pairs)
        confusion = {colour: dict(Counter(d for a, d in pairs if a == colour).most_common()) for colour in COLORS}
        report["guidance"][guidance] = {"right_colour": right, "samples": len(pairs), "confusion": confusion}
        print(f"\nCFG {guidance:g}: drawn in the asked colour {right:.3f} ({len(pairs)} samples)")
        for colour in COLORS:
            print(f"  {colour:>7} -> {confusion[colour]}")
    sensitivity = prompt_sensitivity(model)
    report["sensitivity"] = sensitivity
    print(f"\nx0-hat moves (L2) from {PROBE_BASE!r} when one word changes:")
    print(f"{'t':>5} " + " ".join(f"{word:>10}" for word in PROBE_SWAPS))
    for t, moves in sensitivity.items():
        print(f"{t:>5} " + " ".join(f"{moves[word]:>10.2f}" for word in PROBE_SWAPS))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "colour_binding.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
