import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elborl.config import Params
from elborl.geneval.prompts import write_jsonl
from elborl.models.shapes_model import ShapesFlowModel
from elborl.policy import PolicyConfig
from elborl.rewards import MultiReward, make_reward
from elborl.rounds import RunContext, round_metrics, round_uri, rollout_stage, run_rounds, score_stage, update_stage
from elborl.store import ArtifactStore

from conftest import TINY
from test_rl_loop import METAS, brightness, small_config, tiny_run, trained_policy, without_seconds

POLICY = PolicyConfig(lora_rank=4, lora_alpha=8)


def published_inputs(tmp_path, root: str) -> tuple[str, str]:
    """The tiny base model and the training prompts, published as artifacts under `root`."""
    ShapesFlowModel.from_config(TINY, seed=0).save_pretrained(tmp_path / "base")
    (tmp_path / "prompts").mkdir()
    write_jsonl(tmp_path / "prompts" / "train.jsonl", [{**m, "include": []} for m in METAS])
    store = ArtifactStore()
    store.put_artifact(tmp_path / "base", f"{root}/base")
    store.put_artifact(tmp_path / "prompts", f"{root}/prompts")
    return f"{root}/base", f"{root}/prompts"


def context(tmp_path, root: str, epochs: int = 2, log=print) -> RunContext:
    base, prompts = published_inputs(tmp_path, root) if not (tmp_path / "base").exists() else (f"{root}/base", f"{root}/prompts")
    params = Params(policy=POLICY, rl=small_config(epochs=epochs))
    return RunContext(f"{root}/run", params, base, prompts, cache=tmp_path / "cache", log=log)


def assert_same_as_one_process_run(ctx: RunContext, tmp_path, epochs: int, reward=brightness):
    """`ctx`'s run, however its stages ran, ends with exactly the weights and metrics of the same run in one
    process from the base model in memory."""
    straight = tiny_run(tmp_path / "straight", ctx.params.rl, reward, POLICY,
                        ShapesFlowModel.from_pretrained(tmp_path / "base"), rounds=epochs)
    staged = RunContext(ctx.run, ctx.params, ctx.base_model, cache=tmp_path / "cache").policy_after(epochs - 1)[0]
    expected, got = trained_policy(straight).state_dict(), staged.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_seconds(round_metrics(straight)) == without_seconds(round_metrics(ctx))


def each_stage_in_its_own_process(ctx: RunContext, reward, rounds: int) -> None:
    """Every stage with a fresh context, as stages in separate containers run: nothing carried in memory."""
    def fresh():
        return RunContext(ctx.run, ctx.params, ctx.base_model, ctx.prompts, cache=ctx.cache, log=ctx.log)

    for r in range(rounds):
        rollout_stage(fresh(), r)
        score_stage(fresh(), r, reward)
        update_stage(fresh(), r)


def test_stages_in_separate_processes_give_exactly_the_one_process_run(tmp_path):
    ctx = context(tmp_path, str(tmp_path / "store"))
    # several rewards: the per-reward means (score/<name>) reach the rounds' metrics
    reward = MultiReward({"brightness": brightness, "jpeg": make_reward("jpeg_compressibility")},
                         {"brightness": 1.0, "jpeg": 0.0})
    each_stage_in_its_own_process(ctx, reward, 2)
    assert ctx.completed_rounds() == 2
    assert_same_as_one_process_run(ctx, tmp_path, epochs=2, reward=reward)
    assert {"score/brightness", "score/jpeg"} <= round_metrics(ctx)[0].keys()
    samples = [json.loads(line) for line in open(tmp_path / "store/run/round-00001/rollout/samples.jsonl")]
    assert {"prompt", "seed", "group", "sampler", "steps", "shift", "guidance"} <= samples[0].keys()


def test_a_killed_run_resumes_at_the_first_incomplete_round(tmp_path):
    messages = []
    ctx = context(tmp_path, str(tmp_path / "store"), epochs=3, log=messages.append)
    run_rounds(ctx, brightness, rounds=1, progress=False)
    rollout_stage(ctx, 1)  # killed after round 1's rollout and score, before its update
    score_stage(ctx, 1, brightness)
    assert ctx.completed_rounds() == 1

    scored = []

    def counted_brightness(images, metas):
        scored.append(len(images))
        return brightness(images, metas)

    run_rounds(ctx, counted_brightness, progress=False)  # resumes at round 1, reusing its rollout and score
    assert len(scored) == 1  # only round 2 was scored
    assert any("round-00001/score: already published" in m for m in messages)
    assert_same_as_one_process_run(ctx, tmp_path, epochs=3)


def test_a_stage_under_other_settings_refuses_the_run(tmp_path):
    ctx = context(tmp_path, str(tmp_path / "store"))
    rollout_stage(ctx, 0)
    other = RunContext(ctx.run, Params(policy=POLICY, rl=small_config(epochs=2, lr=5e-3)),
                       ctx.base_model, ctx.prompts)
    with pytest.raises(ValueError, match="changed: rl.lr"):
        update_stage(other, 0)


def test_a_stage_without_its_input_says_what_is_missing(tmp_path):
    ctx = context(tmp_path, str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="round-00000/rollout"):
        score_stage(ctx, 0, brightness)


def test_rounds_run_against_a_real_s3_server(tmp_path, s3_env):
    s3_env.create_bucket("runs")
    ctx = context(tmp_path, "s3://runs/tiny")
    run_rounds(ctx, brightness, rounds=2, progress=False)
    assert ctx.store.exists(round_uri(ctx.run, 1, "update"))
    assert_same_as_one_process_run(ctx, tmp_path, epochs=2)


def test_the_minutes_bar_takes_a_last_round_far_past_the_budget():
    from elborl.rounds import RoundsProgress

    row = {"reward_mean": 0.5, "seconds_reward": 0.0, "seconds_update": 0.0}
    minutes = RoundsProgress()
    minutes.start(0, 100, 0.0, max_train_seconds=60.0)  # a 1-minute budget
    minutes.round_done(1, {**row, "seconds_rollout": 24.0})
    minutes.round_done(2, {**row, "seconds_rollout": 150.0})  # the last round of a large model: minutes past it
    assert minutes.bar.n == minutes.bar.total == 1.0 and "1.0/1.0 min" in str(minutes.bar)
    minutes.close()
    rounds = RoundsProgress()
    rounds.start(0, 3, 0.0, None)
    rounds.round_done(1, {**row, "seconds_rollout": 24.0})
    assert rounds.bar.n == 1
    rounds.close()


def test_a_run_records_its_identity_and_refuses_other_settings(tmp_path):
    """run.json holds the run's one identity: its policy and RL settings and what its caller adds (base model,
    rewards, a benchmark's budget). A stage that knows less checks what it knows; other settings are refused with
    the keys named; a record that lacks a group gets it; a setting added later matches at its default."""
    from dataclasses import replace

    from elborl.config import Params

    run = str(tmp_path / "run")
    params = Params(policy=POLICY, rl=small_config(epochs=1))
    stage = RunContext(run, params)  # a stage in its own process: no identity beyond policy and RL
    stage.check_settings()
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(recorded) == {"policy", "rl"} and recorded["rl"]["epochs"] == 1
    job = RunContext(run, params, identity={"base": "a62d18e5dc56", "budget": {"minutes": 60}})
    job.check_settings()  # the group the record lacked is added
    assert json.loads((tmp_path / "run" / "run.json").read_text())["budget"] == {"minutes": 60}
    stage.check_settings()  # knows less, agrees on what it knows
    with pytest.raises(ValueError, match=r"other settings \(changed: rl\.lr\)"):
        RunContext(run, Params(policy=POLICY, rl=replace(params.rl, lr=0.5))).check_settings()
    with pytest.raises(ValueError, match=r"changed: budget\.minutes"):
        RunContext(run, params, identity={"base": "a62d18e5dc56", "budget": {"minutes": 15}}).check_settings()
    older = json.loads((tmp_path / "run" / "run.json").read_text())
    del older["rl"]["ema_decay"]  # a run recorded before the setting existed
    (tmp_path / "run" / "run.json").write_text(json.dumps(older))
    stage.check_settings()  # this run keeps the default ema_decay
    with pytest.raises(ValueError, match=r"changed: rl\.ema_decay"):
        RunContext(run, Params(policy=POLICY, rl=replace(params.rl, ema_decay=0.5))).check_settings()


def test_an_update_publishes_the_same_bytes_whatever_the_process_rng_was(tmp_path):
    """torch seeds its global generator from the OS in each process; a round's published state (the RNG's among
    it) must depend on the settings alone, so a stage in a container publishes what it publishes in-process."""
    digests = []
    for name, process_seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        ctx = context(tmp_path / name, str(tmp_path / name / "store"))
        torch.manual_seed(process_seed)  # what another process would have started from
        rollout_stage(ctx, 0)
        score_stage(ctx, 0, brightness)
        update_stage(ctx, 0)
        manifest = json.loads((tmp_path / name / "store/run/round-00000/update/manifest.json").read_text())
        digests.append({f["path"]: f["sha256"] for f in manifest["files"]})
    assert "rng.safetensors" in digests[0] and digests[0] == digests[1]


def nan_for_round(bad_round: int, value=float("nan")):
    """Brightness, except that one image of round `bad_round` (by call count) scores `value`."""
    calls = []

    def reward(images, metas):
        calls.append(1)
        scores = brightness(images, metas)
        if len(calls) == bad_round + 1:
            scores[0] = value
        return scores

    return reward


def round_1_with_a_nan_reward(tmp_path, name: str, max_nonfinite_steps: int, log) -> RunContext:
    """A run whose round 0 is good and whose round 1 has one NaN reward, up to round 1's update."""
    (tmp_path / name).mkdir()
    ctx = context(tmp_path / name, str(tmp_path / name / "store"), epochs=3, log=log)
    ctx = RunContext(ctx.run, Params(policy=POLICY, rl=replace(ctx.params.rl, max_nonfinite_steps=max_nonfinite_steps)),
                     ctx.base_model, ctx.prompts, cache=ctx.cache, log=log)
    reward = nan_for_round(1)
    rollout_stage(ctx, 0)
    score_stage(ctx, 0, reward)
    update_stage(ctx, 0)
    rollout_stage(ctx, 1)
    score_stage(ctx, 1, reward)
    return ctx


def test_non_finite_steps_are_skipped_and_the_run_stops_past_the_limit_at_its_last_good_round(tmp_path):
    # a NaN reward poisons every step's gradient: each is skipped, and past the limit the run stops unpublished
    logs = []
    limited = round_1_with_a_nan_reward(tmp_path, "limited", 0, logs.append)
    with pytest.raises(FloatingPointError, match=r"round 1 not published: \d+ optimizer steps .* over "
                                                 r"rl.max_nonfinite_steps = 0 \(1 of \d+ rewards are NaN"):
        update_stage(limited, 1)
    assert limited.completed_rounds() == 1 and not (tmp_path / "limited/store/run/round-00001/update").exists()
    assert "round 1: skipped" in logs[-1] and "rewards are NaN or infinite" in logs[-1]

    # under the limit the round is published with the steps it skipped; θ and its EMA did not move (θ_old takes
    # its scheduled soft update towards θ)
    ctx = round_1_with_a_nan_reward(tmp_path, "allowed", 8, logs.append)
    good = {k: v.clone() for k, v in ctx.policy_after(0)[0].state_dict().items()}
    update_stage(ctx, 1)
    metrics = round_metrics(ctx)
    assert metrics[1]["nonfinite_steps"] == ctx.params.rl.optimizer_steps_per_epoch
    assert metrics[0]["nonfinite_steps"] == 0
    after = RunContext(ctx.run, ctx.params, ctx.base_model, cache=ctx.cache).policy_after(1)[0].state_dict()
    moved = [k for k in good if not k.startswith("old/") and not torch.equal(after[k], good[k])]
    assert not moved and any(k.startswith("ema/") for k in good)


def test_an_overflowing_loss_is_named_as_such(tmp_path):
    """Finite rewards so far apart that their advantages overflow float32: the steps are skipped, and the cause
    named is the loss, not the rewards."""
    logs = []
    ctx = context(tmp_path, str(tmp_path / "store"), epochs=1, log=logs.append)
    rollout_stage(ctx, 0)
    score_stage(ctx, 0, nan_for_round(0, value=-3e38))
    update_stage(ctx, 0)
    assert round_metrics(ctx)[0]["nonfinite_steps"] > 0
    assert any("the rewards are finite: the loss or its gradient overflowed" in line for line in logs)


def test_a_full_disk_while_writing_a_round_names_it_and_the_run_resumes_when_there_is_room(tmp_path, monkeypatch):
    import errno

    from elborl import checkpoint

    ctx = context(tmp_path, str(tmp_path / "store"), epochs=1)
    rollout_stage(ctx, 0)
    score_stage(ctx, 0, brightness)
    real_save = checkpoint.save_file

    def full_after_a_few_bytes(tensors, path):  # the device fills up while the policy state is written
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_after_a_few_bytes)
    with pytest.raises(OSError, match=r"no space left on device while making .*round-00000/update.* nothing was "
                                      r"published") as raised:
        update_stage(ctx, 0)
    assert raised.value.errno == errno.ENOSPC
    assert ctx.completed_rounds() == 0 and not (tmp_path / "store/run/round-00000/update").exists()
    assert (tmp_path / "store/run/round-00000/score/manifest.json").exists()  # the round's inputs stand

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    fresh = RunContext(ctx.run, ctx.params, ctx.base_model, ctx.prompts, cache=ctx.cache)
    update_stage(fresh, 0)  # room again: the round completes as it would have
    assert_same_as_one_process_run(fresh, tmp_path, epochs=1)
