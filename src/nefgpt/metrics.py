"""Image-set metrics: the MMD / COV / 1-NNA set scores and the within-class diversity ratio.

The set metrics follow PointFlow (Yang et al. 2019) and HyperDiffusion, with
S_g the generated set, S_r the reference set and D a distance (here SSIM
distance ``(1 - SSIM) / 2`` from nefgpt.ssim, so 0 for identical images).

The within-class diversity ratio (`diversity_ratio`) compares how varied the
samples of each class are with how varied the reference fields of that class
are: per class, the mean D over pairs of generated images divided by the same
for the reference images, averaged over classes. 1 is as varied as the data; a
model that draws one image per class scores 0. Unlike COV and 1-NNA it does not
depend on the sizes of the two sets (a mean over pairs is unbiased).
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError
from .ssim import ssim_distance


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
