"""Stage `fit`: load the data, split it, and fit one neural field per image.

Fields are fitted many at a time: the weights of a chunk of fields form one
(B, P) tensor and the forward pass is a batched matmul. The loss is the sum over
fields of each field's mean BCE, and Adam is elementwise, so every field follows
exactly the trajectory it would follow alone.

With ``init = "shared"`` one anchor field is first fitted long from random init
on a fixed image (the first training image); every field then starts from the
anchor's weights ("weight conditioning"), which keeps the flattened weights of
different fields aligned position by position.

With ``augment_shifts = k`` every training image is also fitted k more times, moved by one pixel in k of the
8 directions (a seeded choice per image). Those fields are appended after the split's fields in
nefs.safetensors; `nefgpt.fields_io.training_rows` hands them to the models.

Chunks are written as they finish, so a killed fit resumes where it stopped and
ends with the same bytes as an uninterrupted one. The later stages read the fields
with `nefgpt.fields_io.load_nefs`.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import field
from .artifacts import load_tensors, save_tensors
from .config import DataConfig, FitConfig
from .field import FieldSpec
from .fields_io import spec_from_config
from .layout import ANCHOR_FILE, CHUNK_DIR, NEFS_FILE, SPLIT_FILE
from .split import load_split_images, make_split
from .weight_stats import init_stats


def fit_batch(
    spec: FieldSpec, init: torch.Tensor, images: torch.Tensor, steps: int, lr: float, init_l2: float = 0.0
) -> torch.Tensor:
    """Fit fields (B, P) starting at `init` to images (B, H, W) with Adam and a cosine schedule.

    `init_l2` (fit.init_l2) adds init_l2 * ||w - init||^2 to each field's loss. Adam scales each coordinate's
    step by its own gradient history, so the pull wins where the image barely depends on a weight: those
    weights stay at the shared anchor instead of drifting along the fit's path, which leaves the GPT fewer
    arbitrary values to model (docs/results.md, "Fields pulled toward the anchor").
    """
    features = field.encode(field.pixel_coords(images.shape[-1]), spec.octaves)
    target = images.reshape(images.shape[0], -1)
    start = init.detach()
    weights = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([weights], lr=lr)
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        logits = field.forward(spec, weights, features)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1).sum()
        if init_l2:
            loss = loss + init_l2 * (weights - start).square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return weights.detach()


# (dy, dx) of the one-pixel moves; MNIST digits sit in a 4-pixel empty border, so no stroke leaves the image.
SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images (..., H, W) moved by (dy, dx) pixels, |dy|, |dx| <= 1, with zeros coming in at the edges."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1))
    return padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def augmented_images(images: torch.Tensor, shifts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`shifts` distinct one-pixel moves of each image (N, H, W): images (N * shifts, H, W), image by image, with
    the source image's position (N * shifts,) and the move (N * shifts, 2) of each."""
    if shifts == 0:
        return images[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + 7919)
    choice = torch.stack([torch.randperm(len(SHIFTS), generator=gen)[:shifts] for _ in range(len(images))])
    source = torch.arange(len(images)).repeat_interleave(shifts)
    moves = torch.tensor(SHIFTS, dtype=torch.long)[choice.flatten()]
    moved = torch.stack([shift_images(images[i], int(dy), int(dx)) for i, (dy, dx) in zip(source.tolist(), moves)])
    return moved, source, moves


def fit_anchor(spec: FieldSpec, image: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed)
    return fit_batch(spec, field.init_random(spec, 1, gen), image[None], cfg.anchor_steps, cfg.anchor_lr)


def chunk_inits(spec: FieldSpec, cfg: FitConfig, anchor: torch.Tensor | None, start: int, n: int) -> torch.Tensor:
    if cfg.init == "shared":
        return anchor.expand(n, -1)
    # A per-chunk generator keeps random inits independent of how chunks are resumed.
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start + 1)
    return field.init_random(spec, n, gen)


def run_fit(data_cfg: DataConfig, cfg: FitConfig, run_dir: Path, progress: bool = True) -> dict:
    """Fit every field of the split; returns a summary that is also saved in nefs.safetensors."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if (run_dir / SPLIT_FILE).exists():
        split, images, labels = load_split_images(run_dir)
    else:
        split, images, labels = make_split(data_cfg, run_dir)
    spec = spec_from_config(cfg)
    anchor = None
    if cfg.init == "shared":
        anchor_path = run_dir / ANCHOR_FILE
        if anchor_path.exists():
            tensors, meta = load_tensors(anchor_path, {"weights": torch.float32})
            spec.check_matches(FieldSpec.from_meta(meta["field"], str(anchor_path)), str(anchor_path))
            anchor = tensors["weights"]
        else:
            anchor_image = images[split["train"][0]]
            anchor = fit_anchor(spec, anchor_image, cfg)
            save_tensors(anchor_path, {"weights": anchor}, {"field": spec.to_meta(), "image": split["train"][0]})

    train_rows = torch.tensor(split["train"], dtype=torch.long)
    moved, source, moves = augmented_images(images[train_rows], cfg.augment_shifts, cfg.seed)
    real = len(images)
    images = torch.cat([images, moved])
    labels = torch.cat([labels, labels[train_rows[source]]])

    chunk_dir = run_dir / CHUNK_DIR
    n = len(images)
    starts = list(range(0, n, cfg.chunk_size))
    bar = tqdm(starts, desc="fit", unit="chunk", disable=not progress)
    for start in bar:
        path = chunk_dir / f"chunk_{start:07d}.safetensors"
        if path.exists():
            continue
        stop = min(start + cfg.chunk_size, n)
        init = chunk_inits(spec, cfg, anchor, start, stop - start)
        weights = torch.cat([
            fit_batch(spec, i, x, cfg.steps, cfg.lr, cfg.init_l2)
            for i, x in zip(init.split(cfg.batch_size), images[start:stop].split(cfg.batch_size))
        ])
        save_tensors(path, {"weights": weights}, {"field": spec.to_meta()})
    weights = torch.cat(
        [load_tensors(chunk_dir / f"chunk_{s:07d}.safetensors", {"weights": torch.float32})[0]["weights"] for s in starts]
    )
    psnr = field.psnr(field.render(spec, weights, images.shape[-1]), images)  # the shifted fields: their own image
    inits = torch.cat([chunk_inits(spec, cfg, anchor, s, min(cfg.chunk_size, n - s)) for s in starts])
    meta = {
        "field": spec.to_meta(),
        "init": cfg.init,
        "dataset": split["dataset"],
        "flatten_order": "state-dict order: W1 (out x in, row-major), b1, W2, b2, ..., W_out, b_out",
        "psnr_mean": float(psnr[:real].mean()),  # the split's fields, as without augmentation
        "psnr_min": float(psnr[:real].min()),
        **init_stats(weights[:real], inits[:real]),
        "fit_seconds": time.time() - t0,
    }
    tensors = {"weights": weights, "psnr": psnr, "labels": labels}
    if anchor is not None:
        tensors["anchor"] = anchor[0]
    if len(moved):
        meta["augment"] = {"shifts_per_image": cfg.augment_shifts, "first_row": real, "rows": len(moved),
                           "psnr_mean": float(psnr[real:].mean())}
        tensors["augment_source"] = train_rows[source]  # the row of the field whose image was moved
        tensors["augment_shift"] = moves  # (dy, dx)
    save_tensors(run_dir / NEFS_FILE, tensors, meta)
    shutil.rmtree(chunk_dir)  # the chunks, and any temporary file a killed run left there
    return meta
