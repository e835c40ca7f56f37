"""The shipped model: small, loadable offline, and its samples score near the recorded accuracy."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import torch

from nefgpt import field, pretrained
from nefgpt.artifacts import load_json
from nefgpt.classifier import load_classifier, score_images
from nefgpt.cli import main
from nefgpt.samples_io import load_generated_fields


def test_shipped_mnist_model_is_small_and_complete():
    root = pretrained.model_dir("mnist")
    files = {p.name: p.stat().st_size for p in root.iterdir()}
    for name in pretrained.REQUIRED_FILES + ("metrics.json", "classifier.safetensors"):
        assert name in files, name
    assert sum(files.values()) <= 10 * 2**20
    ckpt = torch.load(root / "ckpt.pt", weights_only=True)  # a plain dict: no pickled code
    assert "optimizer" not in ckpt and ckpt["iter_num"] > 0


def test_shipped_mnist_samples_are_classified_near_the_recorded_accuracy(tmp_path):
    out = tmp_path / "pre"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main(["sample", "--pretrained", "mnist", "-n", "5", "--out", str(out), "--quiet"])
    assert rc == 0, err.getvalue()
    samples, meta = load_generated_fields(out)
    images, labels = field.render(meta["spec"], samples["weights"], 28), samples["labels"]
    assert labels.tolist() == [c for c in range(10) for _ in range(5)]
    clf, _ = load_classifier(pretrained.model_dir("mnist") / "classifier.safetensors")
    accuracy = score_images(clf, images, labels)["accuracy"]
    recorded = load_json(pretrained.model_dir("mnist") / "metrics.json")["accuracy"]
    # 50 samples: a binomial standard error of about 4 points at the recorded rate; allow 3.5 of them.
    assert accuracy >= recorded - 0.15, (accuracy, recorded)
