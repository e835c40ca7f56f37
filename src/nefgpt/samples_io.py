"""The sample artifacts every model writes (the GPT's `sample` stage and every baseline) and `evaluate` reads.

samples.safetensors holds the generated weights and their labels (plus what the
model adds, such as its tokens); samples.npz and samples_grid.png hold their
28x28 renders, for use outside nefgpt and for a look.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import field
from .artifacts import atomic_path, load_tensors, save_tensors
from .errors import ArtifactError
from .figures import save_sample_grid
from .layout import GRID_FILE, IMAGES_FILE, SAMPLES_FILE


def save_samples(run_dir: Path, spec: field.FieldSpec, weights: torch.Tensor, labels: torch.Tensor, meta: dict,
                 extra: dict[str, torch.Tensor] | None = None, per_row: int = 10) -> torch.Tensor:
    """Write the sample artifacts every model produces; returns the 28x28 renders.

    `meta` should carry "seconds_per_field" (generation time only), which `compare` reports.
    """
    spec.check_weights(weights, str(run_dir / SAMPLES_FILE))
    images = field.render(spec, weights, 28)
    save_tensors(run_dir / SAMPLES_FILE, {**(extra or {}), "weights": weights.float(), "labels": labels.long()},
                 {"field": spec.to_meta(), **meta})
    save_images_npz(run_dir / IMAGES_FILE, images, labels)
    save_sample_grid(run_dir / GRID_FILE, images, labels, per_row=per_row)
    return images


def save_images_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez(f, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))


def load_generated_fields(run_dir: Path, expect: field.FieldSpec | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of samples.safetensors, checked against the architecture `expect`."""
    path = run_dir / SAMPLES_FILE
    tensors, meta = load_tensors(path, {"weights": torch.float32, "labels": torch.int64})
    spec = field.FieldSpec.from_meta(meta.get("field", {}), str(path))
    if expect is not None:
        expect.check_matches(spec, str(path))
    weights, labels = tensors["weights"], tensors["labels"]
    spec.check_weights(weights, str(path))
    if labels.shape != (weights.shape[0],):
        raise ArtifactError(f"{path}: {tuple(labels.shape)} labels for {weights.shape[0]} fields")
    return tensors, {**meta, "spec": spec}
