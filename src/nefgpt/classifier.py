"""A small MNIST classifier, trained by the project itself, for scoring generated digits.

Generated images are scored by how confidently and correctly a classifier
trained on the real training split recognises their intended class. The
network is deliberately small so that training on a few thousand images takes
about a minute on a laptop CPU, and it needs nothing beyond torch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .artifacts import load_tensors, save_tensors
from .config import EvalConfig
from .errors import ArtifactError, UsageError
from .layout import CLASSIFIER_FILE

IMAGE_SIZE = 28
_FORMAT = "nefgpt-mnist-classifier-v1"


class MnistCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (28 -> 14 -> 7 -> 3) and a linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.width = width
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        channels = [1, width, 2 * width, 4 * width]
        for c_in, c_out in zip(channels, channels[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # BatchNorm supplies the bias
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width * 3 * 3, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, 28, 28) in [0, 1]."""
        return self.head(self.features(images[:, None]).flatten(1))

    def arch(self) -> dict[str, int]:
        return {"width": self.width}


def _check_data(images: torch.Tensor, labels: torch.Tensor, name: str, num_classes: int | None) -> None:
    """Shapes and dtypes; the labels must also lie in 0..num_classes-1 when that is known."""
    if images.dim() != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not images.is_floating_point():
        expected = f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})"
        raise UsageError(f"{name} images must be a float tensor {expected}, got {tuple(images.shape)}")
    if labels.shape != (len(images),) or labels.dtype != torch.int64:
        raise UsageError(f"{name} labels must be int64 of shape ({len(images)},)")
    if len(images) == 0:
        raise UsageError(f"{name} set is empty")
    if num_classes is not None:
        _check_labels(labels, name, num_classes)


def _check_labels(labels: torch.Tensor, name: str, num_classes: int) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(f"{name} labels must lie in 0..{num_classes - 1}")


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px, rotations of up to 10 degrees and scaling by 0.9-1.1."""
    n = len(images)
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(10)
    scale = 1 + 0.1 * u[:, 1]
    # affine_grid works in [-1, 1] coordinates, where one pixel is 2 / 28.
    shift = u[:, 2:] * 2 * (2 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    return F.grid_sample(images[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = True,
) -> tuple[MnistCNN, dict[str, Any]]:
    """Train an MnistCNN with augmentation, AdamW and a one-cycle schedule.

    Images are float (N, 28, 28) in [0, 1], labels int64 in 0..num_classes-1;
    `num_classes` defaults to the number of distinct training labels. The
    defaults reach 98.8% held-out accuracy from 4500 MNIST images in under 20 s
    on 2 idle CPU cores. The same inputs and seed give the same model on the
    same machine and thread count. Returns the model in eval mode and
    {"val_accuracy", "val_cross_entropy", "epochs", "train_seconds"}.
    """
    _check_data(train_images, train_labels, "training", None)
    if num_classes is None:
        num_classes = len(train_labels.unique())
    _check_labels(train_labels, "training", num_classes)
    _check_data(val_images, val_labels, "validation", num_classes)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UsageError(f"need epochs >= 1, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    # Initialise from the seed without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MnistCNN(num_classes=num_classes)
    images, labels = train_images.float().cpu(), train_labels.cpu()
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    scores = score_images(model, val_images, val_labels)
    info = {
        "val_accuracy": scores["accuracy"],
        "val_cross_entropy": scores["cross_entropy"],
        "epochs": epochs,
        "train_seconds": time.perf_counter() - start,
    }
    return model, info


@torch.no_grad()
def score_images(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model`` on labelled images, overall and per class.

    Returns {"accuracy", "cross_entropy", "per_class": {"0": {"accuracy",
    "cross_entropy", "n"}, ...}, "confusion"}, where confusion[true][predicted]
    counts images. A class with no images has None for its accuracy and
    cross-entropy. The model is run in eval mode and left in the mode it had.
    """
    _check_data(images, labels, "scored", getattr(model, "num_classes", None))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        losses, predictions = [], []
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size].to(device, torch.float32)).float().cpu()
            losses.append(F.cross_entropy(logits, labels[start : start + batch_size].cpu(), reduction="none"))
            predictions.append(logits.argmax(dim=1))
    finally:
        model.train(was_training)
    loss, pred, labels = torch.cat(losses).double(), torch.cat(predictions), labels.cpu()
    num_classes = logits.shape[1]
    correct = (pred == labels).double()
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        per_class[str(c)] = {
            "accuracy": correct[mask].mean().item() if n else None,
            "cross_entropy": loss[mask].mean().item() if n else None,
            "n": n,
        }
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    confusion.index_add_(0, labels * num_classes + pred, torch.ones_like(labels))
    return {
        "accuracy": correct.mean().item(),
        "cross_entropy": loss.mean().item(),
        "per_class": per_class,
        "confusion": confusion.view(num_classes, num_classes).tolist(),
    }


def save_classifier(model: MnistCNN, path: str | Path, info: dict[str, Any]) -> None:
    """Write the weights, the architecture and ``info`` (JSON-serialisable) as one safetensors file."""
    save_tensors(path, model.state_dict(), metadata={"format": _FORMAT, "arch": model.arch(), "info": info})


def load_classifier(path: str | Path) -> tuple[MnistCNN, dict[str, Any]]:
    """Rebuild a classifier saved by save_classifier: (model in eval mode, info)."""
    tensors, meta = load_tensors(path)
    arch = meta.get("arch")
    if meta.get("format") != _FORMAT or not isinstance(arch, dict):
        raise ArtifactError(f"{path}: not a classifier file (format {meta.get('format')!r}, expected {_FORMAT!r})")
    try:
        # The class count is the head's: files carry no separate record of it.
        model = MnistCNN(width=int(arch["width"]), num_classes=int(tensors["head.weight"].shape[0]))
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise ArtifactError(f"{path}: classifier weights don't match their architecture ({reason})") from None
    return model.eval(), meta.get("info", {})


def get_classifier(run_dir: Path, cfg: EvalConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
                   val_images: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                   progress: bool) -> tuple[MnistCNN, dict[str, Any]]:
    """The run's classifier: loaded when the run has one, else trained on these images and saved.

    `evaluate` and `tune` both score with it, so they must pass the same arguments.
    """
    path = run_dir / CLASSIFIER_FILE
    if path.exists():
        return load_classifier(path)
    model, info = train_classifier(train_images, train_labels, val_images, val_labels, epochs=cfg.classifier_epochs,
                                   batch_size=cfg.classifier_batch_size, lr=cfg.classifier_lr, seed=cfg.seed,
                                   num_classes=num_classes, progress=progress)
    save_classifier(model, path, info)
    return model, info
