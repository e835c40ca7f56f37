"""A Gaussian with Ledoit-Wolf shrinkage, fitted to rows of weights: the Gaussian baseline's class model, and the
first-layer prior that sampling can multiply into the GPT (nefgpt.weight_prior).

The covariance is kept as per-position stds and an eigendecomposition of the shrunk correlation matrix,
(1 - a) R + a I, with the shrinkage a estimated as Ledoit and Wolf do on the standardized rows.
"""

from __future__ import annotations

import torch

STD_FLOOR = 1e-8  # a class with one field has zero spread; keep its likelihood finite


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
