"""The fitted fields' file (nefs.safetensors) and the field architecture a fit config describes.

Below the stages: `fit` writes the fields; tokenize, tune, evaluate and the baselines read them with `load_nefs`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import load_tensors
from .config import FitConfig
from .errors import ArtifactError
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
    augment = meta.get("augment")
    if augment is not None:
        n = len(tensors["weights"])
        if not (isinstance(augment, dict) and isinstance(augment.get("first_row"), int)
                and isinstance(augment.get("rows"), int) and 0 < augment["first_row"]
                and augment["first_row"] + augment["rows"] == n):
            raise ArtifactError(f"{path}: metadata 'augment' must give first_row and rows of the last fields "
                                f"(the file has {n}), got {augment}")
    meta["spec"] = stored
    return tensors, meta


def training_rows(split: dict, nefs_meta: dict) -> torch.Tensor:
    """Rows of nefs.safetensors the models learn from: the split's training fields, then fit's shifted copies."""
    rows = torch.tensor(split["train"], dtype=torch.long)
    augment = nefs_meta.get("augment")
    if augment:
        rows = torch.cat([rows, torch.arange(augment["first_row"], augment["first_row"] + augment["rows"])])
    return rows
