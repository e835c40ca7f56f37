"""Stage `tune`: search sampling settings (guidance x temperature x top-k x top-p) on the tuning split.

Each setting samples the same number of fields per class with the trained GPT,
renders them, and scores them against the rendered fields of the tuning split
(``split["tune"]``: neither trained on nor part of the held-out set that
`evaluate` reports) with the evaluation's own measures: MMD, COV and 1-NNA under
the SSIM distance, and the accuracy of evaluate's classifier (trained and saved
here if the run has none yet, so both stages score with the same network).

Every setting samples from the same seed, so settings differ by their effect,
not by sampling noise. The best setting minimises the objective among settings
whose accuracy reaches ``min_accuracy``; `sample` then uses it by default.
Writes ``tune.json`` (every setting's scores and ``best``), ``tune_table.md``
and ``tune_heatmap.png``.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import field, metrics
from .artifacts import load_json, save_json, write_bytes
from .classifier import score_images
from .config import RunConfig, TuneConfig
from .errors import ArtifactError, UsageError
from .evaluate import balanced_indices, get_classifier
from .figures import save_tune_heatmap
from .fit import SPLIT_FILE, load_nefs, load_split_images
from .sample import check_guidance, check_sampling, generate, load_checked_model, trained_config
from .tokenizer import TOKENIZER_FILE, load_tokenizer
from .train import CKPT_FILE

TUNE_FILE = "tune.json"
TABLE_FILE = "tune_table.md"
HEATMAP_FILE = "tune_heatmap.png"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "guidance")
# Fixed rather than sample.batch_size: how samples are batched decides which random draws each one gets,
# and the tuning result should depend on the [tune] settings alone.
BATCH_SIZE = 250
# What each objective computes from a setting's scores; lower is better, so maximised scores are negated.
OBJECTIVES = {
    "nna_gap": lambda row: abs(row["1nna"] - 0.5),
    "mmd": lambda row: row["mmd"],
    "cov": lambda row: -row["cov"],
    "accuracy": lambda row: -row["accuracy"],
}


def load_best_setting(run_dir: Path) -> dict:
    """The chosen {temperature, top_k, top_p, guidance} of a run's tune.json (guidance 1 where it has none)."""
    path = run_dir / TUNE_FILE
    try:
        best = load_json(path)["best"]
        return {"temperature": float(best["temperature"]), "top_k": int(best["top_k"]), "top_p": float(best["top_p"]),
                "guidance": float(best.get("guidance", 1.0))}
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: no valid 'best' sampling setting; rerun `nefgpt tune --force`") from None


def candidate_settings(cfg: TuneConfig, num_codes: int) -> list[dict]:
    """The settings to try, in the order they are tried; each is checked before any sampling starts."""
    for name in ("temperatures", "top_ks", "top_ps", "guidances"):
        if not getattr(cfg, name):
            raise UsageError(f"tune.{name} must list at least one value")
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"tune.objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.search not in ("grid", "random"):
        raise UsageError(f"tune.search must be grid or random, got {cfg.search!r}")
    if not 0 <= cfg.min_accuracy <= 1:
        raise UsageError(f"tune.min_accuracy must be in [0, 1], got {cfg.min_accuracy}")
    grid = []
    for g, t, k, p in itertools.product(cfg.guidances, cfg.temperatures, cfg.top_ks, cfg.top_ps):
        setting = {"temperature": float(t), "top_k": int(k), "top_p": float(p), "guidance": float(g)}
        try:
            check_sampling(setting["temperature"], setting["top_k"], setting["top_p"], num_codes, setting["guidance"])
        except UsageError as exc:
            raise UsageError(f"tune: {exc}") from None
        if setting not in grid:
            grid.append(setting)
    if cfg.search == "random":
        order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        grid = [grid[i] for i in order]
    return grid[: cfg.budget] if cfg.budget else grid


def choose_best(rows: list[dict], objective: str, min_accuracy: float) -> tuple[int, bool]:
    """Index of the best row, and whether it reaches min_accuracy.

    Among eligible rows the objective decides, then higher accuracy, then the
    earlier row. With no eligible row the most accurate one wins.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"tune.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    eligible = [i for i, r in enumerate(rows) if r["accuracy"] >= min_accuracy]
    if not eligible:
        return min(range(len(rows)), key=lambda i: (-rows[i]["accuracy"], i)), False
    score = OBJECTIVES[objective]
    return min(eligible, key=lambda i: (score(rows[i]), -rows[i]["accuracy"], i)), True


def format_table(rows: list[dict], best: int, objective: str) -> str:
    """Every setting's scores as a Markdown table, the chosen one in bold."""
    def fmt_k(k: int) -> str:
        return str(k) if k else "–"

    lines = [f"| guidance | T | top-k | top-p | accuracy | CE | MMD | COV | 1-NNA | {objective} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        cells = [f"{r.get('guidance', 1.0):g}", f"{r['temperature']:g}", fmt_k(r["top_k"]),
                 f"{r['top_p']:g}" if r["top_p"] < 1 else "–",
                 f"{r['accuracy']:.1%}", f"{r['cross_entropy']:.3f}", f"{r['mmd']:.4f}", f"{r['cov']:.1%}",
                 f"{r['1nna']:.1%}", f"{r['objective']:.4f}"]
        if i == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tuning_reference(run_dir: Path, split: dict, weights: torch.Tensor, labels: torch.Tensor, spec: field.FieldSpec,
                      n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """Rendered tuning-split fields, the same number per class as will be sampled (at most n_per_class)."""
    tune_idx = torch.tensor(split.get("tune", []), dtype=torch.long)
    if len(tune_idx) == 0:
        raise ArtifactError(f"{run_dir / SPLIT_FILE}: no tuning split; redo `nefgpt fit --force` "
                            f"with data.tune_per_class > 0")
    tune_labels = labels[tune_idx]
    counts = {c: min(n_per_class, int((tune_labels == c).sum())) for c in sorted(set(tune_labels.tolist()))}
    pick = balanced_indices(tune_labels, counts, seed)
    return field.render(spec, weights[tune_idx[pick]], 28), tune_labels[pick], counts


def run_tune(cfg: RunConfig, run_dir: Path, progress: bool = True) -> dict:
    t0 = time.time()
    tc = cfg.tune
    codebook, vocab, spec, tok_id = load_tokenizer(run_dir / TOKENIZER_FILE)
    model, ckpt = load_checked_model(run_dir, vocab, spec, tok_id)
    settings = candidate_settings(tc, vocab.num_codes)
    for g in {s["guidance"] for s in settings}:
        check_guidance(g, trained_config(ckpt), str(run_dir / CKPT_FILE))
    split, images, labels = load_split_images(run_dir)
    if images.shape[-1] != 28:
        raise ArtifactError(f"{run_dir / SPLIT_FILE}: tuning expects 28x28 images, the dataset has "
                            f"{images.shape[-1]}x{images.shape[-1]}")
    nefs, _ = load_nefs(run_dir, spec)
    ref, ref_labels, counts = _tuning_reference(run_dir, split, nefs["weights"], labels, spec, tc.n_per_class, tc.seed)
    if max(counts) >= vocab.num_classes:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: model knows {vocab.num_classes} classes, "
                            f"the tuning split has class {max(counts)}")
    train_idx = torch.tensor(split["train"], dtype=torch.long)
    held_idx = torch.tensor(split["heldout"], dtype=torch.long)
    # Evaluate's arguments exactly, so the classifier is the same whichever stage trains it first.
    clf, _ = get_classifier(run_dir, cfg.evaluate, images[train_idx], labels[train_idx], images[held_idx],
                            labels[held_idx], progress)
    gen_labels = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in counts.items()])

    rows = []
    bar = tqdm(settings, desc="tune", unit="setting", disable=not progress)
    for setting in bar:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(tc.seed)
        tokens = torch.cat([
            generate(model, batch, vocab, spec.num_params, setting["temperature"], setting["top_k"], setting["top_p"],
                     gen, guidance=setting["guidance"]).cpu()
            for batch in gen_labels.split(BATCH_SIZE)
        ])
        images_gen = field.render(spec, codebook[tokens], 28)
        scores = score_images(clf, images_gen, gen_labels)
        row = {**setting, **metrics.set_metrics(images_gen, ref), "accuracy": scores["accuracy"],
               "cross_entropy": scores["cross_entropy"],
               "per_class_accuracy": {c: v["accuracy"] for c, v in scores["per_class"].items() if v["n"]},
               "seconds": time.perf_counter() - start}
        row["objective"] = OBJECTIVES[tc.objective](row)
        row["eligible"] = row["accuracy"] >= tc.min_accuracy
        rows.append(row)
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", nna=f"{row['1nna']:.2f}", refresh=False)

    best, qualified = choose_best(rows, tc.objective, tc.min_accuracy)
    note = (f"best {tc.objective} among {sum(r['eligible'] for r in rows)} settings with accuracy >= {tc.min_accuracy}"
            if qualified else f"no setting reached accuracy {tc.min_accuracy}; chose the most accurate one")
    result = {
        "objective": tc.objective,
        "objective_definition": {"nna_gap": "|1-NNA - 0.5|", "mmd": "MMD", "cov": "-COV",
                                 "accuracy": "-accuracy"}[tc.objective] + " (lower is better)",
        "min_accuracy": tc.min_accuracy,
        "search": tc.search,
        "n_generated": len(gen_labels),
        "n_reference": len(ref),
        "reference": "rendered tuning-split fields (split.json 'tune')",
        "seed": tc.seed,
        "settings": rows,
        "best": {**rows[best], "qualified": qualified, "note": note},
        "tune_seconds": time.time() - t0,
    }
    write_bytes(run_dir / TABLE_FILE, format_table(rows, best, tc.objective).encode())
    save_tune_heatmap(run_dir / HEATMAP_FILE, rows, rows[best])
    save_json(run_dir / TUNE_FILE, result)  # last: its presence marks the stage as done
    return {"n": len(rows), **{k: rows[best][k] for k in (*SAMPLING_KEYS, "accuracy", "1nna", "mmd", "cov")}}
