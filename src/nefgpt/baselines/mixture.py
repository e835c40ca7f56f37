"""Baseline: a mixture of Gaussians per class in weight space, in the class's leading principal directions.

One Gaussian per class (baselines/gaussian.py) blurs a class's styles together: a 7 with and without its
bar, a slanted and an upright 1. Each class here gets ``baseline.components`` full-covariance Gaussians
in its ``baseline.dims`` leading principal directions, fitted by EM from a k-means start, plus an
independent per-position Gaussian for the residual outside them (nefgpt.gaussian_fit.fit_mixture, the fit
the GPT's first-layer prior uses with `sample.prior_components`). A few hundred fields per class can pin
down a covariance in a few dozen dimensions, not in 561.

The reported loss is the negative log-likelihood under the class mixture, in nats per weight, like the
Gaussian baseline's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import ArtifactError, UsageError
from ..gaussian_fit import fit_mixture, jittered_cholesky, mixture_moments, pad_mixture
from ..layout import CKPT_FILE
from .common import Fields, Fitted, load_fields, load_trained, sample_per_class, train_in_one_pass

KIND = "mixture"
_LOW_RANK = ("centre", "basis", "component_means", "component_covs", "residual_var", "log_weights")


def class_mixture(model: dict, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class k's component means (K, p), Cholesky factors (K, p, p) and log weights (K,), from the checkpoint's
    low-rank parameters (the full factors of 16 components x 561 weights would take 40 MB per class)."""
    means, covs = mixture_moments({key: model[key][k] for key in _LOW_RANK})
    return means, jittered_cholesky(covs), model["log_weights"][k]


def nll_per_weight(means: torch.Tensor, chols: torch.Tensor, log_weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each row of x under the mixture, in nats per weight."""
    dist = torch.distributions.MultivariateNormal(means, scale_tril=chols)
    return -torch.logsumexp(dist.log_prob(x.double()[:, None]) + log_weights, 1) / x.shape[1]


def draw(means: torch.Tensor, chols: torch.Tensor, log_weights: torch.Tensor, n: int,
         generator: torch.Generator) -> torch.Tensor:
    component = torch.multinomial(log_weights.exp(), n, replacement=True, generator=generator)
    z = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    return means[component] + (chols[component] @ z[..., None])[..., 0]


def _check(cfg: RunConfig) -> None:
    b = cfg.baseline
    if b.components < 1 or b.dims < 1:
        raise UsageError(f"baseline.components and baseline.dims must be >= 1, got {b.components} and {b.dims}")


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Fit every class in one pass (`resume` is accepted for the common interface; there is nothing to resume)."""
    _check(cfg)
    return train_in_one_pass(cfg, run_dir, KIND, lambda fields: _fit(cfg, run_dir, fields))


def _fit(cfg: RunConfig, run_dir: Path, fields: Fields) -> Fitted:
    heldout = load_fields(cfg, run_dir, "heldout")
    b = cfg.baseline
    p, c, k = fields.spec.num_params, fields.num_classes, b.components
    fits, counts, train_nll, val_nll = [], torch.zeros(c, dtype=torch.long), [], []
    for cls in range(c):
        rows = fields.weights[fields.labels == cls]
        # A class without fields is never sampled (sample_classes); the pooled fit only keeps the shapes whole.
        fits.append(pad_mixture(fit_mixture(rows if len(rows) else fields.weights, k, b.dims, seed=b.seed + cls), k, b.dims))
        if len(rows) == 0:
            continue
        counts[cls] = len(rows)
        mixture = class_mixture({key: f[None] for key, f in fits[-1].items()}, 0)
        train_nll.append(nll_per_weight(*mixture, rows))
        val_nll.append(nll_per_weight(*mixture, heldout.weights[heldout.labels == cls]))
    model = {key: torch.stack([f[key] for f in fits]) for key in _LOW_RANK}
    model["counts"] = counts
    val = torch.cat(val_nll) if val_nll else torch.empty(0)
    summary = {
        "components": k, "dims": b.dims,
        "loss": "negative log-likelihood under the class mixture, nats per weight",
        "train_loss": float(torch.cat(train_nll).mean()),
        "val_loss": float(val.mean()) if len(val) else None,
        "val_loss_median": float(val.median()) if len(val) else None,
    }
    return Fitted(model, {"components": k, "dims": b.dims}, summary, {"config": vars(b).copy()})


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    fields, ckpt = load_trained(cfg, run_dir, KIND)
    m = ckpt["model"]
    n = cfg.sample.n_per_class

    def draw_classes(classes: list[int], _labels: torch.Tensor, gen: torch.Generator):
        try:
            per_class = [class_mixture(m, k) for k in classes]
        except (KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise ArtifactError(f"{run_dir / CKPT_FILE}: not a valid {KIND} checkpoint ({exc})") from None
        return torch.cat([draw(*g, n, gen) for g in per_class]).float(), {}

    return sample_per_class(cfg, run_dir, fields, KIND, labels, draw_classes)
