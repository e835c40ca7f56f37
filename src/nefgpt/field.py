"""The neural field: a tiny MLP from an (x, y) position to a brightness logit.

A field is stored as one flat weight vector so that a GPT can read it as a
sequence. The flatten order is the PyTorch state-dict order of the MLP:
``W1 (h1 x in, row-major), b1, W2 (h2 x h1), b2, ..., W_out (1 x h_last), b_out``.
With 4 octaves and hidden sizes (16, 16) that is 16*16+16 + 16*16+16 + 16+1 = 561.

Coordinates are pixel centres ``(i + 0.5) / res`` in [0, 1], x along columns and
y along rows, for fitting and rendering alike, so a field fitted at 28x28 renders
at any resolution without the half-pixel shift of the reference code.
The encoding per octave k (frequency pi * 2^k) is
``sin(w x), sin(w y), cos(w x), cos(w y)``, giving 4 * octaves features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ArtifactError


@dataclass(frozen=True)
class FieldSpec:
    """The architecture of one field; everything else is derived from it."""

    octaves: int = 4
    hidden: tuple[int, ...] = (16, 16)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.octaves < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"invalid field architecture: octaves={self.octaves}, hidden={self.hidden}")

    @property
    def in_features(self) -> int:
        return 4 * self.octaves

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each linear layer, input to output."""
        sizes = [self.in_features, *self.hidden, 1]
        return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]

    @property
    def layer_params(self) -> list[int]:
        """Parameters of each linear layer (its weight, then its bias), in flatten order."""
        return [o * i + o for o, i in self.layer_shapes]

    @property
    def num_params(self) -> int:
        return sum(self.layer_params)

    def to_meta(self) -> dict[str, Any]:
        return {"octaves": self.octaves, "hidden": list(self.hidden), "num_params": self.num_params}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str = "artifact") -> FieldSpec:
        try:
            spec = cls(octaves=int(meta["octaves"]), hidden=tuple(meta["hidden"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: missing or invalid field architecture ({exc})") from None
        return spec

    def check_weights(self, weights: torch.Tensor, source: str) -> None:
        """Weights must be one row of `num_params` values per field."""
        if weights.ndim != 2:
            raise ArtifactError(f"{source}: weights must be one row per field, got shape {tuple(weights.shape)}")
        if weights.shape[1] != self.num_params:
            raise ArtifactError(f"{source}: weights have {weights.shape[1]} columns, architecture needs {self.num_params}")

    def check_matches(self, other: FieldSpec, source: str) -> None:
        if self != other:
            raise ArtifactError(
                f"{source}: field architecture {other.to_meta()} differs from the configured {self.to_meta()}"
            )


def pixel_coords(res: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(res*res, 2) pixel-centre coordinates (x, y) in row-major image order."""
    c = (torch.arange(res, dtype=torch.float32, device=device) + 0.5) / res
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def encode(coords: torch.Tensor, octaves: int) -> torch.Tensor:
    """(P, 2) coordinates -> (P, 4*octaves) sin/cos features."""
    freqs = math.pi * 2.0 ** torch.arange(octaves, dtype=coords.dtype, device=coords.device)
    ang = coords[:, None, :] * freqs[None, :, None]  # (P, octaves, 2)
    return torch.cat([ang.sin(), ang.cos()], dim=2).reshape(coords.shape[0], -1)


def unflatten(spec: FieldSpec, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, num_params) -> per layer (W (B, out, in), b (B, out)) views, in flatten order."""
    if weights.ndim != 2 or weights.shape[1] != spec.num_params:
        raise ValueError(f"expected weights of shape (B, {spec.num_params}), got {tuple(weights.shape)}")
    layers, pos = [], 0
    for out_f, in_f in spec.layer_shapes:
        w = weights[:, pos : pos + out_f * in_f].reshape(-1, out_f, in_f)
        pos += out_f * in_f
        b = weights[:, pos : pos + out_f]
        pos += out_f
        layers.append((w, b))
    return layers


def flatten(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of `unflatten`."""
    return torch.cat([t for w, b in layers for t in (w.flatten(1), b)], dim=1)


def forward(spec: FieldSpec, weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Logits (B, P) of B fields at P encoded positions; features is (P, in_features)."""
    layers = unflatten(spec, weights)
    h = features.unsqueeze(0)  # broadcasts against the batch of fields
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b.unsqueeze(1), h.expand(w.shape[0], -1, -1), w.transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h.squeeze(2)


@torch.no_grad()
def render(spec: FieldSpec, weights: torch.Tensor, res: int = 28, batch_size: int = 1024) -> torch.Tensor:
    """Brightness images (B, res, res) in [0, 1] of B fields."""
    feats = encode(pixel_coords(res, weights.device), spec.octaves)
    out = [
        torch.sigmoid(forward(spec, chunk.float(), feats)).reshape(-1, res, res)
        for chunk in weights.split(batch_size)
    ]
    return torch.cat(out) if out else weights.new_zeros((0, res, res))


def init_random(spec: FieldSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, num_params) fields with PyTorch's default nn.Linear initialization."""
    layers = []
    for out_f, in_f in spec.layer_shapes:
        bound = 1.0 / math.sqrt(in_f)
        w = (torch.rand(n, out_f, in_f, generator=generator) * 2 - 1) * bound
        b = (torch.rand(n, out_f, generator=generator) * 2 - 1) * bound
        layers.append((w, b))
    return flatten(layers)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]; (B, ...) -> (B,)."""
    mse = (pred - target).flatten(1).pow(2).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)
