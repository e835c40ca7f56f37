"""Tokens and weights: the vocabulary, the learned codebook with its offsets frame, and their files.

Below the stages: `tokenize` learns and writes a `Tokenizer`; training, sampling, tuning, the baselines and the
API read it back with `load_tokenizer` and `load_tokens`.

Vocabulary layout (256 with the defaults): codes ``0 .. K-1``, then SOS = K,
then one class token per class, ``K + 1 + c``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import load_tensors, save_tensors
from .errors import ArtifactError
from .field import FieldSpec
from .layout import TOKENS_FILE


@dataclass(frozen=True)
class Vocab:
    num_codes: int
    num_classes: int

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


OFFSET_MODES = ("none", "raw", "position", "layer", "pca")


# The order of the weights in the sequence: the flatten order (input layer first: W1, b1, W2, b2, ...), or the
# layers reversed (output layer first: ..., W2, b2, W1, b1), so the first layer is decoded last, given the rest.
ORDERS = ("input_first", "output_first")


def sequence_order(spec: FieldSpec, order: str) -> torch.Tensor:
    """(num_params,) int64: position i of the sequence holds weight ``sequence_order(...)[i]`` of the field."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    starts = [0]
    for size in spec.layer_params:
        starts.append(starts[-1] + size)
    layers = [torch.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    return torch.cat(layers if order == "input_first" else layers[::-1])


def tokenizer_id(codebook: torch.Tensor, offsets: str = "none", reference: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, basis: torch.Tensor | None = None,
                 order: str = "input_first") -> str:
    """A short content hash, stored in checkpoints so a mismatched tokenizer is caught.

    An `offsets = none` tokenizer hashes its codebook alone (the ids of earlier runs); the other modes also hash
    the mode, the reference field and the scales.
    """
    h = hashlib.sha256(codebook.float().contiguous().numpy().tobytes())
    if offsets != "none":
        h.update(f"offsets={offsets}".encode())
        for t in (reference, scale) if basis is None else (reference, scale, basis):
            h.update(t.float().contiguous().numpy().tobytes())
    if order != "input_first":
        h.update(f"order={order}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Everything that turns fields into tokens and back.

    With ``offsets = "none"`` a weight is quantized as it is and token t decodes to ``codebook[t]``. Otherwise
    the codebook quantizes ``(w - reference) / scale`` position by position (the reference is the shared anchor
    field; the scale is all ones for ``raw``, the per-position or per-tensor std of the training offsets for
    ``position`` / ``layer``), and token t at position p decodes to ``reference[p] + scale[p] * codebook[t]``.

    With ``pca`` the positions are no longer weights but principal components of the training fields, largest
    variance first: the codebook quantizes ``((w - reference) @ basis) / scale`` (reference = the mean training
    field, basis = the orthonormal (P, P) eigenvectors as columns, scale = the square roots of their variances),
    and tokens decode to ``reference + (scale * codebook[tokens]) @ basis.T``.

    ``order`` (see ORDERS) places the weights in the sequence: tokens are always in sequence order, weights and
    `values` in the field's flatten order.
    """

    codebook: torch.Tensor  # (num_codes,) sorted, float32
    vocab: Vocab
    spec: FieldSpec
    offsets: str = "none"
    reference: torch.Tensor | None = None  # (num_params,) float32, or None for offsets = none
    scale: torch.Tensor | None = None  # (num_params,) float32 > 0, or None for offsets = none
    basis: torch.Tensor | None = None  # (num_params, num_params) float32, only for offsets = pca
    order: str = "input_first"

    def __post_init__(self) -> None:
        if self.offsets not in OFFSET_MODES:
            raise ValueError(f"offsets must be one of {', '.join(OFFSET_MODES)}, got {self.offsets!r}")
        if self.codebook.shape != (self.vocab.num_codes,) or not bool((self.codebook[1:] >= self.codebook[:-1]).all()):
            raise ValueError(f"codebook must be {self.vocab.num_codes} sorted values, got shape "
                             f"{tuple(self.codebook.shape)}")
        sequence_order(self.spec, self.order)  # checks the name
        if self.order != "input_first" and self.offsets == "pca":
            raise ValueError("offsets = pca orders the sequence by variance: it takes order = input_first")
        if self.offsets == "none":
            if self.reference is not None or self.scale is not None:
                raise ValueError("an offsets = none tokenizer has no reference field or scales")
            return
        p = self.spec.num_params
        for name in ("reference", "scale"):
            t = getattr(self, name)
            if t is None or t.shape != (p,) or t.dtype != torch.float32:
                raise ValueError(f"offsets = {self.offsets} needs a float32 '{name}' of shape ({p},), got "
                                 f"{None if t is None else (tuple(t.shape), t.dtype)}")
        if not bool((self.scale > 0).all()):
            raise ValueError("offset scales must be > 0")
        if self.offsets == "pca":
            if self.basis is None or self.basis.shape != (p, p) or self.basis.dtype != torch.float32:
                raise ValueError(f"offsets = pca needs a float32 'basis' of shape ({p}, {p}), got "
                                 f"{None if self.basis is None else (tuple(self.basis.shape), self.basis.dtype)}")
        elif self.basis is not None:
            raise ValueError(f"only an offsets = pca tokenizer has a basis, not offsets = {self.offsets}")

    @property
    def id(self) -> str:
        return tokenizer_id(self.codebook, self.offsets, self.reference, self.scale, self.basis, self.order)

    def values(self, weights: torch.Tensor) -> torch.Tensor:
        """The scalars the codebook quantizes: the weights (B, P) themselves, or their standardized offsets."""
        if self.offsets == "none":
            return weights
        offsets = weights - self.reference.to(weights.device)
        if self.basis is not None:
            offsets = offsets @ self.basis.to(weights.device)
        return offsets / self.scale.to(weights.device)

    def encode(self, weights: torch.Tensor) -> torch.Tensor:
        """Fields (B, num_params) -> tokens (B, num_params), int64 codes in sequence order."""
        codes = assign(self.values(weights), self.codebook.to(weights.device))
        if self.order == "input_first":
            return codes
        return codes[..., sequence_order(self.spec, self.order).to(codes.device)]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes (B, num_params), any integer dtype -> field weights (B, num_params), float32.

        The one way tokens become weights: sampling, tuning and every baseline that emits tokens decode here.
        """
        codes = self.codebook.to(tokens.device)[tokens.long()]
        if self.order != "input_first":
            codes = codes[..., sequence_order(self.spec, self.order).argsort().to(codes.device)]
        if self.offsets == "none":
            return codes
        offsets = self.scale.to(tokens.device) * codes
        if self.basis is not None:
            offsets = offsets @ self.basis.to(tokens.device).T
        return self.reference.to(tokens.device) + offsets


def save_tokenizer(path: Path, tok: Tokenizer | torch.Tensor, vocab: Vocab | None = None,
                   spec: FieldSpec | None = None) -> None:
    """Write `tok`; the older form ``save_tokenizer(path, codebook, vocab, spec)`` writes an offsets = none one."""
    if not isinstance(tok, Tokenizer):
        tok = Tokenizer(tok, vocab, spec)
    meta = {"num_codes": tok.vocab.num_codes, "num_classes": tok.vocab.num_classes, "vocab_size": tok.vocab.size,
            "field": tok.spec.to_meta(), "tokenizer_id": tok.id, "offsets": tok.offsets, "order": tok.order}
    tensors = {"codebook": tok.codebook}
    if tok.offsets != "none":
        tensors |= {"reference": tok.reference, "scale": tok.scale}
    if tok.basis is not None:
        tensors["basis"] = tok.basis
    save_tensors(path, tensors, meta)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer; files written before offsets existed (no 'offsets' metadata) load as offsets = none."""
    tensors, meta = load_tensors(path, {"codebook": torch.float32})
    try:
        vocab = Vocab(int(meta["num_codes"]), int(meta["num_classes"]))
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: missing vocabulary metadata") from None
    spec = FieldSpec.from_meta(meta.get("field", {}), str(path))
    offsets = meta.get("offsets", "none")
    if not isinstance(offsets, str) or offsets not in OFFSET_MODES:
        raise ArtifactError(f"{path}: unknown offsets mode {offsets!r} (known: {', '.join(OFFSET_MODES)})")
    order = meta.get("order", "input_first")
    if order not in ORDERS:
        raise ArtifactError(f"{path}: unknown order {order!r} (known: {', '.join(ORDERS)})")
    extra = [name for name in ("reference", "scale", "basis") if name in tensors]
    if offsets == "none" and extra:
        raise ArtifactError(f"{path}: has offset tensors {extra} but its metadata says offsets = none")
    try:
        return Tokenizer(tensors["codebook"], vocab, spec, offsets, tensors.get("reference"), tensors.get("scale"),
                         tensors.get("basis"), order)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def load_tokens(run_dir: Path, expected_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = run_dir / TOKENS_FILE
    tensors, meta = load_tensors(path, {"tokens": torch.int16, "labels": torch.int64})
    if meta.get("tokenizer_id") != expected_id:
        raise ArtifactError(f"{path}: made by another tokenizer; rerun `nefgpt tokenize --force`")
    tokens, labels = tensors["tokens"], tensors["labels"]
    if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
        raise ArtifactError(f"{path}: tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} don't match")
    return tokens.long(), labels
