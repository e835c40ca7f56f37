"""Data-parallel training (DistributedDataParallel) across processes started by torchrun.

``torchrun --nproc_per_node=N -m nefgpt.cli train --out RUN`` starts N copies of the
command; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
tells each its place. With WORLD_SIZE > 1 the copies form one process group (gloo for
CPU tensors, and NCCL for CUDA tensors where CUDA is available) and split each batch.

Roles: rank 0, the *leader*, runs the ordinary command. It alone takes the run
directory's lock, reads the artifacts, and writes the config, checkpoints, logs and
JSON. Ranks > 0, the *followers*, never touch the run directory (so on several nodes
only rank 0's node needs it): they join the group and wait for one of the leader's
orders, sent with ``broadcast_object_list``:

- a `TrainOrder`: the config, the training sequences, and the model and optimizer
  state to start from (fresh or resumed); the follower builds the same model and runs
  the same loop on its share of every batch, then waits for the next order;
- ``STOP``: exit (training is done or was skipped, or failed before it began).

`Group` keeps the protocol's state; the training itself is the caller's (the leader's
nefgpt.train, and the `train` callback a follower gets), so this module knows nothing
of models.

Inside the loop, one small all-reduce per step averages the loss (the logged loss
is that of the whole global batch) and ORs the Ctrl-C flag, so a non-finite loss or
an interrupt ends every rank at the same step. Followers exit 0 unless they fail
themselves: rank 0 reports, and its exit code is the run's. An error on the leader
alone after training began makes it exit non-zero, and torchrun stops the followers.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .errors import UsageError

TIMEOUT = datetime.timedelta(minutes=30)  # the longest a rank waits for the others (rank 0 evaluating, say)


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int


def placement() -> Placement | None:
    """This process's place in a torchrun launch; None for one process (no torchrun, or WORLD_SIZE 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UsageError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers; launch with torchrun") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is outside 0..{world - 1}")
    return Placement(rank, world, local)


def is_follower() -> bool:
    p = placement()
    return p is not None and p.rank > 0


@dataclass
class TrainOrder:
    """The leader's `train` order: what a follower needs to run the same loop on its share of every batch."""

    cfg: TrainConfig
    model_args: dict  # GPTConfig.to_dict()
    model: dict  # state dicts on the CPU (cpu_state): each rank moves them to its own device
    optimizer: dict
    train_seqs: torch.Tensor  # (N, T) int16, the training sequences
    null: int  # the null-class token
    start: int  # the iteration to start from
    elapsed_before: float = 0.0  # training time of earlier runs (a resume continues the same budget)
    first_layer: int = 0  # weight positions of the field's first layer (train.first_layer_weight)


STOP = "stop"  # the other order: exit


class Group:
    """The default process group, with the leader/follower protocol.

    The leader's state runs idle -> training -> done. An order is due in idle and done (the followers
    wait for one); in training the followers are inside the loop and stop at the same step on their own.
    """

    def __init__(self, where: Placement) -> None:
        self.rank, self.world_size, self.local_rank = where.rank, where.world_size, where.local_rank
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=TIMEOUT)
        self.state = "idle"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def start_training(self, order: TrainOrder) -> None:
        """Leader: hand the followers their start; from now on they are in the loop."""
        if self.state != "idle":
            raise RuntimeError(f"a train order in state {self.state}")
        self._send(order)
        self.state = "training"

    def end_training(self) -> None:
        """Leader: the loop ended on every rank; the followers wait for the next order."""
        self.state = "done"

    def release(self) -> None:
        """Leader, on the way out: tell followers that wait for an order to exit."""
        if self.state != "training":
            self._send(STOP)
            # Tear the group down only when no rank is still inside a collective: destroying gloo's pairs
            # while the peer reads the STOP aborted the process at exit ("terminate called without an
            # active exception") on a loaded 2-core machine. Followers meet this barrier after the STOP.
            dist.barrier()

    def next_order(self) -> TrainOrder | None:
        """Follower: the leader's next order; None means exit."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0] if isinstance(box[0], TrainOrder) else None

    def _send(self, order: TrainOrder | str) -> None:
        dist.broadcast_object_list([order], src=0)

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (LOCAL_RANK) when training on CUDA."""
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise UsageError(f"train.batch_size {batch_size} must be divisible by the {self.world_size} processes")

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n rows (a remainder of n % world is left out)."""
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def agree(self, loss: torch.Tensor, interrupted: bool, elapsed_s: float) -> tuple[float, bool, float]:
        """(mean loss over the ranks, whether any rank was interrupted, the largest elapsed time), alike on every rank."""
        t = torch.tensor([float(loss.detach()), float(interrupted)], dtype=torch.float64)
        dist.all_reduce(t)
        clock = torch.tensor([elapsed_s], dtype=torch.float64)
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)
        return float(t[0]) / self.world_size, bool(t[1] > 0), float(clock[0])

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def cpu_state(state: Any) -> Any:
    """A (nested) state dict with its tensors on the CPU, to send: each rank moves them to its own device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: cpu_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_state(v) for v in state)
    return state


_GROUP: Group | None = None


def current() -> Group | None:
    """The process group of a distributed `train`, or None in a single process."""
    return _GROUP


@contextmanager
def leading(command: str) -> Iterator[None]:
    """Rank 0's side of a torchrun launch, around the whole command; nothing without torchrun.

    Joins the group, refuses commands other than `train`, and on the way out tells
    the followers to stop unless they are inside the training loop.
    """
    global _GROUP
    where = placement()
    if where is None:
        yield
        return
    group = _GROUP = Group(where)
    try:
        if command != "train":
            raise UsageError(f"only `nefgpt train` runs under torchrun, not `{command}`; run it as one process")
        yield
    finally:
        # Followers inside the loop stop at the same step on their own (a shared interrupt or non-finite loss),
        # or are ended by torchrun when the leader exits with an error.
        group.release()
        _GROUP = None
        group.close()


def follow(train: Callable[[TrainOrder, Group], bool]) -> int:
    """Ranks > 0: join the group and carry out the leader's orders; the exit code is 0 unless this rank failed.

    `train` runs one order's training on this rank (nefgpt.train.follow_train); it returns False when the
    training ended in a stop that every rank shares (an interrupt, a non-finite loss): the leader then exits
    without another order, and reports the stop. A follower that exited non-zero would make torchrun stop
    rank 0, perhaps while it saves the checkpoint of an interrupt.
    """
    global _GROUP
    group = _GROUP = Group(placement())  # type: ignore[arg-type]
    try:
        while (order := group.next_order()) is not None:
            if not train(order, group):
                return 0
        dist.barrier()  # the leader's, after its STOP (Group.release)
        return 0
    finally:
        _GROUP = None
        group.close()
