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

from .artifacts import load_checkpoint, load_json, save_checkpoint, save_json
from .errors import UsageError

MODELS_DIR = "pretrained_models"
# What `sample` needs, and what lets a user (and a test) check the recorded numbers.
SHIPPED_FILES = ("tokenizer.safetensors", "ckpt.pt", "config.json", "tune.json", "metrics.json",
                 "classifier.safetensors", "samples_grid.png")
REQUIRED_FILES = ("tokenizer.safetensors", "ckpt.pt", "config.json")
# Checkpoint keys a sampler needs; the optimizer state would triple the size for nothing.
CKPT_KEYS = ("model", "model_args", "iter_num", "best_val_loss", "tokenizer_id", "config", "elapsed_s")


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
    for f in SHIPPED_FILES:
        if (src / f).exists() and f != "samples_grid.png":
            shutil.copyfile(src / f, run_dir / f)
    return run_dir


def export(run_dir: Path, dest: Path) -> list[Path]:
    """Write the shippable subset of an evaluated run into `dest` (used once, to make a shipped model)."""
    for f in REQUIRED_FILES:
        if not (run_dir / f).exists():
            raise UsageError(f"{run_dir / f}: not found; export needs a trained run")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for f in SHIPPED_FILES:
        if not (run_dir / f).exists():
            continue
        if f == "ckpt.pt":
            ckpt = load_checkpoint(run_dir / f)
            save_checkpoint(dest / f, {k: ckpt[k] for k in CKPT_KEYS if k in ckpt})
        elif f == "config.json":
            save_json(dest / f, load_json(run_dir / f))
        else:
            shutil.copyfile(run_dir / f, dest / f)
        written.append(dest / f)
    return written
