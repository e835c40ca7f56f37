"""Fuzzing the loaders, the sampling filters and the metrics with hypothesis.

Every loader, fed anything at all, must either succeed or raise a NefgptError (which
the CLI prints as one line): never an IndexError, OverflowError, a safetensors or
zipfile exception, a crash or a hang. Bounded so this file runs in well under a minute;
``NEFGPT_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz.py`` runs the long fuzz
(docs/hardening.md records its counts).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from nefgpt import metrics, ssim
from nefgpt.artifacts import load_tensors
from nefgpt.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, decode_idx, load_dataset
from nefgpt.errors import NefgptError
from nefgpt.fields_io import load_nefs
from nefgpt.generate import filter_logits
from nefgpt.codebook import load_tokenizer

N = int(os.environ.get("NEFGPT_FUZZ_EXAMPLES", "0"))


def fuzz(default: int):
    return settings(max_examples=N or default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def only_nefgpt_errors(fn, *args):
    try:
        return fn(*args)
    except NefgptError:
        return None


# --- IDX ---


@fuzz(150)
@given(images=st.booleans(), dims=st.lists(st.integers(0, 5), min_size=0, max_size=4), cut=st.integers(-6, 6),
       ndim_byte=st.integers(0, 255), type_byte=st.sampled_from([0x08, 0x09, 0x0B, 0x0D, 0x0E, 0x00]),
       gz=st.booleans(), tail=st.binary(max_size=8))
def test_idx_structured_headers(images, dims, cut, ndim_byte, type_byte, gz, tail):
    """Headers with plausible magic bytes, any dims and body length: an array of the header's shape, or a DataError."""
    magic = IDX_IMAGES_MAGIC if images else IDX_LABELS_MAGIC
    header = bytes([0, 0, type_byte, ndim_byte]) + struct.pack(f">{len(dims)}I", *dims)
    size = math.prod(dims) if dims else 0
    body = bytes(max(0, size + cut)) + (tail if cut > 0 else b"")
    data = header + body
    result = only_nefgpt_errors(decode_idx, gzip.compress(data) if gz else data, magic, Path("f"))
    if result is not None:
        assert result.ndim == (magic & 0xFF) and result.dtype == np.uint8


# --- npz ---


@fuzz(150)
@given(raw=st.binary(max_size=300), zip_prefix=st.booleans())
def test_npz_random_bytes(scratch, raw, zip_prefix):
    path = scratch / "random.npz"
    path.write_bytes((b"PK\x03\x04" if zip_prefix else b"") + raw)
    only_nefgpt_errors(load_dataset, f"npz:{path}")


DTYPES = [np.uint8, np.int8, np.int16, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64, "U3", "S2", "datetime64[s]"]


@st.composite
def npz_archives(draw):
    keys = draw(st.lists(st.sampled_from(["images", "labels", "x", "images.npy"]), max_size=3, unique=True))
    arrays = {}
    for key in keys:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        if dtype.kind in "iub":
            values = draw(st.integers(-3, 12))
            arr = np.full(shape, values).astype(dtype) if dtype.kind != "b" else np.zeros(shape, dtype)
        elif dtype.kind in "fc":
            arr = np.full(shape, draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, math.nan, math.inf])), dtype)
        else:
            arr = np.zeros(shape, dtype)
        arrays[key] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = bytearray(buf.getvalue())
    flips = draw(st.lists(st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)), max_size=2))
    for pos, value in flips:
        if data:
            data[pos] = value
    return bytes(data)


@fuzz(150)
@given(content=npz_archives())
def test_npz_valid_archives_random_contents(scratch, content):
    path = scratch / "archive.npz"
    path.write_bytes(content)
    ds = only_nefgpt_errors(load_dataset, f"npz:{path}")
    if ds is not None:
        assert ds.images.ndim == 3 and len(ds.labels) == len(ds.images)


@fuzz(60)
@given(member=st.binary(max_size=200), name=st.sampled_from(["images.npy", "labels.npy", "x.npy"]))
def test_npz_members_that_are_random_bytes(scratch, member, name):
    path = scratch / "members.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, member)
        z.writestr("labels.npy" if name != "labels.npy" else "images.npy", b"\x93NUMPY" + member)
    only_nefgpt_errors(load_dataset, f"npz:{path}")


# --- safetensors ---


@fuzz(150)
@given(raw=st.binary(max_size=300), header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_safetensors_random_bytes(scratch, raw, header_len):
    path = scratch / "random.safetensors"
    path.write_bytes((struct.pack("<Q", header_len) if header_len is not None else b"") + raw)
    only_nefgpt_errors(load_tensors, path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=6)
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "F8_E4M3", "XX", 3]


@fuzz(150)
@given(entries=st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({
           "dtype": st.sampled_from(ST_DTYPES), "shape": st.lists(st.integers(-1, 5), max_size=3),
           "data_offsets": st.lists(st.integers(-1, 80), min_size=0, max_size=3)}), max_size=3),
       meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), json_values, max_size=2)),
       body=st.binary(max_size=80), pad=st.integers(0, 3))
def test_safetensors_random_headers(scratch, entries, meta, body, pad):
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    blob = json.dumps(header).encode() + b" " * pad
    path = scratch / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    only_nefgpt_errors(load_tensors, path)


TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
                torch.uint8, torch.bool]
field_meta = st.one_of(
    st.fixed_dictionaries({"octaves": st.one_of(st.integers(-2, 6), st.text(max_size=3), st.floats()),
                           "hidden": st.one_of(st.lists(st.integers(-1, 20), max_size=3), st.integers(),
                                               st.text(max_size=3))}),
    json_values,
)


@st.composite
def safetensors_files(draw):
    names = draw(st.lists(st.sampled_from(["weights", "psnr", "labels", "codebook", "anchor", "t\u00e9"]), max_size=4,
                          unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        shape = draw(st.sampled_from([(0,), (3,), (2, 561), (2, 217), (245,), (3, 3), (), (1, 0), (245, 1)]))
        fill = draw(st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf]))
        t = torch.full(shape, fill if dtype.is_floating_point else 1.0, dtype=torch.float64).to(dtype)
        if name == "codebook" and dtype == torch.float32 and len(shape) == 1 and draw(st.booleans()):
            t = torch.linspace(-1, 1, shape[0]) if draw(st.booleans()) else torch.linspace(1, -1, shape[0])
        tensors[name] = t
    meta = draw(st.dictionaries(st.sampled_from(["field", "num_codes", "num_classes", "tokenizer_id", "x"]),
                                st.one_of(field_meta, st.integers(-5, 300)), max_size=3))
    raw_meta = {k: json.dumps(v) if draw(st.integers(0, 9)) else "{not json" for k, v in meta.items()}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=raw_meta or None)


@fuzz(150)
@given(content=safetensors_files())
def test_stage_loaders_on_valid_safetensors_with_random_contents(scratch, content):
    run = scratch / "run"
    run.mkdir(exist_ok=True)
    (run / "nefs.safetensors").write_bytes(content)
    (run / "tokenizer.safetensors").write_bytes(content)
    only_nefgpt_errors(load_tensors, run / "nefs.safetensors")
    only_nefgpt_errors(load_nefs, run)
    only_nefgpt_errors(load_tokenizer, run / "tokenizer.safetensors")


# --- the sampling filters ---


finite_logits = st.integers(1, 8).flatmap(lambda v: st.lists(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
             min_size=v, max_size=v), min_size=1, max_size=3))


@fuzz(300)
@given(rows=finite_logits, temperature=st.sampled_from([0.0, 1e-30, 1e-6, 0.5, 1.0, 7.0, 1e30]) | st.floats(0, 100),
       top_k=st.integers(0, 8), top_p=st.floats(1e-9, 1.0) | st.just(1.0),
       min_p=st.just(0.0) | st.floats(0.0, 1.0, exclude_max=True) | st.sampled_from([1e-30, 0.5, 1 - 1e-9]))
def test_filter_logits_is_a_distribution(rows, temperature, top_k, top_p, min_p):
    logits = torch.tensor(rows, dtype=torch.float32)
    top_k = min(top_k, logits.shape[1])
    probs = filter_logits(logits, temperature, top_k, top_p, min_p)
    assert probs.shape == logits.shape
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    assert ((probs > 0).sum(dim=1) >= 1).all()
    if top_k:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        assert not ((probs > 0) & (logits < kth)).any()  # only the k largest (and ties of the k-th) survive
    # The most likely token always survives every filter.
    assert (probs.gather(1, logits.argmax(1, keepdim=True)) > 0).all()
    torch.multinomial(probs, 1)  # and torch can sample from it


# --- the metrics ---


@fuzz(100)
@given(data=st.data(), n_g=st.integers(1, 6), n_r=st.integers(1, 6))
def test_metric_ranges_and_permutation_invariance(data, n_g, n_r):
    values = st.floats(0, 1, allow_nan=False, width=32)

    def matrix(rows, cols, symmetric=False):
        m = torch.tensor(data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)
        if symmetric:
            m = (m + m.T) / 2
            m.fill_diagonal_(0)
        return m

    d_gg, d_rr, d_gr = matrix(n_g, n_g, True), matrix(n_r, n_r, True), matrix(n_g, n_r)
    m, c, n = metrics.mmd(d_gr), metrics.coverage(d_gr), metrics.one_nna(d_gg, d_rr, d_gr)
    assert 0 <= m <= 1 and 0 <= c <= 1 and 0 <= n <= 1
    assert c >= 1 / n_r - 1e-9  # every generated sample covers at least one reference
    pg = torch.tensor(data.draw(st.permutations(range(n_g))))
    pr = torch.tensor(data.draw(st.permutations(range(n_r))))
    assert metrics.mmd(d_gr[pg][:, pr]) == pytest.approx(m, abs=1e-6)
    assert metrics.one_nna(d_gg[pg][:, pg], d_rr[pr][:, pr], d_gr[pg][:, pr]) == pytest.approx(n, abs=1e-6)


@fuzz(15)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_ssim_distance_range_and_symmetry(seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 16, 16, generator=g)
    b = torch.rand(n + 1, 16, 16, generator=g)
    d = ssim.ssim_distance(a, b)
    assert d.shape == (n, n + 1) and torch.isfinite(d).all()
    assert (d >= -1e-6).all() and (d <= 1 + 1e-6).all()
    torch.testing.assert_close(ssim.ssim_distance(b, a), d.T, atol=1e-5, rtol=0)
