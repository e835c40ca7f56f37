"""Stage `tokenize`: a learned scalar codebook that turns weights into tokens.

The codebook is learned as the talk describes: initialize, assign every weight
to its nearest code, move each code to the mean of its weights (the L2-optimal
update), hand codes that are rarely used to the worst-quantized weights, and
repeat until the error stops improving. In one dimension the nearest code is a
binary search between sorted code midpoints, so each pass over millions of
weights takes milliseconds.

Vocabulary layout (256 with the defaults): codes ``0 .. K-1``, then SOS = K,
then one class token per class, ``K + 1 + c``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import field
from .artifacts import load_tensors, save_json, save_tensors
from .config import TokenizerConfig
from .errors import ArtifactError
from .field import FieldSpec
from .weight_stats import save_tokenizer_figure

TOKENIZER_FILE = "tokenizer.safetensors"
TOKENS_FILE = "tokens.safetensors"
REPORT_FILE = "tokenizer.json"
FIGURE_FILE = "tokenizer.png"


@dataclass(frozen=True)
class Vocab:
    num_codes: int
    num_classes: int = 10

    @property
    def sos(self) -> int:
        return self.num_codes

    def class_token(self, label: int | torch.Tensor) -> int | torch.Tensor:
        return self.num_codes + 1 + label

    @property
    def size(self) -> int:
        return self.num_codes + 1 + self.num_classes


def assign(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for each value; `codebook` must be sorted ascending."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.searchsorted(midpoints, values.contiguous())


def learn_codebook(values: torch.Tensor, cfg: TokenizerConfig) -> tuple[torch.Tensor, dict]:
    """Learn a sorted codebook of `cfg.num_codes` scalars for the 1-D `values`."""
    values = values.flatten().double()
    k = cfg.num_codes
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "quantile":
        qs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        sample = values[torch.randperm(len(values), generator=gen)[:1_000_000]]
        codebook = torch.quantile(sample, qs)
    else:
        codebook = values[torch.randperm(len(values), generator=gen)[:k]]
    codebook = codebook.sort().values
    history, reassigned, reassign = [], 0, True
    before_reassign: torch.Tensor | None = None
    for _ in range(cfg.max_iters):
        idx = assign(values, codebook)
        err = (values - codebook[idx]) ** 2
        mse = float(err.mean())
        if before_reassign is not None and mse > history[-1]:
            # Lloyd steps never raise the error, so the reassignment did (it evicted a code that
            # serves a small, far cluster): undo it and stop reassigning.
            codebook, before_reassign, reassign = before_reassign, None, False
            continue
        history.append(mse)
        counts = torch.bincount(idx, minlength=k).double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), codebook)
        codebook = updated.sort().values
        dead = counts < cfg.dead_fraction * counts.mean()
        before_reassign = None
        if reassign and dead.any():
            # Rarely used codes move onto the weights that are currently quantized worst.
            before_reassign = codebook
            updated[dead] = values[err.topk(int(dead.sum())).indices]
            codebook = updated.sort().values
            reassigned += int(dead.sum())
        elif len(history) > 1 and history[-2] - history[-1] <= cfg.tol * history[-2]:
            break
    idx = assign(values, codebook)
    counts = torch.bincount(idx, minlength=k).double()
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    stats = {
        "iterations": len(history),
        "mse": float(((values - codebook[idx]) ** 2).mean()),
        "mse_history": history,
        "reassigned_codes": reassigned,
        "codes_used_fraction": float((counts > 0).double().mean()),
        "code_entropy_bits": float(-(nz * nz.log2()).sum()),
    }
    return codebook.float(), stats


def tokenizer_id(codebook: torch.Tensor) -> str:
    """A short content hash, stored in checkpoints so a mismatched tokenizer is caught."""
    return hashlib.sha256(codebook.float().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_tokenizer(path: Path, codebook: torch.Tensor, vocab: Vocab, spec: FieldSpec) -> None:
    meta = {"num_codes": vocab.num_codes, "num_classes": vocab.num_classes, "vocab_size": vocab.size,
            "field": spec.to_meta(), "tokenizer_id": tokenizer_id(codebook)}
    save_tensors(path, {"codebook": codebook}, meta)


def load_tokenizer(path: Path) -> tuple[torch.Tensor, Vocab, FieldSpec, str]:
    tensors, meta = load_tensors(path, {"codebook": torch.float32})
    codebook = tensors["codebook"]
    try:
        vocab = Vocab(int(meta["num_codes"]), int(meta["num_classes"]))
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: missing vocabulary metadata") from None
    if codebook.shape != (vocab.num_codes,) or not bool((codebook[1:] >= codebook[:-1]).all()):
        raise ArtifactError(f"{path}: codebook must be {vocab.num_codes} sorted values, got shape {tuple(codebook.shape)}")
    return codebook, vocab, FieldSpec.from_meta(meta.get("field", {}), str(path)), tokenizer_id(codebook)


def run_tokenize(cfg: TokenizerConfig, run_dir: Path, num_classes: int) -> dict:
    """Learn the codebook on the training fields and tokenize every field."""
    from .fit import load_nefs, load_split, load_split_images

    nefs, meta = load_nefs(run_dir)
    spec: FieldSpec = meta["spec"]
    split = load_split(run_dir)
    weights = nefs["weights"]
    train = torch.tensor(split["train"], dtype=torch.long)
    codebook, stats = learn_codebook(weights[train], cfg)
    vocab = Vocab(cfg.num_codes, num_classes)
    tokens = assign(weights, codebook)
    quantized = codebook[tokens]
    _, images, _ = load_split_images(run_dir)
    res = images.shape[-1]
    psnr_q = field.psnr(field.render(spec, quantized, res), images)
    psnr_f = nefs["psnr"]  # stored by `fit` against the same images
    report = {
        **{k: v for k, v in stats.items() if k != "mse_history"},
        "num_codes": vocab.num_codes,
        "vocab_size": vocab.size,
        "sos_token": vocab.sos,
        "class_tokens": [vocab.num_codes + 1, vocab.size - 1],
        "psnr_fitted_mean": float(psnr_f.mean()),
        "psnr_quantized_mean": float(psnr_q.mean()),
        "psnr_loss_db": float(psnr_f.mean() - psnr_q.mean()),
        "tokenizer_id": tokenizer_id(codebook),
        "mse_history": stats["mse_history"],
    }
    save_tokenizer(run_dir / TOKENIZER_FILE, codebook, vocab, spec)
    save_tensors(run_dir / TOKENS_FILE, {"tokens": tokens.to(torch.int16), "labels": nefs["labels"]},
                 {"tokenizer_id": report["tokenizer_id"]})
    save_json(run_dir / REPORT_FILE, report)
    # One field of each of the first classes, so the figure shows varied shapes.
    shown = [int(train[(nefs["labels"][train] == c).nonzero()[0, 0]]) for c in nefs["labels"][train].unique()[:6]]
    save_tokenizer_figure(run_dir / FIGURE_FILE, weights[train], codebook, spec, weights[shown], quantized[shown],
                          images[shown])
    return report


def load_tokens(run_dir: Path, expected_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = run_dir / TOKENS_FILE
    tensors, meta = load_tensors(path, {"tokens": torch.int16, "labels": torch.int64})
    if meta.get("tokenizer_id") != expected_id:
        raise ArtifactError(f"{path}: made by another tokenizer; rerun `nefgpt tokenize --force`")
    tokens, labels = tensors["tokens"], tensors["labels"]
    if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
        raise ArtifactError(f"{path}: tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} don't match")
    return tokens.long(), labels
