"""Gaussians fitted to rows of weights: the Gaussian baseline's class model, and the first-layer prior that
sampling can multiply into the GPT (nefgpt.weight_prior).

`fit_gaussian` keeps the covariance as per-position stds and an eigendecomposition of the shrunk correlation
matrix, (1 - a) R + a I, with the shrinkage a estimated as Ledoit and Wolf do on the standardized rows.

`fit_mixture` fits a mixture of Gaussians in the rows' leading principal components (EM from a k-means start),
plus an independent per-position Gaussian for what those components leave out: a few hundred rows can't
pin down a full covariance per component in hundreds of dimensions, but they can in a few dozen.
"""

from __future__ import annotations

import torch

STD_FLOOR = 1e-8  # a class with one field has zero spread; keep its likelihood finite
# The log weight of a padding component (pad_mixture): far below any real one, and finite, as the safetensors
# files here must be.
ABSENT = -1e30


def ledoit_wolf_diagonal(y: torch.Tensor) -> float:
    """Shrinkage weight toward the identity for standardized, centred data y (n, p).

    Ledoit-Wolf's estimate of E||R - Sigma||^2 / ||R - I||^2 over the off-diagonal
    entries (the diagonal of a correlation matrix needs no shrinking), clipped to [0, 1].
    """
    n = y.shape[0]
    r = y.T @ y / n
    off = ~torch.eye(r.shape[0], dtype=torch.bool)
    delta = float((r[off] ** 2).sum())
    y2 = y * y
    beta = float(((y2.T @ y2)[off].sum() / n - (r[off] ** 2).sum()) / n)
    if delta <= 0:
        return 1.0
    return min(max(beta / delta, 0.0), 1.0)


def fit_gaussian(x: torch.Tensor, covariance: str = "full", shrinkage: float = -1.0,
                 std_floor: torch.Tensor | float = STD_FLOOR) -> dict[str, torch.Tensor]:
    """Mean, stds, and eigenvectors/values of the shrunk correlation matrix of rows x (n, p), in float64."""
    x = x.double()
    n, p = x.shape
    mean = x.mean(0)
    std = torch.maximum(x.std(0, correction=0), torch.as_tensor(std_floor, dtype=torch.float64)).clamp_min(STD_FLOOR)
    if covariance == "diag" or n < 2:
        return {"mean": mean, "std": std, "eigvecs": torch.eye(p, dtype=torch.float64),
                "eigvals": torch.ones(p, dtype=torch.float64), "shrinkage": torch.tensor(1.0, dtype=torch.float64)}
    y = (x - mean) / std
    a = ledoit_wolf_diagonal(y) if shrinkage < 0 else shrinkage
    corr = (1 - a) * (y.T @ y / n) + a * torch.eye(p, dtype=torch.float64)
    eigvals, eigvecs = torch.linalg.eigh((corr + corr.T) / 2)
    return {"mean": mean, "std": std, "eigvecs": eigvecs, "eigvals": eigvals.clamp_min(0),
            "shrinkage": torch.tensor(a, dtype=torch.float64)}


def jittered_cholesky(covs: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of covariances (..., p, p), symmetrized, with 1e-10 on the diagonal: the fits keep them
    positive definite, and the jitter covers rounding at dead-unit positions (variance ~ 0)."""
    eye = torch.eye(covs.shape[-1], dtype=covs.dtype)
    return torch.linalg.cholesky((covs + covs.transpose(-1, -2)) / 2 + 1e-10 * eye)


def _kmeans(z: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Cluster labels (n,) of rows z (n, d): k-means++ seeding, then Lloyd's iterations."""
    centres = z[torch.randint(len(z), (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(z, centres).min(1).values ** 2
        centres = torch.cat([centres, z[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)
        centres = torch.stack([z[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    return torch.cdist(z, centres).argmin(1)


def fit_mixture(x: torch.Tensor, components: int, dims: int, seed: int = 0, iters: int = 100,
                tol: float = 1e-6) -> dict[str, torch.Tensor]:
    """A mixture of `components` Gaussians on rows x (n, p), in float64, in its low-rank form (mixture_moments
    expands it): centre (p,), basis (p, d), component_means (K, d), component_covs (K, d, d), residual_var (p,),
    log_weights (K,).

    Each component is full-covariance in the leading d = `dims` principal directions of the rows (the columns
    of basis) and shares the per-position variance of the residual outside them. The EM's covariances get 1e-6
    of the mean component variance on their diagonal, so a component that collapses onto a few rows stays
    positive definite. Fewer rows than components or dims give fewer.
    """
    x = x.double()
    n, p = x.shape
    k = max(1, min(components, n))
    d = max(1, min(dims, n - 1, p))
    centre = x.mean(0)
    centred = x - centre
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:d].T  # (p, d)
    z = centred @ basis
    resid_var = (centred - z @ basis.T).var(0, correction=0).clamp_min(STD_FLOOR ** 2)
    reg = 1e-6 * float(z.var(0, correction=0).mean()) + 1e-300
    gen = torch.Generator().manual_seed(seed)
    resp = torch.nn.functional.one_hot(_kmeans(z, k, gen), k).double()
    eye = torch.eye(d, dtype=torch.float64)
    last = -float("inf")
    for _ in range(iters):
        nk = resp.sum(0) + 1e-12  # M step
        mu = (resp.T @ z) / nk[:, None]
        diff = z[None] - mu[:, None]  # (k, n, d)
        cov = torch.einsum("kn,kni,knj->kij", resp.T, diff, diff) / nk[:, None, None] + reg * eye
        logw = (nk / n).log()
        logp = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(z[:, None]) + logw
        total = float(torch.logsumexp(logp, 1).mean())  # E step
        resp = torch.softmax(logp, 1)
        if total - last < tol:
            break
        last = total
    return {"centre": centre, "basis": basis, "component_means": mu, "component_covs": cov,
            "residual_var": resid_var, "log_weights": logw}


def mixture_moments(m: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each component's mean (K, p) and covariance (K, p, p) in the rows' own coordinates, from fit_mixture."""
    means = m["centre"] + m["component_means"] @ m["basis"].T
    covs = m["basis"] @ m["component_covs"] @ m["basis"].T + torch.diag(m["residual_var"])
    return means, (covs + covs.transpose(1, 2)) / 2


def pad_mixture(m: dict[str, torch.Tensor], components: int, dims: int) -> dict[str, torch.Tensor]:
    """fit_mixture's parameters padded to `components` and `dims`: a class with few rows gets fewer of both.

    Padding components get weight ABSENT; padding directions a zero basis column, so they add nothing.
    """
    k, d = m["component_means"].shape
    pad_k, pad_d = components - k, dims - d
    out = dict(m)
    out["basis"] = torch.nn.functional.pad(m["basis"], (0, pad_d))
    means = torch.nn.functional.pad(m["component_means"], (0, pad_d))
    out["component_means"] = torch.cat([means, means[:1].expand(pad_k, dims)])
    covs = torch.nn.functional.pad(m["component_covs"], (0, pad_d, 0, pad_d))
    covs[:, d:, d:] = torch.eye(pad_d, dtype=covs.dtype)
    out["component_covs"] = torch.cat([covs, covs[:1].expand(pad_k, dims, dims)])
    out["log_weights"] = torch.cat([m["log_weights"], torch.full((pad_k,), ABSENT, dtype=torch.float64)])
    return out
