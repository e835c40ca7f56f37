"""Stage `tokenize`: vocabulary layout, nearest-code assignment, codebook learning, artifacts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nefgpt import fit, tokenizer
from nefgpt.artifacts import load_tensors, save_tensors
from nefgpt.config import DataConfig, FitConfig, TokenizerConfig
from nefgpt.errors import ArtifactError
from nefgpt.field import FieldSpec
from nefgpt.tokenizer import Vocab, assign, learn_codebook


def test_vocab_layout_defaults():
    v = Vocab(245, 10)
    assert v.sos == 245
    assert [v.class_token(c) for c in range(10)] == list(range(246, 256))
    assert v.size == 256
    assert torch.equal(v.class_token(torch.tensor([0, 9])), torch.tensor([246, 255]))


def test_vocab_layout_other_sizes():
    v = Vocab(4, 3)
    assert (v.sos, v.class_token(0), v.class_token(2), v.size) == (4, 5, 7, 8)


def brute_force(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return (values[:, None] - codebook[None, :]).abs().argmin(dim=1)


def test_assign_equals_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(37, generator=g, dtype=torch.float64).sort().values
    values = torch.randn(5000, generator=g, dtype=torch.float64) * 1.5
    got = assign(values, codebook)
    assert got.dtype == torch.int64
    assert torch.equal(got, brute_force(values, codebook))
    # Values beyond either end go to the end codes; the codes themselves map to themselves.
    assert assign(torch.tensor([-1e9, 1e9], dtype=torch.float64), codebook).tolist() == [0, 36]
    assert torch.equal(assign(codebook, codebook), torch.arange(37))


@settings(max_examples=60, deadline=None)
@given(
    codes=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=20, unique=True),
    values=st.lists(st.floats(-200, 200, allow_nan=False, width=32), min_size=1, max_size=50),
)
def test_assign_picks_a_nearest_code(codes, values):
    codebook = torch.tensor(sorted(codes), dtype=torch.float32)
    v = torch.tensor(values, dtype=torch.float32)
    idx = assign(v, codebook)
    assert ((idx >= 0) & (idx < len(codebook))).all()
    got = (v - codebook[idx]).abs()
    best = (v[:, None] - codebook[None, :]).abs().min(dim=1).values
    # Equal up to the rounding of the midpoint between two codes.
    assert torch.allclose(got, best, rtol=0, atol=1e-4 * (1 + float(v.abs().max())))


def mixture(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n // 2, generator=g, dtype=torch.float64) * 0.3
    b = 0.8 + torch.rand(n // 4, generator=g, dtype=torch.float64) * 0.4
    c = -1.0 + torch.randn(n - n // 2 - n // 4, generator=g, dtype=torch.float64) * 0.05
    return torch.cat([a, b, c])


def test_learn_codebook_lowers_mse_and_matches_kmeans():
    from sklearn.cluster import KMeans

    values = mixture()
    codebook, stats = learn_codebook(values, TokenizerConfig(num_codes=16))
    assert codebook.shape == (16,) and codebook.dtype == torch.float32
    assert torch.all(codebook[1:] >= codebook[:-1])
    history = stats["mse_history"]
    assert stats["mse"] < history[0] * 0.9  # better than its initialization
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:]))  # Lloyd never gets worse
    mse = float(((values - codebook.double()[assign(values, codebook.double())]) ** 2).mean())
    assert mse == pytest.approx(stats["mse"], rel=1e-4)
    assert stats["codes_used_fraction"] == 1.0
    assert 0 < stats["code_entropy_bits"] <= 4

    km = KMeans(n_clusters=16, n_init=1, random_state=0).fit(values.numpy()[:, None])
    assert mse <= 1.05 * km.inertia_ / len(values)


def test_random_init_lowers_mse_too():
    values = mixture()
    codebook, stats = learn_codebook(values, TokenizerConfig(num_codes=16, init="random"))
    assert stats["mse"] < 0.5 * stats["mse_history"][0]
    assert len(torch.unique(codebook)) == 16


def test_learn_codebook_is_deterministic():
    values = mixture(5000)
    a, sa = learn_codebook(values, TokenizerConfig(num_codes=8, init="random", seed=3))
    b, sb = learn_codebook(values, TokenizerConfig(num_codes=8, init="random", seed=3))
    assert torch.equal(a, b) and sa == sb


def outlier_data(n_outliers: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.zeros(10_000), torch.rand(1000, generator=g) * 2 - 1, torch.full((n_outliers,), 10.0)])


def test_dead_codes_are_reassigned():
    # 87% of the values are exactly 0, so the quantile init puts 7 of 8 codes at 0: 6 are dead.
    values = outlier_data(500)
    init = torch.quantile(values.double(), (torch.arange(8, dtype=torch.float64) + 0.5) / 8)
    assert int((init == 0).sum()) == 7
    codebook, stats = learn_codebook(values, TokenizerConfig(num_codes=8, dead_fraction=0.05))
    assert stats["reassigned_codes"] > 0
    assert stats["codes_used_fraction"] == 1.0
    assert len(torch.unique(codebook)) == 8
    assert float((codebook - 10).abs().min()) < 1e-3  # the far cluster has a code of its own
    assert float(codebook.abs().min()) < 1e-2  # and so has the spike at 0
    _, plain = learn_codebook(values, TokenizerConfig(num_codes=8, dead_fraction=0.0))
    assert plain["reassigned_codes"] == 0
    assert stats["mse"] < plain["mse"]


def test_a_small_far_cluster_keeps_its_code():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(10_000, generator=g), torch.full((50,), 10.0)])
    codebook, stats = learn_codebook(values, TokenizerConfig(num_codes=8))
    _, plain = learn_codebook(values, TokenizerConfig(num_codes=8, dead_fraction=0.0))
    assert float((codebook - 10).abs().min()) < 0.1
    assert stats["mse"] <= 1.05 * plain["mse"]


def test_tokenizer_id_is_a_stable_content_hash():
    codebook = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    expected = hashlib.sha256(np.array([-1.0, 0.0, 0.5, 2.0], dtype=np.float32).tobytes()).hexdigest()[:16]
    assert tokenizer.tokenizer_id(codebook) == expected
    assert tokenizer.tokenizer_id(codebook.double()) == expected  # hashed as float32
    assert tokenizer.tokenizer_id(codebook.clone()) == expected
    assert tokenizer.tokenizer_id(torch.tensor([-1.0, 0.0, 0.5, 2.5])) != expected


def test_save_load_round_trip(tmp_path):
    codebook = torch.linspace(-1, 1, 245)
    vocab, spec = Vocab(245, 10), FieldSpec(octaves=3, hidden=(8,))
    path = tmp_path / tokenizer.TOKENIZER_FILE
    tokenizer.save_tokenizer(path, codebook, vocab, spec)
    cb, v, s, tid = tokenizer.load_tokenizer(path)
    assert torch.equal(cb, codebook) and v == vocab and s == spec
    assert tid == tokenizer.tokenizer_id(codebook)
    _, meta = load_tensors(path)
    assert meta["vocab_size"] == 256 and meta["tokenizer_id"] == tid


def test_corrupt_or_invalid_tokenizer_raises_artifact_error(tmp_path):
    path = tmp_path / tokenizer.TOKENIZER_FILE
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        tokenizer.load_tokenizer(path)  # missing
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        tokenizer.load_tokenizer(path)
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        tokenizer.load_tokenizer(path)

    spec_meta = {"field": FieldSpec().to_meta()}
    save_tensors(path, {"codebook": torch.tensor([1.0, 0.0, 2.0])}, {"num_codes": 3, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="sorted"):
        tokenizer.load_tokenizer(path)
    save_tensors(path, {"codebook": torch.tensor([0.0, 1.0])}, {"num_codes": 3, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError):
        tokenizer.load_tokenizer(path)  # wrong length
    save_tensors(path, {"codebook": torch.tensor([0.0, 1.0])}, spec_meta)
    with pytest.raises(ArtifactError, match="vocabulary"):
        tokenizer.load_tokenizer(path)  # no vocabulary metadata
    save_tensors(path, {"codebook": torch.tensor([0.0, float("nan")])}, {"num_codes": 2, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="NaN"):
        tokenizer.load_tokenizer(path)
    save_tensors(path, {"codebook": torch.tensor([0, 1], dtype=torch.int64)}, {"num_codes": 2, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="dtype"):
        tokenizer.load_tokenizer(path)


def test_run_tokenize_on_a_fitted_run(tiny_npz, tmp_path):
    run = tmp_path / "run"
    fit.run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1),
                FitConfig(steps=5, anchor_steps=10, init="random"), run, progress=False)
    report = tokenizer.run_tokenize(TokenizerConfig(num_codes=32, max_iters=20), run, num_classes=10)
    codebook, vocab, spec, tid = tokenizer.load_tokenizer(run / tokenizer.TOKENIZER_FILE)
    assert vocab == Vocab(32, 10) and spec == FieldSpec()
    assert report["tokenizer_id"] == tid and report["vocab_size"] == 43 and report["sos_token"] == 32
    assert report["class_tokens"] == [33, 42]
    assert report["psnr_quantized_mean"] <= report["psnr_fitted_mean"] + 1e-3

    raw, meta = load_tensors(run / tokenizer.TOKENS_FILE)
    assert raw["tokens"].dtype == torch.int16 and raw["tokens"].shape == (60, 561)
    tokens, labels = tokenizer.load_tokens(run, tid)
    nefs, _ = fit.load_nefs(run)
    assert torch.equal(tokens, assign(nefs["weights"], codebook))
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    assert torch.equal(labels, nefs["labels"])
    with pytest.raises(ArtifactError, match="tokens.safetensors"):
        tokenizer.load_tokens(run, "0" * 16)

    # The codebook is learned on the training fields only.
    split = json.loads((run / fit.SPLIT_FILE).read_text())
    train_weights = nefs["weights"][torch.tensor(split["train"])]
    expected, _ = learn_codebook(train_weights, TokenizerConfig(num_codes=32, max_iters=20))
    assert torch.equal(codebook, expected)
