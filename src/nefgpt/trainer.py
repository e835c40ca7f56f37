"""The one training loop that the GPT and the trained baselines share (in the spirit of minGPT's Trainer).

A model plugs in through a `Task`: it draws the batch of an iteration, computes its loss, scores the
held-out set, and adds its own content to the checkpoint. The `Trainer` owns everything else, alike
for every model: the learning-rate schedule (warmup, then cosine over the faster of the iteration and
wall-clock budgets), dropout seeding per iteration and rank, autocast, the finite-loss check, gradient
clipping, Ctrl-C / SIGTERM deferred to a step boundary, evaluation with the CSV log and TensorBoard
scalars, periodic checkpoints, exact resume and the summary in train.json.

Exact resume rests on two rules: a task draws everything random from generators seeded by
(seed, iteration), and the global RNG is reseeded before each step that uses dropout. A checkpoint
holds the state after its iteration, so a resumed run takes the same steps as an uninterrupted one.
Under torchrun each rank runs `Trainer.steps` on its share of every batch; only rank 0 has a
`run_dir` and does the bookkeeping.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch
from tqdm import tqdm

from . import hardware
from .artifacts import save_json
from .checkpoint import save_checkpoint
from .errors import NefgptError, UsageError
from .layout import CKPT_FILE, LOG_FILE, LOSS_FIGURE_FILE, SUMMARY_FILE, TB_DIR
from .train_log import Scalars, append_log, truncate_log

if TYPE_CHECKING:
    from .distributed import Group

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, after a checkpoint of the last completed iteration was saved.

    `signum` is the signal that stopped it: the CLI exits 128 + signum (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class NonFiniteLoss(NefgptError):
    """The training loss became NaN or infinite (on every rank alike)."""


def stop_word(signum: int) -> str:
    """How a stop by `signum` is reported: "terminated" for SIGTERM, "interrupted" for Ctrl-C."""
    return "terminated" if signum == signal.SIGTERM else "interrupted"


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Turn Ctrl-C and SIGTERM into a flag that the training loop checks between steps.

    The flag is a list of the signal numbers that arrived (non-empty once one did).
    A KeyboardInterrupt raised mid-step could leave the weights updated but not
    the optimizer state; deferring it lets the loop save a consistent checkpoint.
    A second signal interrupts at once, keeping the last periodic checkpoint: Ctrl-C
    raises KeyboardInterrupt, SIGTERM gets the handler it had before (the CLI's
    raises `errors.Terminated`). The previous handlers are restored on the way out.
    """
    hits: list[int] = []
    # Only the main thread may set handlers.
    if threading.current_thread() is not threading.main_thread():
        yield hits
        return
    previous = {s: signal.getsignal(s) for s in DEFERRED_SIGNALS}
    # An ignored signal (SIGINT under nohup or `cmd &`, SIGTERM ignored by a parent) stays ignored.
    deferred = [s for s in DEFERRED_SIGNALS if previous[s] is not signal.SIG_IGN]
    # getsignal gives None for a handler not set from Python: SIGINT's is then Python's usual one.
    restore = {s: previous[s] if previous[s] is not None else
               (signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL) for s in deferred}
    at_once = {s: signal.default_int_handler if s == signal.SIGINT else restore[s] for s in deferred}

    def handler(signum, frame):
        hits.append(signum)
        for s in deferred:
            signal.signal(s, at_once[s])

    for s in deferred:
        signal.signal(s, handler)
    try:
        yield hits
    finally:
        for s in deferred:
            signal.signal(s, restore[s])


class LoopConfig(Protocol):
    """The settings the loop reads; TrainConfig and DiffusionConfig both have them."""

    lr: float
    min_lr_frac: float
    warmup_iters: int
    max_iters: int
    max_minutes: float
    grad_clip: float
    dropout: float
    eval_interval: int
    ckpt_interval: int
    seed: int


def lr_at(it: int, cfg: LoopConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay over progress = max(iterations, elapsed time) / budget.

    With ``cfg.max_minutes > 0`` the schedule is budgeted training ("Cramming"): whichever of the
    iteration and wall-clock budgets runs out first drives the decay, so a slow CPU still ends at the
    minimum learning rate. ``max_minutes = 0`` makes the schedule a pure function of the iteration.
    """
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1)
    if cfg.max_minutes > 0:
        progress = max(progress, elapsed_s / (60 * cfg.max_minutes))
    min_lr = cfg.lr * cfg.min_lr_frac
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def batch_indices(n: int, batch_size: int, iteration: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `iteration`: epochs of seeded permutations, last partial batch dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, j = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * batch_size : (j + 1) * batch_size]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decoupled decay on matrices and tables, none on biases and norms."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting} = cuda, but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it fast; None means plain fp32.

    "auto" picks fp32 on a CPU without native bf16 (AVX2-only machines emulate it slowly) and whenever
    NEFGPT_AUTOCAST=fp32 is set.
    """
    if name == "fp32":
        return None
    if name == "auto" and not hardware.bf16_autocast_allowed():
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() or name == "bf16" else None
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and hardware.cpu_has_bf16() else None


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


class Task:
    """What a model brings to the loop. `model`, `optimizer` and `model_args` go into every checkpoint."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    model_args: dict

    def batch(self, it: int) -> Any:
        """The inputs of iteration `it` (this rank's share), from generators seeded by the iteration."""
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        """The training loss of a batch; runs under autocast."""
        raise NotImplementedError

    def evaluate(self) -> float:
        """The held-out loss, for the log (rank 0 only)."""
        return float("nan")

    def checkpoint(self) -> dict:
        """What this model's checkpoint holds besides the loop's keys."""
        return {}

    def restore(self, ckpt: dict) -> None:
        """On resume, after the loop restored model and optimizer: this model's own checkpoint content."""

    def after_step(self) -> None:
        """After each optimizer step (on every rank), e.g. to update a weight average."""

    def finish(self) -> None:
        """After the last step, before the final checkpoint."""


class Trainer:
    """Runs a `Task` from `start` until max_iters or the max_minutes budget; rank 0 (with a `run_dir`) keeps the books."""

    def __init__(self, task: Task, cfg: LoopConfig, device: torch.device, amp: torch.dtype | None, *,
                 run_dir: Path | None = None, group: Group | None = None, progress: bool = False,
                 desc: str = "train", tokens_per_iter: int = 0, start: int = 0, elapsed_before: float = 0.0) -> None:
        self.task, self.cfg, self.device, self.amp, self.group = task, cfg, device, amp, group
        self.run_dir, self.progress, self.desc, self.tokens_per_iter = run_dir, progress, desc, tokens_per_iter
        # elapsed_before: the training time of earlier runs of this training (a resume continues the same budget)
        self.start, self.elapsed_before, self.best_val = start, elapsed_before, float("inf")
        self.done, self.stopped_by = start, "max_iters"
        self.t0 = time.time()
        self.bar: tqdm | None = None
        self.scalars: Scalars | None = None
        self.ckpt_path, self.log_path = (run_dir / CKPT_FILE, run_dir / LOG_FILE) if run_dir else (None, None)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def fresh(self) -> None:
        """Start from iteration 0: the log and scalars of an earlier training go."""
        self.log_path.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / TB_DIR, ignore_errors=True)

    def resume(self, ckpt: dict) -> None:
        """Continue from a checkpoint that the caller checked to fit this model; log rows after it go."""
        self.task.model.load_state_dict(ckpt["model"])
        self.task.optimizer.load_state_dict(ckpt["optimizer"])
        self.task.restore(ckpt)
        self.start = self.done = int(ckpt["iter_num"])
        self.best_val = float(ckpt["best_val_loss"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        truncate_log(self.log_path, self.start)

    def save(self, it: int) -> None:
        t = self.task
        save_checkpoint(self.ckpt_path, {
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "model_args": t.model_args,
            "iter_num": it, "best_val_loss": self.best_val, **t.checkpoint(), "elapsed_s": self.elapsed(),
        })

    def train(self) -> tuple[int, str]:
        """The whole training on one process: the loop with its bookkeeping, then the final checkpoint."""
        with self.bookkeeping():
            self.steps()
        self.finish()
        return self.done, self.stopped_by

    @contextmanager
    def bookkeeping(self) -> Iterator[None]:
        """Rank 0's progress bar and scalars around `steps`; a non-finite loss names the checkpoint kept."""
        self.bar = tqdm(total=self.cfg.max_iters, initial=self.start, desc=self.desc, disable=not self.progress)
        self.scalars = Scalars(self.run_dir, self.start)  # type: ignore[arg-type]
        self.last_t, self.last_it = time.time(), self.start
        try:
            with self.bar:
                yield
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc} in {self.ckpt_path}") from None
        finally:
            self.scalars.close()

    def finish(self) -> None:
        self.task.finish()
        self.save(self.done)  # also when nothing was left to train: the checkpoint is complete either way

    def steps(self) -> tuple[int, str]:
        """The loop, on every rank; returns (iterations done, what stopped it: max_iters or max_minutes)."""
        cfg, task, group = self.cfg, self.task, self.group
        rank = group.rank if group else 0
        budget_s = 60 * cfg.max_minutes
        self.t0 = time.time()
        if self.start >= cfg.max_iters or (budget_s > 0 and self.elapsed_before >= budget_s):
            self.stopped_by = "max_iters" if self.start >= cfg.max_iters else "max_minutes"
            return self.done, self.stopped_by
        with deferred_signals() as interrupted:
            for it in range(self.start, cfg.max_iters):
                batch = task.batch(it)
                if cfg.dropout > 0:  # dropout masks depend on the iteration (and rank) only
                    torch.manual_seed(cfg.seed * 1_000_003 + it + rank * 7_777_777)
                with autocast(self.device, self.amp):
                    loss = task.loss(batch)
                elapsed = self.elapsed()
                # One all-reduce: every rank sees the global batch's loss, any rank's Ctrl-C and the slowest rank's
                # clock, so all ranks set the same learning rate and stop at the same step.
                if group:
                    train_loss, stop, elapsed = group.agree(loss, bool(interrupted), elapsed)
                else:
                    train_loss, stop = loss.item(), False
                if not math.isfinite(train_loss):
                    raise NonFiniteLoss(f"train: loss became {train_loss} at iteration {it}; "
                                        "the last good checkpoint is kept")
                lr = lr_at(it, cfg, elapsed)
                for param_group in task.optimizer.param_groups:
                    param_group["lr"] = lr * param_group.get("lr_mult", 1.0)
                task.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(task.model.parameters(), cfg.grad_clip)
                task.optimizer.step()
                task.after_step()
                self.done = it + 1
                # Checked only here, between steps, so an interrupted checkpoint is exactly the state after it + 1.
                stop = stop or (group is None and bool(interrupted))
                signum = (interrupted[0] if interrupted else signal.SIGINT) if stop else 0
                out_of_time = budget_s > 0 and elapsed >= budget_s
                final = self.done == cfg.max_iters or out_of_time
                if self.run_dir is not None:
                    self.after_step(train_loss, signum, final, lr)
                if signum:
                    raise TrainInterrupted(f"{stop_word(signum)} at iteration {self.done}", signum)
                if out_of_time:
                    self.stopped_by = "max_minutes"
                    return self.done, self.stopped_by
        self.stopped_by = "max_iters"
        return self.done, self.stopped_by

    def after_step(self, train_loss: float, signum: int, final: bool, lr: float) -> None:
        """Rank 0's books after a step: bar and scalars, evaluation and log, checkpoints, the interrupt."""
        cfg, done = self.cfg, self.done
        assert self.bar is not None and self.scalars is not None, "steps() on rank 0 runs inside bookkeeping()"
        self.bar.update(1)
        self.scalars.add(done, {"train/loss": train_loss, "lr": lr})
        if cfg.max_minutes > 0:
            self.bar.set_description(f"{self.desc} ({self.elapsed() / 60:.1f}/{cfg.max_minutes:g} min)", refresh=False)
        if done % cfg.eval_interval == 0 or final:
            val_loss = self.task.evaluate()
            self.best_val = min(self.best_val, val_loss)
            now = time.time()
            # Every model counts its tokens per second: GPT tokens, or weights for the baselines.
            rate = self.tokens_per_iter * (done - self.last_it) / max(now - self.last_t, 1e-9)
            self.last_t, self.last_it = now, done
            append_log(self.log_path, [done, f"{lr:.6g}", f"{train_loss:.5f}", f"{val_loss:.5f}",
                                       f"{rate:.0f}", f"{self.elapsed_before + now - self.t0:.1f}"])
            self.scalars.add(done, {"val/loss": val_loss, "tokens_per_s": rate})
            self.bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if signum or (done % cfg.ckpt_interval == 0 and not final):  # the final one is written by finish()
            self.save(done)
        if signum:
            raise TrainInterrupted(f"{stop_word(signum)} at iteration {done}; checkpoint saved to {self.ckpt_path} "
                                   "(resume with --resume)", signum)

    def summary(self, train_loss: float, val_loss: float, head: dict | None = None, tail: dict | None = None) -> dict:
        """train.json's content: the loop's figures between the model's own `head` and `tail` entries."""
        return {
            **(head or {}),
            "iterations": self.done,
            "stopped_by": self.stopped_by,  # max_iters, or max_minutes when the wall-clock budget ran out first
            "max_iters": self.cfg.max_iters,
            "max_minutes": self.cfg.max_minutes,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": min(self.best_val, val_loss),
            "num_params": sum(p.numel() for p in self.task.model.parameters()),
            "device": str(self.device),
            "autocast": str(self.amp) if self.amp else "fp32",
            "train_seconds": self.elapsed(),
            **(tail or {}),
        }

    def write_summary(self, summary: dict, loss_label: str | None = None) -> dict:
        """train.json, and with `loss_label` the loss curve of the log (the CLI draws the GPT's)."""
        save_json(self.run_dir / SUMMARY_FILE, summary)
        if loss_label and self.log_path.exists():
            from .figures import save_loss_curve  # matplotlib, only once training is done

            save_loss_curve(self.run_dir / LOSS_FIGURE_FILE, self.log_path, loss_label)
        return summary
