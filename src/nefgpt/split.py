"""The run's split of the data: which images become fields, and which fields train, tune and are held out.

`fit` makes the split (split.json); every later stage reads it through here, so no
stage has to use another stage as a library.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import load_json, save_json
from .config import DataConfig
from .data import load_dataset, stratified_split, subset_per_class
from .errors import ArtifactError, DataError
from .layout import SPLIT_FILE


def make_split(cfg: DataConfig, run_dir: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Load the dataset, pick the subset and the stratified split, and save them.

    Returns the split and the images and labels of its fields, in field order.
    """
    ds = load_dataset(cfg.dataset)
    keep = (
        subset_per_class(ds.labels, cfg.subset_per_class, cfg.seed)
        if cfg.subset_per_class
        else torch.arange(len(ds.labels))
    )
    train_idx, heldout_idx = stratified_split(ds.labels[keep], cfg.heldout_per_class, cfg.seed)
    train_labels = ds.labels[keep][train_idx]
    fewest = int(train_labels.unique(return_counts=True)[1].min()) if len(train_labels) else 0
    if cfg.tune_per_class >= fewest:
        raise DataError(f"data.tune_per_class = {cfg.tune_per_class}: a class has only {fewest} examples left after "
                        f"holding out {cfg.heldout_per_class} per class, and training needs some")
    rest, tune = stratified_split(train_labels, cfg.tune_per_class, cfg.seed + 1)
    train_idx, tune_idx = train_idx[rest], train_idx[tune]
    split = {
        "dataset": ds.name,
        "image_size": int(ds.images.shape[-1]),
        "num_classes": ds.num_classes,
        "indices": keep.tolist(),  # positions in the dataset of the fields, in field order
        "train": train_idx.tolist(),  # positions in `indices` / rows of nefs.safetensors
        "heldout": heldout_idx.tolist(),
        "tune": tune_idx.tolist(),  # for `nefgpt tune`; neither trained on nor used in the reported scores
    }
    save_json(run_dir / SPLIT_FILE, split)
    return split, ds.images[keep], ds.labels[keep]


def load_split(run_dir: Path) -> dict:
    split = load_json(run_dir / SPLIT_FILE)
    for key in ("dataset", "indices", "train", "heldout", "num_classes"):
        if key not in split:
            raise ArtifactError(f"{run_dir / SPLIT_FILE}: missing '{key}'")
    return split


def load_split_images(run_dir: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The split and the images/labels of its fields, in field order."""
    split = load_split(run_dir)
    ds = load_dataset(split["dataset"])
    idx = torch.tensor(split["indices"], dtype=torch.long)
    return split, ds.images[idx], ds.labels[idx]


def first_per_class(labels: torch.Tensor, per_class: int | dict[int, int]) -> list[int]:
    """Indices of the first `per_class` items of each class (per_class[c] of class c, given a dict), class by class."""
    if isinstance(per_class, int):
        per_class = {c: per_class for c in sorted(set(labels.tolist()))}
    return [i for c, k in sorted(per_class.items()) for i in torch.nonzero(labels == c).flatten()[:k].tolist()]


def balanced_indices(labels: torch.Tensor, per_class: dict[int, int], seed: int) -> torch.Tensor:
    """A seeded draw of per_class[c] indices of each class c, sorted."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c, k in sorted(per_class.items()):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values
