"""Stage `sample`: generate class-conditioned fields with the trained GPT.

Decoding is incremental with a key/value cache. Logits are shaped in a fixed
order: temperature, then top-k, then top-p (nucleus); temperature 0 is greedy.
The model only scores codebook tokens, so special tokens can't appear at weight
positions. Sampling uses its own seeded generator, so it is reproducible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import field
from .artifacts import atomic_path, save_tensors
from .config import SampleConfig
from .errors import ArtifactError, UsageError
from .figures import save_sample_grid
from .model import GPT, KVCache
from .tokenizer import TOKENIZER_FILE, Vocab, load_tokenizer
from .train import CKPT_FILE, load_model

SAMPLES_FILE = "samples.safetensors"
IMAGES_FILE = "samples.npz"
GRID_FILE = "samples_grid.png"


def check_sampling(temperature: float, top_k: int, top_p: float, num_codes: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k != 0 and not (1 <= top_k <= num_codes):
        raise UsageError(f"top_k must be 0 (off) or between 1 and {num_codes}, got {top_k}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (B, V) -> probabilities after temperature, top-k and top-p, in that order."""
    if temperature == 0:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        return probs.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    raw = logits.float()
    # Shift the maximum to 0 first, so a tiny temperature can't overflow the logits to inf (softmax NaN);
    # the maxima stay exactly 0 even when the temperature rounds to 0 in float32 (0 / 0 would be NaN).
    shifted = raw - raw.amax(dim=1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_k and top_k < logits.shape[1]:
        # Shifting and scaling keep the order, so top-k picks on the raw values: rounding after the shift or a
        # huge temperature could turn distinct logits into ties and let more than k through.
        kth = raw.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(raw < kth, float("-inf"))
    if top_p < 1.0:
        # Order by the raw logits (the same order, without ties made by rounding), the first maximum first.
        order = raw.sort(dim=1, descending=True, stable=True).indices
        sorted_logits = logits.gather(1, order)
        cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop_sorted = (cum - sorted_logits.softmax(dim=1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=1)


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, temperature: float, top_k: int,
             top_p: float, generator: torch.Generator, use_cache: bool = True) -> torch.Tensor:
    """Code tokens (B, num_weights) for class labels (B,)."""
    device = next(model.parameters()).device
    b = labels.shape[0]
    seq = torch.stack([torch.full_like(labels, vocab.sos), vocab.class_token(labels)], dim=1).to(device)
    cache = KVCache(model.config, b, device, next(model.parameters()).dtype) if use_cache else None
    logits = model(seq, cache, 0)[:, -1]
    out = torch.empty(b, num_weights, dtype=torch.long, device=device)
    for i in range(num_weights):
        probs = filter_logits(logits, temperature, top_k, top_p)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        out[:, i] = nxt[:, 0]
        if i + 1 == num_weights:
            break
        if use_cache:
            logits = model(nxt, cache, seq.shape[1] + i)[:, -1]
        else:
            logits = model(torch.cat([seq, out[:, : i + 1]], dim=1))[:, -1]
    return out


def run_sample(cfg: SampleConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    codebook, vocab, spec, tok_id = load_tokenizer(run_dir / TOKENIZER_FILE)
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, vocab.num_codes)
    model, ckpt = load_model(run_dir)
    if ckpt.get("tokenizer_id") != tok_id:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: trained with another tokenizer than {run_dir / TOKENIZER_FILE}")
    mc = model.config
    if (mc.vocab_size, mc.num_codes) != (vocab.size, vocab.num_codes):
        raise ArtifactError(f"{run_dir / CKPT_FILE}: vocabulary of {mc.vocab_size} tokens ({mc.num_codes} codes) differs "
                            f"from {run_dir / TOKENIZER_FILE}'s {vocab.size} ({vocab.num_codes} codes)")
    if mc.block_size != spec.num_params + 2:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: model generates {mc.block_size - 2} weights, but the field "
                            f"architecture {spec.to_meta()} in {run_dir / TOKENIZER_FILE} has {spec.num_params}")
    classes = list(range(vocab.num_classes)) if labels is None else labels
    for c in classes:
        if not 0 <= c < vocab.num_classes:
            raise UsageError(f"label {c} is not a class of this model (0..{vocab.num_classes - 1})")
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.n_per_class)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunks = []
    for batch in tqdm(all_labels.split(cfg.batch_size), desc="sample", disable=not progress):
        chunks.append(generate(model, batch, vocab, spec.num_params, cfg.temperature, cfg.top_k, cfg.top_p, gen).cpu())
    tokens = torch.cat(chunks)
    weights = codebook[tokens]
    images = field.render(spec, weights, 28)
    save_tensors(run_dir / SAMPLES_FILE, {"tokens": tokens.to(torch.int16), "weights": weights, "labels": all_labels},
                 {"field": spec.to_meta(), "tokenizer_id": tok_id, "sampling": vars(cfg).copy()})
    save_images_npz(run_dir / IMAGES_FILE, images, all_labels)
    save_sample_grid(run_dir / GRID_FILE, images, all_labels, per_row=min(cfg.n_per_class, 10))
    return {"n": len(all_labels), "sampling": vars(cfg).copy()}


def save_images_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez(f, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
