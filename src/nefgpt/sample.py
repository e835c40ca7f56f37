"""Stage `sample`: generate class-conditioned fields with the trained GPT.

Decoding is incremental with a key/value cache. Logits are shaped in a fixed
order: classifier-free guidance, then temperature, then top-k, then top-p
(nucleus), then min-p (Nguyen et al. 2024: keep the tokens whose probability,
after temperature, is at least ``min_p`` times the most likely token's; 0 is
off); temperature 0 is greedy. The model only scores codebook tokens, so
special tokens can't appear at weight positions. Sampling uses its own seeded
generator, so it is reproducible.

The null class is the SOS token at the class position, ``[SOS, SOS, w1 ...]``
(the vocabulary has no free token): an unconditional model
(``train.conditioning = "none"``) saw only it, and a model trained with
``train.p_uncond > 0`` saw it in that share of its sequences, which is what
guidance needs: with scale g the next-token logits are
``l_null + g (l_cond - l_null)``, from the conditional and the null-class
sequence decoded together as one batch.
"""

from __future__ import annotations

import math
import os
import time
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


def check_sampling(temperature: float, top_k: int, top_p: float, num_codes: int, guidance: float = 1.0,
                   min_p: float = 0.0) -> None:
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise UsageError(f"guidance must be a finite number >= 0, got {guidance}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k != 0 and not (1 <= top_k <= num_codes):
        raise UsageError(f"top_k must be 0 (off) or between 1 and {num_codes}, got {top_k}")
    if not (isinstance(min_p, (int, float)) and 0 <= min_p < 1):  # also refuses NaN
        raise UsageError(f"min_p must be in [0, 1) (0 is off), got {min_p}")


# Sampling time per field when the run has none measured: a conservative CPU figure (the demo GPT measured
# 0.066 s per field on 2 cores, docs/compare.json; the baselines are much faster).
DEFAULT_SECONDS_PER_FIELD = 0.1
LONG_SAMPLING_S = 600  # warn above 10 minutes


def sampling_bytes_per_field(num_weights: int) -> int:
    """Memory a sampled field takes until the artifacts are written: int64 tokens while sampling, int16 tokens
    and float32 weights saved, and its 28x28 float32 render (and the .npz copy of it)."""
    return num_weights * (8 + 2 + 4) + 2 * 28 * 28 * 4


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def check_sampling_size(n_per_class: int, classes: int, num_weights: int,
                        seconds_per_field: float | None = None, measured: bool = False) -> str | None:
    """Refuse (UsageError) a sampling whose results would not fit in half of the machine's memory;
    return a one-line warning when it would run longer than LONG_SAMPLING_S, else None.

    Called before any work is done, so an absurd ``-n`` changes nothing.
    """
    n = n_per_class * classes
    need = n * sampling_bytes_per_field(num_weights)
    ram = physical_memory()
    if ram and need > ram // 2:
        raise UsageError(f"sample.n_per_class = {n_per_class}: {n} fields of {num_weights} weights would need an "
                         f"estimated {_size(need)} of memory, more than half of this machine's {_size(ram)}; "
                         "sample fewer per class (-n)")
    per_field = seconds_per_field if seconds_per_field and seconds_per_field > 0 else DEFAULT_SECONDS_PER_FIELD
    seconds = n * per_field
    if seconds <= LONG_SAMPLING_S:
        return None
    how = "measured by this run's last sampling" if measured and seconds_per_field else "a rough CPU figure"
    return (f"nefgpt: warning: sampling {n} fields (sample.n_per_class = {n_per_class}) will take an estimated "
            f"{_duration(seconds)} ({per_field:.3g} s per field, {how})")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """Logits (B, V) -> probabilities after temperature, top-k, top-p and min-p, in that order."""
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
    if min_p > 0:
        # p_i >= min_p * p_max  <=>  l_i - l_max >= log(min_p) on the tempered logits, whose maximum is exactly 0
        # (renormalizing after top-k / top-p changes no ratio, and both keep the maximum), so the argmax survives.
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    return logits.softmax(dim=1)


def condition_tokens(labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """The token at the class position: C(label), or the null class (SOS) for label -1."""
    labels = labels.long()
    return torch.where(labels < 0, vocab.sos, vocab.class_token(labels.clamp(min=0)))


def check_guidance(guidance: float, trained: dict, where: str) -> None:
    """Guidance needs a model that learned the null class next to the classes; `trained` is its train config."""
    if guidance == 1:
        return
    conditioning, p_uncond = trained.get("conditioning", "class"), float(trained.get("p_uncond", 0.0))
    if conditioning != "class" or p_uncond <= 0:
        how = "unconditionally (train.conditioning = none)" if conditioning != "class" else "with train.p_uncond = 0"
        raise UsageError(f"sample.guidance = {guidance} needs a class-conditional model trained with null-class "
                         f"dropout (train.p_uncond > 0), but {where} was trained {how}; use guidance 1")


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, temperature: float, top_k: int,
             top_p: float, generator: torch.Generator, use_cache: bool = True, guidance: float = 1.0,
             min_p: float = 0.0) -> torch.Tensor:
    """Code tokens (B, num_weights) for class labels (B,); label -1 is the null class (unconditional).

    With guidance g != 1 the B conditional and B null-class sequences run as one batch of 2B (one cache) and
    each step's logits are ``l_null + g (l_cond - l_null)``, before temperature, top-k, top-p and min-p; both
    halves are then extended with the same sampled token.
    """
    device = next(model.parameters()).device
    b = labels.shape[0]
    cond = condition_tokens(labels, vocab)
    guided = guidance != 1
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, vocab.sos)])

    def mix(logits: torch.Tensor) -> torch.Tensor:
        if not guided:
            return logits
        with_class, null = logits[:b].float(), logits[b:].float()
        return null + guidance * (with_class - null)

    seq = torch.stack([torch.full_like(cond, vocab.sos), cond], dim=1).to(device)
    cache = KVCache(model.config, seq.shape[0], device, next(model.parameters()).dtype) if use_cache else None
    logits = mix(model(seq, cache, 0)[:, -1])
    out = torch.empty(seq.shape[0], num_weights, dtype=torch.long, device=device)
    for i in range(num_weights):
        probs = filter_logits(logits, temperature, top_k, top_p, min_p)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        if guided:
            nxt = nxt.repeat(2, 1)
        out[:, i] = nxt[:, 0]
        if i + 1 == num_weights:
            break
        if use_cache:
            logits = mix(model(nxt, cache, seq.shape[1] + i)[:, -1])
        else:
            logits = mix(model(torch.cat([seq, out[:, : i + 1]], dim=1))[:, -1])
    return out[:b]


def trained_config(ckpt: dict) -> dict:
    """The train config a checkpoint was made with; {} for a checkpoint that carries none."""
    return ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}


def load_checked_model(run_dir: Path, vocab: Vocab, spec: field.FieldSpec, tok_id: str) -> tuple[GPT, dict]:
    """The run's GPT and checkpoint, refused unless it was trained with this tokenizer and field architecture."""
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
    return model, ckpt


def run_sample(cfg: SampleConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    vocab, spec, tok_id = tok.vocab, tok.spec, tok.id
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, vocab.num_codes, cfg.guidance, cfg.min_p)
    model, ckpt = load_checked_model(run_dir, vocab, spec, tok_id)
    trained = trained_config(ckpt)
    check_guidance(cfg.guidance, trained, str(run_dir / CKPT_FILE))
    conditioned = trained.get("conditioning", "class") == "class"
    if labels and not conditioned:
        raise UsageError(f"{run_dir / CKPT_FILE} is an unconditional model (train.conditioning = none): "
                         "it cannot sample chosen classes; leave out --label")
    classes = list(range(vocab.num_classes)) if labels is None else labels
    for c in classes:
        if not 0 <= c < vocab.num_classes:
            raise UsageError(f"label {c} is not a class of this model (0..{vocab.num_classes - 1})")
    # An unconditional model draws as many fields as a conditional run (n_per_class for each class slot, so
    # set metrics compare equal sizes); its labels only number the slots and are not conditions.
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.n_per_class)
    conditions = all_labels if conditioned else torch.full_like(all_labels, -1)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    chunks = []
    for batch in tqdm(conditions.split(cfg.batch_size), desc="sample", disable=not progress):
        chunks.append(generate(model, batch, vocab, spec.num_params, cfg.temperature, cfg.top_k, cfg.top_p, gen,
                               guidance=cfg.guidance, min_p=cfg.min_p).cpu())
    tokens = torch.cat(chunks)
    meta = {"tokenizer_id": tok_id, "sampling": vars(cfg).copy(), "conditioned": conditioned,
            "seconds_per_field": (time.perf_counter() - t0) / len(all_labels)}
    save_samples(run_dir, spec, tok.decode(tokens), all_labels, meta,
                 extra={"tokens": tokens.to(torch.int16)}, per_row=min(cfg.n_per_class, 10))
    return {"n": len(all_labels), "sampling": vars(cfg).copy(), "conditioned": conditioned}


def save_samples(run_dir: Path, spec: field.FieldSpec, weights: torch.Tensor, labels: torch.Tensor, meta: dict,
                 extra: dict[str, torch.Tensor] | None = None, per_row: int = 10) -> torch.Tensor:
    """Write the sample artifacts every model produces; returns the 28x28 renders.

    `meta` should carry "seconds_per_field" (generation time only), which `compare` reports.
    """
    spec.check_weights(weights, str(run_dir / SAMPLES_FILE))
    images = field.render(spec, weights, 28)
    save_tensors(run_dir / SAMPLES_FILE, {**(extra or {}), "weights": weights.float(), "labels": labels.long()},
                 {"field": spec.to_meta(), **meta})
    save_images_npz(run_dir / IMAGES_FILE, images, labels)
    save_sample_grid(run_dir / GRID_FILE, images, labels, per_row=per_row)
    return images


def save_images_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez(f, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
