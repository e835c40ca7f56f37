import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nefgpt import data
from nefgpt.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    Dataset,
    decode_idx,
    load_dataset,
    stratified_split,
    subset_per_class,
)
from nefgpt.errors import DataError


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file holding `array` as unsigned bytes; `magic` overrides the header's magic number."""
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_pair(directory: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train", gz: bool = False) -> Path:
    """Write an MNIST-named IDX pair and return the images file's path."""
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    images_path = directory / f"{prefix}-images-idx3-ubyte{suffix}"
    images_path.write_bytes(pack(idx_bytes(images)))
    (directory / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(pack(idx_bytes(labels)))
    return images_path


def tiny_set(n: int = 20, size: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def assert_data_error(spec: str, named: Path | str, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(spec)
    message = str(info.value)
    assert str(named) in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist")


def test_mnist_is_the_bundled_5000_image_subset(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10
    assert mnist.images.shape == (5000, 28, 28) and mnist.images.dtype == torch.float32
    assert mnist.labels.dtype == torch.int64
    assert 0 <= mnist.images.min() and mnist.images.max() == 1
    assert torch.bincount(mnist.labels).tolist() == [500] * 10


@pytest.mark.parametrize("gz", [False, True])
def test_idx_file_round_trip(tmp_path, gz):
    images, labels = tiny_set()
    path = write_pair(tmp_path, images, labels, gz=gz)
    dataset = load_dataset(f"idx:{path}")
    assert dataset.name == f"idx:{path}"
    assert torch.equal(dataset.images, torch.from_numpy(images).float() / 255)
    assert torch.equal(dataset.labels, torch.from_numpy(labels).long())


def test_idx_gzip_is_detected_by_content_not_extension(tmp_path):
    images, labels = tiny_set()
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    assert torch.equal(load_dataset(f"idx:{path}").labels, torch.from_numpy(labels).long())


def test_idx_dotted_naming_variant(tmp_path):
    images, labels = tiny_set()
    (tmp_path / "t10k-images.idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels.idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    assert len(load_dataset(f"idx:{tmp_path / 't10k-images.idx3-ubyte'}").images) == 20


def test_idx_directory_concatenates_train_then_t10k(tmp_path):
    train, train_labels = tiny_set(20, seed=1)
    test, test_labels = tiny_set(10, seed=2)
    write_pair(tmp_path, train, train_labels, gz=True)
    write_pair(tmp_path, test, test_labels, prefix="t10k")
    dataset = load_dataset(f"idx:{tmp_path}")
    assert torch.equal(dataset.images, torch.from_numpy(np.concatenate([train, test])).float() / 255)
    assert torch.equal(dataset.labels, torch.from_numpy(np.concatenate([train_labels, test_labels])).long())


def test_npz_uint8_and_float_images(tmp_path):
    images, labels = tiny_set()
    np.savez(tmp_path / "u8.npz", images=images, labels=labels.astype(np.int32))
    np.savez_compressed(tmp_path / "f.npz", images=images / 255.0, labels=labels)
    from_u8, from_float = load_dataset(f"npz:{tmp_path / 'u8.npz'}"), load_dataset(f"npz:{tmp_path / 'f.npz'}")
    assert torch.equal(from_u8.images, torch.from_numpy(images).float() / 255)
    assert torch.allclose(from_float.images, from_u8.images)
    assert torch.equal(from_float.labels, from_u8.labels)


# --- errors: each names the file and stays on one line ---


def test_idx_missing_images_file(tmp_path):
    assert_data_error(f"idx:{tmp_path / 'train-images-idx3-ubyte'}", tmp_path / "train-images-idx3-ubyte", "no such")


def test_idx_missing_labels_file(tmp_path):
    path = write_pair(tmp_path, *tiny_set())
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    assert_data_error(f"idx:{path}", tmp_path / "train-labels-idx1-ubyte", "not found")


def test_idx_unrecognised_name(tmp_path):
    path = tmp_path / "digits.bin"
    path.write_bytes(idx_bytes(tiny_set()[0]))
    assert_data_error(f"idx:{path}", path, "labels file")


def test_idx_directory_without_idx_files(tmp_path):
    assert_data_error(f"idx:{tmp_path}", tmp_path, "no train-images")


def test_idx_wrong_magic(tmp_path):
    images, labels = tiny_set()
    path = write_pair(tmp_path, images, labels)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(labels, magic=0x00000901))
    assert_data_error(f"idx:{path}", labels_path, "magic number 0x00000901")
    path.write_bytes(idx_bytes(labels))  # a labels file where images belong
    assert_data_error(f"idx:{path}", path, "not an IDX images file")


def test_idx_truncated_body_header_and_trailing_data(tmp_path):
    images, labels = tiny_set()
    path = write_pair(tmp_path, images, labels)
    whole = idx_bytes(images)
    for broken, problem in [(whole[:-1], "truncated"), (whole[:10], "truncated"), (whole + b"\0", "trailing data")]:
        path.write_bytes(broken)
        assert_data_error(f"idx:{path}", path, problem)


def test_idx_corrupt_gzip(tmp_path):
    images, labels = tiny_set()
    path = write_pair(tmp_path, images, labels, gz=True)
    path.write_bytes(path.read_bytes()[:30])
    assert_data_error(f"idx:{path}", path, "corrupt gzip")


def test_idx_count_mismatch(tmp_path):
    images, labels = tiny_set()
    path = write_pair(tmp_path, images, labels[:-1])
    assert_data_error(f"idx:{path}", path, "20 images but .* has 19 labels")


def test_idx_directory_with_mismatched_image_sizes(tmp_path):
    write_pair(tmp_path, *tiny_set(size=4))
    write_pair(tmp_path, *tiny_set(size=5), prefix="t10k")
    assert_data_error(f"idx:{tmp_path}", tmp_path / "t10k-images-idx3-ubyte", "5x5")


def test_idx_label_out_of_range(tmp_path):
    images, labels = tiny_set()
    labels[7] = 10
    path = write_pair(tmp_path, images, labels)
    assert_data_error(f"idx:{path}", path, "label 10 at index 7 is outside 0..9")


def test_idx_empty_set(tmp_path):
    path = write_pair(tmp_path, np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.uint8))
    assert_data_error(f"idx:{path}", path, "no images")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((3, 4, 5), np.uint8), "labels": np.zeros(3, int)}, "square"),
        ({"images": np.zeros((3, 16), np.uint8), "labels": np.zeros(3, int)}, r"shape \(N, H, W\)"),
        ({"images": np.zeros((0, 4, 4), np.uint8), "labels": np.zeros(0, int)}, "no images"),
        ({"images": np.full((3, 4, 4), 1.5), "labels": np.zeros(3, int)}, r"\[0, 1\]"),
        ({"images": np.full((3, 4, 4), np.nan), "labels": np.zeros(3, int)}, "finite"),
        ({"images": np.zeros((3, 4, 4), np.int64), "labels": np.zeros(3, int)}, "dtype int64"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3)}, "labels have dtype float64"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, -1, 2])}, "label -1 at index 1"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, int)}, "3 images but 2 labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8)}, "missing array 'labels'"),
        ({"pixels": np.zeros((3, 4, 4), np.uint8)}, "missing array 'images' and 'labels'"),
        ({"images": np.array([None] * 3, dtype=object), "labels": np.zeros(3, int)}, "can't read array 'images'"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    assert_data_error(f"npz:{path}", path, match)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage bytes, not a zip", b"PK\x03\x04 truncated zip", b"\x93NUMPY plain .npy", b"\x80\x04pickle"],
)
def test_npz_unreadable(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    assert_data_error(f"npz:{path}", path, "npz archive")


def test_npz_missing_file(tmp_path):
    assert_data_error(f"npz:{tmp_path / 'none.npz'}", tmp_path / "none.npz", "not found")


@pytest.mark.parametrize("spec", ["cifar", "idx:", "npz", "MNIST", "csv:/tmp/x"])
def test_unknown_spec_lists_valid_forms(spec):
    assert_data_error(spec, repr(spec), "mnist, fashion-mnist, idx:PATH .* npz:PATH")


def test_fashion_mnist_missing_directory_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert_data_error("fashion-mnist", tmp_path / "absent", "apt-get install dataset-fashion-mnist")


@pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(),
    reason=f"{data.FASHION_MNIST_DIR} missing; `apt-get install dataset-fashion-mnist` to run this test",
)
def test_fashion_mnist_loads_train_and_test():
    dataset = load_dataset("fashion-mnist")
    assert dataset.images.shape == (70000, 28, 28)
    assert torch.bincount(dataset.labels).tolist() == [7000] * 10


# --- splitting ---


def test_stratified_split(mnist):
    train, heldout = stratified_split(mnist.labels, 50, seed=0)
    assert (len(train), len(heldout)) == (4500, 500)
    assert torch.bincount(mnist.labels[heldout]).tolist() == [50] * 10
    assert train.dtype == heldout.dtype == torch.int64
    assert torch.equal(train, train.sort().values) and torch.equal(heldout, heldout.sort().values)
    assert torch.equal(torch.cat([train, heldout]).sort().values, torch.arange(5000))
    again = stratified_split(mnist.labels, 50, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], heldout)
    assert not torch.equal(stratified_split(mnist.labels, 50, seed=1)[1], heldout)


def test_stratified_split_needs_enough_of_every_class():
    labels = torch.tensor([0] * 5 + [1] * 3)
    assert len(stratified_split(labels, 3, seed=0)[1]) == 6
    with pytest.raises(DataError, match="class 1 has 3 examples, fewer than the 4"):
        stratified_split(labels, 4, seed=0)


def test_subset_per_class_caps_each_class():
    labels = torch.tensor([0] * 8 + [1] * 2 + [2] * 5)
    picked = subset_per_class(labels, 4, seed=3)
    assert torch.bincount(labels[picked]).tolist() == [4, 2, 4]
    assert torch.equal(picked, picked.sort().values) and picked.dtype == torch.int64
    assert torch.equal(picked, subset_per_class(labels, 4, seed=3))


# --- the IDX parser on hostile input ---


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), gz=st.booleans(), images=st.booleans())
def test_idx_parser_only_raises_data_error_on_random_bytes(raw, gz, images):
    magic = IDX_IMAGES_MAGIC if images else IDX_LABELS_MAGIC
    try:
        array = decode_idx(gzip.compress(raw) if gz else raw, magic, Path("random"))
    except DataError as exc:
        assert str(exc).startswith("random: ")
    else:
        assert array.ndim == (3 if images else 1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    magic=st.sampled_from([IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, 0x0802, 0x0D03, 0]) | st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)) | st.tuples(st.integers(0, 2**32 - 1)),
    body_delta=st.integers(-3, 3),
    labels=st.binary(max_size=8),
    gz=st.booleans(),
)
def test_idx_loader_only_raises_data_error_on_random_headers(tmp_path, magic, shape, body_delta, labels, gz):
    # Files are overwritten on every example, so sharing tmp_path across examples is harmless.
    body = bytes(max(0, min(200, int(np.prod(shape))) + body_delta))
    content = struct.pack(f">I{len(shape)}I", magic, *shape) + body
    pack = gzip.compress if gz else bytes
    (tmp_path / "x-images-idx3-ubyte").write_bytes(pack(content))
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(pack(idx_bytes(np.frombuffer(labels, np.uint8) % 12)))
    try:
        dataset = load_dataset(f"idx:{tmp_path / 'x-images-idx3-ubyte'}")
    except DataError as exc:
        assert str(tmp_path) in str(exc)
    else:
        assert len(dataset.images) == len(labels)
