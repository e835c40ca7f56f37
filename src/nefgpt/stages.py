"""The stages of a run: one `Stage` record each (config sections, inputs, outputs, runner), and running one.

A stage whose outputs exist, are newer than its inputs and were made with the current settings (a
fingerprint of its config sections in stages.json) is skipped; `--force` redoes it. The command line
(nefgpt.cli) parses arguments and calls `run_stage` for each stage it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from . import data, evaluate, fit, sample, tokenizer, train, tune
from .artifacts import load_json, save_json
from .baselines import baseline_module
from .codebook import load_tokenizer
from .config import RunConfig
from .errors import ArtifactError, NefgptError, UsageError
from .fields_io import load_nefs, spec_from_config
from .figures import save_loss_curve
from .layout import (ANCHOR_FILE, CHUNK_DIR, CKPT_FILE, CLASSIFIER_FILE, IMAGES_FILE, LOG_FILE, LOSS_FIGURE_FILE,
                     METRICS_FILE, NEFS_FILE, SAMPLES_FILE, SPLIT_FILE, STAGES_FILE, SUMMARY_FILE, TOKENIZER_FILE,
                     TOKENS_FILE, TUNE_FILE)
from .tune import sampling_config

# Stage runners: (cfg, run_dir, args, restart) -> the stage's summary. They call through the stage's module, so
# a test may replace a stage function there. `restart` is true when the stage redoes work made with other settings.
Runner = Callable[[RunConfig, Path, argparse.Namespace, bool], dict]


def _fit(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    return fit.run_fit(cfg.data, cfg.fit, run_dir, not args.quiet)


def _tokenize(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    return tokenizer.run_tokenize(cfg.tokenize, run_dir)


def _train(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    if cfg.train.model != "gpt":
        return baseline_module(cfg.train.model).train(cfg, run_dir, not args.quiet, resume=args.resume)
    summary = train.run_train(cfg.train, run_dir, resume=args.resume, progress=not args.quiet, restart=restart)
    save_loss_curve(run_dir / LOSS_FIGURE_FILE, run_dir / LOG_FILE)
    return summary


def _tune(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    return tune.run_tune(cfg, run_dir, not args.quiet)


def _sample(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    labels = getattr(args, "label", None)
    if cfg.train.model != "gpt":
        return baseline_module(cfg.train.model).sample(cfg, run_dir, not args.quiet, labels)
    return sample.run_sample(cfg.sample, run_dir, not args.quiet, labels=labels)


def _evaluate(cfg: RunConfig, run_dir: Path, args: argparse.Namespace, restart: bool) -> dict:
    return evaluate.run_evaluate(cfg.evaluate, run_dir, not args.quiet)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run: what it depends on, what it writes, how it runs."""

    name: str
    # The config sections it depends on directly; upstream changes reach it through file times.
    sections: tuple[str, ...]
    inputs: tuple[str, ...]  # in the run directory, made by earlier stages
    outputs: tuple[str, ...]  # their presence (and times) mark the stage as done
    run: Runner
    help: str
    # Removed before the stage is redone: derived from what it replaces, they would otherwise outlive it.
    # Other stages replace their outputs atomically once their inputs have loaded.
    stale_on_redo: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("fit", ("data", "fit"), (), (NEFS_FILE,), _fit, "load data, split it, fit one field per image",
          # The split goes too (a redo may split anew), and the classifier, trained on the split's images.
          stale_on_redo=(NEFS_FILE, SPLIT_FILE, ANCHOR_FILE, CHUNK_DIR, CLASSIFIER_FILE)),
    Stage("tokenize", ("tokenize",), (NEFS_FILE,), (TOKENIZER_FILE, TOKENS_FILE), _tokenize,
          "learn the codebook, tokenize fields"),
    Stage("train", ("train", "diffusion", "regression", "baseline"), (TOKENS_FILE,), (CKPT_FILE, SUMMARY_FILE),
          _train, "train the GPT (or a baseline: --set train.model=...)"),
    Stage("tune", ("tune",), (CKPT_FILE,), (TUNE_FILE,), _tune, "search sampling settings against the tuning split"),
    Stage("sample", ("sample",), (CKPT_FILE,), (SAMPLES_FILE, IMAGES_FILE), _sample, "sample fields per class"),
    Stage("evaluate", ("evaluate",), (SAMPLES_FILE,), (METRICS_FILE,), _evaluate, "score samples",
          stale_on_redo=(CLASSIFIER_FILE,)),  # trained with the evaluate settings
)
STAGE = {s.name: s for s in STAGES}
RUN_HELP = "all stages in order, then the HTML report"


# Settings read only when sampling, though they live in a model's section.
SAMPLING_ONLY = {("regression", "noise"), ("diffusion", "sample_steps"), ("diffusion", "eta"), ("diffusion", "clip_x0")}
# Settings added after runs existed, with the value that does what those runs did: left out of the fingerprint
# at that value, so a run directory made before the setting existed stays fresh.
ADDED_LATER = {("fit", "init_l2"): 0.0, ("fit", "augment_shifts"): 0, ("train", "first_layer_weight"): 1.0,
               ("tokenize", "order"): "input_first", ("sample", "prior_weight"): 0.0, ("tune", "prior_weights"): [0.0],
               ("sample", "prior_components"): 1, ("sample", "prior_dims"): 0, ("sample", "prior_gpt_weight"): 1.0,
               ("tune", "prior_components"): [1], ("tune", "prior_dims"): [0], ("tune", "prior_gpt_weights"): [1.0],
               ("sample", "prior_positions"): "first_layer", ("tune", "prior_positions"): ["first_layer"],
               ("baseline", "components"): 16, ("baseline", "dims"): 128,
               ("sample", "prior_component_draw"): "posterior", ("tune", "prior_component_draws"): ["posterior"],
               ("tune", "samples_per_class"): 0, ("sample", "critic_fields"): 0, ("sample", "critic_quantile"): 0.5}


def stage_fingerprint(cfg: RunConfig, stage: str) -> str:
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in STAGE[stage].sections}
    for section, key in SAMPLING_ONLY:
        if stage == "sample":
            sections[f"{section}.{key}"] = getattr(getattr(cfg, section), key)
        elif section in sections:
            sections[section].pop(key, None)
    for (section, key), neutral in ADDED_LATER.items():
        if section in sections and sections[section].get(key) == neutral:
            sections[section].pop(key)
    blob = json.dumps(sections, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_record(run_dir: Path) -> dict:
    path = run_dir / STAGES_FILE
    return load_json(path) if path.exists() else {}


def is_fresh(run_dir: Path, stage: str, cfg: RunConfig) -> bool:
    """Outputs exist, are newer than the inputs, and were made with the current settings."""
    inputs, outputs = STAGE[stage].inputs, STAGE[stage].outputs
    outs = [run_dir / o for o in outputs]
    if not all(o.exists() for o in outs) or not all((run_dir / i).exists() for i in inputs):
        return False
    if _stage_record(run_dir).get(stage) != stage_fingerprint(cfg, stage):
        return False
    newest_in = max(((run_dir / i).stat().st_mtime for i in inputs if (run_dir / i).exists()), default=0.0)
    return min(o.stat().st_mtime for o in outs) >= newest_in


def run_stage(name: str, cfg: RunConfig, run_dir: Path, args: argparse.Namespace) -> None:
    if name == "tune" and cfg.train.model != "gpt":
        print(f"[tune] skipped: it tunes the GPT's sampling, this run's model is {cfg.train.model}", file=sys.stderr)
        return
    if name == "sample":
        cfg = sampling_config(cfg, run_dir)
    labels = getattr(args, "label", None)
    force = args.force or (name == "sample" and bool(labels))
    if not force and is_fresh(run_dir, name, cfg):
        print(f"[{name}] up to date, skipped (--force redoes it)", file=sys.stderr)
        return
    check_inputs(name, run_dir)
    if name == "sample" and labels:
        check_labels(labels, run_dir)
    recorded = _stage_record(run_dir).get(name)
    redo = force or recorded not in (None, stage_fingerprint(cfg, name))  # made with other settings
    if redo:
        _remove(run_dir, STAGE[name].stale_on_redo)
    t0 = time.time()
    print(f"[{name}] running", file=sys.stderr)
    result = STAGE[name].run(cfg, run_dir, args, redo)
    record = _stage_record(run_dir)
    # Samples of chosen labels only are not what a later `run` expects: record them as different.
    record[name] = stage_fingerprint(cfg, name) + (f"+labels{sorted(labels)}" if labels else "")
    save_json(run_dir / STAGES_FILE, record)
    print(f"[{name}] done in {time.time() - t0:.1f}s: {_brief(result)}", file=sys.stderr)


def check_inputs(name: str, run_dir: Path) -> None:
    for i in STAGE[name].inputs:
        if not (run_dir / i).exists():
            raise ArtifactError(f"{run_dir / i}: file not found; run `nefgpt {_maker(i)} --out {run_dir}` first")


def check_architecture(cfg: RunConfig, run_dir: Path) -> None:
    """Fields fitted earlier must have the configured architecture (a `run` fits them itself)."""
    if (run_dir / NEFS_FILE).exists():
        load_nefs(run_dir, spec_from_config(cfg.fit))


def check_labels(labels: list[int], run_dir: Path) -> None:
    num_classes = load_tokenizer(run_dir / TOKENIZER_FILE).vocab.num_classes
    for c in labels:
        if not 0 <= c < num_classes:
            raise UsageError(f"--label {c}: not a class of this run (0..{num_classes - 1})")


def _maker(filename: str) -> str:
    return next(s.name for s in STAGES if filename in s.outputs)


def _remove(run_dir: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_sampling_budget(cfg: RunConfig, run_dir: Path, labels: list[int] | None, force: bool) -> None:
    """Refuse an absurd sample.n_per_class before any work; warn on stderr when sampling would run long."""
    classes = None
    try:
        if (run_dir / SPLIT_FILE).exists():
            classes = int(load_json(run_dir / SPLIT_FILE)["num_classes"])
    except (NefgptError, KeyError, TypeError, ValueError):
        pass  # the stages report a bad split themselves
    if classes is None and not labels:  # before `fit` has split the data (a bad dataset fails here, before any work)
        classes = data.class_count(cfg.data.dataset)
    seconds, measured = None, False
    try:
        if (run_dir / SAMPLES_FILE).exists():
            with safe_open(str(run_dir / SAMPLES_FILE), framework="pt") as f:
                seconds, measured = float(json.loads((f.metadata() or {})["seconds_per_field"])), True
    except Exception:  # no usable measurement: the estimate uses a rough figure
        seconds, measured = None, False
    warning = sample.check_sampling_size(cfg.sample.n_per_class, len(labels) if labels else classes,
                                         spec_from_config(cfg.fit).num_params, seconds, measured)
    if not warning:
        return
    try:  # no warning for a sampling that will be skipped as up to date
        skipped = not (force or labels) and is_fresh(run_dir, "sample", sampling_config(cfg, run_dir))
    except NefgptError:
        skipped = False
    if not skipped:
        print(warning, file=sys.stderr)


def _brief(result: dict) -> str:
    keys = ("psnr_mean", "psnr_quantized_mean", "mse", "train_loss", "val_loss", "n", "accuracy", "1nna", "mmd", "cov")
    parts = [f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys if k in result]
    return ", ".join(parts) or "ok"
