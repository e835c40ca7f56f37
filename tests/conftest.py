"""Shared fixtures: one torch thread, and tiny synthetic datasets and run directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


# Modules whose results depend on floating-point details (kernels, batch shapes, reduction order). `.ci/run`
# runs them a second time with ATEN_CPU_CAPABILITY=default and fp32, as an older CPU would compute them.
NUMERICS_MODULES = {"test_model", "test_sample", "test_regression", "test_train", "test_metrics", "test_baselines",
                    "test_field", "test_tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread: on a small, busy machine oversubscribed torch threads are many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_digits(per_class: int = 6, num_classes: int = 10, res: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float images in [0, 1]: class c is a soft blob whose position depends on c, jittered per image."""
    rng = np.random.default_rng(seed)
    c = (np.arange(res) + 0.5) / res
    yy, xx = np.meshgrid(c, c, indexing="ij")
    images, labels = [], []
    for label in range(num_classes):
        angle = 2 * np.pi * label / num_classes
        for _ in range(per_class):
            cx = 0.5 + 0.25 * np.cos(angle) + rng.normal(0, 0.02)
            cy = 0.5 + 0.25 * np.sin(angle) + rng.normal(0, 0.02)
            width = 0.08 + 0.01 * label
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
            images.append(np.clip(blob + rng.uniform(0, 0.05, blob.shape), 0, 1))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels, dtype=np.int64)


def write_npz(path: Path, per_class: int = 6, seed: int = 0) -> Path:
    images, labels = synthetic_digits(per_class, seed=seed)
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="session")
def npz_writer():
    """`write_npz(path, per_class=6, seed=0)`, for fixtures of wider scope."""
    return write_npz


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """An npz dataset of 60 28x28 images, 6 per class."""
    return write_npz(tmp_path / "tiny.npz")


def assert_same_checkpoint(a: Path, b: Path, iter_num: int) -> None:
    """Two runs' checkpoints hold the same iteration, model, optimizer state and best loss, bit for bit."""
    ca, cb = (torch.load(path, weights_only=True) for path in (a, b))
    assert ca["iter_num"] == cb["iter_num"] == iter_num
    assert ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    assert ca["best_val_loss"] == cb["best_val_loss"]
    assert ("ema" in ca) == ("ema" in cb)
    if "ema" in ca:  # the weight average too (train.ema_decay)
        assert ca["ema"]["updates"] == cb["ema"]["updates"] == iter_num
        for k, v in ca["ema"]["shadow"].items():
            assert torch.equal(v, cb["ema"]["shadow"][k]), k
