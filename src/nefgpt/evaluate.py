"""Stage `evaluate`: score generated fields on their rendered images.

- Set metrics (MMD, COV, 1-NNA under D = (1 - SSIM) / 2) of the generated set
  against the rendered held-out fields, overall and per class, with equal
  per-class counts.
- The real-data ceiling: the same metrics for rendered *training* fields
  against the held-out fields, so a reader sees what a perfect model would get.
- Within-class diversity ratio (metrics.diversity_ratio): per class, the mean
  pairwise SSIM distance of the samples over that of the held-out fields,
  averaged over classes (1 = as varied as the data, 0 = one image per class).
  Its ceiling is the same ratio for the ceiling's second real set, the rendered
  training fields (same classes and counts), against the held-out fields: what
  a model reproducing the data would score, about 1 up to sampling noise.
- Novelty: each sample's distance to its nearest rendered training field,
  compared with the same distance for held-out fields (near-copy rate).
- Classifier score: a CNN trained on the train-split images scores the samples
  by accuracy (label = condition) and cross-entropy.
- Figures (nefgpt.eval_figures): nearest training fields of some samples, the
  classifier's confusion matrix, and a GIF of autoregressive generation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import field, metrics, ssim
from .artifacts import save_json
from .classifier import get_classifier, score_images
from .config import EvalConfig
from .errors import ArtifactError
from .eval_figures import write_eval_figures
from .fields_io import load_nefs
from .codebook import load_tokenizer, sequence_order
from .layout import METRICS_FILE, SAMPLES_FILE, TOKENIZER_FILE
from .samples_io import load_generated_fields
from .split import balanced_indices, load_split_images


def near_copy_stats(gen_nn: torch.Tensor, heldout_nn: torch.Tensor) -> dict:
    """Compare nearest-training distances of samples with those of held-out real fields."""
    threshold = float(torch.quantile(heldout_nn.double(), 0.05))
    return {
        "threshold_heldout_p5": threshold,
        "near_copy_rate": float((gen_nn < threshold).double().mean()),
        "heldout_near_copy_rate": float((heldout_nn < threshold).double().mean()),
        "generated_nn_distance": _quantiles(gen_nn),
        "heldout_nn_distance": _quantiles(heldout_nn),
    }


def _quantiles(x: torch.Tensor) -> dict:
    q = torch.quantile(x.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(x.double().mean()), "p5": q[0], "median": q[1], "p95": q[2]}


def generation_order(run_dir: Path, spec: field.FieldSpec, has_tokens: bool) -> tuple[bool, torch.Tensor | None]:
    """Whether the samples were made weight by weight, and in which order (None: the flatten order).

    Tokens mean a GPT made them, in its tokenizer's sequence order; with ``offsets = pca`` each token is a
    principal component, not a weight, so there is no weight-by-weight generation to show.
    """
    if not has_tokens:
        return False, None
    if not (run_dir / TOKENIZER_FILE).exists():
        return True, None
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    if tok.offsets == "pca":
        return False, None
    return True, sequence_order(spec, tok.order)


def run_evaluate(cfg: EvalConfig, run_dir: Path, progress: bool = True) -> dict:
    t0 = time.time()
    split, images, labels = load_split_images(run_dir)
    nefs, meta = load_nefs(run_dir)
    spec = meta["spec"]
    train_idx = torch.tensor(split["train"], dtype=torch.long)
    held_idx = torch.tensor(split["heldout"], dtype=torch.long)
    res = images.shape[-1]
    if res != 28:
        raise ArtifactError(f"{run_dir}: evaluation expects 28x28 images, the dataset has {res}x{res}")

    samples, _ = load_generated_fields(run_dir, spec)
    gen_weights, gen_labels = samples["weights"], samples["labels"]
    gen_images = field.render(spec, gen_weights, 28)
    held_fields = field.render(spec, nefs["weights"][held_idx], res)
    held_labels = labels[held_idx]
    # Equal-size sets per class, as the PointFlow protocol requires.
    counts = {c: min(int((gen_labels == c).sum()), int((held_labels == c).sum())) for c in range(split["num_classes"])}
    counts = {c: k for c, k in counts.items() if k > 0}
    if not counts:
        raise ArtifactError(f"{run_dir / SAMPLES_FILE}: no sampled class appears in the held-out split")
    g_sel = balanced_indices(gen_labels, counts, cfg.seed)
    r_sel = balanced_indices(held_labels, counts, cfg.seed)
    gen, gen_l = gen_images[g_sel], gen_labels[g_sel]
    ref, ref_l = held_fields[r_sel], held_labels[r_sel]
    model_metrics = metrics.set_metrics_by_class(gen, gen_l, ref, ref_l)
    diversity = metrics.diversity_by_class(gen, gen_l, ref, ref_l)

    train_labels = labels[train_idx]
    t_sel = balanced_indices(train_labels, counts, cfg.seed + 1)
    train_fields_sample = field.render(spec, nefs["weights"][train_idx[t_sel]], res)
    ceiling = metrics.set_metrics(train_fields_sample, ref)
    ceiling["diversity_ratio"] = metrics.diversity_by_class(train_fields_sample, train_labels[t_sel], ref,
                                                            ref_l)["ratio"]

    train_fields = field.render(spec, nefs["weights"][train_idx], res)
    gen_nn, gen_nn_idx = ssim.nearest_distance(gen, train_fields)
    held_nn, _ = ssim.nearest_distance(ref, train_fields)
    novelty = near_copy_stats(gen_nn, held_nn)

    clf, clf_info = get_classifier(run_dir, cfg, images[train_idx], train_labels, images[held_idx], held_labels,
                                   split["num_classes"], progress)
    score = score_images(clf, gen, gen_l)
    held_field_score = score_images(clf, ref, ref_l)

    result = {
        "n_generated": len(gen),
        "n_reference": len(ref),
        "reference": "rendered held-out fields",
        "distance": "(1 - SSIM) / 2, SSIM per Wang et al. 2004 (11x11 Gaussian, sigma 1.5, valid windows)",
        "mmd": model_metrics["overall"]["mmd"],
        "cov": model_metrics["overall"]["cov"],
        "1nna": model_metrics["overall"]["1nna"],
        "accuracy": score["accuracy"],
        "cross_entropy": score["cross_entropy"],
        # None where no class has 2 samples and 2 held-out fields to measure it on.
        "diversity_ratio": diversity["ratio"],
        "classifier_heldout_accuracy": clf_info["val_accuracy"],
        "per_class": {c: {**model_metrics["per_class"][c], "accuracy": score["per_class"][c]["accuracy"],
                          "cross_entropy": score["per_class"][c]["cross_entropy"],
                          "diversity_ratio": diversity["per_class"][c]["ratio"],
                          "mean_pairwise_distance": diversity["per_class"][c]["generated"],
                          "heldout_mean_pairwise_distance": diversity["per_class"][c]["reference"]}
                      for c in model_metrics["per_class"]},
        "confusion": score["confusion"],
        "ceiling": {**ceiling, "accuracy": held_field_score["accuracy"],
                    "cross_entropy": held_field_score["cross_entropy"],
                    "description": "rendered training fields vs rendered held-out fields, same sizes (the "
                                   "diversity ratio too: training fields' within-class diversity over the held-out "
                                   "fields')"},
        "novelty": novelty,
        "nearest_train_index": train_idx[gen_nn_idx].tolist(),
    }
    # Figures before metrics.json, whose presence marks the stage as done.
    autoregressive, order = generation_order(run_dir, spec, "tokens" in samples)
    result["figures"] = write_eval_figures(run_dir, spec, gen, gen_weights[g_sel], gen_l, train_fields,
                                           score["confusion"], nefs.get("anchor"), autoregressive, order)
    result["evaluate_seconds"] = time.time() - t0
    save_json(run_dir / METRICS_FILE, result)
    return result
