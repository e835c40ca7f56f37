"""Image-set metrics: pairwise SSIM and the MMD / COV / 1-NNA set scores.

SSIM follows Wang et al. 2004 exactly as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``:
an 11x11 normalised Gaussian window, K1=0.01, K2=0.03, and the mean of the SSIM
map over the positions where the window fits entirely inside the image.

A full matrix of pairs is computed as batched matrix products: per window
position, the covariance of every pair of images is a dot product of their
Gaussian-weighted patches, so one ``bmm`` gives all of them at once.

The set metrics follow PointFlow (Yang et al. 2019) and HyperDiffusion, with
S_g the generated set, S_r the reference set and D a distance (here SSIM
distance ``(1 - SSIM) / 2``, so 0 for identical images).

The within-class diversity ratio (`diversity_ratio`) compares how varied the
samples of each class are with how varied the reference fields of that class
are: per class, the mean D over pairs of generated images divided by the same
for the reference images, averaged over classes. 1 is as varied as the data; a
model that draws one image per class scores 0. Unlike COV and 1-NNA it does not
depend on the sizes of the two sets (a mean over pairs is unbiased).
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


def _check_matrix(d: torch.Tensor, name: str) -> None:
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or d.numel() == 0:
        raise UsageError(f"{name} must be a non-empty 2-D distance matrix")


def mmd(d_gr: torch.Tensor) -> float:
    """Minimum matching distance: mean over reference Y of min over generated X of D(X, Y).

    ``d_gr`` is (|S_g|, |S_r|). Lower is better; it measures fidelity.
    """
    _check_matrix(d_gr, "d_gr")
    return d_gr.min(dim=0).values.double().mean().item()


def coverage(d_gr: torch.Tensor) -> float:
    """Fraction of reference items that are the nearest neighbour of some generated item.

    ``d_gr`` is (|S_g|, |S_r|). Higher is better; it measures diversity. An
    exact tie goes to the lowest reference index.
    """
    _check_matrix(d_gr, "d_gr")
    return d_gr.argmin(dim=1).unique().numel() / d_gr.shape[1]


def _own_set_credit(d_own: torch.Tensor, d_other: torch.Tensor, rows_per_step: int = 1024) -> torch.Tensor:
    """Per row of ``d_own``: the fraction of its nearest neighbours (self excluded) in its own set."""
    credit = torch.empty(len(d_own), dtype=torch.float64, device=d_own.device)
    # Row blocks bound the extra memory to a copy of rows_per_step rows.
    for start in range(0, len(d_own), rows_per_step):
        stop = start + rows_per_step
        own = d_own[start:stop].clone()
        rows = torch.arange(len(own), device=own.device)
        own[rows, rows + start] = math.inf
        other = d_other[start:stop]
        nearest = torch.minimum(own.min(dim=1).values, other.min(dim=1).values)[:, None]
        n_own = (own == nearest).sum(dim=1).double()
        n_other = (other == nearest).sum(dim=1).double()
        credit[start:stop] = n_own / (n_own + n_other)
    return credit


def one_nna(d_gg: torch.Tensor, d_rr: torch.Tensor, d_gr: torch.Tensor) -> float:
    """1-nearest-neighbour accuracy of telling S_g from S_r in the pooled set.

    Each item is classified by its nearest other item; the score is the
    fraction classified into their own set. 0.5 is ideal for equal-size sets;
    near 1 means the sets are easy to tell apart, and well below 0.5 means
    generated items sit right on top of reference items (memorisation).

    Ties: when several items are equally near, the item gets the fraction of
    them that lie in its own set. That is the expected accuracy under a random
    tie-break, and it keeps the score independent of the order of either set
    (exact ties arise from duplicate images).
    """
    for d, name in ((d_gg, "d_gg"), (d_rr, "d_rr"), (d_gr, "d_gr")):
        _check_matrix(d, name)
    n_g, n_r = d_gr.shape
    if d_gg.shape != (n_g, n_g) or d_rr.shape != (n_r, n_r):
        shapes = ", ".join(f"{name} {tuple(d.shape)}" for d, name in ((d_gg, "d_gg"), (d_rr, "d_rr"), (d_gr, "d_gr")))
        raise UsageError(f"shapes disagree: {shapes}")
    correct = _own_set_credit(d_gg, d_gr).sum() + _own_set_credit(d_rr, d_gr.T).sum()
    return (correct / (n_g + n_r)).item()


def _metrics_from(d_gg: torch.Tensor, d_rr: torch.Tensor, d_gr: torch.Tensor) -> dict[str, float]:
    return {"mmd": mmd(d_gr), "cov": coverage(d_gr), "1nna": one_nna(d_gg, d_rr, d_gr)}


def set_metrics(generated: torch.Tensor, reference: torch.Tensor, chunk: int | None = None) -> dict[str, float]:
    """MMD, COV and 1-NNA of a generated image set against a reference set, under SSIM distance.

    The sets should be the same size, as in the PointFlow protocol: COV and
    1-NNA are only comparable between evaluations that use equal sizes.
    """
    d_gg = ssim_distance(generated, None, chunk)
    d_rr = ssim_distance(reference, None, chunk)
    return _metrics_from(d_gg, d_rr, ssim_distance(generated, reference, chunk))


def set_metrics_by_class(
    generated: torch.Tensor,
    gen_labels: torch.Tensor,
    reference: torch.Tensor,
    ref_labels: torch.Tensor,
    chunk: int | None = None,
) -> dict[str, dict]:
    """Set metrics overall and within each class.

    Returns ``{"overall": {...}, "per_class": {"3": {"mmd", "cov", "1nna",
    "n_generated", "n_reference"}, ...}}``. A class present in only one of
    the two sets has ``None`` for its metrics. The three distance matrices are
    computed once; each class uses its sub-matrices.
    """
    if gen_labels.shape != (len(generated),) or ref_labels.shape != (len(reference),):
        raise UsageError("there must be one label per image")
    d_gg = ssim_distance(generated, None, chunk)
    d_rr = ssim_distance(reference, None, chunk)
    d_gr = ssim_distance(generated, reference, chunk)
    gen_labels, ref_labels = gen_labels.to(d_gg.device), ref_labels.to(d_gg.device)
    per_class: dict[str, dict] = {}
    for c in torch.unique(torch.cat([gen_labels, ref_labels])).tolist():
        g = torch.nonzero(gen_labels == c).flatten()
        r = torch.nonzero(ref_labels == c).flatten()
        entry: dict = {"n_generated": len(g), "n_reference": len(r)}
        if len(g) and len(r):
            entry.update(_metrics_from(d_gg[g][:, g], d_rr[r][:, r], d_gr[g][:, r]))
        else:
            entry.update({"mmd": None, "cov": None, "1nna": None})
        per_class[str(c)] = entry
    return {"overall": _metrics_from(d_gg, d_rr, d_gr), "per_class": per_class}


# SSIM of identical images is 1 only up to float32 rounding: a mean distance below this is "all the same".
_SAME_IMAGES = 1e-5


def mean_pairwise_distance(images: torch.Tensor, chunk: int | None = None) -> float:
    """Mean SSIM distance over the pairs of distinct images (i < j) of a set; nan for fewer than 2 images."""
    n = len(images)
    if n < 2:
        return math.nan
    d = ssim_distance(images, None, chunk).double()
    return float((d.sum() - d.diagonal().sum()) / (n * (n - 1)))


def diversity_by_class(
    generated: torch.Tensor,
    gen_labels: torch.Tensor,
    reference: torch.Tensor,
    ref_labels: torch.Tensor,
    chunk: int | None = None,
) -> dict:
    """Per class, the mean pairwise SSIM distance of the generated and of the reference images, and their ratio.

    Returns ``{"ratio": mean of the class ratios or None, "per_class": {"3": {"generated", "reference", "ratio",
    "n_generated", "n_reference"}, ...}}``. A class's ratio is None when either set has fewer than 2 images of
    it or its reference images are all identical (mean distance at most _SAME_IMAGES, float32 rounding of 0);
    such classes are left out of the mean.
    """
    if gen_labels.shape != (len(generated),) or ref_labels.shape != (len(reference),):
        raise UsageError("there must be one label per image")
    per_class: dict[str, dict] = {}
    ratios = []
    for c in torch.unique(torch.cat([gen_labels.cpu(), ref_labels.cpu()])).tolist():
        g = generated[(gen_labels == c).to(generated.device)]
        r = reference[(ref_labels == c).to(reference.device)]
        d_g, d_r = mean_pairwise_distance(g, chunk), mean_pairwise_distance(r, chunk)
        ratio = d_g / d_r if math.isfinite(d_g) and math.isfinite(d_r) and d_r > _SAME_IMAGES else None
        per_class[str(c)] = {"generated": d_g if math.isfinite(d_g) else None,
                             "reference": d_r if math.isfinite(d_r) else None,
                             "ratio": ratio, "n_generated": len(g), "n_reference": len(r)}
        if ratio is not None:
            ratios.append(ratio)
    return {"ratio": sum(ratios) / len(ratios) if ratios else None, "per_class": per_class}


def diversity_ratio(
    generated: torch.Tensor,
    gen_labels: torch.Tensor,
    reference: torch.Tensor,
    ref_labels: torch.Tensor,
    chunk: int | None = None,
) -> float:
    """Within-class diversity ratio: per class, the mean pairwise SSIM distance D = (1 - SSIM) / 2 of the generated
    images over that of the reference images, averaged over the classes where both are defined (see
    `diversity_by_class`); nan when no class is. 1 is as varied as the reference, 0 is one image per class.
    """
    ratio = diversity_by_class(generated, gen_labels, reference, ref_labels, chunk)["ratio"]
    return math.nan if ratio is None else ratio
