"""Pairwise SSIM between two sets of images, and nearest neighbours by SSIM distance.

SSIM follows Wang et al. 2004 exactly as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``:
an 11x11 normalised Gaussian window, K1=0.01, K2=0.03, and the mean of the SSIM
map over the positions where the window fits entirely inside the image
(tests/test_metrics.py checks it against scikit-image).

A full matrix of pairs is computed as batched matrix products: per window
position, the covariance of every pair of images is a dot product of their
Gaussian-weighted patches, so one ``bmm`` gives all of them at once. The
nearest-neighbour searches walk the same blocks and never hold the whole matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import UsageError

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
_C1 = K1**2  # data_range is 1
_C2 = K2**2

# Each block of pairs materialises a few float32 tensors of shape
# (positions, rows, cols); this keeps each one near a size that is both fast
# (large enough for efficient matmuls) and far below the 2 GB memory goal.
_BLOCK_BYTES = 48 << 20
# Patch statistics take _STATS_FLOATS per window position per image (about
# 160 kB for a 28x28 image); they are kept for the smaller set when they fit,
# and recomputed per block otherwise.
_STATS_FLOATS = WINDOW * WINDOW + 3  # covariance factor (121 + 1), mean, variance
_CACHE_BYTES = 1 << 30


@dataclass
class _PatchStats:
    """Per-window statistics of a block of images, laid out position-first for bmm."""

    mean: torch.Tensor  # (P, n) Gaussian-weighted local mean
    var: torch.Tensor  # (P, n) Gaussian-weighted local variance
    # (P, n, WINDOW**2 + 1): sqrt(2 g) * (patch - mean), then a constant sqrt(C2),
    # so that the dot product of two rows is 2 * cov + C2, the SSIM contrast
    # numerator, with no separate pass over the large pairwise tensor.
    cov_factor: torch.Tensor


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The flattened 11x11 window that scipy's gaussian_filter uses (truncate=3.5)."""
    offsets = torch.arange(WINDOW, dtype=torch.float64) - WINDOW // 2
    g = torch.exp(-0.5 * (offsets / SIGMA) ** 2)
    g /= g.sum()
    return torch.outer(g, g).reshape(-1).to(device=device, dtype=torch.float32)


def _patch_stats(images: torch.Tensor, window: torch.Tensor) -> _PatchStats:
    n, h, w = images.shape
    patches = (
        images.to(torch.float32)
        .unfold(1, WINDOW, 1)
        .unfold(2, WINDOW, 1)
        .permute(1, 2, 0, 3, 4)
        .reshape((h - WINDOW + 1) * (w - WINDOW + 1), n, WINDOW * WINDOW)
    )
    mean = patches @ window
    # Centring each patch on its own local mean, rather than using
    # E[xy] - E[x]E[y], avoids cancellation in flat regions, where the
    # covariance is ~0 but E[xy] is ~mean^2; that keeps float32 exact enough.
    centred = (patches - mean[..., None]).mul_((2.0 * window).sqrt())
    var = (centred * centred).sum(-1).mul_(0.5)
    cov_factor = torch.nn.functional.pad(centred, (0, 1), value=math.sqrt(_C2))
    return _PatchStats(mean=mean, var=var, cov_factor=cov_factor)


def _ssim_block(sa: _PatchStats, sb: _PatchStats) -> torch.Tensor:
    """Mean SSIM of every pair in two blocks: (n_a, n_b)."""
    mua, mub = sa.mean[:, :, None], sb.mean[:, None, :]
    # In-place updates keep the working set to two (P, n_a, n_b) tensors.
    s = torch.bmm(sa.cov_factor, sb.cov_factor.transpose(1, 2))
    work = torch.mul(2.0 * mua, mub).add_(_C1)
    s.mul_(work)
    torch.add(mua * mua + _C1, mub * mub, out=work)
    s.div_(work)
    torch.add(sa.var[:, :, None] + _C2, sb.var[:, None, :], out=work)
    s.div_(work)
    return s.mean(0)


class _BlockStats:
    """Patch statistics of consecutive blocks of images, cached when asked to."""

    def __init__(self, images: torch.Tensor, chunk: int, window: torch.Tensor, cache: bool) -> None:
        self.images, self.chunk, self.window = images, chunk, window
        self.cache: dict[int, _PatchStats] | None = {} if cache else None

    def __len__(self) -> int:
        return -(-len(self.images) // self.chunk)

    def span(self, k: int) -> slice:
        return slice(k * self.chunk, min((k + 1) * self.chunk, len(self.images)))

    def __getitem__(self, k: int) -> _PatchStats:
        if self.cache is not None and k in self.cache:
            return self.cache[k]
        stats = _patch_stats(self.images[self.span(k)], self.window)
        if self.cache is not None:
            self.cache[k] = stats
        return stats


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise UsageError(f"{name} must be a float tensor of shape (N, H, W)")
    if min(x.shape[1:]) < WINDOW:
        raise UsageError(f"{name}: images are {tuple(x.shape[1:])}, SSIM needs at least {WINDOW}x{WINDOW}")


def _default_chunk(image_shape: torch.Size) -> int:
    positions = (image_shape[0] - WINDOW + 1) * (image_shape[1] - WINDOW + 1)
    return max(8, math.isqrt(_BLOCK_BYTES // (4 * positions)))


def _ssim_blocks(
    inner: torch.Tensor, outer: torch.Tensor | None, chunk: int | None
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield (inner rows, outer cols, SSIM block) covering inner x outer.

    With ``outer=None`` the matrix is inner x inner and only blocks on or above
    the diagonal are produced. Each outer block's statistics are computed once;
    the inner set's are cached when they fit in memory, so pass the smaller set
    as ``inner``. Arguments are checked at the call, not at the first block.
    """
    _check_images(inner, "images")
    if outer is not None:
        _check_images(outer, "images")
        if inner.shape[1:] != outer.shape[1:]:
            raise UsageError(f"image sizes differ: {tuple(inner.shape[1:])} vs {tuple(outer.shape[1:])}")
    if chunk is None:
        chunk = _default_chunk(inner.shape[1:])
    elif chunk < 1:
        raise UsageError(f"chunk must be positive, got {chunk}")
    window = _gaussian_window(inner.device)
    positions = (inner.shape[1] - WINDOW + 1) * (inner.shape[2] - WINDOW + 1)
    fits = len(inner) * positions * _STATS_FLOATS * 4 <= _CACHE_BYTES
    rows = _BlockStats(inner, chunk, window, cache=fits)
    cols = rows if outer is None else _BlockStats(outer, chunk, window, cache=False)

    def blocks() -> Iterator[tuple[slice, slice, torch.Tensor]]:
        for j in range(len(cols)):
            col_stats = cols[j]
            for i in range(j + 1 if outer is None else len(rows)):
                yield rows.span(i), cols.span(j), _ssim_block(rows[i], col_stats)

    return blocks()


def ssim_matrix(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """SSIM of every image in ``a`` (N, H, W) against every image in ``b`` (M, H, W).

    Returns an (N, M) float32 matrix. With ``b=None`` it returns the exactly
    symmetric (N, N) matrix of ``a`` against itself at about half the cost.
    ``chunk`` is the side of the blocks of pairs computed at once; the default
    keeps memory to a few hundred MB whatever N and M are.
    """
    if b is None:
        blocks = _ssim_blocks(a, None, chunk)
        out = torch.empty(len(a), len(a), device=a.device)
        for rows, cols, block in blocks:
            if rows == cols:  # bmm need not give a bit-symmetric diagonal block
                block = (block + block.T) / 2
            out[rows, cols] = block
            out[cols, rows] = block.T
        return out
    swap = len(a) > len(b)  # the smaller set goes inner, where its statistics are cached
    blocks = _ssim_blocks(b, a, chunk) if swap else _ssim_blocks(a, b, chunk)
    out = torch.empty(len(a), len(b), device=a.device)
    for rows, cols, block in blocks:
        if swap:
            out[cols, rows] = block.T
        else:
            out[rows, cols] = block
    return out


def ssim_distance(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """(1 - SSIM) / 2: 0 for identical images, at most 1."""
    return ssim_matrix(a, b, chunk).neg_().add_(1.0).div_(2.0)


def nearest_distance(
    query: torch.Tensor, pool: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM distance from each query image to its nearest pool image, and that image's index.

    Never holds the full query x pool matrix, so the pool can be a whole
    training set. Ties go to the lowest pool index.
    """
    blocks = _ssim_blocks(query, pool, chunk)
    best = torch.full((len(query),), -math.inf, device=query.device)
    index = torch.zeros(len(query), dtype=torch.int64, device=query.device)
    for rows, cols, block in blocks:
        block_best, arg = block.max(dim=1)
        better = block_best > best[rows]  # strict, so an earlier block wins a tie
        best[rows] = torch.where(better, block_best, best[rows])
        index[rows] = torch.where(better, arg + cols.start, index[rows])
    return (1.0 - best) / 2.0, index


def nearest_k(
    query: torch.Tensor, pool: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM distances (Q, k) from each query image to its k nearest pool images, nearest first, and their indices.

    Like `nearest_distance`, it never holds the full query x pool matrix. Ties go
    to the lowest pool index.
    """
    if not 1 <= k <= len(pool):
        raise UsageError(f"k must be between 1 and the pool size {len(pool)}, got {k}")
    blocks = _ssim_blocks(query, pool, chunk)
    best = torch.full((len(query), k), -math.inf, device=query.device)
    index = torch.full((len(query), k), -1, dtype=torch.int64, device=query.device)
    for rows, cols, block in blocks:
        cand = torch.cat([best[rows], block], dim=1)
        block_idx = torch.arange(cols.start, cols.stop, device=query.device).expand(len(block), -1)
        cand_idx = torch.cat([index[rows], block_idx], dim=1)
        # Sorting by (similarity desc, index asc) keeps ties deterministic, whatever the block order.
        order = torch.argsort(cand_idx, dim=1, stable=True)
        cand, cand_idx = cand.gather(1, order), cand_idx.gather(1, order)
        top = torch.argsort(cand, dim=1, descending=True, stable=True)[:, :k]
        best[rows], index[rows] = cand.gather(1, top), cand_idx.gather(1, top)
    return (1.0 - best) / 2.0, index
