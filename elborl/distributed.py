"""Data parallelism for a run in one job of several processes (`torchrun`, `accelerate launch`): which share of
the work is this process's, and the few collectives that put the shares back together.

A round splits as the method needs it (METHOD.md §2-§4): every group of G samples stays whole on one process,
so rollouts and rewards are computed where the group was sampled and gathered before the group advantages;
the update's micro-batches are dealt round-robin and their gradients summed over processes before each
optimizer step, so every process takes the same step and holds the same weights; one process writes the
artifacts. A held-out evaluation splits its images into near-equal consecutive shares (each image has its own
seed, so a share samples what one process would), gathered before the scores are summed up. With one process
every method here is the identity.

The process group comes from accelerate (`PartialState`: gloo on CPU, NCCL on GPUs); the collectives are
torch.distributed's, on the device the backend moves (NCCL only moves CUDA tensors).
"""

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
import os
import tempfile

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Processes:
    """This process's place among the job's `world` processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> "Processes":
        """The job this process belongs to: one process unless a launcher set WORLD_SIZE > 1."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # without cpu=True accelerate sees a CPU-only job as one process (it looks for GPUs to be distributed over);
        # the other processes wait in a collective while the main one evaluates held-out prompts, which on SD3.5-M
        # can outlast the default 30-minute timeout
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT)
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def launched_rank() -> int:
        """This process's rank as the launcher set it, without joining the process group (0 when not launched)."""
        return int(os.environ.get("RANK", "0"))

    # --- shares -------------------------------------------------------------------------------------
    def group_share(self, groups: int) -> range:
        """The consecutive groups this process samples and scores (equal shares; checked by `check_groups`)."""
        per_process = groups // self.world
        return range(self.rank * per_process, (self.rank + 1) * per_process)

    def check_groups(self, groups: int) -> None:
        if groups % self.world:
            raise ValueError(f"rl.prompts_per_epoch ({groups}) must be a multiple of the number of processes "
                             f"({self.world}): every process samples whole groups, the same number of them")

    def sample_share(self, groups: int, group_size: int) -> slice:
        """This process's samples of `groups` consecutive groups of `group_size`: its share of whole groups."""
        self.check_groups(groups)
        share = self.group_share(groups)
        return slice(share.start * group_size, share.stop * group_size)

    def even_share(self, items: int) -> slice:
        """This process's consecutive share of `items`: ceil(items / world) each, the last ones shorter."""
        per_process = -(-items // self.world)
        return slice(min(items, self.rank * per_process), min(items, (self.rank + 1) * per_process))

    def owns_micro_batch(self, index: int) -> bool:
        """Micro-batches of an optimizer step are dealt round-robin."""
        return index % self.world == self.rank

    # --- collectives (all processes call them in the same order) ------------------------------------
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's equally long `tensor` concatenated in rank order along dim 0."""
        if self.world == 1:
            return tensor
        moved = _on_backend_device(tensor.contiguous())
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        dist.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)

    def gather_objects(self, value) -> list:
        """Every process's picklable `value` in rank order (small metadata only: statistics, score lists)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def gather_to_main(self, value) -> list | None:
        """Every process's picklable `value` in rank order on the main process, None on the others (large
        results only the main process writes, such as a held-out evaluation's images)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def sum_gradients(self, parameters) -> None:
        """Sums each parameter's gradient over processes in place (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)

    def agree(self, value: bool) -> bool:
        """The main process's `value`, on every process (a decision all must take alike)."""
        if self.world == 1:
            return value
        flag = _on_backend_device(torch.tensor([int(value)]))
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def publish(self, store, uri: str, write, meta: dict, log=print, everyone: bool = True) -> None:
        """`write`'s artifact published at `uri` by `store` (an elborl.store.ArtifactStore) unless it already is.
        Every process runs `write` (its work holds collectives; `everyone=False`: the main process's alone, into a
        scratch directory elsewhere), the main process publishes, and all wait until it has."""
        if self.world == 1:
            store.publish(uri, write, meta, log=log)
            return
        if self.agree(store.exists(uri)):
            log(f"{uri}: already published, skipped")
            return
        if self.is_main:
            store.publish(uri, write, meta, log=log)
        elif everyone:
            with tempfile.TemporaryDirectory() as scratch:
                write(Path(scratch))
        self.barrier()


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the process group's backend can send it: NCCL only moves CUDA tensors (this process's GPU,
    which accelerate selected), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor.cpu()


SINGLE = Processes()
