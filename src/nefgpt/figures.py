"""Figures for people: sample grids, loss curves, tuning heatmaps and confusion matrices, written atomically as PNG."""

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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: figures are written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: Path, fig, **savefig_kwargs) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    pyplot().close(fig)


def save_loss_curve(path: Path, log_csv: Path, ylabel: str = "cross-entropy (nats / weight token)") -> None:
    """Train and held-out loss against iteration, from the training CSV log."""
    plt = pyplot()
    with log_csv.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    it = [int(r["iter"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(it, [float(r["train_loss"]) for r in rows], label="train (last batch)")
    ax.plot(it, [float(r["val_loss"]) for r in rows], label="held-out")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig)


def _annotated_map(ax, values: np.ndarray, text: list[list[str]], cmap: str, vmin: float, vmax: float) -> None:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            red, green, blue, _ = image.cmap(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # the cell's luminance picks the text colour
            ax.text(c, r, text[r][c], ha="center", va="center", fontsize=8, color="white" if dark else "black")


# The sampling dimensions of tune.json rows, with their defaults for files written before they were tuned.
_TUNE_DIMS = {"top_k": 0, "temperature": 1.0, "guidance": 1.0, "min_p": 0.0, "top_p": 1.0, "oversample": 1.0,
              "prior_weight": 0.0, "prior_gpt_weight": 1.0, "prior_components": 1, "prior_dims": 0,
              "prior_positions": "first_layer", "prior_component_draw": "posterior"}
_TUNE_LABELS = {"top_k": "top-k", "temperature": "temperature", "guidance": "guidance", "min_p": "min-p",
                "top_p": "top-p", "oversample": "oversample", "prior_weight": "prior weight",
                "prior_gpt_weight": "GPT weight under the prior", "prior_components": "prior components",
                "prior_dims": "prior dims", "prior_positions": "prior positions",
                "prior_component_draw": "prior component"}


def _tune_axes(rows: list[dict]) -> tuple[str, str]:
    """(row dimension, column dimension) of the tuning heatmap: the dimensions that vary.

    Columns are top-k when it varies (else the second varying dimension); rows are the first other varying
    dimension in the order temperature, guidance, min-p, top-p, oversample, prior weight, GPT weight under the prior,
    prior components, prior dims.
    """
    value = lambda r, d: r.get(d, _TUNE_DIMS[d])  # noqa: E731
    varying = [d for d in _TUNE_DIMS if len({value(r, d) for r in rows}) > 1]
    others = [d for d in varying if d != "top_k"]
    col = "top_k" if "top_k" in varying or len(others) < 2 else others[1]
    row = next((d for d in others if d != col), "temperature")
    return row, col


def _tick(dim: str, v: float | str) -> str:
    if isinstance(v, str):
        return v
    if dim == "top_k":
        return str(v) if v else "off"
    if (dim in ("min_p", "prior_weight") and v == 0) or (dim in ("top_p", "oversample") and v == 1):
        return "off"
    return f"{v:g}"


def save_tune_heatmap(path: Path, rows: list[dict], best: dict) -> None:
    """Accuracy, 1-NNA and (where measured) the diversity ratio of the tuned settings, on a 2-D slice of the search.

    The two axes are the sampling dimensions that vary (see `_tune_axes`: columns top-k, rows temperature when both
    vary); every other dimension is held at the best setting's value, and the title says which values those are
    and how many tried settings lie off the slice. `rows` are tune.json's settings; cells that were not tried
    (random search, or a time budget that ran out) stay blank. The best setting's cell is framed.
    """
    plt = pyplot()
    value = lambda r, d: r.get(d, _TUNE_DIMS[d])  # noqa: E731 - tune.json files from before guidance / min-p
    row_dim, col_dim = _tune_axes(rows)
    fixed_dims = [d for d in _TUNE_DIMS if d not in (row_dim, col_dim)]
    at = [r for r in rows if all(value(r, d) == value(best, d) for d in fixed_dims)]
    ys = sorted({value(r, row_dim) for r in at})
    xs = sorted({value(r, col_dim) for r in at}, key=lambda k: (k == 0, k) if col_dim == "top_k" else k)  # k off last
    panels = [("accuracy", "classifier accuracy", "viridis", (0, 1), "{:.0%}"),
              ("1nna", "1-NNA (0.5 ideal)", "magma_r", (0.5, 1), "{:.0%}")]
    if any(r.get("diversity_ratio") is not None for r in at):
        panels.append(("diversity_ratio", "diversity ratio (1 ideal)", "RdBu", (0, 2), "{:.2f}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.2 * len(xs) * len(panels), 1.4 + 0.6 * len(ys)),
                             dpi=100, squeeze=False)
    for ax, (key, title, cmap, (vmin, vmax), fmt) in zip(axes[0], panels):
        values = np.full((len(ys), len(xs)), np.nan)
        for r in at:
            if r.get(key) is not None:
                values[ys.index(value(r, row_dim)), xs.index(value(r, col_dim))] = r[key]
        text = [[fmt.format(v) for v in row] for row in values]
        _annotated_map(ax, values, text, cmap, vmin, vmax)
        ax.set_xticks(range(len(xs)), [_tick(col_dim, x) for x in xs])
        ax.set_yticks(range(len(ys)), [_tick(row_dim, y) for y in ys])
        ax.set_xlabel(_TUNE_LABELS[col_dim])
        ax.set_ylabel(_TUNE_LABELS[row_dim])
        ax.set_title(title, fontsize=10)
        bx, by = xs.index(value(best, col_dim)), ys.index(value(best, row_dim))
        ax.add_patch(plt.Rectangle((bx - 0.5, by - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    # Name the held values of the dimensions that were searched, and the defaults that differ from "off".
    searched = {d for d in fixed_dims if len({value(r, d) for r in rows}) > 1}
    fixed = [f"{_TUNE_LABELS[d]} {_tick(d, value(best, d))}" for d in fixed_dims
             if d in searched or value(best, d) != _TUNE_DIMS[d]]
    hidden = len(rows) - len(at)
    title = "sampling settings on the tuning split" + (f", {', '.join(fixed)}" if fixed else "") + " (best framed)"
    if hidden:
        title += f"\n{hidden} other tried setting{'s' if hidden > 1 else ''} not shown (see tune_table.md)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(path, fig)


def save_confusion_matrix(path: Path, confusion: list[list[int]], title: str) -> None:
    """Counts of (true class, predicted class); colour is the share of the true class's images."""
    plt = pyplot()
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(counts)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n), dpi=100)
    _annotated_map(ax, shares, [[str(v) if v else "" for v in row] for row in counts.tolist()], "Blues", 0, 1)
    ax.set_xticks(range(n), [str(c) for c in range(n)])
    ax.set_yticks(range(n), [str(c) for c in range(n)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("conditioning class")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}\naccuracy {accuracy:.1%} of {counts.sum()}", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig)


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
