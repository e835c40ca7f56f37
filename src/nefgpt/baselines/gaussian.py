"""Baseline: one Gaussian per class in weight space.

Each class gets the mean and covariance of its training fields. With ~420 fields
per class and 561 weights the sample covariance S is singular, so the full
model uses (1 - a) S + a diag(S): shrinkage toward the diagonal, with `a`
estimated per class as Ledoit and Wolf do (on standardized weights, where the
diagonal target is the identity) or fixed by ``baseline.shrinkage``.

Each class std is floored (see STD_FLOOR_REL), which makes the target the
floored diagonal: (1 - a) S + a diag(std^2). The covariance is stored as those
stds and an eigendecomposition of the shrunk matrix in std units, which serves
both sampling (x = mean + std * V sqrt(L) z) and the log-likelihood reported
as the train / held-out loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import ArtifactError
from ..gaussian_fit import fit_gaussian
from ..layout import CKPT_FILE
from .common import Fields, Fitted, check_range, load_fields, load_trained, sample_per_class, \
    train_in_one_pass

KIND = "gaussian"
# A weight into a unit that is dead in every field of a class never moves from the anchor, so its class std is
# ~0 and one held-out field where the unit lives gets a likelihood of ~0 (a mean NLL of 1e6). Flooring each
# class std at this share of the position's std over all training fields bounds that and barely changes samples.
STD_FLOOR_REL = 1e-2
_EIG_FLOOR = 1e-10


def draw(g: dict[str, torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, g["mean"].shape[0], generator=generator, dtype=torch.float64)
    return g["mean"] + g["std"] * ((z * g["eigvals"].sqrt()) @ g["eigvecs"].T)


def nll_per_weight(g: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each row of x, in nats per weight."""
    lam = g["eigvals"].clamp_min(_EIG_FLOOR)
    y = ((x.double() - g["mean"]) / g["std"]) @ g["eigvecs"]
    maha = (y * y / lam).sum(1)
    logdet = 2 * g["std"].log().sum() + lam.log().sum()
    p = x.shape[1]
    return 0.5 * (maha + logdet + p * math.log(2 * math.pi)) / p


def _check(cfg: RunConfig) -> None:
    if cfg.baseline.shrinkage != -1.0:
        check_range("baseline.shrinkage (or -1 to estimate it)", cfg.baseline.shrinkage, 0.0, 1.0)


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Fit every class in one pass (`resume` is accepted for the common interface; there is nothing to resume)."""
    _check(cfg)
    return train_in_one_pass(cfg, run_dir, KIND, lambda fields: _fit(cfg, run_dir, fields))


def _fit(cfg: RunConfig, run_dir: Path, fields: Fields) -> Fitted:
    heldout = load_fields(cfg, run_dir, "heldout")
    b = cfg.baseline
    p, c = fields.spec.num_params, fields.num_classes
    f64 = torch.float64
    model = {"mean": torch.zeros(c, p, dtype=f64), "std": torch.ones(c, p, dtype=f64),
             "eigvecs": torch.eye(p, dtype=f64).repeat(c, 1, 1), "eigvals": torch.ones(c, p, dtype=f64),
             "shrinkage": torch.ones(c, dtype=f64), "counts": torch.zeros(c, dtype=torch.long)}
    train_nll, val_nll = [], []
    floor = STD_FLOOR_REL * fields.weights.double().std(0, correction=0)
    for k in range(c):
        rows = fields.weights[fields.labels == k]
        if len(rows) == 0:
            continue
        g = fit_gaussian(rows, b.covariance, b.shrinkage, floor)
        for name, value in g.items():
            model[name][k] = value
        model["counts"][k] = len(rows)
        train_nll.append(nll_per_weight(g, rows))
        val_nll.append(nll_per_weight(g, heldout.weights[heldout.labels == k]))
    val = torch.cat(val_nll) if val_nll else torch.empty(0)
    summary = {
        "covariance": b.covariance,
        "shrinkage": {str(k): float(model["shrinkage"][k]) for k in range(c) if model["counts"][k] > 0},
        "loss": "negative log-likelihood under the class Gaussian, nats per weight",
        "train_loss": float(torch.cat(train_nll).mean()),
        "val_loss": float(val.mean()) if len(val) else None,
        "val_loss_median": float(val.median()) if len(val) else None,
    }
    return Fitted(model, {"covariance": b.covariance}, summary, {"config": vars(b).copy()})


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    fields, ckpt = load_trained(cfg, run_dir, KIND)
    m = ckpt["model"]
    n = cfg.sample.n_per_class

    def draw_classes(classes: list[int], _labels: torch.Tensor, gen: torch.Generator):
        try:
            per_class = [{name: m[name][k] for name in ("mean", "std", "eigvecs", "eigvals")} for k in classes]
        except (KeyError, IndexError, TypeError) as exc:
            raise ArtifactError(f"{run_dir / CKPT_FILE}: not a valid {KIND} checkpoint ({exc})") from None
        return torch.cat([draw(g, n, gen) for g in per_class]).float(), {}

    return sample_per_class(cfg, run_dir, fields, KIND, labels, draw_classes)
