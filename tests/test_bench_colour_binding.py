"""bench/colour_binding.py against oracle models whose Euler samples land exactly on a rendered image: one that
draws the asked colour must score 1, one that draws everything red must score chance."""

import numpy as np
import pytest
import torch

from conftest import load_bench
from elborl.geneval.prompts import enumerate_prompts
from elborl.sampling import from_uint8, to_uint8
from elborl.shapes.render import render
from elborl.shapes.world import COLORS, SHAPES_VOCABULARY

colour_binding = load_bench("colour_binding")


class RenderingOracle:
    """v = (x_t - x0) / t for a rendered x0, so the Euler sampler ends on x0 exactly.

    `forced_colour` renders every prompt in that colour instead of the asked one."""

    sample_shape, device = (3, 32, 32), torch.device("cpu")

    def __init__(self, forced_colour: str | None = None):
        self.records = {r["prompt"]: r for r in enumerate_prompts(SHAPES_VOCABULARY, "colors")}
        self.forced_colour = forced_colour

    def encode_prompts(self, prompts):
        images = []
        for i, prompt in enumerate(prompts):
            meta = self.records[prompt]
            if self.forced_colour:
                meta = {**meta, "include": [{**clause, "color": self.forced_colour} for clause in meta["include"]]}
            images.append(render(meta, np.random.default_rng(i))[0])
        return from_uint8(np.stack(images))

    def velocity(self, x_t, t, x0):
        return (x_t - x0) / torch.as_tensor(t).clamp_min(1e-6).view(-1, 1, 1, 1)

    def to_images(self, x0):
        return to_uint8(x0)


def right_share(pairs):
    return sum(asked == drawn for asked, drawn in pairs) / len(pairs)


def test_a_model_drawing_the_asked_colour_scores_one():
    pairs = colour_binding.drawn_colours(RenderingOracle(), per_pair=1, guidance=1.0)
    assert len(pairs) == len(COLORS) * 3
    assert right_share(pairs) == 1.0


def test_a_model_ignoring_colour_words_scores_chance():
    pairs = colour_binding.drawn_colours(RenderingOracle(forced_colour="red"), per_pair=1, guidance=1.0)
    assert {drawn for _, drawn in pairs} == {"red"}
    assert right_share(pairs) == pytest.approx(1 / len(COLORS))


def test_prompt_sensitivity_is_zero_for_a_model_without_text(tiny_model):
    moves = colour_binding.prompt_sensitivity(tiny_model, times=(0.9,))
    assert set(moves[0.9]) == set(colour_binding.PROBE_SWAPS)
    assert all(m > 0 for m in moves[0.9].values())  # a random text encoder still moves the estimate
    tiny_model.encode_prompts = lambda prompts, encode=tiny_model.encode_prompts: encode([""] * len(prompts))
    assert all(m == 0 for m in colour_binding.prompt_sensitivity(tiny_model, times=(0.9,))[0.9].values())
