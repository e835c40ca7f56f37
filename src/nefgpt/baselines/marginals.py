"""Baseline: every weight drawn independently from its class's histogram of codes at that position.

It works on the run's tokens (``tokens.safetensors``, made by `tokenize` with the
run's codebook): for each class c and weight position p, the counts of each code
over the training fields of c. Sampling draws each position's code from those
counts on its own (no dependence between positions) and decodes the codes as
the GPT's samples are decoded (``Tokenizer.decode``). ``sample.temperature``
applies to the log-frequencies: 1 is the histogram itself, 0 the most frequent
code of every position, and values in between sharpen it.

The reported loss is the cross-entropy per weight token of these marginals,
with add-one (Laplace) smoothing so a code never seen at a position keeps a
nonzero probability: the same quantity, on the same held-out fields, as the
GPT's val CE (``train.json`` val_loss). A GPT that learned nothing about how
positions depend on each other would score about this.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import ArtifactError
from ..layout import CKPT_FILE, TOKENIZER_FILE, TOKENS_FILE
from ..codebook import load_tokenizer, load_tokens
from .common import Fields, Fitted, load_fields, load_trained, sample_per_class, train_in_one_pass

KIND = "marginals"


def code_counts(tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, num_codes: int) -> torch.Tensor:
    """Counts (num_classes, P, num_codes), int64: how often each code appears at each position in each class."""
    n, p = tokens.shape
    pos = torch.arange(p).expand(n, p)
    flat = (labels[:, None] * p + pos) * num_codes + tokens
    return torch.bincount(flat.reshape(-1), minlength=num_classes * p * num_codes).reshape(num_classes, p, num_codes)


def smoothed_log_probs(counts: torch.Tensor) -> torch.Tensor:
    """log of the add-one smoothed frequencies (counts + 1) / (n_c + K), float64, same shape as counts."""
    counts = counts.double()
    return (counts + 1).log() - (counts.sum(-1, keepdim=True) + counts.shape[-1]).log()


def cross_entropy(counts: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean negative log-probability (nats per weight token) of tokens (N, P) of classes labels (N,)."""
    if len(tokens) == 0:
        return None
    logp = smoothed_log_probs(counts)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    return float(-logp[labels[:, None].expand_as(tokens), pos, tokens].mean())


def sampling_probs(counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position code probabilities (..., K) from counts: frequencies**(1/T), renormalized; T = 0 is the mode."""
    counts = counts.double()
    if temperature == 0:
        return torch.zeros_like(counts).scatter_(-1, counts.argmax(-1, keepdim=True), 1.0)
    logits = counts.log() / temperature  # zero counts stay at -inf: a code never seen is never drawn
    return torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)


def draw(counts: torch.Tensor, n: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """n code sequences (n, P) drawn position by position from one class's counts (P, K)."""
    probs = sampling_probs(counts, temperature)
    return torch.multinomial(probs, n, replacement=True, generator=generator).T.contiguous()


def _run_tokens(run_dir: Path, *parts: Fields):
    """The run's tokenizer and the tokens of every field, checked to belong to these fields."""
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    tokens, _ = load_tokens(run_dir, tok.id)
    fields = parts[0]
    last_row = max((int(f.rows.max()) for f in parts if len(f.rows)), default=-1)
    if tokens.shape[1] != fields.spec.num_params or len(tokens) <= last_row:
        raise ArtifactError(f"{run_dir / TOKENS_FILE}: tokens {tuple(tokens.shape)} don't match the fields "
                            f"({fields.spec.num_params} weights each); rerun `nefgpt tokenize --force`")
    if int(tokens.min()) < 0 or int(tokens.max()) >= tok.vocab.num_codes:
        raise ArtifactError(f"{run_dir / TOKENS_FILE}: holds codes outside 0..{tok.vocab.num_codes - 1}")
    return tok, tokens


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Count every class's codes per position (`resume` is accepted for the common interface; nothing to resume)."""
    return train_in_one_pass(cfg, run_dir, KIND, lambda fields: _fit(cfg, run_dir, fields))


def _fit(cfg: RunConfig, run_dir: Path, fields: Fields) -> Fitted:
    heldout = load_fields(cfg, run_dir, "heldout")
    tok, tokens = _run_tokens(run_dir, fields, heldout)
    k, c, p = tok.vocab.num_codes, fields.num_classes, fields.spec.num_params
    if len(fields.labels) and int(fields.labels.max()) >= c:
        raise ArtifactError(f"{run_dir}: training labels go up to {int(fields.labels.max())}, "
                            f"the split has {c} classes")
    train_tokens, held_tokens = tokens[fields.rows], tokens[heldout.rows]
    counts = code_counts(train_tokens, fields.labels, c, k)
    held_ok = heldout.labels < c
    summary = {
        "loss": "cross-entropy of the per-class, per-position code frequencies (add-one smoothing), "
                "nats per weight token",
        "train_loss": cross_entropy(counts, train_tokens, fields.labels),
        "val_loss": cross_entropy(counts, held_tokens[held_ok], heldout.labels[held_ok]),
        "uniform_loss": math.log(k),  # a model that knows nothing: every code equally likely
        # Held-out tokens whose code never occurs at that position in the class's training fields.
        "heldout_unseen_rate": (float((counts[heldout.labels[held_ok][:, None], torch.arange(p), held_tokens[held_ok]]
                                       == 0).double().mean()) if bool(held_ok.any()) else None),
        "num_codes": k,
    }
    return Fitted({"counts": counts.to(torch.int32)}, {"num_codes": k}, summary, {"tokenizer_id": tok.id})


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    fields, ckpt = load_trained(cfg, run_dir, KIND)
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    if ckpt.get("tokenizer_id") != tok.id:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: counted with another tokenizer than {run_dir / TOKENIZER_FILE}; "
                            f"rerun `nefgpt train --force --out {run_dir}`")
    counts = ckpt["model"].get("counts") if isinstance(ckpt.get("model"), dict) else None
    shape = (fields.num_classes, fields.spec.num_params, tok.vocab.num_codes)
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != shape or bool((counts < 0).any()):
        raise ArtifactError(f"{run_dir / CKPT_FILE}: not a valid {KIND} checkpoint (needs 'counts' of shape {shape})")
    n, temperature = cfg.sample.n_per_class, cfg.sample.temperature

    def draw_classes(classes: list[int], _labels: torch.Tensor, gen: torch.Generator):
        codes = torch.cat([draw(counts[c], n, temperature, gen) for c in classes])
        # The codes go under their own name: "tokens" marks autoregressive samples (evaluate's generation GIF).
        return tok.decode(codes), {"codes": codes.to(torch.int16)}

    return sample_per_class(cfg, run_dir, fields, KIND, labels, draw_classes, meta={"tokenizer_id": tok.id},
                            sampling={"temperature": temperature})
