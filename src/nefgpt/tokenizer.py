"""Stage `tokenize`: a learned scalar codebook that turns weights into tokens.

The codebook is learned as the talk describes: initialize, assign every weight
to its nearest code, move each code to the mean of its weights (the L2-optimal
update), hand codes that are rarely used to the worst-quantized weights, and
repeat until the error stops improving. In one dimension the nearest code is a
binary search between sorted code midpoints, so each pass over millions of
weights takes milliseconds.

With ``tokenize.offsets`` other than ``none`` the codebook quantizes offsets from
the shared anchor field, ``(w - anchor) / scale``, or with ``pca`` the whitened
principal components of the training fields (see `Tokenizer`); tokens always
become weights through `Tokenizer.decode`.

The vocabulary, the `Tokenizer` and their files live in `nefgpt.codebook`, below the
stages, because training, sampling, tuning and the baselines read them too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import field
from .codebook import Tokenizer, Vocab, assign, save_tokenizer
from .artifacts import save_json, save_tensors
from .config import TokenizerConfig
from .validation import check_vocab_size
from .errors import UsageError
from .field import FieldSpec
from .fields_io import load_nefs, training_rows
from .layout import TOKENIZER_FIGURE_FILE, TOKENIZER_FILE, TOKENIZER_REPORT_FILE, TOKENS_FILE
from .split import load_split, load_split_images
from .weight_stats import save_tokenizer_figure


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


SCALE_FLOOR = 1e-3  # a scale is at least this fraction of the pooled std of the training offsets


def offset_frame(mode: str, train_weights: torch.Tensor, anchor: torch.Tensor | None,
                 spec: FieldSpec) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The reference field, the (num_params,) scales and the basis (pca only) of an offsets mode.

    Scales are population stds of ``w - anchor`` over the training fields, per position or pooled per parameter
    tensor, clamped to at least SCALE_FLOOR times the pooled std (positions no field moved have std 0). For
    ``pca`` they are the stds along the principal axes of ``w - mean``, clamped the same way.
    """
    if mode == "none":
        return None, None, None
    if mode == "pca":
        return principal_frame(train_weights)
    if anchor is None:
        raise UsageError(f"tokenize.offsets = {mode} needs fields fitted from a shared anchor (fit.init = shared); "
                         "these have none (use tokenize.offsets = none)")
    reference = anchor.float().reshape(-1).clone()
    if mode == "raw":
        return reference, torch.ones_like(reference), None
    offsets = (train_weights.double() - reference.double())
    if mode == "position":
        scale = offsets.std(0, correction=0)
    else:  # layer: one std per parameter tensor, in flatten order W1, b1, W2, b2, ...
        scale, pos = torch.empty(spec.num_params, dtype=torch.float64), 0
        for out_f, in_f in spec.layer_shapes:
            for size in (out_f * in_f, out_f):
                scale[pos:pos + size] = offsets[:, pos:pos + size].std(correction=0)
                pos += size
    return reference, clamp_scale(scale, offsets), None


def clamp_scale(scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    pooled = float(offsets.std(correction=0)) if offsets.numel() else 0.0
    floor = SCALE_FLOOR * pooled if pooled > 0 else 1.0
    return scale.clamp_min(floor).float()


def principal_frame(train_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, principal-axis stds and eigenvectors (columns, largest variance first) of the training fields.

    Each eigenvector's sign is fixed (its largest entry positive) so that the frame does not depend on which
    LAPACK build computed it.
    """
    weights = train_weights.double()
    mean = weights.mean(0)
    offsets = weights - mean
    cov = offsets.T @ offsets / max(len(weights), 1)
    variances, basis = torch.linalg.eigh(cov)
    variances, basis = variances.flip(0).clamp_min(0), basis.flip(1)
    peak = basis.abs().argmax(0)
    basis = basis * basis[peak, torch.arange(basis.shape[1])].sign()
    return mean.float(), clamp_scale(variances.sqrt(), offsets), basis.float().contiguous()


def learn_tokenizer(train_weights: torch.Tensor, spec: FieldSpec, cfg: TokenizerConfig, num_classes: int,
                    anchor: torch.Tensor | None = None) -> tuple[Tokenizer, dict]:
    """The tokenizer of `cfg` learned on the training fields (B, num_params); `anchor` is the shared init field."""
    check_vocab_size(cfg.num_codes, num_classes)  # the class count of this run's data
    reference, scale, basis = offset_frame(cfg.offsets, train_weights, anchor, spec)
    vocab = Vocab(cfg.num_codes, num_classes)
    frame = Tokenizer(torch.zeros(cfg.num_codes), vocab, spec, cfg.offsets, reference, scale, basis, cfg.order)
    codebook, stats = learn_codebook(frame.values(train_weights), cfg)
    return Tokenizer(codebook, vocab, spec, cfg.offsets, reference, scale, basis, cfg.order), stats


def run_tokenize(cfg: TokenizerConfig, run_dir: Path) -> dict:
    """Learn the codebook on the training fields and tokenize every field; the split gives the classes."""
    nefs, meta = load_nefs(run_dir)
    spec: FieldSpec = meta["spec"]
    split = load_split(run_dir)
    weights = nefs["weights"]
    train = torch.tensor(split["train"], dtype=torch.long)
    held = torch.tensor(split["heldout"], dtype=torch.long)
    learn_rows = training_rows(split, meta)  # with fit's shifted copies, when there are any
    tok, stats = learn_tokenizer(weights[learn_rows], spec, cfg, int(split["num_classes"]), nefs.get("anchor"))
    vocab, codebook = tok.vocab, tok.codebook
    tokens = tok.encode(weights)
    quantized = tok.decode(tokens)
    sq_err = (quantized.double() - weights.double()) ** 2
    _, images, _ = load_split_images(run_dir)
    res = images.shape[-1]
    real = len(images)  # the split's fields; fit's shifted copies come after them
    psnr_q = field.psnr(field.render(spec, quantized[:real], res), images)
    psnr_f = nefs["psnr"][:real]  # stored by `fit` against the same images
    report = {
        **{k: v for k, v in stats.items() if k != "mse_history"},  # mse: in the units the codebook quantizes
        "offsets": tok.offsets,
        "order": tok.order,
        # In weight space, so every offsets mode is comparable: mean (decoded - fitted)^2 over the fields' weights.
        "weight_mse": float(sq_err[train].mean()),
        "weight_mse_heldout": float(sq_err[held].mean()) if len(held) else None,
        "num_codes": vocab.num_codes,
        "vocab_size": vocab.size,
        "sos_token": vocab.sos,
        "class_tokens": [vocab.num_codes + 1, vocab.size - 1],
        "psnr_fitted_mean": float(psnr_f.mean()),
        "psnr_quantized_mean": float(psnr_q.mean()),
        "psnr_loss_db": float(psnr_f.mean() - psnr_q.mean()),
        "tokenizer_id": tok.id,
        "mse_history": stats["mse_history"],
    }
    if tok.offsets != "none":
        report["offset_scale"] = {"min": float(tok.scale.min()), "median": float(tok.scale.median()),
                                  "max": float(tok.scale.max())}
    save_tokenizer(run_dir / TOKENIZER_FILE, tok)
    # Which rows are fit's shifted copies travels with the tokens, so `train` needs no other stage's file.
    carried = {"augment": meta["augment"]} if "augment" in meta else {}
    save_tensors(run_dir / TOKENS_FILE, {"tokens": tokens.to(torch.int16), "labels": nefs["labels"]},
                 {"tokenizer_id": report["tokenizer_id"], **carried})
    save_json(run_dir / TOKENIZER_REPORT_FILE, report)
    # One field of each of the first classes, so the figure shows varied shapes.
    shown = [int(train[(nefs["labels"][train] == c).nonzero()[0, 0]]) for c in nefs["labels"][train].unique()[:6]]
    label = {"none": "weight value", "raw": "offset w - anchor", "position": "(w - anchor) / per-position std",
             "layer": "(w - anchor) / per-tensor std", "pca": "whitened principal component"}[tok.offsets]
    save_tokenizer_figure(run_dir / TOKENIZER_FIGURE_FILE, tok.values(weights[train]), codebook, spec, weights[shown],
                          quantized[shown], images[shown], value_label=label)
    return report
