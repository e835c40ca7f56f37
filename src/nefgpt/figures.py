"""Figures for people: sample grids and loss curves, written atomically as PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .artifacts import atomic_path


def image_grid(images: torch.Tensor, rows: list[list[int]], scale: int = 2, gap: int = 2,
               row_titles: list[str] | None = None) -> Image.Image:
    """Tile images (N, H, W) in [0, 1]; `rows` lists the image indices of each row."""
    h, w = images.shape[-2:]
    cols = max((len(r) for r in rows), default=0)
    margin = 24 if row_titles else 0
    canvas = np.full((len(rows) * (h * scale + gap) + gap, margin + cols * (w * scale + gap) + gap), 255, np.uint8)
    pixels = (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    for r, indices in enumerate(rows):
        for c, i in enumerate(indices):
            y0, x0 = gap + r * (h * scale + gap), margin + gap + c * (w * scale + gap)
            canvas[y0 : y0 + h * scale, x0 : x0 + w * scale] = np.kron(pixels[i], np.ones((scale, scale), np.uint8))
    img = Image.fromarray(canvas).convert("RGB")
    if row_titles:
        draw = ImageDraw.Draw(img)
        for r, title in enumerate(row_titles):
            draw.text((4, gap + r * (h * scale + gap) + h * scale // 2 - 5), title, fill=(0, 0, 0))
    return img


def save_png(path: Path, img: Image.Image) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_sample_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, per_row: int = 10) -> None:
    """One row per class with up to `per_row` samples, labelled with the class."""
    classes = sorted(set(labels.tolist()))
    rows = [torch.nonzero(labels == c).flatten()[:per_row].tolist() for c in classes]
    save_png(path, image_grid(images, rows, row_titles=[str(c) for c in classes]))


def save_loss_curve(path: Path, log_csv: Path) -> None:
    """Train and held-out cross-entropy against iteration, from the training CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_csv.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    it = [int(r["iter"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(it, [float(r["train_loss"]) for r in rows], label="train (last batch)")
    ax.plot(it, [float(r["val_loss"]) for r in rows], label="held-out")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats / weight token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def render_artifact(path: Path, res: int, count: int, png: Path, stride: int = 1) -> int:
    """Render `count` fields (every `stride`-th) of a field artifact at res x res into a PNG grid; returns the count.

    A field artifact is any safetensors file with a (N, P) float32 ``weights``
    tensor and the field architecture in its metadata (nefs, samples, anchor).
    """
    from . import field
    from .artifacts import load_tensors
    from .errors import UsageError

    if not 8 <= res <= 1024:
        raise UsageError(f"--res must be between 8 and 1024, got {res}")
    if count < 1 or stride < 1:
        raise UsageError(f"-n and --stride must be >= 1, got {count} and {stride}")
    tensors, meta = load_tensors(path, {"weights": torch.float32})
    spec = field.FieldSpec.from_meta(meta.get("field", {}), str(path))
    weights = tensors["weights"]
    spec.check_weights(weights, str(path))
    images = field.render(spec, weights[::stride][:count], res)
    per_row = min(len(images), 10)
    rows = [list(range(i, min(i + per_row, len(images)))) for i in range(0, len(images), per_row)]
    save_png(png, image_grid(images, rows, scale=max(1, 128 // res)))
    return len(images)
