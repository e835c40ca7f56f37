"""Stage `train`: fit the GPT to ``[SOS, C(label), w1 ... wP]`` token sequences.

nanoGPT's habits: AdamW with decoupled weight decay on matrices only, linear
warmup then cosine decay, gradient clipping, bf16 autocast where supported,
periodic held-out evaluation, and a plain-dict checkpoint
``{model, optimizer, model_args, iter_num, ...}`` written atomically.

The data order, and which sequences get the null class (SOS at the class
position; all of them with ``conditioning = "none"``, a ``p_uncond`` share for
classifier-free guidance), are pure functions of (seed, iteration), so a resumed
run sees the same batches as an uninterrupted one. Under torchrun the ranks split
each global batch (nefgpt.distributed). Scalars also go to TensorBoard (RUN/tb)
when it is installed.
"""

from __future__ import annotations

import csv
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .artifacts import atomic_path, load_checkpoint, save_checkpoint, save_json
from .config import TrainConfig
from .errors import ArtifactError, NefgptError, UsageError
from .fit import load_split
from .model import GPT, GPTConfig
from .tokenizer import TOKENIZER_FILE, Vocab, load_tokenizer, load_tokens

CKPT_FILE = "ckpt.pt"
LOG_FILE = "train_log.csv"
SUMMARY_FILE = "train.json"
TB_DIR = "tb"  # TensorBoard scalars, when tensorboard is installed
LOG_COLUMNS = ("iter", "lr", "train_loss", "val_loss", "tokens_per_s", "elapsed_s")


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a checkpoint of the last completed iteration was saved."""


class NonFiniteLoss(NefgptError):
    """The training loss became NaN or infinite (on every rank alike)."""


@contextmanager
def deferred_sigint() -> Iterator[list[int]]:
    """Turn Ctrl-C into a flag (a non-empty list) that the training loop checks between steps.

    A KeyboardInterrupt raised mid-step could leave the weights updated but not
    the optimizer state; deferring it lets the loop save a consistent checkpoint.
    A second Ctrl-C interrupts at once, keeping the last periodic checkpoint.
    """
    hits: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    # Only the main thread may set handlers; an ignored SIGINT (e.g. nohup) stays ignored.
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield hits
        return

    def handler(signum, frame):
        hits.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def build_sequences(tokens: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(N, P) code tokens -> (N, P + 2) sequences ``[SOS, C(label), w1 .. wP]``."""
    n = tokens.shape[0]
    sos = torch.full((n, 1), vocab.sos, dtype=torch.long)
    cls = vocab.class_token(labels.long()).view(n, 1)
    return torch.cat([sos, cls, tokens.long()], dim=1)


def sequence_loss(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the weight tokens only (the SOS and class inputs are given)."""
    logits = model(seq[:, :-1])[:, 1:]  # the prediction made at the class token is w1
    targets = seq[:, 2:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch_indices(n: int, batch_size: int, iteration: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `iteration`: epochs of seeded permutations, last partial batch dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, j = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * batch_size : (j + 1) * batch_size]


def lr_at(it: int, cfg: TrainConfig) -> float:
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1)
    min_lr = cfg.lr * cfg.min_lr_frac
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device = cuda, but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it fast; None means plain fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() or name == "bf16" else None
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.no_grad()
def evaluate_loss(model: GPT, seqs: torch.Tensor, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in seqs.split(batch_size):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = sequence_loss(model, chunk.to(device))
        total += float(loss) * len(chunk)
        count += len(chunk)
    model.train()
    return total / max(count, 1)


def model_config(cfg: TrainConfig, vocab: Vocab, num_params: int) -> GPTConfig:
    return GPTConfig(block_size=num_params + 2, vocab_size=vocab.size, num_codes=vocab.num_codes,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, head_dim=cfg.head_dim,
                     dropout=cfg.dropout, bias=cfg.bias)


def null_class_mask(n: int, iteration: int, cfg: TrainConfig) -> torch.Tensor:
    """Which of the n sequences of `iteration`'s batch get the null class: a pure function of (seed, iteration)."""
    if cfg.conditioning == "none":
        return torch.ones(n, dtype=torch.bool)
    if cfg.p_uncond <= 0:
        return torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(cfg.seed * 10_000_019 + 7_919 + iteration)
    return torch.rand(n, generator=g) < cfg.p_uncond


def training_batch(train_seqs: torch.Tensor, cfg: TrainConfig, iteration: int, null: int,
                   group: distributed.Group | None = None) -> torch.Tensor:
    """The global batch of `iteration`, its class tokens dropped to `null` where the mask says, or this rank's share."""
    batch = train_seqs[batch_indices(len(train_seqs), cfg.batch_size, iteration, cfg.seed)]
    batch[null_class_mask(len(batch), iteration, cfg), 1] = null  # indexing copied, train_seqs is untouched
    return batch[group.shard(len(batch))] if group else batch


def train_steps(model: GPT, optimizer: torch.optim.Optimizer, train_seqs: torch.Tensor, cfg: TrainConfig,
                null: int, start: int, device: torch.device, amp: torch.dtype | None,
                group: distributed.Group | None, after_step: Callable[[int, float, bool], None] | None) -> None:
    """Iterations start .. max_iters - 1; `after_step(done, train_loss, interrupted)` does rank 0's bookkeeping."""
    net = group.wrap(model, device) if group else model
    step_fn = torch.compile(sequence_loss) if cfg.compile else sequence_loss
    rank = group.rank if group else 0
    with deferred_sigint() as interrupted:
        for it in range(start, cfg.max_iters):
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_at(it, cfg)
            batch = training_batch(train_seqs, cfg, it, null, group).to(device)
            if cfg.dropout > 0:  # dropout masks depend on the iteration (and rank) only
                torch.manual_seed(cfg.seed * 1_000_003 + it + rank * 7_777_777)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = step_fn(net, batch)
            # One all-reduce: every rank sees the global batch's loss and any rank's Ctrl-C, so all stop alike.
            train_loss, stop = group.agree(loss, bool(interrupted)) if group else (loss.item(), False)
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"train: loss became {train_loss} at iteration {it}; the last good checkpoint is kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            # Checked only here, between steps, so an interrupted checkpoint is exactly the state after it + 1.
            stop = stop or (group is None and bool(interrupted))
            if after_step:
                after_step(it + 1, train_loss, stop)
            if stop:
                raise TrainInterrupted(f"interrupted at iteration {it + 1}")


def run_train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
              restart: bool = False) -> dict:
    """Train, or continue from ``ckpt.pt`` with `resume`; `restart` ignores (and later replaces) it.

    Under torchrun this runs on rank 0, which hands the other ranks their start (see nefgpt.distributed).
    """
    codebook, vocab, spec, tok_id = load_tokenizer(run_dir / TOKENIZER_FILE)
    tokens, labels = load_tokens(run_dir, tok_id)
    split = load_split(run_dir)
    seqs = build_sequences(tokens, labels, vocab)
    if cfg.conditioning == "none":
        seqs[:, 1] = vocab.sos  # an unconditional model: every sequence has the null class (SOS at the class slot)
    train_seqs = seqs[torch.tensor(split["train"], dtype=torch.long)]
    val_seqs = seqs[torch.tensor(split["heldout"], dtype=torch.long)]

    group = distributed.current()
    if group:
        group.check_batch(cfg.batch_size)
    device = group.device(resolve_device(cfg.device)) if group else resolve_device(cfg.device)
    amp = autocast_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model_args = model_config(cfg, vocab, spec.num_params)
    try:
        model = GPT(model_args).to(device)
    except ValueError as exc:
        raise UsageError(f"train: {exc}") from None
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    ckpt_path = run_dir / CKPT_FILE
    log_path = run_dir / LOG_FILE
    start_iter, best_val, elapsed_before = 0, float("inf"), 0.0
    if ckpt_path.exists() and not (restart and not resume):
        if not resume:
            raise NefgptError(f"{ckpt_path}: a checkpoint from an earlier training exists; pass --resume to continue from it or --force to start over")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("tokenizer_id") != tok_id:
            raise ArtifactError(f"{ckpt_path}: trained with another tokenizer ({ckpt.get('tokenizer_id')} vs {tok_id})")
        if ckpt["model_args"] != model_args.to_dict():
            raise ArtifactError(f"{ckpt_path}: model settings differ from the config; use --force to restart")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        truncate_log(log_path, start_iter)
    else:
        log_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
    if group:
        group.send({"op": "train", "cfg": vars(cfg).copy(), "train_seqs": train_seqs.to(torch.int16),
                    "model_args": model_args.to_dict(), "null": vocab.sos, "start": start_iter,
                    "model": distributed.cpu_state(model.state_dict()),
                    "optimizer": distributed.cpu_state(optimizer.state_dict())})
        group.state = "training"

    tokens_per_iter = cfg.batch_size * (seqs.shape[1] - 1)
    t0 = time.time()

    def save(it: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args.to_dict(),
            "iter_num": it, "best_val_loss": best_val, "tokenizer_id": tok_id, "config": vars(cfg).copy(),
            "elapsed_s": elapsed_before + time.time() - t0,
        })

    last = {"t": time.time()}
    scalars = Scalars(run_dir, start_iter)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", disable=not progress)

    def after_step(done: int, train_loss: float, interrupted: bool) -> None:
        nonlocal best_val
        bar.update(1)
        lr = lr_at(done - 1, cfg)
        scalars.add(done, {"train/loss": train_loss, "lr": lr})
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            val_loss = evaluate_loss(model, val_seqs, cfg.batch_size, device, amp)
            best_val = min(best_val, val_loss)
            now = time.time()
            rate = tokens_per_iter * (done - max(start_iter, done - cfg.eval_interval)) / max(now - last["t"], 1e-9)
            last["t"] = now
            append_log(log_path, [done, f"{lr:.6g}", f"{train_loss:.5f}", f"{val_loss:.5f}",
                                   f"{rate:.0f}", f"{elapsed_before + now - t0:.1f}"])
            scalars.add(done, {"val/loss": val_loss, "tokens_per_s": rate})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if interrupted or done % cfg.ckpt_interval == 0 or done == cfg.max_iters:
            save(done)
        if interrupted:
            raise TrainInterrupted(f"interrupted at iteration {done}; checkpoint saved to {ckpt_path} "
                                   "(resume with --resume)")

    try:
        with bar:
            train_steps(model, optimizer, train_seqs, cfg, vocab.sos, start_iter, device, amp, group, after_step)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{exc} in {ckpt_path}") from None
    finally:
        scalars.close()
    if group:
        group.state = "done"

    final_train = evaluate_loss(model, train_seqs[: len(val_seqs)], cfg.batch_size, device, amp)
    final_val = evaluate_loss(model, val_seqs, cfg.batch_size, device, amp)
    summary = {
        "iterations": cfg.max_iters,
        "train_loss": final_train,
        "val_loss": final_val,
        "best_val_loss": min(best_val, final_val),
        "num_params": model.num_params(),
        "device": str(device),
        "autocast": str(amp) if amp else "fp32",
        "train_seconds": elapsed_before + time.time() - t0,
        "tokenizer_id": tok_id,
        "conditioning": cfg.conditioning,
        "p_uncond": cfg.p_uncond,
        "processes": group.world_size if group else 1,
    }
    save_json(run_dir / SUMMARY_FILE, summary)
    return summary


class Scalars:
    """TensorBoard scalars in RUN/tb when tensorboard is installed; nothing otherwise (the CSV log is always written).

    The writer opens at the first value, so a run that fails before its first step leaves no tb/ behind.
    On resume, events after the checkpoint's iteration (from the interrupted run) are purged.
    """

    def __init__(self, run_dir: Path, start_iter: int) -> None:
        self.path, self.start, self.writer = run_dir / TB_DIR, start_iter, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # not installed, or an incompatible install: CSV only
            self.cls = None
        else:
            self.cls = SummaryWriter

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.cls is None:
            return
        if self.writer is None:
            self.writer = self.cls(str(self.path), purge_step=self.start + 1 if self.start else None)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_done(run_dir: Path, cfg: TrainConfig) -> bool:
    ckpt_path = run_dir / CKPT_FILE
    if not ckpt_path.exists() or not (run_dir / SUMMARY_FILE).exists():
        return False
    return int(load_checkpoint(ckpt_path)["iter_num"]) >= cfg.max_iters


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    ckpt = load_checkpoint(run_dir / CKPT_FILE)
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: does not hold a valid GPT ({str(exc).splitlines()[0][:160]})") from None
    return model.to(device).eval(), ckpt


def append_log(path: Path, row: list) -> None:
    """One row of the training CSV log (every model writes these columns, so one loss figure serves all)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow(row)


def truncate_log(path: Path, upto: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    rows = list(csv.reader(path.open()))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= upto]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows(kept)
