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

- ``train``: the config, the training sequences, and the model and optimizer state
  to start from (fresh or resumed); the follower builds the same model and runs the
  same loop on its share of every batch, then waits for the next order;
- ``stop``: exit (training is done or was skipped, or failed before it began).

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
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

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


class Group:
    """The default process group, with the leader/follower protocol."""

    def __init__(self, where: Placement) -> None:
        self.rank, self.world_size, self.local_rank = where.rank, where.world_size, where.local_rank
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=TIMEOUT)
        self.state = "idle"  # idle -> training -> done (leader); an order is due in idle and done

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, order: dict) -> None:
        dist.broadcast_object_list([order], src=0)

    def receive(self) -> dict:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
        if group.state != "training":
            group.send({"op": "stop"})
        _GROUP = None
        group.close()


def follow() -> int:
    """Ranks > 0: join the group and carry out the leader's orders; the exit code is 0 unless this rank failed.

    Rank 0 reports errors and interrupts, and its exit code is the run's: a follower that exited non-zero
    would make torchrun stop rank 0, perhaps while it saves the checkpoint of an interrupt.
    """
    from .train import NonFiniteLoss, TrainInterrupted

    global _GROUP
    group = _GROUP = Group(placement())  # type: ignore[arg-type]
    try:
        while (order := group.receive())["op"] == "train":
            try:
                follow_train(order, group)
            except (TrainInterrupted, NonFiniteLoss):  # stops shared by every rank: rank 0 reports them
                return 0
        return 0
    finally:
        _GROUP = None
        group.close()


def follow_train(order: dict, group: Group) -> None:
    """A rank > 0's part of the training that rank 0 ordered: the same loop on its share of each batch."""
    from .config import TrainConfig
    from .model import GPT, GPTConfig
    from .train import autocast_dtype, resolve_device, train_steps

    cfg = TrainConfig(**order["cfg"])
    device = group.device(resolve_device(cfg.device))
    model = GPT(GPTConfig(**order["model_args"])).to(device)
    model.load_state_dict(order["model"])
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    optimizer.load_state_dict(order["optimizer"])
    train_steps(model, optimizer, order["train_seqs"].long(), cfg, order["null"], order["start"], device,
                autocast_dtype(cfg.dtype, device), group, None, float(order.get("elapsed_before", 0.0)))
