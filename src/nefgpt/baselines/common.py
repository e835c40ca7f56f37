"""What the baselines share: their training fields, checkpoint checks, class choice, sample writing.

The baselines fitted in one pass (gaussian, marginals, copy_noise) also share
their whole skeleton: `train_in_one_pass` loads the training fields, saves what
the baseline fitted as ckpt.pt and train.json; `sample_per_class` loads the
checkpoint and writes what the baseline drew for each class. Each baseline keeps
only its statistics and its draw.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..artifacts import load_checkpoint, save_checkpoint, save_json
from ..config import RunConfig
from ..errors import ArtifactError, UsageError
from ..field import FieldSpec
from ..fields_io import load_nefs, spec_from_config, training_rows
from ..layout import CKPT_FILE, NEFS_FILE, SPLIT_FILE, SUMMARY_FILE
from ..samples_io import save_samples
from ..split import load_split


@dataclass
class Fields:
    """Fields of one split part (rows of nefs.safetensors), with what a baseline needs around them."""

    weights: torch.Tensor  # (N, P) float32
    labels: torch.Tensor  # (N,) int64
    spec: FieldSpec
    num_classes: int
    nefs_id: str  # fingerprint of the training fields: a checkpoint must match the fields it is used with
    anchor: torch.Tensor | None
    rows: torch.Tensor  # (N,) rows of nefs.safetensors


def load_fields(cfg: RunConfig, run_dir: Path, part: str = "train") -> Fields:
    """The fields of split part `part` ("train", "tune" or "heldout"); "train" includes fit's shifted copies."""
    nefs, meta = load_nefs(run_dir, spec_from_config(cfg.fit))
    split = load_split(run_dir)
    rows = split.get(part)
    if part == "train" and rows is not None:
        rows = training_rows(split, meta).tolist()
    if rows is None:
        raise ArtifactError(f"{run_dir / SPLIT_FILE}: has no '{part}' part (made by an older version; "
                            f"rerun `nefgpt fit --force --out {run_dir}`)")
    n = nefs["weights"].shape[0]
    if any(not (isinstance(r, int) and 0 <= r < n) for r in rows):
        raise ArtifactError(f"{run_dir / SPLIT_FILE}: '{part}' rows must be integers in 0..{n - 1} "
                            f"(rows of {run_dir / NEFS_FILE})")
    idx = torch.tensor(rows, dtype=torch.long)
    train_idx = training_rows(split, meta)
    return Fields(weights=nefs["weights"][idx], labels=nefs["labels"][idx], spec=meta["spec"],
                  num_classes=int(split["num_classes"]), nefs_id=fingerprint(nefs["weights"][train_idx]),
                  anchor=nefs.get("anchor"), rows=idx)


def fingerprint(weights: torch.Tensor) -> str:
    return hashlib.sha256(weights.contiguous().numpy().tobytes()).hexdigest()[:16]


def load_baseline_checkpoint(run_dir: Path, kind: str, fields: Fields) -> dict:
    """ckpt.pt, checked to be a `kind` checkpoint made from these training fields."""
    path = run_dir / CKPT_FILE
    ckpt = load_checkpoint(path)
    found = ckpt["model_args"].get("kind", "gpt")
    if found != kind:
        raise ArtifactError(f"{path}: holds a {found} model, not {kind}; rerun `nefgpt train --force --out {run_dir}`")
    if ckpt.get("nefs_id") != fields.nefs_id:
        raise ArtifactError(f"{path}: trained on other fields than {run_dir / NEFS_FILE}; rerun `nefgpt train --force`")
    if ckpt["model_args"].get("num_params") != fields.spec.num_params:
        raise ArtifactError(f"{path}: model has {ckpt['model_args'].get('num_params')} weights per field, "
                            f"the fields have {fields.spec.num_params}")
    return ckpt


def sample_classes(labels: list[int] | None, fields: Fields) -> list[int]:
    """The classes to sample, each checked to be a class with training fields."""
    classes = list(range(fields.num_classes)) if labels is None else list(labels)
    present = set(fields.labels.tolist())
    for c in classes:
        if not 0 <= c < fields.num_classes:
            raise UsageError(f"label {c} is not a class of this run (0..{fields.num_classes - 1})")
        if c not in present:
            raise ArtifactError(f"class {c} has no training fields to learn from")
    return classes


def write_samples(cfg: RunConfig, run_dir: Path, fields: Fields, weights: torch.Tensor, labels: torch.Tensor,
                  meta: dict, extra: dict[str, torch.Tensor] | None = None) -> dict:
    if not torch.isfinite(weights).all():
        raise ArtifactError(f"{run_dir / CKPT_FILE}: the model generated NaN or Inf weights")
    save_samples(run_dir, fields.spec, weights, labels, meta, extra=extra, per_row=min(cfg.sample.n_per_class, 10))
    return {"n": len(labels), "model": meta["model"], "seconds_per_field": meta["seconds_per_field"]}


def check_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise UsageError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


@dataclass
class Fitted:
    """What a baseline fitted in one pass learned, for its checkpoint and train.json."""

    model: dict  # the checkpoint's "model"
    model_args: dict  # beyond kind, num_params and num_classes, which every baseline records
    summary: dict  # train.json, beyond model, num_train_fields and train_seconds
    checkpoint: dict = field(default_factory=dict)  # more checkpoint entries: settings, tokenizer id


def train_in_one_pass(cfg: RunConfig, run_dir: Path, kind: str, fit: Callable[[Fields], Fitted]) -> dict:
    """Fit `kind` on the training fields and save it; there is nothing to resume, so iter_num is 0."""
    t0 = time.time()
    fields = load_fields(cfg, run_dir, "train")
    fitted = fit(fields)
    model_args = {"kind": kind, "num_params": fields.spec.num_params, "num_classes": fields.num_classes,
                  **fitted.model_args}
    save_checkpoint(run_dir / CKPT_FILE, {"model": fitted.model, "model_args": model_args, "nefs_id": fields.nefs_id,
                                          **fitted.checkpoint, "iter_num": 0})
    summary = {"model": kind, **fitted.summary, "num_train_fields": len(fields.labels),
               "train_seconds": time.time() - t0}
    save_json(run_dir / SUMMARY_FILE, summary)
    return summary


def load_trained(cfg: RunConfig, run_dir: Path, kind: str) -> tuple[Fields, dict]:
    """The training fields and the `kind` checkpoint made from them."""
    fields = load_fields(cfg, run_dir, "train")
    return fields, load_baseline_checkpoint(run_dir, kind, fields)


# draw(classes, labels, generator) -> (weights (N, P), extra tensors for samples.safetensors), N = len(labels):
# labels holds each class of `classes` n_per_class times, in order.
Draw = Callable[[list[int], torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def sample_per_class(cfg: RunConfig, run_dir: Path, fields: Fields, kind: str, labels: list[int] | None, draw: Draw,
                     meta: dict | None = None, sampling: dict | None = None) -> dict:
    """Draw sample.n_per_class fields of each class (all, or `labels`) from one seeded generator and write them.

    `meta` and `sampling` add the baseline's own entries to the samples' metadata and its "sampling" record.
    """
    classes = sample_classes(labels, fields)
    n = cfg.sample.n_per_class
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n)
    gen = torch.Generator().manual_seed(cfg.sample.seed)
    t0 = time.perf_counter()
    weights, extra = draw(classes, all_labels, gen)
    meta = {"model": kind, **(meta or {}), "sampling": {"seed": cfg.sample.seed, "n_per_class": n, **(sampling or {})},
            "seconds_per_field": (time.perf_counter() - t0) / len(all_labels)}
    return write_samples(cfg, run_dir, fields, weights, all_labels, meta, extra=extra or None)
