"""The fitted fields' file (nefs.safetensors) and the field architecture a fit config describes.

Below the stages: `fit` writes the fields; tokenize, tune, evaluate and the baselines read them with `load_nefs`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import load_tensors
from .config import FitConfig
from .field import FieldSpec
from .layout import NEFS_FILE


def spec_from_config(cfg: FitConfig) -> FieldSpec:
    return FieldSpec(octaves=cfg.octaves, hidden=tuple(cfg.hidden))


def load_nefs(run_dir: Path, spec: FieldSpec | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load nefs.safetensors, checking its architecture against `spec` when given."""
    path = run_dir / NEFS_FILE
    tensors, meta = load_tensors(path, {"weights": torch.float32, "psnr": torch.float32, "labels": torch.int64})
    stored = FieldSpec.from_meta(meta.get("field", {}), str(path))
    stored.check_weights(tensors["weights"], str(path))
    if spec is not None:
        spec.check_matches(stored, str(path))
    meta["spec"] = stored
    return tensors, meta
