"""A per-class prior on a field's weights, multiplied into the GPT while sampling (sample.prior_weight).

The samples fall short in the first layer (W1, b1): given a real one, the GPT draws the rest of a field well
(benchmarks/layer_oracle.py), while its own first layers are poor. A per-class density that captures the
weights' correlations is multiplied in: at each of its positions i (`sample.prior_positions`: the first layer,
or every weight) the sampler draws from

    prior_gpt_weight * (the GPT's logit of c) + prior_weight * log p(v_c | the prior's values decoded so far)

for every code c with value v_c (nefgpt.generate).

The density is a mixture of Gaussians per class: `sample.prior_components` = 1 with `sample.prior_dims` = 0
is one Ledoit-Wolf-shrunk Gaussian on all its positions (the Gaussian baseline's fit); more components
live in the class's leading `prior_dims` principal directions (gaussian_fit.fit_mixture), and a class's
digits come in a few distinct styles that one Gaussian blurs together.

Each component k is x = m_k + L_k z with its covariance's Cholesky factor L_k and standard normal z, so its
conditional at position i is m_ki + L_k[i, :i] z[:i] with std L_k[i, i], and each decoded value adds one z by
forward substitution: O(i) per step, field and component. The components' weights given the decoded prefix
follow from each component's running log-likelihood of it, or, with `sample.prior_component_draw = first`, each
field draws one component before decoding and keeps it: then the GPT's pull can't move fields between styles.

The prior is fitted on the run's dequantized training tokens (with fit's shifted copies, when there are any)
when `sample` or `tune` needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import load_metadata, load_tensors, save_tensors
from .codebook import Tokenizer, load_tokens
from .errors import ArtifactError, UsageError
from .fields_io import training_rows
from .gaussian_fit import ABSENT, fit_gaussian, fit_mixture, jittered_cholesky, mixture_moments, pad_mixture
from .layout import PRIOR_FILE, TOKENS_FILE
from .split import load_split


@dataclass
class PriorState:
    """What the prior knows of b fields being decoded: whitened values per component, and log-likelihoods."""
    z: torch.Tensor  # (b, K, n)
    loglik: torch.Tensor  # (b, K): log weight + log density of the decoded prefix under each component
    # (i, means, stds) of the last conditional computed: log_density's, which observe then reuses at position i
    last: tuple[int, torch.Tensor, torch.Tensor] | None = None


def code_log_widths(values: torch.Tensor) -> torch.Tensor:
    """log of the width of each code's cell (the values nearest it), for values (V,) in ascending order.

    A code's probability is its density times its cell's width: the codebook is densest where weights are
    common, so the density alone would pull every weight toward the crowded middle of the codebook.
    The two end cells are unbounded; they get their inner half-width twice.
    """
    if len(values) < 2:
        return torch.zeros_like(values)
    gaps = values[1:] - values[:-1]
    widths = torch.cat([gaps[:1], gaps]) / 2 + torch.cat([gaps, gaps[-1:]]) / 2
    return widths.clamp_min(1e-30).log()


class WeightPrior:
    """Class mixtures of Gaussians over the first `n` weight positions, evaluated one position at a time."""

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor, values: torch.Tensor,
                 log_weights: torch.Tensor | None = None):
        if mean.ndim == 2:  # one Gaussian per class (the layout of first_layer_prior.safetensors before mixtures)
            mean, chol = mean[:, None], chol[:, None]
        self.mean = mean.double()  # (C, K, n)
        self.chol = chol.double()  # (C, K, n, n), lower triangular
        self.log_weights = (torch.zeros(mean.shape[:2]) if log_weights is None else log_weights).double()  # (C, K)
        self.values = values.double()  # (V,) the weight value of each code, ascending
        self.log_widths = code_log_widths(self.values)
        self.n = self.mean.shape[2]

    @classmethod
    def fit(cls, weights: torch.Tensor, labels: torch.Tensor, num_classes: int, values: torch.Tensor,
            components: int = 1, dims: int = 0) -> WeightPrior:
        """From rows of weights (N, n), the prior's positions, and their labels; a class without rows gets the
        pooled fit.

        components 1, dims 0: one Ledoit-Wolf Gaussian per class; otherwise gaussian_fit.fit_mixture.
        """
        if components == 1 and dims == 0:
            means, covs = [], []
            for c in range(num_classes):
                rows = weights[labels == c]
                g = fit_gaussian(rows if len(rows) else weights)
                covs.append((g["std"][:, None] * (g["eigvecs"] * g["eigvals"]) @ g["eigvecs"].T * g["std"][None, :])[None])
                means.append(g["mean"][None])
            return cls(torch.stack(means), jittered_cholesky(torch.stack(covs)), values)
        if dims < 1:
            raise UsageError(f"sample.prior_components = {components} needs sample.prior_dims >= 1, got {dims}")
        fits = []
        for c in range(num_classes):
            rows = weights[labels == c]
            fits.append(pad_mixture(fit_mixture(rows if len(rows) else weights, components, dims, seed=c), components, dims))
        low_rank = {key: torch.stack([f[key] for f in fits]) for key in fits[0]}
        return cls.from_low_rank(low_rank, values)

    @classmethod
    def from_low_rank(cls, low_rank: dict[str, torch.Tensor], values: torch.Tensor) -> WeightPrior:
        """From fit_mixture's parameters, padded (pad_mixture) and stacked per class (C, ...)."""
        low_rank = {k: v.double() for k, v in low_rank.items()}
        moments = [mixture_moments({k: v[c] for k, v in low_rank.items()}) for c in range(len(low_rank["centre"]))]
        return cls(torch.stack([m for m, _ in moments]), jittered_cholesky(torch.stack([s for _, s in moments])), values,
                   low_rank["log_weights"])

    def start(self, b: int, labels: torch.Tensor, draw: torch.Generator | None = None) -> PriorState:
        """The state of b fields of classes `labels` (b,), none of their values decoded yet.

        With a generator `draw` (sample.prior_component_draw = first) each field draws one component by its weight
        now and stays in it: the others start at weight ABSENT, so the decoded values can't move the field away.
        """
        loglik = self.log_weights[labels].clone()
        if draw is not None:
            chosen = torch.multinomial(torch.softmax(loglik, 1).float(), 1, generator=draw)
            loglik = torch.full_like(loglik, ABSENT).scatter_(1, chosen, 0.0)
        return PriorState(torch.zeros(b, self.mean.shape[1], self.n, dtype=torch.float64), loglik)

    def _conditional(self, labels: torch.Tensor, state: PriorState, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each component's mean and std (b, K) of weight i given the decoded values.

        The sampler asks for them twice per position (log_density, then observe), and each costs O(b K i), so
        the last one is kept in the state; observe advances past it, which makes it stale.
        """
        if state.last is not None and state.last[0] == i:
            return state.last[1], state.last[2]
        m = self.mean[labels, :, i] + (state.z[:, :, :i] * self.chol[:, :, i, :i][labels]).sum(2)
        state.last = (i, m, self.chol[labels, :, i, i])
        return state.last[1], state.last[2]

    def log_density(self, labels: torch.Tensor, state: PriorState, i: int) -> torch.Tensor:
        """log p(v_c | decoded values) of every code value, up to a constant per field: (b, V) float32."""
        m, s = self._conditional(labels, state, i)
        per_component = -0.5 * ((self.values - m[..., None]) / s[..., None]) ** 2 - s.log()[..., None] + self.log_widths
        if per_component.shape[1] == 1:
            return per_component[:, 0].float()
        posterior = torch.log_softmax(state.loglik, 1)
        return torch.logsumexp(posterior[..., None] + per_component, 1).float()

    def observe(self, labels: torch.Tensor, state: PriorState, i: int, codes: torch.Tensor) -> None:
        """Record the codes (b,) decoded at position i."""
        m, s = self._conditional(labels, state, i)
        z = (self.values[codes][:, None] - m) / s
        state.z[:, :, i] = z
        state.loglik += -0.5 * z ** 2 - s.log()
        state.last = None


def prior_size(tok: Tokenizer, positions: str) -> int:
    """How many weight positions, from the first, a prior covers: the first layer (W1, b1) or all of them."""
    return tok.spec.num_params if positions == "all" else tok.spec.layer_params[0]


def save_prior(path: Path, codes: torch.Tensor, labels: torch.Tensor, tokenizer_id: str) -> None:
    """What a run's prior is fitted from, for a model folder without training tokens: the codes (N, P) of the
    training rows and their labels. About 2.4 MB for MNIST, where a fitted mixture of 16 components in 128 dims
    would take 12 MB for the first layer alone, and refitting takes a second or two."""
    small = torch.uint8 if codes.numel() == 0 or int(codes.max()) < 256 else torch.int16
    save_tensors(path, {"codes": codes.to(small), "labels": labels.long()}, {"tokenizer_id": tokenizer_id})


def _load_prior(saved: Path, tok: Tokenizer, components: int, dims: int, n: int) -> WeightPrior:
    t, meta = load_tensors(saved)
    if meta.get("tokenizer_id") != tok.id:
        raise ArtifactError(f"{saved}: made for another tokenizer than the run's tokenizer.safetensors")
    c = tok.vocab.num_classes
    if "codes" in t:
        codes, labels = _saved_codes(saved, t, tok, n)
        return WeightPrior.fit(tok.codebook[codes], labels, c, tok.codebook, components, dims)
    # The first shipped priors: one fitted Gaussian per class on the first layer (mean (C, n), chol (C, n, n)).
    mean, chol = t.get("mean"), t.get("chol")
    if mean is None or chol is None or mean.shape != (c, n) or chol.shape != (c, n, n):
        raise ArtifactError(f"{saved}: needs codes and labels, or mean ({c}, {n}) and chol ({c}, {n}, {n})")
    if (components, dims) != (1, 0):
        raise UsageError(f"{saved}: this model ships one fitted Gaussian per class; use sample.prior_components = 1, "
                         "sample.prior_dims = 0")
    return WeightPrior(mean, chol, t["values"] if "values" in t else tok.codebook)


def _saved_codes(saved: Path, t: dict, tok: Tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = tok.vocab.num_classes
    codes, labels = t["codes"].long(), t.get("labels")
    if codes.ndim != 2 or codes.shape[1] < n or labels is None or labels.shape != codes.shape[:1]:
        raise ArtifactError(f"{saved}: needs codes (N, >= {n}) and labels (N,), got codes {tuple(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= tok.vocab.num_codes or int(labels.min()) < 0 \
            or int(labels.max()) >= c:
        raise ArtifactError(f"{saved}: codes or labels out of range ({tok.vocab.num_codes} codes, {c} classes)")
    return codes[:, :n], labels.long()


def training_codes(run_dir: Path, tok: Tokenizer, n: int, needs: str, off: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of the first n positions (N, n) and the labels (N,) of a run's training rows, from its tokens or,
    in a shipped model, from the codes saved beside it (save_prior). `needs` and `off` name the setting that
    wants them, in messages."""
    saved = run_dir / PRIOR_FILE
    if not (run_dir / TOKENS_FILE).exists() and saved.exists():  # a shipped model carries its training codes
        t, meta = load_tensors(saved)
        if "codes" in t and meta.get("tokenizer_id") == tok.id:
            return _saved_codes(saved, t, tok, n)
    if not (run_dir / TOKENS_FILE).exists():
        raise ArtifactError(f"{run_dir / TOKENS_FILE}: {needs} needs the run's training "
                            f"tokens, and this run has none (a shipped pretrained model?); use {off}")
    tokens, labels = load_tokens(run_dir, tok.id)
    rows = training_rows(load_split(run_dir), load_metadata(run_dir / TOKENS_FILE))
    return tokens[rows, :n], labels[rows]


def prior_training_codes(run_dir: Path, tok: Tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """training_codes for the prior, which lives on the raw weights in the flatten order."""
    if tok.offsets != "none" or tok.order != "input_first":
        raise UsageError(f"sample.prior_weight > 0: the prior is on the raw weights, but the run's tokens "
                         f"are tokenize.offsets = {tok.offsets}, tokenize.order = {tok.order}; use prior_weight 0")
    return training_codes(run_dir, tok, n, "sample.prior_weight > 0", "prior_weight 0")


def run_prior(run_dir: Path, tok: Tokenizer, components: int = 1, dims: int = 0,
              positions: str = "first_layer") -> WeightPrior:
    """The prior of a run over `positions` (first_layer or all), fitted on its training tokens
    (tokens.safetensors, split.json).

    A shipped pretrained model has no training tokens; `pretrained.export` saves the codes the prior is fitted
    from instead (save_prior).
    """
    n = prior_size(tok, positions)
    saved = run_dir / PRIOR_FILE
    if saved.exists():
        return _load_prior(saved, tok, components, dims, n)
    codes, labels = prior_training_codes(run_dir, tok, n)
    return WeightPrior.fit(tok.codebook[codes], labels, tok.vocab.num_classes, tok.codebook, components, dims)
