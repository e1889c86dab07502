import math
from pathlib import Path

import numpy as np
import pytest
import torch

from elborl.config import load_params
from elborl.models.tokenizer import build_tokenizer
from elborl.models.shapes_model import ShapesFlowModel
from elborl.geneval.types import TASKS
from elborl.pretrain import PretrainConfig, RenderedPrompts, pretrain, training_times
from elborl.sampling import make_scheduler, sample, sampler_times, time_grid, to_uint8
from elborl.shapes.world import SHAPES_VOCABULARY

from conftest import TINY

PROMPTS = ["a photo of a red circle", "a photo of three squares", "a photo of a triangle left of a circle"]


def test_tokenizer_ids_are_a_function_of_the_vocabulary():
    a, b = build_tokenizer(SHAPES_VOCABULARY), build_tokenizer(SHAPES_VOCABULARY)
    assert a.get_vocab() == b.get_vocab()
    ids = a("a photo of an orange triangle left of a square").input_ids
    assert a.unk_token_id not in ids and ids[0] == a.bos_token_id and ids[-1] == a.eos_token_id


def test_pooled_prompt_embedding_is_the_end_token_state(tiny_model):
    with torch.no_grad():
        cond = tiny_model.encode_prompts(PROMPTS)
    ends = cond.mask.sum(1) - 1  # prompts are left-aligned, the end token is the last real one
    assert torch.equal(cond.pooled, cond.hidden[torch.arange(len(PROMPTS)), ends])
    assert not torch.equal(cond.pooled[0], cond.pooled[1])


def test_save_load_round_trip_gives_identical_velocities(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = ShapesFlowModel.from_pretrained(tmp_path).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        expected = tiny_model.velocity(x, t, tiny_model.encode_prompts(PROMPTS))
        got = loaded.velocity(x, t, loaded.encode_prompts(PROMPTS))
    assert torch.equal(expected, got)
    assert loaded.tokenizer.get_vocab() == tiny_model.tokenizer.get_vocab()


def test_loading_a_directory_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shapes model"):
        ShapesFlowModel.from_pretrained(tmp_path)


def test_euler_schedule_is_sd3_shifted_linspace():
    # METHOD.md §0: linspace(1, 1/1000, 10) through s t / (1 + (s - 1) t), s = 3.
    expected = [1.000, .960, .913, .857, .790, .706, .601, .463, .275, .003]
    assert np.allclose(sampler_times("euler", 10).numpy(), expected, atol=6e-4)
    assert make_scheduler("euler", 10).sigmas[-1] == 0


def test_every_sampler_runs_on_the_one_sd3_grid():
    """METHOD.md §0: Euler, DPM-Solver-2 and the SDE query the model at the same times, ending near 0."""
    euler = sampler_times("euler", 10)
    assert torch.equal(sampler_times("dpm2", 10), euler) and torch.equal(sampler_times("sde", 10), euler)
    assert float(euler[-1]) < 0.01


class GaussianData:
    """Data x0 ~ N(mu, s^2) per dimension and its exact flow-matching velocity E[eps - x0 | x_t] (a stand-in
    model): its probability-flow ODE maps x_1 to mu + s x_1 exactly."""

    sample_shape = (1, 2, 2)
    device = torch.device("cpu")

    def __init__(self, mu=0.7, s=0.3):
        self.mu, self.s = mu, s

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1)

    def velocity(self, x, t, cond):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1) if torch.as_tensor(t).dim() else float(t)
        x = x.double()
        variance = (1 - t) ** 2 * self.s ** 2 + t ** 2
        centred = x - (1 - t) * self.mu
        x0 = self.mu + (1 - t) * self.s ** 2 / variance * centred
        eps = t / variance * centred
        return (eps - x0).float()


def transcribed_dpm_solver_pp_2m(model, x, grid):
    """DPM-Solver++(2M) as Lu et al. (2022) write it, with alpha = 1 - t, sigma = t, lambda = log(alpha/sigma):
    first order at the first and the last step, the multistep second-order update in between."""
    x = x.double()
    lam = lambda t: math.log(max(1 - t, 1e-300)) - math.log(t)  # noqa: E731
    history = []
    n = len(grid) - 1
    for i in range(n):
        t, t_next = grid[i], grid[i + 1]
        m = x - t * model.velocity(x.float(), t, None).double()
        history.append((t, m))
        if t_next == 0:
            x = m
        elif i == 0 or i == n - 1:
            h = lam(t_next) - lam(t)
            x = (t_next / t) * x - (1 - t_next) * math.expm1(-h) * m
        else:
            (t_prev, m_prev), (_, m0) = history[-2], history[-1]
            h, h0 = lam(t_next) - lam(t), lam(t) - lam(t_prev)
            d1 = (m0 - m_prev) / (h0 / h)
            x = (t_next / t) * x - (1 - t_next) * math.expm1(-h) * m0 - 0.5 * (1 - t_next) * math.expm1(-h) * d1
    return x


def test_dpm2_is_dpm_solver_pp_2m_on_the_sd3_grid():
    model = GaussianData()
    seeds = [3, 4, 5]
    got = sample(model, ["a", "b", "c"], seeds, "dpm2", steps=10).double()
    x1 = torch.stack([torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    expected = transcribed_dpm_solver_pp_2m(model, x1, time_grid(10).double().tolist())
    assert torch.allclose(got, expected, atol=1e-6)
    # a data-prediction solver is exact when the data is one point: every x0 estimate is that point
    point = GaussianData(mu=0.7, s=0.0)
    assert torch.allclose(sample(point, ["a", "b", "c"], seeds, "dpm2", steps=10), torch.full_like(got, 0.7).float(),
                          atol=1e-5)


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun", 10)


@pytest.mark.parametrize("sampler", ["euler", "dpm2"])
def test_sampling_is_deterministic_per_seed_and_independent_of_batching(tiny_model, sampler):
    seeds = [11, 12, 13]
    a = sample(tiny_model, PROMPTS, seeds, sampler, steps=4)
    b = sample(tiny_model, PROMPTS, seeds, sampler, steps=4)
    assert torch.equal(a, b)
    one_by_one = sample(tiny_model, PROMPTS, seeds, sampler, steps=4, batch_size=1)
    assert torch.allclose(a, one_by_one, atol=1e-5)
    other_seeds = sample(tiny_model, PROMPTS, [21, 22, 23], sampler, steps=4)
    assert not torch.allclose(a, other_seeds)


def test_guidance_one_is_plain_sampling_and_guidance_changes_samples(tiny_model):
    seeds = [1, 2, 3]
    plain = sample(tiny_model, PROMPTS, seeds, "euler", steps=3)
    assert torch.equal(plain, sample(tiny_model, PROMPTS, seeds, "euler", steps=3, guidance=1.0))
    assert not torch.allclose(plain, sample(tiny_model, PROMPTS, seeds, "euler", steps=3, guidance=4.0))


def test_to_uint8_range(tiny_model):
    images = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert images.shape == (1, 1, 5, 3) and images.dtype == np.uint8
    assert images[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_pretraining_reduces_the_flow_matching_loss():
    config = PretrainConfig(steps=40, batch_size=8, lr=2e-3, warmup_steps=5, colour_captions=0.0,
                            lr_schedule="constant", threads=1)
    _, losses = pretrain(TINY, config, progress=False, log=lambda *_: None)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


def test_pretraining_runs_on_its_configured_threads_whatever_the_caller_uses():
    # The default model: 1 and 2 threads sum in different orders there, so its losses part after one step.
    model_config = load_params(Path(__file__).parents[1] / "params.yaml").base_model
    config = PretrainConfig(steps=3, batch_size=8, threads=1)
    runs = []
    for caller_threads in (2, 1):
        torch.set_num_threads(caller_threads)
        runs.append(pretrain(model_config, config, progress=False, log=lambda *_: None)[1])
        assert torch.get_num_threads() == caller_threads  # given back
    assert runs[0] == runs[1]


def test_training_times_uniform_covers_the_high_noise_end_that_logit_normal_skips():
    generator = torch.Generator().manual_seed(0)
    uniform = training_times(20_000, 1.0, generator, "uniform")
    logit_normal = training_times(20_000, 1.0, generator, "logit_normal")
    assert 0 < float(uniform.min()) and float(uniform.max()) < 1
    assert abs(float((uniform > 0.9).float().mean()) - 0.10) < 0.01
    assert float((logit_normal > 0.9).float().mean()) < 0.03
    shifted = training_times(20_000, 3.0, generator, "uniform")
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)  # shift 3 maps u = 0.5 to 0.75
    with pytest.raises(ValueError, match="time sampling"):
        training_times(4, 1.0, generator, "beta")


def test_task_weights_set_the_pretraining_task_mix():
    def task_shares(data):
        prompts, _ = data.batch(3000)
        tags = [next(t for t, records in zip(TASKS, data.by_task) if p in {r["prompt"] for r in records}) for p in prompts]
        return {task: tags.count(task) / len(tags) for task in TASKS}

    equal = task_shares(RenderedPrompts(0))
    assert all(abs(share - 1 / 6) < 0.03 for share in equal.values())
    weighted = task_shares(RenderedPrompts(0, task_weights={"colors": 4, "color_attr": 0}))
    assert abs(weighted["colors"] - 4 / 8) < 0.03 and weighted["color_attr"] == 0  # 4 of 4 + 1 + 1 + 1 + 1
    assert abs(weighted["counting"] - 1 / 8) < 0.03


def test_colour_captions_name_the_drawn_colours_in_that_share_of_colour_free_prompts():
    from elborl.shapes.detector import PaletteColorClassifier, ShapesDetector
    from elborl.shapes.world import COLORS
    from elborl.sampling import to_uint8

    prompts_off, _ = RenderedPrompts(0).batch(600)
    assert prompts_off == RenderedPrompts(0, colour_captions=0.0).batch(600)[0]  # off = the old stream
    named = lambda prompts: sum(any(f" {c} " in p for c in COLORS) for p in prompts) / len(prompts)
    half = RenderedPrompts(0, colour_captions=0.5).batch(1200)[0]
    every = RenderedPrompts(0, colour_captions=1.0)
    prompts_all, images = every.batch(60)
    # colors and color_attr always name colours (1/3 of the stream); the rest: none, half or all of it
    assert abs(named(prompts_off) - 1 / 3) < 0.05
    assert abs(named(half) - (1 / 3 + 2 / 3 * 0.5)) < 0.05
    assert named(prompts_all) == 1.0
    # the image shows the colours the caption names
    detector, classify = ShapesDetector(), PaletteColorClassifier()
    for prompt, image in zip(prompts_all[:20], to_uint8(images)):
        detections = [d for d in detector(image) if d.score > 0.3]
        drawn = {classify(image, [d], d.label)[0] for d in detections}
        assert drawn and all(colour in prompt.split() for colour in drawn), (prompt, drawn)
