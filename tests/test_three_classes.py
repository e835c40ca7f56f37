"""A dataset with 3 classes, not MNIST's 10, goes through the whole pipeline (`nefgpt run`)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import nefgpt

from conftest import synthetic_digits
from nefgpt.artifacts import load_tensors
from nefgpt.cli import main
from nefgpt.errors import UsageError
from nefgpt.codebook import load_tokenizer

NUM_CLASSES = 3


def fast_settings(npz) -> list[str]:
    # The fastest end-to-end settings of tests/test_cli.py (toy_settings), with the budgets spelled out.
    sets = [
        f"data.dataset=npz:{npz}", "data.heldout_per_class=2", "data.tune_per_class=1",
        "fit.steps=10", "fit.anchor_steps=20",
        "tokenize.max_iters=10",
        "train.max_iters=6", "train.n_layer=1", "train.n_embd=32", "train.n_head=2", "train.batch_size=8",
        "train.warmup_iters=2", "train.eval_interval=3", "train.ckpt_interval=3", "train.max_minutes=0",
        "tune.temperatures=[1.0]", "tune.top_ks=[0, 3]", "tune.top_ps=[1.0]", "tune.min_ps=[0.0]",
        "tune.n_per_class=1", "tune.objective=nna_gap", "tune.max_minutes=0", "tune.samples_per_class=0",
        "sample.critic_fields=0",
        "sample.n_per_class=2",
        "evaluate.classifier_epochs=1",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_three_class_dataset_runs_end_to_end(tmp_path):
    # synthetic_digits draws classes 0..num_classes-1: labels 0, 1, 2 only.
    images, labels = synthetic_digits(per_class=6, num_classes=NUM_CLASSES)
    npz = tmp_path / "three.npz"
    np.savez(npz, images=images, labels=labels)
    run = tmp_path / "run"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in ["run", "--out", run, "--quiet", *fast_settings(npz)]])
    assert rc == 0, err.getvalue()

    vocab = load_tokenizer(run / "tokenizer.safetensors").vocab
    assert vocab.num_classes == NUM_CLASSES and vocab.size == vocab.num_codes + 1 + NUM_CLASSES  # codes, SOS, C(0..2)
    assert json.loads((run / "split.json").read_text())["num_classes"] == NUM_CLASSES

    tensors, _ = load_tensors(run / "samples.safetensors")
    sampled = tensors["labels"]
    assert sampled.min() >= 0 and sampled.max() < NUM_CLASSES
    assert sorted(set(sampled.tolist())) == list(range(NUM_CLASSES))

    # The Python API reads the same run: 3 classes, and a 4th is refused.
    gen = nefgpt.load(run)
    assert gen.num_classes == NUM_CLASSES
    assert gen.sample(labels=[2, 0], seed=0).labels.tolist() == [2, 0]
    with pytest.raises(UsageError, match=r"label 3 .*0\.\.2"):
        gen.sample(labels=[3])

    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics_path = run / "metrics.json"
    assert metrics_path.exists()
    metrics = json.loads(metrics_path.read_text())
    # Wherever the metrics break results down by class, they name exactly the 3 classes.
    per_class = list(_per_class_tables(metrics))
    assert per_class, "metrics.json records no per-class results"
    for where, table in per_class:
        assert len(table) == NUM_CLASSES, (where, table)


def _per_class_tables(node, where="metrics"):
    """(path, value) of every per-class entry (a key containing 'per_class') and of every confusion matrix."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if ("per_class" in key or key == "confusion") and isinstance(value, (dict, list)):
                yield path, value
            else:
                yield from _per_class_tables(value, path)


def test_class_count_reads_an_npz_set_and_knows_the_builtins(tmp_path):
    # Before `fit` has written split.json, the sampling-time estimate reads the class count from the data.
    from nefgpt import data

    images, labels = synthetic_digits(per_class=2, num_classes=NUM_CLASSES)
    npz = tmp_path / "three.npz"
    np.savez(npz, images=images, labels=labels)
    assert data.class_count(f"npz:{npz}") == NUM_CLASSES
    assert data.class_count("mnist") == data.class_count("fashion-mnist") == 10  # no data read for the built-ins
