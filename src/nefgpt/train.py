"""Stage `train`: fit the GPT to ``[SOS, C(label), w1 ... wP]`` token sequences.

nanoGPT's habits: AdamW with decoupled weight decay on matrices only, linear
warmup then cosine decay, gradient clipping, bf16 autocast where supported,
periodic held-out evaluation, and a plain-dict checkpoint
``{model, optimizer, model_args, iter_num, ...}`` written atomically. The loop
itself is nefgpt.trainer's, shared with the baselines; this module supplies the
GPT's batches, loss and held-out evaluation (`GPTTask`).

The data order, and which sequences get the null class (SOS at the class
position; all of them with ``conditioning = "none"``, a ``p_uncond`` share for
classifier-free guidance), are pure functions of (seed, iteration), so a resumed
run sees the same batches as an uninterrupted one. Under torchrun the ranks split
each global batch (nefgpt.distributed): rank 0 runs `run_train`, the others
`follow_train`. Scalars also go to TensorBoard (RUN/tb) when it is installed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .artifacts import load_metadata
from .checkpoint import load_checkpoint, saved_model_args
from .codebook import Vocab, load_tokenizer, load_tokens
from .config import TrainConfig
from .ema import EMA
from .errors import ArtifactError, NefgptError, UsageError
from .field import FieldSpec
from .fields_io import training_rows
from .layout import CKPT_FILE, TOKENIZER_FILE, TOKENS_FILE
from .model import GPT, GPTConfig
from .split import load_split
# The loop's names, public here before the loop moved to nefgpt.trainer.
from .trainer import (NonFiniteLoss, Task, Trainer, TrainInterrupted, autocast, autocast_dtype, batch_indices,
                      resolve_device)


def build_sequences(tokens: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(N, P) code tokens -> (N, P + 2) sequences ``[SOS, C(label), w1 .. wP]``."""
    n = tokens.shape[0]
    sos = torch.full((n, 1), vocab.sos, dtype=torch.long)
    cls = vocab.class_token(labels.long()).view(n, 1)
    return torch.cat([sos, cls, tokens.long()], dim=1)


def sequence_loss(model: GPT, seq: torch.Tensor, hl_sigma: float = 0.0,
                  position_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the weight tokens only (the SOS and class inputs are given).

    `hl_sigma` > 0 (train.hl_sigma, training only) scores against HL-Gauss targets, see `hl_gauss_loss`.
    `position_weight` (P,), training only: each weight position's share of the loss, a weighted mean.
    """
    logits = model(seq[:, :-1])[:, 1:]  # the prediction made at the class token is w1
    targets = seq[:, 2:]
    flat_logits, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if position_weight is None:
        return hl_gauss_loss(flat_logits, flat_targets, hl_sigma)
    per_token = hl_gauss_loss(flat_logits, flat_targets, hl_sigma, reduction="none").view(targets.shape)
    w = position_weight.to(per_token.device)
    return (per_token * w).sum(1).mean() / w.sum()


def first_layer_weights(num_params: int, first_layer: int, weight: float) -> torch.Tensor | None:
    """train.first_layer_weight: the loss weight of each position, `weight` on the first layer's tokens, else 1.

    Per-layer temperature showed that the first layer's weights decide whether a field is readable
    (docs/results.md); this spends more of the gradient on them. None when the weight is 1 (the plain loss).
    """
    if weight == 1.0:
        return None
    w = torch.ones(num_params)
    w[:first_layer] = weight
    return w


def hl_gauss_loss(logits: torch.Tensor, targets: torch.Tensor, sigma: float, reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy of logits (N, K) against HL-Gauss targets (Farebrother et al. 2024); sigma 0 is one-hot.

    ``reduction = "none"`` gives each row's loss (N,) instead of their mean.

    The codebook is sorted, so code indices order the values. The target of code y puts on each code j the
    mass of N(y, sigma^2) over its bin [j - 1/2, j + 1/2], kept within ceil(4 sigma) codes of y and inside the
    codebook, renormalized. Only that band of log-probabilities is gathered: no (N, K) target matrix.
    """
    if sigma == 0:
        return F.cross_entropy(logits, targets, reduction=reduction)
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
    per_row = -(weight * logp).sum(dim=1)
    return per_row if reduction == "none" else per_row.mean()


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


@torch.no_grad()
def evaluate_loss(model: GPT, seqs: torch.Tensor, batch_size: int, device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in seqs.split(batch_size):
        with autocast(device, amp):
            loss = sequence_loss(model, chunk.to(device))  # always the plain CE, whatever train.hl_sigma is
        total += float(loss) * len(chunk)
        count += len(chunk)
    model.train()
    return total / max(count, 1)


class GPTTask(Task):
    """The GPT's part of the loop: this rank's share of each global batch, the token loss, the held-out CE.

    With an `ema` (train.ema_decay > 0, rank 0 only) the held-out CE is that of the averaged weights,
    the ones `sample` and `tune` use.
    """

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, cfg: TrainConfig, train_seqs: torch.Tensor,
                 null: int, device: torch.device, amp: torch.dtype | None, group: distributed.Group | None = None,
                 val_seqs: torch.Tensor | None = None, extra: dict | None = None, ema: EMA | None = None,
                 first_layer: int = 0) -> None:
        self.model, self.optimizer, self.model_args = model, optimizer, model.config.to_dict()
        self.cfg, self.train_seqs, self.val_seqs, self.null = cfg, train_seqs, val_seqs, null
        self.device, self.amp, self.group, self.extra, self.ema = device, amp, group, extra or {}, ema
        self.net: torch.nn.Module = model  # the DDP wrapper under torchrun (train_steps sets it)
        self.averaged: GPT | None = None  # one copy of the model that holds the average, made on first use
        # The first `first_layer` weight positions are the field's first layer (train.first_layer_weight).
        self.position_weight = first_layer_weights(model.config.block_size - 2, first_layer, cfg.first_layer_weight)
        # Looked up now, not at import, so a test may replace sequence_loss.
        self.step_fn = torch.compile(sequence_loss) if cfg.compile else sequence_loss

    def batch(self, it: int) -> torch.Tensor:
        return training_batch(self.train_seqs, self.cfg, it, self.null, self.group).to(self.device)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.step_fn(self.net, batch, self.cfg.hl_sigma, self.position_weight)

    def after_step(self) -> None:
        if self.ema:
            self.ema.update(self.model)

    def sampled_model(self) -> GPT:
        """The weights that sampling will use: the average with EMA on, else the model itself."""
        if not self.ema:
            return self.model
        if self.averaged is None:
            self.averaged = copy.deepcopy(self.model)
        self.averaged.load_state_dict(self.ema.shadow)
        return self.averaged

    def evaluate(self) -> float:
        return evaluate_loss(self.sampled_model(), self.val_seqs, self.cfg.batch_size, self.device, self.amp)

    def checkpoint(self) -> dict:
        ema = {"ema": self.ema.state_dict()} if self.ema else {}
        return {**self.extra, "config": vars(self.cfg).copy(), **ema}

    def restore(self, ckpt: dict) -> None:
        if self.ema:
            if "ema" not in ckpt:
                raise ArtifactError("the checkpoint has no weight average, but train.ema_decay > 0; use --force to restart")
            self.ema.load_state_dict(ckpt["ema"])


def train_steps(model: GPT, optimizer: torch.optim.Optimizer, trainer: Trainer) -> tuple[int, str]:
    """The loop of every rank (rank 0's and the followers'); returns (iterations done, what stopped it).

    `model` and `optimizer` are the trainer's task's, named so that a caller may inspect them around the loop.
    """
    task = trainer.task
    # DDP's constructor is a collective, so it comes after rank 0 sent the order that the others wait for.
    task.net = trainer.group.wrap(model, trainer.device) if trainer.group else model
    return trainer.steps()


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
    # With fit's shifted copies, when there are any (tokens.safetensors says which rows they are).
    train_rows = training_rows(split, load_metadata(run_dir / TOKENS_FILE))
    if len(train_rows) and int(train_rows.max()) >= len(seqs):
        raise ArtifactError(f"{run_dir / TOKENS_FILE}: its training rows reach {int(train_rows.max())}, but it holds "
                            f"{len(seqs)} fields; rerun `nefgpt tokenize --force --out {run_dir}`")
    train_seqs = seqs[train_rows]
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
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    first_layer = spec.layer_params[0]  # W1 and b1
    task = GPTTask(model, optimizer, cfg, train_seqs, vocab.sos, device, amp, group, val_seqs,
                   {"tokenizer_id": tok_id}, ema, first_layer)
    trainer = Trainer(task, cfg, device, amp, run_dir=run_dir, group=group, progress=progress, desc="train",
                      tokens_per_iter=cfg.batch_size * (seqs.shape[1] - 1))
    ckpt_path = run_dir / CKPT_FILE
    if ckpt_path.exists() and not (restart and not resume):
        if not resume:
            raise NefgptError(f"{ckpt_path}: a checkpoint from an earlier training exists; pass --resume to continue from it or --force to start over")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("tokenizer_id") != tok_id:
            raise ArtifactError(f"{ckpt_path}: trained with another tokenizer ({ckpt.get('tokenizer_id')} vs {tok_id})")
        if saved_model_args(ckpt) != model_args.to_dict():
            raise ArtifactError(f"{ckpt_path}: model settings differ from the config; use --force to restart")
        trainer.resume(ckpt)
    else:
        trainer.fresh()
    if group:
        group.start_training(distributed.TrainOrder(
            cfg=cfg, model_args=model_args.to_dict(), model=distributed.cpu_state(model.state_dict()),
            optimizer=distributed.cpu_state(optimizer.state_dict()), train_seqs=train_seqs.to(torch.int16),
            null=vocab.sos, start=trainer.start, elapsed_before=trainer.elapsed_before, first_layer=first_layer))

    with trainer.bookkeeping():
        train_steps(model, optimizer, trainer)
    if group:
        group.end_training()
    trainer.finish()

    sampled = task.sampled_model()
    final_train = evaluate_loss(sampled, train_seqs[: len(val_seqs)], cfg.batch_size, device, amp)
    final_val = evaluate_loss(sampled, val_seqs, cfg.batch_size, device, amp)
    # With EMA the losses above are the average's; the raw weights' held-out CE shows what averaging gained.
    raw = {"val_loss_raw": evaluate_loss(model, val_seqs, cfg.batch_size, device, amp), "ema_decay": cfg.ema_decay} if ema else {}
    summary = trainer.summary(final_train, final_val, tail={
        "tokenizer_id": tok_id,
        "train_fields": len(train_seqs),  # with fit's shifted copies
        "conditioning": cfg.conditioning,
        "p_uncond": cfg.p_uncond,
        "processes": group.world_size if group else 1,
        **raw,
    })
    return trainer.write_summary(summary)


def follow_train(order: distributed.TrainOrder, group: distributed.Group) -> bool:
    """A rank > 0's part of the training that rank 0 ordered: the same loop on its share of each batch.

    Returns False when the loop ended in a stop every rank shares (rank 0 reports it), True when it ran out.
    """
    cfg = order.cfg
    device = group.device(resolve_device(cfg.device))
    model = GPT(GPTConfig(**order.model_args)).to(device)
    model.load_state_dict(order.model)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.pos_bias_decay,
                                          cfg.pos_bias_lr_mult)
    optimizer.load_state_dict(order.optimizer)
    amp = autocast_dtype(cfg.dtype, device)
    task = GPTTask(model, optimizer, cfg, order.train_seqs.long(), order.null, device, amp, group,
                   first_layer=order.first_layer)
    trainer = Trainer(task, cfg, device, amp, group=group, start=order.start, elapsed_before=order.elapsed_before)
    try:
        train_steps(model, optimizer, trainer)
    except (TrainInterrupted, NonFiniteLoss):
        return False
    return True
