"""Figures that `evaluate` writes beside metrics.json.

- ``samples_nearest.png``: a few samples per class, each beside its 3 nearest
  rendered training fields under the evaluation's SSIM distance, distances
  written under them. Near-copies show up as a distance near 0.
- ``confusion.png``: the classifier's confusion matrix on the samples.
- ``generation.gif``: autoregressive generation of one sample per class. Frame
  s renders the field whose first n_s weights are the sample's and whose other
  weights are still the anchor's (the shared initialisation every training
  field started from), so the animation morphs from the anchor into the sample
  in flatten order: first layer, then second, then the output layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import field, ssim
from .artifacts import atomic_path
from .figures import save_confusion_matrix, save_png
from .layout import CONFUSION_FILE, GENERATION_FILE, NEAREST_FILE
from .split import first_per_class

FIGURE_FILES = (NEAREST_FILE, CONFUSION_FILE, GENERATION_FILE)

_BLACK, _GREY, _RED = (0, 0, 0), (110, 110, 110), (200, 30, 30)


def _tile(image: torch.Tensor, scale: int) -> Image.Image:
    pixels = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.kron(pixels, np.ones((scale, scale), np.uint8))).convert("RGB")


def nearest_figure(samples: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, distances: torch.Tensor,
                   neighbours: torch.Tensor, per_row: int = 2, scale: int = 3) -> Image.Image:
    """One row per class: up to `per_row` groups of a sample (red frame) and its nearest pool images.

    `samples` (N, H, W) with `labels` (N,); `distances` and `neighbours` (N, k)
    are the distances to and the pool indices of each sample's k nearest, nearest first.
    """
    k = neighbours.shape[1]
    side = samples.shape[-1] * scale
    cell, text_h, gap, group_gap, margin, header = side + 4, 14, 4, 18, 26, 18
    group_w = (1 + k) * cell + gap
    classes = sorted(set(labels.tolist()))
    groups = [[i for i in range(len(labels)) if labels[i] == c][:per_row] for c in classes]
    width = margin + per_row * group_w + (per_row - 1) * group_gap
    height = header + len(classes) * (cell + text_h + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 3), f"sample | its {k} nearest training fields, SSIM distance (1 - SSIM) / 2", fill=_BLACK)
    for r, (c, members) in enumerate(zip(classes, groups)):
        y = header + r * (cell + text_h + gap)
        draw.text((6, y + side // 2 - 5), str(c), fill=_BLACK)
        for g, i in enumerate(members):
            x = margin + g * (group_w + group_gap)
            canvas.paste(_tile(samples[i], scale), (x + 2, y + 2))
            draw.rectangle((x, y, x + side + 3, y + side + 3), outline=_RED, width=2)
            for j in range(k):
                nx = x + (1 + j) * cell + gap
                canvas.paste(_tile(pool[int(neighbours[i, j])], scale), (nx + 2, y + 2))
                draw.text((nx + 4, y + cell + 1), f"{float(distances[i, j]):.3f}", fill=_GREY)
    return canvas


def generation_frames(spec: field.FieldSpec, weights: torch.Tensor, start: torch.Tensor, steps: int,
                      res: int, order: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Renders (B, res, res) after 0, P/steps, ..., P weights are generated, and those weight counts.

    Weights are generated in `order` (the tokenizer's sequence order; None is the flatten order), and those
    not generated yet take their value from `start` (P,).
    """
    n = spec.num_params
    order = torch.arange(n) if order is None else order
    counts = sorted({round(s * n / steps) for s in range(steps + 1)})
    frames = []
    for m in counts:
        partial = start.expand(len(weights), -1).clone()
        partial[:, order[:m]] = weights[:, order[:m]]
        frames.append(field.render(spec, partial, res))
    return frames, counts


def save_generation_gif(path: Path, spec: field.FieldSpec, weights: torch.Tensor, labels: torch.Tensor,
                        start: torch.Tensor, steps: int = 40, res: int = 64, frame_ms: int = 80,
                        order: torch.Tensor | None = None) -> int:
    """Animate the fields `weights` (B, P) being filled in from `start` (P,) in `order`; returns the frame count."""
    frames, counts = generation_frames(spec, weights, start, steps, res, order)
    cell, gap, header = res + 4, 4, 16
    images = []
    for frame, m in zip(frames, counts):
        canvas = Image.new("RGB", (gap + len(weights) * cell, header + cell + 14), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        draw.text((gap, 2), f"weights generated: {m} / {spec.num_params}", fill=_BLACK)
        for b in range(len(weights)):
            canvas.paste(_tile(frame[b], 1), (gap + b * cell, header))
            draw.text((gap + b * cell + res // 2 - 3, header + res + 1), str(int(labels[b])), fill=_GREY)
        # One shared palette: a per-frame adaptive one would make still regions flicker.
        images.append(canvas.convert("L"))
    durations = [frame_ms] * len(images)
    durations[0], durations[-1] = 4 * frame_ms, 20 * frame_ms  # hold the start and the result
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return len(images)


def write_eval_figures(run_dir: Path, spec: field.FieldSpec, gen_images: torch.Tensor, gen_weights: torch.Tensor,
                       gen_labels: torch.Tensor, train_fields: torch.Tensor, confusion: list[list[int]],
                       anchor: torch.Tensor | None, autoregressive: bool,
                       order: torch.Tensor | None = None) -> list[str]:
    """Write the evaluation figures of the scored samples; returns the names written.

    The GIF is made only for `autoregressive` samples (made weight by weight, in
    `order`: the tokenizer's sequence order, None for the flatten order): for other
    models the morph would show an order they never used.
    """
    picks = first_per_class(gen_labels, 2)
    k = min(3, len(train_fields))
    dist, idx = ssim.nearest_k(gen_images[picks], train_fields, k)
    save_png(run_dir / NEAREST_FILE, nearest_figure(gen_images[picks], gen_labels[picks], train_fields, dist, idx))
    save_confusion_matrix(run_dir / CONFUSION_FILE, confusion, "classifier on the samples (colour: row share)")
    written = [NEAREST_FILE, CONFUSION_FILE]
    if autoregressive:
        one = first_per_class(gen_labels, 1)
        start = anchor if anchor is not None else torch.zeros(spec.num_params)
        save_generation_gif(run_dir / GENERATION_FILE, spec, gen_weights[one], gen_labels[one], start, order=order)
        written.append(GENERATION_FILE)
    else:
        (run_dir / GENERATION_FILE).unlink(missing_ok=True)  # a GIF of an earlier GPT sample set would mislead
    return written
