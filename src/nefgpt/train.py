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

from . import distributed, hardware
from .artifacts import atomic_path, load_checkpoint, save_checkpoint, save_json
from .config import TrainConfig
from .errors import ArtifactError, NefgptError, UsageError
from .field import FieldSpec
from .layout import TOKENIZER_FILE
from .model import GPT, GPTConfig
from .split import load_split
from .tokenizer import Vocab, load_tokenizer, load_tokens

CKPT_FILE = "ckpt.pt"
LOG_FILE = "train_log.csv"
SUMMARY_FILE = "train.json"
TB_DIR = "tb"  # TensorBoard scalars, when tensorboard is installed
LOG_COLUMNS = ("iter", "lr", "train_loss", "val_loss", "tokens_per_s", "elapsed_s")


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, after a checkpoint of the last completed iteration was saved.

    `signum` is the signal that stopped it: the CLI exits 128 + signum (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


def stop_word(signum: int) -> str:
    """How a stop by `signum` is reported: "terminated" for SIGTERM, "interrupted" for Ctrl-C."""
    return "terminated" if signum == signal.SIGTERM else "interrupted"


class NonFiniteLoss(NefgptError):
    """The training loss became NaN or infinite (on every rank alike)."""


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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




def build_sequences(tokens: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(N, P) code tokens -> (N, P + 2) sequences ``[SOS, C(label), w1 .. wP]``."""
    n = tokens.shape[0]
    sos = torch.full((n, 1), vocab.sos, dtype=torch.long)
    cls = vocab.class_token(labels.long()).view(n, 1)
    return torch.cat([sos, cls, tokens.long()], dim=1)


def sequence_loss(model: GPT, seq: torch.Tensor, hl_sigma: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the weight tokens only (the SOS and class inputs are given).

    `hl_sigma` > 0 (train.hl_sigma, training only) scores against HL-Gauss targets, see `hl_gauss_loss`.
    """
    logits = model(seq[:, :-1])[:, 1:]  # the prediction made at the class token is w1
    targets = seq[:, 2:]
    return hl_gauss_loss(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), hl_sigma)


def hl_gauss_loss(logits: torch.Tensor, targets: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean cross-entropy of logits (N, K) against HL-Gauss targets (Farebrother et al. 2024); sigma 0 is one-hot.

    The codebook is sorted, so code indices order the values. The target of code y puts on each code j the
    mass of N(y, sigma^2) over its bin [j - 1/2, j + 1/2], kept within ceil(4 sigma) codes of y and inside the
    codebook, renormalized. Only that band of log-probabilities is gathered: no (N, K) target matrix.
    """
    if sigma == 0:
        return F.cross_entropy(logits, targets)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"hl_sigma must be a finite number >= 0, got {sigma}")
    k = logits.shape[-1]
    r = min(math.ceil(4 * sigma), k - 1)
    offsets = torch.arange(-r, r + 1, device=logits.device)
    edge = (offsets.double() + 0.5) / (sigma * math.sqrt(2))
    mass = (0.5 * (torch.special.erf(edge) - torch.special.erf(edge - 1 / (sigma * math.sqrt(2))))).float()
    codes = targets[:, None] + offsets  # (N, 2r + 1)
    inside = (codes >= 0) & (codes < k)
    weight = mass * inside
    weight = weight / weight.sum(dim=1, keepdim=True)
    logp = logits.log_softmax(dim=-1).gather(1, codes.clamp(0, k - 1))
    return -(weight * logp).sum(dim=1).mean()


def batch_indices(n: int, batch_size: int, iteration: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `iteration`: epochs of seeded permutations, last partial batch dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, j = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * batch_size : (j + 1) * batch_size]


def lr_at(it: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device = cuda, but no CUDA device is available")
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


@torch.no_grad()
def evaluate_loss(model: GPT, seqs: torch.Tensor, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in seqs.split(batch_size):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = sequence_loss(model, chunk.to(device))  # always the plain CE, whatever train.hl_sigma is
        total += float(loss) * len(chunk)
        count += len(chunk)
    model.train()
    return total / max(count, 1)


def model_config(cfg: TrainConfig, vocab: Vocab, num_params: int, spec: FieldSpec | None = None) -> GPTConfig:
    """The GPT of `cfg`; train.struct_pos needs the field's `spec` (its layer widths go into the model args)."""
    sizes: tuple[int, ...] = ()
    if cfg.struct_pos:  # only then: model args of runs without it stay as they were
        if spec is None:
            raise ValueError("train.struct_pos needs the field architecture")
        sizes = (spec.layer_shapes[0][1], *(out for out, _ in spec.layer_shapes))
    return GPTConfig(block_size=num_params + 2, vocab_size=vocab.size, num_codes=vocab.num_codes,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, head_dim=cfg.head_dim,
                     dropout=cfg.dropout, bias=cfg.bias, class_embed=cfg.class_embed, pos_bias=cfg.pos_bias,
                     value_embed=cfg.value_embed, struct_pos=cfg.struct_pos, field_sizes=sizes)


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
                group: distributed.Group | None, after_step: Callable[[int, float, bool, bool, float], None] | None,
                elapsed_before: float = 0.0) -> tuple[int, str]:
    """Iterations from `start` until max_iters or the max_minutes budget; returns (iterations done, what stopped it).

    `after_step(done, train_loss, interrupted, final, lr)` does rank 0's bookkeeping. `elapsed_before` is the
    training time of earlier runs of this training (a resume continues the same budget).
    """
    net = group.wrap(model, device) if group else model
    step_fn = torch.compile(sequence_loss) if cfg.compile else sequence_loss
    rank = group.rank if group else 0
    budget_s = 60 * cfg.max_minutes
    t0 = time.time()
    done = start
    if start >= cfg.max_iters or (budget_s > 0 and elapsed_before >= budget_s):
        return done, "max_iters" if start >= cfg.max_iters else "max_minutes"
    with deferred_signals() as interrupted:
        for it in range(start, cfg.max_iters):
            batch = training_batch(train_seqs, cfg, it, null, group).to(device)
            if cfg.dropout > 0:  # dropout masks depend on the iteration (and rank) only
                torch.manual_seed(cfg.seed * 1_000_003 + it + rank * 7_777_777)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = step_fn(net, batch, cfg.hl_sigma)
            elapsed = elapsed_before + time.time() - t0
            # One all-reduce: every rank sees the global batch's loss, any rank's Ctrl-C and the slowest rank's
            # clock, so all ranks set the same learning rate and stop at the same step.
            if group:
                train_loss, stop, elapsed = group.agree(loss, bool(interrupted), elapsed)
            else:
                train_loss, stop = loss.item(), False
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"train: loss became {train_loss} at iteration {it}; the last good checkpoint is kept")
            lr = lr_at(it, cfg, elapsed)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr * param_group.get("lr_mult", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            done = it + 1
            # Checked only here, between steps, so an interrupted checkpoint is exactly the state after it + 1.
            stop = stop or (group is None and bool(interrupted))
            stop = stop and (interrupted[0] if interrupted else signal.SIGINT)  # the signal number (truthy), or False
            out_of_time = budget_s > 0 and elapsed >= budget_s
            final = done == cfg.max_iters or out_of_time
            if after_step:
                after_step(done, train_loss, stop, final, lr)
            if stop:
                raise TrainInterrupted(f"{stop_word(stop)} at iteration {done}", stop)
            if out_of_time:
                return done, "max_minutes"
    return done, "max_iters"


def run_train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
              restart: bool = False) -> dict:
    """Train, or continue from ``ckpt.pt`` with `resume`; `restart` ignores (and later replaces) it.

    Under torchrun this runs on rank 0, which hands the other ranks their start (see nefgpt.distributed).
    """
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    vocab, spec, tok_id = tok.vocab, tok.spec, tok.id
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
    model_args = model_config(cfg, vocab, spec.num_params, spec)
    try:
        model = GPT(model_args).to(device)
    except ValueError as exc:
        raise UsageError(f"train: {exc}") from None
    if model_args.value_embed:  # the codebook's values, into the buffer that the checkpoint keeps
        model.code_values.copy_(tok.codebook)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.pos_bias_decay,
                                          cfg.pos_bias_lr_mult)
    ckpt_path = run_dir / CKPT_FILE
    log_path = run_dir / LOG_FILE
    start_iter, best_val, elapsed_before = 0, float("inf"), 0.0
    if ckpt_path.exists() and not (restart and not resume):
        if not resume:
            raise NefgptError(f"{ckpt_path}: a checkpoint from an earlier training exists; pass --resume to continue from it or --force to start over")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("tokenizer_id") != tok_id:
            raise ArtifactError(f"{ckpt_path}: trained with another tokenizer ({ckpt.get('tokenizer_id')} vs {tok_id})")
        if saved_model_args(ckpt) != model_args.to_dict():
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
                    "optimizer": distributed.cpu_state(optimizer.state_dict()), "elapsed_before": elapsed_before})
        group.state = "training"

    tokens_per_iter = cfg.batch_size * (seqs.shape[1] - 1)
    t0 = time.time()

    def save(it: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args.to_dict(),
            "iter_num": it, "best_val_loss": best_val, "tokenizer_id": tok_id, "config": vars(cfg).copy(),
            "elapsed_s": elapsed_before + time.time() - t0,
        })

    last = {"t": time.time(), "it": start_iter}
    scalars = Scalars(run_dir, start_iter)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", disable=not progress)

    def after_step(done: int, train_loss: float, interrupted: bool, final: bool, lr: float) -> None:
        nonlocal best_val
        bar.update(1)
        scalars.add(done, {"train/loss": train_loss, "lr": lr})
        if cfg.max_minutes > 0:
            bar.set_description(f"train ({(elapsed_before + time.time() - t0) / 60:.1f}/{cfg.max_minutes:g} min)",
                                refresh=False)
        if done % cfg.eval_interval == 0 or final:
            val_loss = evaluate_loss(model, val_seqs, cfg.batch_size, device, amp)
            best_val = min(best_val, val_loss)
            now = time.time()
            rate = tokens_per_iter * (done - last["it"]) / max(now - last["t"], 1e-9)
            last["t"], last["it"] = now, done
            append_log(log_path, [done, f"{lr:.6g}", f"{train_loss:.5f}", f"{val_loss:.5f}",
                                   f"{rate:.0f}", f"{elapsed_before + now - t0:.1f}"])
            scalars.add(done, {"val/loss": val_loss, "tokens_per_s": rate})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if interrupted or done % cfg.ckpt_interval == 0 or final:
            save(done)
        if interrupted:
            raise TrainInterrupted(f"{stop_word(interrupted)} at iteration {done}; checkpoint saved to {ckpt_path} "
                                   "(resume with --resume)", interrupted)

    try:
        with bar:
            reached, stopped_by = train_steps(model, optimizer, train_seqs, cfg, vocab.sos, start_iter, device, amp,
                                              group, after_step, elapsed_before)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{exc} in {ckpt_path}") from None
    finally:
        scalars.close()
    if group:
        group.state = "done"

    final_train = evaluate_loss(model, train_seqs[: len(val_seqs)], cfg.batch_size, device, amp)
    final_val = evaluate_loss(model, val_seqs, cfg.batch_size, device, amp)
    summary = {
        "iterations": reached,
        "stopped_by": stopped_by,  # max_iters, or max_minutes when the wall-clock budget ran out first
        "max_iters": cfg.max_iters,
        "max_minutes": cfg.max_minutes,
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


def saved_model_args(ckpt: dict) -> dict | None:
    """A checkpoint's model args with the keys added since it was written at their defaults (off); None if invalid."""
    try:
        return GPTConfig(**ckpt["model_args"]).to_dict()
    except (TypeError, ValueError):
        return None


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
