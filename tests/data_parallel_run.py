"""A tiny rounds run in one process of a data-parallel job (launched by tests/test_distributed.py with torchrun):

    torchrun --standalone --nproc_per_node 2 tests/data_parallel_run.py RUN_DIR ROUNDS CONFIG_JSON [--die-after-rollout]

Every process builds the same tiny model; `--die-after-rollout` runs ROUNDS - 1 rounds and the next round's
rollout, then every process exits at once without a word (a job killed mid-round)."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TINY  # noqa: E402
from test_rl_loop import METAS, brightness  # noqa: E402
from elborl.config import Params  # noqa: E402
from elborl.models.shapes_model import ShapesFlowModel  # noqa: E402
from elborl.policy import PolicyConfig  # noqa: E402
from elborl.rl import RLConfig  # noqa: E402
from elborl.rounds import RunContext, rollout_stage, run_rounds  # noqa: E402


def main(run_dir: str, rounds: int, config: dict, die_after_rollout: bool) -> None:
    torch.set_num_threads(1)
    params = Params(policy=PolicyConfig(lora_rank=4, lora_alpha=8), rl=RLConfig(**config))
    ctx = RunContext(run_dir, params, backbone=ShapesFlowModel.from_config(TINY, seed=0), train_metas=METAS)
    assert ctx.processes.world == int(os.environ["WORLD_SIZE"])
    if die_after_rollout:
        run_rounds(ctx, brightness, rounds=rounds - 1, progress=False)
        rollout_stage(ctx, rounds - 1)
        os._exit(9)
    run_rounds(ctx, brightness, rounds=rounds, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), "--die-after-rollout" in sys.argv)
