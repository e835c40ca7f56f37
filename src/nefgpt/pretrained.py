"""Shipped pretrained models: `nefgpt sample --pretrained mnist` works offline on a fresh clone.

A shipped model is a folder in ``nefgpt/pretrained_models/NAME`` holding what the
`sample` stage reads (tokenizer, a checkpoint without optimizer state, the resolved
config and the tuned sampling setting), plus the run's ``metrics.json`` and the
classifier it was scored with, so its recorded accuracy can be checked again.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .artifacts import load_checkpoint, save_checkpoint, write_bytes
from .checkpoint import sampling_weights
from .errors import UsageError
from .codebook import load_tokenizer
from .layout import (CKPT_FILE, CLASSIFIER_FILE, CONFIG_FILE, CRITIC_FILE, GRID_FILE, METRICS_FILE, PRIOR_FILE,
                     TOKENIZER_FILE, TUNE_FILE)
from .tune import load_best_setting
from .weight_prior import prior_training_codes, save_prior

MODELS_DIR = "pretrained_models"
# What `sample` needs, and what lets a user (and a test) check the recorded numbers.
SHIPPED_FILES = (TOKENIZER_FILE, CKPT_FILE, CONFIG_FILE, TUNE_FILE, METRICS_FILE, CLASSIFIER_FILE, GRID_FILE,
                 CRITIC_FILE)
REQUIRED_FILES = (TOKENIZER_FILE, CKPT_FILE, CONFIG_FILE)


def models_root() -> Path:
    return Path(str(resources.files("nefgpt") / MODELS_DIR))


def available() -> list[str]:
    root = models_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def model_dir(name: str) -> Path:
    path = models_root() / name
    if not path.is_dir():
        names = ", ".join(available()) or "none"
        raise UsageError(f"no pretrained model '{name}' (available: {names})")
    return path


def install(name: str, run_dir: Path) -> Path:
    """Copy the shipped model's files into `run_dir`, so the usual `sample` stage can use it."""
    src = model_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in (*SHIPPED_FILES, PRIOR_FILE):
        if (src / f).exists() and f != GRID_FILE:
            shutil.copyfile(src / f, run_dir / f)
    return run_dir


def export(run_dir: Path, dest: Path) -> Path:
    """Write a finished run as a shipped-model folder: its SHIPPED_FILES, the checkpoint cut to what sampling reads.

    The checkpoint keeps the weights `sample` uses (the moving average where training kept one) as its
    model, and drops the optimizer state and the second copy, which only resuming needs.
    """
    missing = [f for f in REQUIRED_FILES + (METRICS_FILE, CLASSIFIER_FILE) if not (run_dir / f).exists()]
    if missing:
        raise UsageError(f"{run_dir}: not a finished, evaluated run (no {', '.join(missing)})")
    dest.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_FILES:
        if f != CKPT_FILE and (run_dir / f).exists():
            write_bytes(dest / f, (run_dir / f).read_bytes())  # atomic, like every artifact write
    ckpt = load_checkpoint(run_dir / CKPT_FILE)
    kept = {k: v for k, v in ckpt.items() if k not in ("optimizer", "ema")}
    save_checkpoint(dest / CKPT_FILE, {**kept, "model": sampling_weights(ckpt)})
    # The folder has no training tokens, so a tuned prior travels as the codes it is fitted on.
    if (run_dir / TUNE_FILE).exists() and load_best_setting(run_dir)["prior_weight"] > 0:
        tok = load_tokenizer(run_dir / TOKENIZER_FILE)
        save_prior(dest / PRIOR_FILE, *prior_training_codes(run_dir, tok, tok.spec.num_params), tok.id)
    return dest
