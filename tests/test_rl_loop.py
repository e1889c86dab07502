import json

import pytest
import torch

from elborl.config import Params
from elborl.geneval.prompts import shapes_test_set
from elborl.evaluate import EvalConfig, evaluate
from elborl.models.shapes_model import ShapesFlowModel
from elborl.policy import Policy, PolicyConfig
from elborl.rewards import MultiReward, make_reward
from elborl.rl import RLConfig, rollout, update, make_optimizer
from elborl.rounds import HeldOut, RunContext, evaluations, round_metrics, run_rounds

from conftest import TINY

METAS = [{"tag": "colors", "prompt": "a photo of a red circle"}, {"tag": "counting", "prompt": "a photo of two squares"}]


def brightness(images, metas):
    return images.astype("float32").mean(axis=(1, 2, 3)) / 255


def tiny_policy(finetune="lora") -> Policy:
    return Policy(ShapesFlowModel.from_config(TINY, seed=0), PolicyConfig(finetune=finetune, lora_rank=4, lora_alpha=8))


def small_config(**overrides) -> RLConfig:
    return RLConfig(**{"prompts_per_epoch": 2, "group_size": 3, "steps": 3, "micro_batch": 8, "lr": 1e-2,
                       **overrides})


def rows(path):
    return [json.loads(line) for line in open(path)]


def tiny_run(run_dir, config: RLConfig, reward=brightness, policy: PolicyConfig | None = None, backbone=None,
             **run_options) -> RunContext:
    """A rounds run of the tiny model in this process (what the main job and the benchmarks do); `backbone`
    stands in for a fresh tiny model (a second process resuming the run builds its own)."""
    policy = policy or PolicyConfig(lora_rank=4, lora_alpha=8)
    ctx = RunContext(str(run_dir), Params(policy=policy, rl=config), log=lambda *_: None,
                     backbone=backbone or ShapesFlowModel.from_config(TINY, seed=0), train_metas=METAS)
    run_rounds(ctx, reward, progress=run_options.pop("progress", False), **run_options)
    return ctx


def trained_policy(ctx: RunContext) -> Policy:
    return ctx.policy_after(ctx.completed_rounds() - 1)[0]


@pytest.mark.parametrize("finetune,precision", [("lora", "float32"), ("full", "float32"), ("lora", "bfloat16")])
def test_delta_is_exactly_zero_for_every_term_on_the_first_update(finetune, precision):
    policy, config = tiny_policy(finetune), small_config(update_precision=precision)
    ro = rollout(policy, METAS, config, epoch=0)
    metrics = update(policy, make_optimizer(policy, config), ro, torch.rand(len(ro.seeds)), config, epoch=0)
    assert metrics["delta_abs_max"] == 0.0 and metrics["ratio_min"] == 1.0 == metrics["ratio_max"]
    assert metrics["grad_norm"] > 0


def test_elbo_terms_under_cfg_take_the_old_policy_at_the_sampling_guidance_and_theta_at_the_training_one():
    def first_update(**settings):
        policy, config = tiny_policy(), small_config(**settings)
        ro = rollout(policy, METAS, config, epoch=0)
        return update(policy, make_optimizer(policy, config), ro, torch.rand(len(ro.seeds)), config, epoch=0)

    # the same guidance for both: the same guided velocity, δ = 0 exactly while θ_old = θ
    same = first_update(guidance=3.0, train_guidance=3.0, reference_guidance=3.0, kl_beta=1e-3)
    assert same["delta_abs_max"] == 0.0 and same["grad_norm"] > 0 and same["kl"] == 0.0
    # θ trained without guidance against θ_old as it sampled (G = 3): the two ELBOs differ from the first step
    mixed = first_update(guidance=3.0, train_guidance=1.0)
    assert mixed["delta_abs_max"] > 1e-3


def without_seconds(metric_rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in metric_rows]


def test_a_run_resumed_in_a_new_process_matches_a_straight_run(tmp_path):
    straight = tiny_run(tmp_path / "straight", small_config(epochs=4))
    tiny_run(tmp_path / "resumed", small_config(epochs=4), rounds=2)
    # a fresh process: a new model, the state only from the published rounds
    resumed = tiny_run(tmp_path / "resumed", small_config(epochs=4))
    expected, got = trained_policy(straight).state_dict(), trained_policy(resumed).state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_seconds(round_metrics(straight)) == without_seconds(round_metrics(resumed))


def test_bad_settings_are_rejected_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="rl.objective: unknown objective 'ppo'"):
        tiny_run(tmp_path, small_config(objective="ppo"))
    assert not (tmp_path / "round-00000").exists()
    with pytest.raises(ValueError, match="group_size"):
        small_config(group_size=1).validate()


def test_a_short_run_raises_a_simple_reward(tmp_path):
    """PEPG + adaptive ELBO on mean brightness: the reward climbs (a flipped gradient sign would lower it)."""
    config = RLConfig(prompts_per_epoch=2, group_size=4, steps=3, epochs=10, lr=1e-3, micro_batch=32,
                      advantage="std", kl_beta=0.0)
    ctx = tiny_run(tmp_path, config, policy=PolicyConfig(finetune="full"))
    rewards = [r["reward_mean"] for r in round_metrics(ctx)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.015, rewards


def test_epoch_prompts_are_balanced_over_tasks():
    from elborl.rl import choose_prompts

    skewed = [{"tag": "color_attr", "prompt": f"p{i}"} for i in range(90)] + [{"tag": "counting", "prompt": "c"}]
    picks = [m["tag"] for e in range(50) for m in choose_prompts(skewed, small_config(prompts_per_epoch=4), e)]
    assert 0.35 < picks.count("counting") / len(picks) < 0.65  # uniform over prompts would give ~0.01
    assert choose_prompts(skewed, small_config(), 3) == choose_prompts(skewed, small_config(), 3)


def test_task_weights_shift_the_epoch_prompts_between_tasks():
    from elborl.rl import choose_prompts

    skewed = [{"tag": "color_attr", "prompt": f"p{i}"} for i in range(90)] + [{"tag": "counting", "prompt": "c"}]
    config = small_config(prompts_per_epoch=4, task_weights={"color_attr": 0.25})
    picks = [m["tag"] for e in range(100) for m in choose_prompts(skewed, config, e)]
    assert 0.7 < picks.count("counting") / len(picks) < 0.9  # 1 / (1 + 0.25) = 0.8
    never = small_config(task_weights={"color_attr": 0.0})
    assert {m["tag"] for e in range(20) for m in choose_prompts(skewed, never, e)} == {"counting"}
    with pytest.raises(ValueError, match="without training prompts: \\['colors'\\]"):
        choose_prompts(skewed, small_config(task_weights={"colors": 2.0}), 0)
    with pytest.raises(ValueError, match="task_weights"):
        small_config(task_weights={"counting": -1.0}).validate()


def test_bfloat16_rollouts_stay_close_to_float32_and_are_recorded():
    policy = tiny_policy()
    exact = rollout(policy, METAS, small_config(), epoch=0)
    low = rollout(policy, METAS, small_config(rollout_precision="bfloat16"), epoch=0)
    assert low.x0.dtype == torch.float32 and not torch.equal(low.x0, exact.x0)
    assert (low.x0 - exact.x0).abs().mean() < 0.05 * exact.x0.abs().mean()
    assert low.records()[0]["precision"] == "bfloat16" and "precision" not in exact.records()[0]
    with pytest.raises(ValueError, match="rl.rollout_precision: bfloat16 rollouts need rl.estimator: elbo"):
        small_config(rollout_precision="bfloat16", estimator="trajectory", sampler="sde").validate()
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        small_config(rollout_precision="float16").validate()


def epoch_gradient(config) -> torch.Tensor:
    policy = tiny_policy()
    ro = rollout(policy, METAS, config, epoch=0)
    update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0), ro, torch.arange(6.0), config, epoch=0)
    return torch.cat([p.grad.reshape(-1) for p in policy.trainable_parameters()])


def test_bfloat16_updates_give_nearly_the_float32_gradient():
    exact = epoch_gradient(small_config(kl_beta=0.0))
    low = epoch_gradient(small_config(kl_beta=0.0, update_precision="bfloat16"))
    assert not torch.equal(low, exact)  # autocast did change the arithmetic
    assert torch.nn.functional.cosine_similarity(low, exact, dim=0) > 0.95
    with pytest.raises(ValueError, match="rl.update_precision: bfloat16 updates need rl.estimator: elbo"):
        small_config(update_precision="bfloat16", estimator="trajectory", sampler="sde").validate()
    with pytest.raises(ValueError, match="rl.update_precision: unknown precision 'half'"):
        small_config(update_precision="half").validate()


def test_adam_momentum_is_the_configured_one():
    policy = tiny_policy()
    assert make_optimizer(policy, small_config(adam_beta1=0.98)).param_groups[0]["betas"] == (0.98, 0.999)
    with pytest.raises(ValueError, match="rl.adam_beta1: must be in \\[0, 1\\), got 1.0"):
        small_config(adam_beta1=1.0).validate()


def test_held_out_evaluations_start_before_training_and_end_with_the_final_policy(tmp_path):
    test_metas, calls = shapes_test_set()[:2], []

    def counted_evaluation(backbone):
        calls.append(1)
        return evaluate(backbone, test_metas, EvalConfig(images_per_prompt=1, steps=2), progress=False)

    ctx = tiny_run(tmp_path, small_config(epochs=3), held_out=HeldOut(counted_evaluation, every=2))
    assert [e["epoch"] for e in evaluations(ctx)] == [0, 2, 3] and len(calls) == 3
    assert (tmp_path / "evals" / "00002" / "grid.png").exists()
    assert [e["train_seconds"] for e in evaluations(ctx)][1:] == [round_metrics(ctx)[r]["train_seconds"] for r in (1, 2)]
    # the caller's evaluation of the base model stands in for the first; a finished run evaluates nothing more
    base = evaluate(ShapesFlowModel.from_config(TINY, seed=0), test_metas, EvalConfig(images_per_prompt=1, steps=2))
    other = tiny_run(tmp_path / "other", small_config(epochs=1), held_out=HeldOut(counted_evaluation, 0, lambda: base))
    assert len(calls) == 4 and evaluations(other)[0]["overall"] == base[0]["overall"]
    tiny_run(tmp_path, small_config(epochs=3), held_out=HeldOut(counted_evaluation, every=2))
    assert len(calls) == 4


def test_a_multi_reward_logs_the_mean_of_each_reward(tmp_path):
    reward = MultiReward({"brightness": brightness, "jpeg": make_reward("jpeg_compressibility")},
                         {"brightness": 1.0, "jpeg": 0.0})  # weight 0: logged, not trained on
    row = round_metrics(tiny_run(tmp_path, small_config(epochs=1), reward))[0]
    assert row["score/brightness"] == pytest.approx(row["reward_mean"]) and row["score/jpeg"] < 0


def test_a_wall_clock_budget_ends_the_run_and_shows_minutes(tmp_path, capsys):
    ctx = tiny_run(tmp_path, small_config(epochs=100_000), max_train_seconds=0.0, progress=True)
    assert [r["epoch"] for r in round_metrics(ctx)] == [0]  # the first round already spends the 0 s budget
    bar = capsys.readouterr().err
    assert "training minutes" in bar and "/0.0 min" in bar and "/100000" not in bar  # no meaningless round total
    tiny_run(tmp_path, small_config(epochs=100_000), max_train_seconds=0.0)  # resumed: the budget is spent
    assert ctx.completed_rounds() == 1


def test_the_evaluation_ema_moves_after_every_optimizer_step_with_a_warm_up():
    """METHOD.md §4, transcribed here: after optimizer step s (0-based), ema <- d ema + (1 - d) θ with
    d = min((1 + s) / (10 + s), 0.9); two epochs of 3 steps each, checked against θ recorded after every step."""
    policy, config = tiny_policy(), small_config(optimizer_steps_per_epoch=3, ema_decay=0.9)
    optimizer = make_optimizer(policy, config)
    expected = {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}
    step_count = [0]
    original_step = optimizer.step

    def step_and_record(*args, **kwargs):
        result = original_step(*args, **kwargs)
        s = step_count[0]
        decay = min((1 + s) / (10 + s), 0.9)
        for n, p in policy.trainable_named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach()
        step_count[0] += 1
        return result

    optimizer.step = step_and_record
    for epoch in range(2):
        ro = rollout(policy, METAS, config, epoch=epoch)
        update(policy, optimizer, ro, torch.rand(len(ro.seeds)), config, epoch=epoch)
    assert step_count[0] == 6
    for n in expected:
        torch.testing.assert_close(policy.ema[n], expected[n], rtol=1e-5, atol=1e-7)
    # the first step's decay is 0.1: the EMA already sits close to θ, not to the base model
    moved = {n: (policy.ema[n] - p).abs().max() for n, p in policy.trainable_named_parameters()}
    assert max(float(v.detach()) for v in moved.values()) > 0
