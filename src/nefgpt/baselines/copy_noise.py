"""Baseline: a random training field of the class plus Gaussian noise.

The noise std at each weight position is ``scale * std_p``, std_p being that
position's std over all training fields. The scale is chosen from a small grid
on the tuning split: for each scale, as many noisy copies per class as the split
has tuning fields are rendered at 28x28 and scored against the rendered tuning
fields by the 1-NNA gap |1-NNA - 0.5|. Every scale uses the same copies and the
same unit noise, so the scores differ by the scale alone.

Seen as a density, copy + noise is a Gaussian kernel density estimate over the
training fields of the class; its log-likelihood (leave-one-out on the training
fields, plain on the held-out ones) is reported as the train / held-out loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from .. import field, metrics
from ..config import RunConfig
from ..errors import ArtifactError, UsageError
from ..layout import CKPT_FILE
from .common import Fields, Fitted, load_fields, load_trained, sample_per_class, train_in_one_pass

KIND = "copy_noise"


def position_std(weights: torch.Tensor) -> torch.Tensor:
    return weights.double().std(0, correction=0).float()


def noisy_copies(fields: Fields, labels: torch.Tensor, std: torch.Tensor, scale: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each label, a random training field of that class plus noise; returns (weights, source rows)."""
    sources = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        pos = torch.nonzero(labels == c).flatten()
        rows = torch.nonzero(fields.labels == c).flatten()
        if len(rows) == 0:
            raise ArtifactError(f"class {c} has no training fields to copy")
        sources[pos] = rows[torch.randint(len(rows), (len(pos),), generator=generator)]
    noise = torch.randn(len(labels), fields.weights.shape[1], generator=generator)
    return fields.weights[sources] + noise * (scale * std), sources


def tune_scale(fields: Fields, tune: Fields, std: torch.Tensor, scales: list[float], seed: int,
               progress: bool) -> list[dict]:
    """1-NNA (and MMD, COV) of copies + noise at each scale against the rendered tuning fields."""
    if len(tune.labels) == 0:
        raise UsageError("copy_noise chooses its noise scale on the tuning split, which is empty here: set "
                         "data.tune_per_class > 0, or fix the scale with baseline.noise_scale")
    reference = field.render(tune.spec, tune.weights, 28)
    scores = []
    for scale in tqdm(scales, desc="copy_noise scales", disable=not progress):
        gen = torch.Generator().manual_seed(seed)  # the same copies and unit noise at every scale
        weights, _ = noisy_copies(fields, tune.labels, std, scale, gen)
        m = metrics.set_metrics(field.render(tune.spec, weights, 28), reference)
        scores.append({"scale": scale, "1nna": m["1nna"], "nna_gap": abs(m["1nna"] - 0.5), "mmd": m["mmd"],
                       "cov": m["cov"]})
    return scores


def kde_nll_per_weight(x: torch.Tensor, x_labels: torch.Tensor, fields: Fields, sigma: torch.Tensor,
                       leave_one_out: bool) -> float:
    """Mean negative log-likelihood (nats per weight) of rows x under the class's kernel density."""
    sigma = sigma.double().clamp_min(1e-12)
    p = x.shape[1]
    log_norm = sigma.log().sum() + 0.5 * p * math.log(2 * math.pi)
    total, count = 0.0, 0
    for c in x_labels.unique().tolist():
        queries = x[x_labels == c].double() / sigma
        centres = fields.weights[fields.labels == c].double() / sigma
        log_k = -0.5 * torch.cdist(queries, centres).pow(2)
        if leave_one_out:
            if len(centres) < 2:
                continue
            log_k.fill_diagonal_(float("-inf"))
        n = len(centres) - (1 if leave_one_out else 0)
        if n < 1:
            continue
        nll = -(torch.logsumexp(log_k, 1) - math.log(n) - log_norm)
        total += float(nll.sum())
        count += len(queries)
    return total / max(count, 1) / p


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Choose the noise scale (`resume` is accepted for the common interface; there is nothing to resume)."""
    b = cfg.baseline
    if b.noise_scale != -1.0 and b.noise_scale < 0:
        raise UsageError(f"baseline.noise_scale must be >= 0, or -1 to tune it, got {b.noise_scale}")
    if b.noise_scale == -1.0 and (not b.noise_scales or min(b.noise_scales) < 0):
        raise UsageError(f"baseline.noise_scales must be a non-empty list of scales >= 0, got {b.noise_scales}")
    return train_in_one_pass(cfg, run_dir, KIND, lambda fields: _fit(cfg, run_dir, fields, progress))


def _fit(cfg: RunConfig, run_dir: Path, fields: Fields, progress: bool) -> Fitted:
    b = cfg.baseline
    std = position_std(fields.weights)
    scores: list[dict] = []
    if b.noise_scale >= 0:
        scale, chosen_by = b.noise_scale, "baseline.noise_scale"
    else:
        tune = load_fields(cfg, run_dir, "tune")
        scores = tune_scale(fields, tune, std, list(b.noise_scales), b.seed, progress)
        # Ties go to the larger scale: the same score with more noise is the less copied one.
        scale = min(scores, key=lambda s: (s["nna_gap"], -s["scale"]))["scale"]
        chosen_by = "1-NNA gap on the tuning split"
    summary = {"noise_scale": float(scale), "chosen_by": chosen_by, "grid": scores}
    if scale > 0:
        heldout = load_fields(cfg, run_dir, "heldout")
        sigma = scale * std
        summary["loss"] = "negative log-likelihood under the class's Gaussian kernel density, nats per weight"
        summary["train_loss"] = kde_nll_per_weight(fields.weights, fields.labels, fields, sigma, leave_one_out=True)
        summary["val_loss"] = kde_nll_per_weight(heldout.weights, heldout.labels, fields, sigma, leave_one_out=False)
    return Fitted({"std": std}, {"noise_scale": float(scale)}, summary, {"grid": scores, "config": vars(b).copy()})


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    fields, ckpt = load_trained(cfg, run_dir, KIND)
    std = ckpt["model"].get("std")
    scale = ckpt["model_args"].get("noise_scale")
    if not isinstance(std, torch.Tensor) or std.shape != (fields.spec.num_params,) or not isinstance(scale, float):
        raise ArtifactError(f"{run_dir / CKPT_FILE}: not a valid {KIND} checkpoint (needs 'std' and 'noise_scale')")

    def draw_classes(_classes: list[int], all_labels: torch.Tensor, gen: torch.Generator):
        weights, sources = noisy_copies(fields, all_labels, std.float(), scale, gen)
        return weights, {"source_rows": fields.rows[sources]}  # rows of nefs.safetensors

    return sample_per_class(cfg, run_dir, fields, KIND, labels, draw_classes, meta={"noise_scale": scale})
