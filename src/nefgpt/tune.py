"""Stage `tune`: search sampling settings (guidance x prior weight x temperature x top-k x top-p x min-p x
oversample) on the tuning split.

Each setting samples the same number of fields per class with the trained GPT,
renders them, and scores them against the rendered fields of the tuning split
(``split["tune"]``: neither trained on nor part of the held-out set that
`evaluate` reports) with the evaluation's own measures: MMD, COV and 1-NNA under
the SSIM distance, the within-class diversity ratio (metrics.diversity_ratio:
how varied the samples of a class are, relative to the tuning fields of that
class; 1 is as varied as the data), and the accuracy of evaluate's classifier
(trained and saved here if the run has none yet, so both stages score with the
same network).

Every setting samples from the same seed, so settings differ by their effect,
not by sampling noise. ``samples_per_class`` above the tuning fields' count draws
more fields per class: accuracy and diversity then read all of them, the set
measures the first ones, equal sizes with the tuning fields. The best setting
minimises the objective among settings whose accuracy reaches ``min_accuracy``;
`sample` then uses it by default.
With ``max_minutes`` the settings are tried in order until the stage has run
that long (the one under way is finished), and the best is chosen among those
tried; tune.json records how many were tried and why the search stopped.
Writes ``tune.json`` (every setting's scores and ``best``), ``tune_table.md``
and ``tune_heatmap.png``.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import field, metrics
from .artifacts import load_json, save_json, write_bytes
from .checkpoint import load_checked_model
from .classifier import get_classifier, score_images
from .config import RunConfig, TuneConfig
from .objectives import OBJECTIVES
from .validation import SAMPLING_KEYS, check_tune
from .errors import ArtifactError
from .figures import save_tune_heatmap
from .fields_io import load_nefs
from .generate import check_guidance, draw_tokens, trained_config
from .layout import CKPT_FILE, SPLIT_FILE, TOKENIZER_FILE, TUNE_FILE, TUNE_HEATMAP_FILE, TUNE_TABLE_FILE
from .split import balanced_indices, first_per_class, load_split_images
from .codebook import load_tokenizer
from .weight_prior import run_prior

# Fixed rather than sample.batch_size: how samples are batched decides which random draws each one gets,
# and the tuning result should depend on the [tune] settings alone.
BATCH_SIZE = 250


def load_best_setting(run_dir: Path) -> dict:
    """The chosen setting (validation.SAMPLING_KEYS) of a run's tune.json.

    tune.json files written before guidance, min-p, oversampling or the prior were tuned mean guidance 1, min-p 0,
    oversample 1 and prior weight 0 (off); before the prior's shape was tuned, one full Gaussian in the product.
    """
    path = run_dir / TUNE_FILE
    try:
        best = load_json(path)["best"]
        return {"temperature": float(best["temperature"]), "top_k": int(best["top_k"]), "top_p": float(best["top_p"]),
                "min_p": float(best.get("min_p", 0.0)), "guidance": float(best.get("guidance", 1.0)),
                "oversample": float(best.get("oversample", 1.0)), "prior_weight": float(best.get("prior_weight", 0.0)),
                "prior_components": int(best.get("prior_components", 1)), "prior_dims": int(best.get("prior_dims", 0)),
                "prior_gpt_weight": float(best.get("prior_gpt_weight", 1.0)),
                "prior_positions": str(best.get("prior_positions", "first_layer")),
                "prior_component_draw": str(best.get("prior_component_draw", "posterior"))}
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: no valid 'best' sampling setting; rerun `nefgpt tune --force`") from None


def sampling_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The config with the tuned sampling setting filled in, when the run has one and may use it.

    Keys in ``sample.explicit`` (given by hand) keep their value; the tuned setting fills in the others.
    The `sample` stage and nefgpt.api both sample with it.
    """
    if cfg.train.model != "gpt" or not cfg.sample.use_tuned or not (run_dir / TUNE_FILE).exists():
        return cfg
    cfg = copy.deepcopy(cfg)
    for key, value in load_best_setting(run_dir).items():
        if key not in cfg.sample.explicit:
            setattr(cfg.sample, key, value)
    return cfg


def candidate_settings(cfg: TuneConfig, num_codes: int) -> list[dict]:
    """The settings to try, in the order they are tried; all are checked (check_tune) before any sampling starts."""
    check_tune(cfg, num_codes)
    grid = []
    shapes = list(itertools.product(cfg.prior_positions, cfg.prior_components, cfg.prior_dims, cfg.prior_gpt_weights,
                                    cfg.prior_component_draws))
    for g, w, (pp, pc, pd, a, cd), t, k, p, m, r in itertools.product(cfg.guidances, cfg.prior_weights, shapes,
                                                               cfg.temperatures, cfg.top_ks, cfg.top_ps, cfg.min_ps,
                                                               cfg.oversamples):
        if w == 0:  # the prior is off, so its shape is moot: one setting, recorded with the defaults
            pp, pc, pd, a, cd = "first_layer", 1, 0, 1.0, "posterior"
        setting = {"temperature": float(t), "top_k": int(k), "top_p": float(p), "min_p": float(m),
                   "guidance": float(g), "oversample": float(r), "prior_weight": float(w),
                   "prior_components": int(pc), "prior_dims": int(pd), "prior_gpt_weight": float(a),
                   "prior_positions": str(pp), "prior_component_draw": str(cd)}
        if setting not in grid:
            grid.append(setting)
    if cfg.search == "random":
        order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        grid = [grid[i] for i in order]
    return grid[: cfg.budget] if cfg.budget else grid


def choose_best(rows: list[dict], objective: str, min_accuracy: float, fallback_margin: float = 0.0) -> tuple[int, bool]:
    """Index of the best row, and whether it reaches min_accuracy.

    Among eligible rows the objective decides, then higher accuracy, then the earlier row. With no
    eligible row the floor drops to the best accuracy minus `fallback_margin`: with the margin 0 the
    most accurate row wins, as it always did; a margin lets the objective trade a little accuracy
    for diversity instead of taking the least varied setting. ``objective`` was checked by check_tune.
    """
    eligible = [i for i, r in enumerate(rows) if r["accuracy"] >= min_accuracy]
    qualified = bool(eligible)
    if not qualified:
        floor = max(r["accuracy"] for r in rows) - fallback_margin
        eligible = [i for i, r in enumerate(rows) if r["accuracy"] >= floor]
        if fallback_margin == 0:
            return min(eligible, key=lambda i: (-rows[i]["accuracy"], i)), False
    score = OBJECTIVES[objective]
    return min(eligible, key=lambda i: (score(rows[i]), -rows[i]["accuracy"], i)), qualified



def choice_note(rows: list[dict], tc: TuneConfig, qualified: bool) -> str:
    """Which of choose_best's rules chose, in words for tune.json."""
    if qualified:
        return f"best {tc.objective} among {sum(r['eligible'] for r in rows)} settings with accuracy >= {tc.min_accuracy}"
    if tc.fallback_margin == 0:
        return f"no setting reached accuracy {tc.min_accuracy}; chose the most accurate one"
    top = max(r["accuracy"] for r in rows)
    return (f"no setting reached accuracy {tc.min_accuracy}; best {tc.objective} among the settings within "
            f"{tc.fallback_margin:g} of the best accuracy {top:.3f}")

def format_table(rows: list[dict], best: int, objective: str) -> str:
    """Every setting's scores as a Markdown table, the chosen one in bold."""
    def fmt_k(k: int) -> str:
        return str(k) if k else "–"

    def prior_cell(r: dict) -> str:
        """weight, then (components x dims, GPT weight) where they are not the one full Gaussian in the product."""
        w = r.get("prior_weight", 0.0)
        if w == 0:
            return "–"
        pc, pd, a = r.get("prior_components", 1), r.get("prior_dims", 0), r.get("prior_gpt_weight", 1.0)
        shape = ("" if (pc, pd) == (1, 0) else f" {pc}×{pd}") + ("" if a == 1 else f" GPT {a:g}") + (
            " all" if r.get("prior_positions", "first_layer") == "all" else "") + (
            " drawn first" if r.get("prior_component_draw", "posterior") == "first" else "")
        return f"{w:g}" + (f" ({shape.strip()})" if shape else "")

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None or not math.isfinite(value) else format(value, spec)

    # min-p, diversity, guidance and the prior are read with defaults: tune.json files written before they were
    # tuned lack them.
    lines = [f"| guidance | T | top-k | top-p | min-p | oversample | prior | accuracy | CE | MMD | COV | 1-NNA "
             f"| diversity | {objective} |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        cells = [f"{r.get('guidance', 1.0):g}", f"{r['temperature']:g}", fmt_k(r["top_k"]),
                 f"{r['top_p']:g}" if r["top_p"] < 1 else "–",
                 f"{r.get('min_p', 0.0):g}" if r.get("min_p", 0.0) > 0 else "–",
                 f"{r.get('oversample', 1.0):g}" if r.get("oversample", 1.0) > 1 else "–",
                 prior_cell(r),
                 f"{r['accuracy']:.1%}", f"{r['cross_entropy']:.3f}", f"{r['mmd']:.4f}", f"{r['cov']:.1%}",
                 f"{r['1nna']:.1%}", fmt(r.get("diversity_ratio"), ".3f"), fmt(r.get("objective"), ".4f")]
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
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    vocab, spec, tok_id = tok.vocab, tok.spec, tok.id
    model, ckpt = load_checked_model(run_dir, vocab, spec, tok_id)
    settings = candidate_settings(tc, vocab.num_codes)
    for key in ("guidance", "oversample"):
        for value in {s[key] for s in settings}:
            check_guidance(value, trained_config(ckpt), str(run_dir / CKPT_FILE), key=key)
    priors = {shape: run_prior(run_dir, tok, *shape) for shape in
              {(s["prior_components"], s["prior_dims"], s["prior_positions"]) for s in settings if s["prior_weight"] > 0}}
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
                            labels[held_idx], split["num_classes"], progress)
    drawn = {c: max(k, tc.samples_per_class) for c, k in counts.items()}
    gen_labels = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in drawn.items()])
    compared = first_per_class(gen_labels, counts)
    if OBJECTIVES[tc.objective].uses_diversity and max(counts.values()) < 2:
        raise ArtifactError(f"{run_dir / SPLIT_FILE}: tune.objective = {tc.objective} measures the diversity within "
                            "each class, which needs at least 2 tuning fields of a class; redo `nefgpt fit --force` "
                            "with data.tune_per_class >= 2")

    rows = []
    stop_reason = "all settings tried"
    bar = tqdm(settings, desc="tune", unit="setting", disable=not progress)
    for setting in bar:
        if rows and tc.max_minutes > 0 and time.time() - t0 > 60 * tc.max_minutes:
            stop_reason = "max_minutes"
            break
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(tc.seed)
        prior = priors.get((setting["prior_components"], setting["prior_dims"], setting["prior_positions"]))
        tokens = draw_tokens(model, gen_labels, vocab, spec.num_params, setting, gen, BATCH_SIZE, prior=prior)
        images_gen = field.render(spec, tok.decode(tokens), 28)
        scores = score_images(clf, images_gen, gen_labels)
        row = {**setting, **metrics.set_metrics(images_gen[compared], ref), "accuracy": scores["accuracy"],
               "cross_entropy": scores["cross_entropy"],
               "per_class_accuracy": {c: v["accuracy"] for c, v in scores["per_class"].items() if v["n"]}}
        diversity = metrics.diversity_ratio(images_gen, gen_labels, ref, ref_labels)
        row["diversity_ratio"] = diversity if math.isfinite(diversity) else None  # None: no class of >= 2 fields
        row["seconds"] = time.perf_counter() - start
        objective = OBJECTIVES[tc.objective](row)
        row["objective"] = objective if math.isfinite(objective) else None
        row["eligible"] = row["accuracy"] >= tc.min_accuracy
        rows.append(row)
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", nna=f"{row['1nna']:.2f}", refresh=False)

    bar.close()
    best, qualified = choose_best(rows, tc.objective, tc.min_accuracy, tc.fallback_margin)
    note = choice_note(rows, tc, qualified)
    result = {
        "objective": tc.objective,
        "objective_definition": OBJECTIVES[tc.objective].definition + " (lower is better)",
        "min_accuracy": tc.min_accuracy,
        "fallback_margin": tc.fallback_margin,
        "search": tc.search,
        "n_settings_planned": len(settings),
        "n_settings_tried": len(rows),
        # "all settings tried", or "max_minutes": the stage ran past tune.max_minutes and started no further setting.
        "stop_reason": stop_reason,
        "max_minutes": tc.max_minutes,
        "diversity_definition": "per class, mean pairwise (1 - SSIM) / 2 of the samples over the same for the "
                                "reference fields of the class, averaged over classes (1 = as varied as the data)",
        "n_generated": len(gen_labels),  # accuracy and diversity read them all
        "n_set_metrics": len(compared),  # MMD, COV and 1-NNA: the first of each class, as many as the references
        "n_reference": len(ref),
        "reference": "rendered tuning-split fields (split.json 'tune')",
        "seed": tc.seed,
        "settings": rows,
        "best": {**rows[best], "qualified": qualified, "note": note},
        "tune_seconds": time.time() - t0,
    }
    write_bytes(run_dir / TUNE_TABLE_FILE, format_table(rows, best, tc.objective).encode())
    save_tune_heatmap(run_dir / TUNE_HEATMAP_FILE, rows, rows[best])
    save_json(run_dir / TUNE_FILE, result)  # last: its presence marks the stage as done
    return {"n": len(rows), **{k: rows[best][k] for k in (*SAMPLING_KEYS, "accuracy", "1nna", "mmd", "cov")}}
