"""A per-class Gaussian on the first layer's weights, multiplied into the GPT while sampling (sample.prior_weight).

The samples fall short in the first layer (W1, b1): given a real one, the GPT draws the rest of a field well
(benchmarks/layer_oracle.py), while its own first layers are poor. One Gaussian per class captures that
layer's correlations, so at each first-layer position i the sampler adds

    prior_weight * log N(v_c; m_i, s_i^2)

to the logit of every code c with value v_c, where m_i and s_i are the class Gaussian's mean and std of
weight i given the first-layer values decoded so far. With the covariance's Cholesky factor L, x = m + L z
for standard normal z, so that conditional is m_i + L[i, :i] z[:i] with std L[i, i], and each decoded value
adds one z by forward substitution: O(i) per step and field.

The Gaussian is fitted on the run's dequantized training tokens (with fit's shifted copies, when there are
any), with the Gaussian baseline's Ledoit-Wolf shrinkage, when `sample` or `tune` needs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import load_metadata, load_tensors, save_tensors
from .codebook import Tokenizer, load_tokens
from .errors import ArtifactError, UsageError
from .fields_io import training_rows
from .gaussian_fit import fit_gaussian
from .layout import PRIOR_FILE, TOKENS_FILE
from .split import load_split


class FirstLayerPrior:
    """Class Gaussians over the first `n` weight positions, evaluated one position at a time while decoding."""

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor, values: torch.Tensor):
        self.mean = mean.double()  # (C, n)
        self.chol = chol.double()  # (C, n, n), lower triangular
        self.values = values.double()  # (K,) the weight value of each code
        self.n = self.mean.shape[1]

    @classmethod
    def fit(cls, weights: torch.Tensor, labels: torch.Tensor, num_classes: int, values: torch.Tensor) -> FirstLayerPrior:
        """From rows of first-layer weights (N, n) and their labels; a class without rows gets the pooled Gaussian."""
        n = weights.shape[1]
        means, chols = [], []
        for c in range(num_classes):
            rows = weights[labels == c]
            g = fit_gaussian(rows if len(rows) else weights)
            cov = g["std"][:, None] * (g["eigvecs"] * g["eigvals"]) @ g["eigvecs"].T * g["std"][None, :]
            # Shrinkage keeps it positive definite; the jitter covers rounding at dead-unit positions (std ~ 0).
            cov = (cov + cov.T) / 2 + 1e-10 * torch.eye(n, dtype=torch.float64)
            means.append(g["mean"])
            chols.append(torch.linalg.cholesky(cov))
        return cls(torch.stack(means), torch.stack(chols), values)

    def start(self, b: int) -> torch.Tensor:
        """The whitened values of b fields, none decoded yet: (b, n) zeros that `observe` fills in."""
        return torch.zeros(b, self.n, dtype=torch.float64)

    def _conditional_mean(self, labels: torch.Tensor, z: torch.Tensor, i: int) -> torch.Tensor:
        return self.mean[labels, i] + (z[:, :i] * self.chol[:, i, :i][labels]).sum(1)

    def log_density(self, labels: torch.Tensor, z: torch.Tensor, i: int) -> torch.Tensor:
        """log N(v_c; m_i, s_i^2) of every code value, up to a constant per field: (b, K) float32."""
        m = self._conditional_mean(labels, z, i)
        s = self.chol[labels, i, i]
        return (-0.5 * ((self.values[None] - m[:, None]) / s[:, None]) ** 2).float()

    def observe(self, labels: torch.Tensor, z: torch.Tensor, i: int, codes: torch.Tensor) -> None:
        """Record the codes (b,) decoded at position i."""
        z[:, i] = (self.values[codes] - self._conditional_mean(labels, z, i)) / self.chol[labels, i, i]


def save_prior(path: Path, prior: FirstLayerPrior, tokenizer_id: str) -> None:
    save_tensors(path, {"mean": prior.mean.float(), "chol": prior.chol.float(), "values": prior.values.float()},
                 {"tokenizer_id": tokenizer_id})


def run_prior(run_dir: Path, tok: Tokenizer) -> FirstLayerPrior:
    """The first-layer prior of a run, fitted on its training tokens (tokens.safetensors, split.json).

    A shipped pretrained model has no training tokens; `pretrained.export` saves its fitted prior instead.
    """
    saved = run_dir / PRIOR_FILE
    if saved.exists():
        t, meta = load_tensors(saved, {"mean": torch.float32, "chol": torch.float32, "values": torch.float32})
        if meta.get("tokenizer_id") != tok.id:
            raise ArtifactError(f"{saved}: made for another tokenizer than {run_dir / 'tokenizer.safetensors'}")
        if t["chol"].ndim != 3 or t["mean"].shape != t["chol"].shape[:2] or t["mean"].shape[0] != tok.vocab.num_classes:
            raise ArtifactError(f"{saved}: mean {tuple(t['mean'].shape)} and chol {tuple(t['chol'].shape)} "
                                f"don't fit {tok.vocab.num_classes} classes")
        return FirstLayerPrior(t["mean"], t["chol"], t["values"])
    if tok.offsets != "none" or tok.order != "input_first":
        raise UsageError(f"sample.prior_weight > 0: the prior is on the raw first-layer weights, but the run's tokens "
                         f"are tokenize.offsets = {tok.offsets}, tokenize.order = {tok.order}; use prior_weight 0")
    if not (run_dir / TOKENS_FILE).exists():
        raise ArtifactError(f"{run_dir / TOKENS_FILE}: sample.prior_weight > 0 fits its prior on the run's training "
                            "tokens, and this run has none (a shipped pretrained model?); use prior_weight 0")
    tokens, labels = load_tokens(run_dir, tok.id)
    rows = training_rows(load_split(run_dir), load_metadata(run_dir / TOKENS_FILE))
    first = tok.spec.layer_params[0]
    return FirstLayerPrior.fit(tok.codebook[tokens[rows, :first]], labels[rows], tok.vocab.num_classes, tok.codebook)
