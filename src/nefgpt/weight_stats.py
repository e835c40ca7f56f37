"""Weight-space statistics and figures of the field and tokenizer stages.

Why shared init matters: the GPT reads the flattened weights as a sequence, so a
position must mean the same thing in every field. Fields fitted from one shared
anchor stay close to it, and each position varies little across fields; fields
fitted from random inits land far apart, with the position's value set mostly by
the init. `init_stats` measures both, `fit` stores them in nefs.safetensors, and
`benchmarks/init_modes.py` compares the two modes side by side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import field
from .figures import pyplot, save_figure


def init_stats(weights: torch.Tensor, inits: torch.Tensor) -> dict:
    """How far fields (N, P) moved from their inits (N, P), and how much each position varies across fields."""
    w, w0 = weights.double(), inits.double()
    moved = (w - w0).norm(dim=1)
    position_std = w.std(dim=0)
    return {
        "init_distance_mean": float(moved.mean()),
        "init_distance_median": float(moved.median()),
        # Relative to the typical weight-vector norm, so the two modes compare on one scale.
        "init_distance_relative": float(moved.mean() / w.norm(dim=1).mean()),
        "position_std_mean": float(position_std.mean()),
        "position_std_median": float(position_std.median()),
        # Spread across fields vs the spread of all weights pooled: near 1 means a position carries no
        # information shared across fields; near 0 means fields agree position by position.
        "position_std_over_pooled_std": float(position_std.mean() / w.std()),
    }


def save_tokenizer_figure(path: Path, train_weights: torch.Tensor, codebook: torch.Tensor, spec: field.FieldSpec,
                          fitted: torch.Tensor, quantized: torch.Tensor, images: torch.Tensor,
                          value_label: str = "weight value") -> None:
    """Weight histogram with the code positions, and image / fitted / quantized renders of a few fields.

    `train_weights` are the values the codebook quantizes (the weights, or their offsets), named by `value_label`.
    """
    n = min(len(images), 6)
    plt = pyplot()  # imported on first use: `fit` imports this module, and most commands draw nothing
    fig = plt.figure(figsize=(11, 4.2))
    grid = fig.add_gridspec(3, 2 + n, width_ratios=[3, 0.2] + [1] * n, wspace=0.08, hspace=0.1)
    ax = fig.add_subplot(grid[:, 0])
    values = train_weights.flatten().numpy()
    ax.hist(values, bins=200, color="0.6", log=True)
    ymax = ax.get_ylim()[1]
    ax.vlines(codebook.numpy(), ymin=ax.get_ylim()[0], ymax=ymax, color="C3", linewidth=0.4, alpha=0.8)
    ax.set_xlabel(value_label)
    ax.set_ylabel("count (log)")
    ax.set_title(f"training weights and the {len(codebook)} codes (red)", fontsize=9)
    rows = [("image", images[:n]), ("fitted", field.render(spec, fitted[:n], images.shape[-1])),
            ("quantized", field.render(spec, quantized[:n], images.shape[-1]))]
    for r, (title, imgs) in enumerate(rows):
        for c in range(n):
            a = fig.add_subplot(grid[r, 2 + c])
            a.imshow(imgs[c].numpy(), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(title, fontsize=9)
    save_figure(path, fig, dpi=110, bbox_inches="tight")


def save_position_std_figure(path: Path, stds: dict[str, torch.Tensor]) -> None:
    """Per-position standard deviation across fields, one line per init mode."""
    fig, ax = pyplot().subplots(figsize=(9, 3.2))
    for name, std in stds.items():
        ax.plot(std.numpy(), linewidth=0.7, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("weight position (flatten order)")
    ax.set_ylabel("std across fields")
    ax.legend()
    save_figure(path, fig, dpi=110, bbox_inches="tight")
