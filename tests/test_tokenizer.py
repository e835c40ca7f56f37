"""Stage `tokenize`: vocabulary layout, nearest-code assignment, codebook learning, artifacts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nefgpt import codebook as codebook_io
from nefgpt import fields_io, fit, layout, tokenizer
from nefgpt.artifacts import load_tensors, save_tensors
from nefgpt.config import DataConfig, FitConfig, TokenizerConfig
from nefgpt.errors import ArtifactError
from nefgpt.field import FieldSpec
from nefgpt.split import load_split_images
from nefgpt.codebook import Vocab, assign
from nefgpt.tokenizer import learn_codebook


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
    assert codebook_io.tokenizer_id(codebook) == expected
    assert codebook_io.tokenizer_id(codebook.double()) == expected  # hashed as float32
    assert codebook_io.tokenizer_id(codebook.clone()) == expected
    assert codebook_io.tokenizer_id(torch.tensor([-1.0, 0.0, 0.5, 2.5])) != expected


def test_save_load_round_trip(tmp_path):
    codebook = torch.linspace(-1, 1, 245)
    vocab, spec = Vocab(245, 10), FieldSpec(octaves=3, hidden=(8,))
    path = tmp_path / layout.TOKENIZER_FILE
    codebook_io.save_tokenizer(path, codebook, vocab, spec)
    tok = codebook_io.load_tokenizer(path)
    cb, v, s, tid = tok.codebook, tok.vocab, tok.spec, tok.id
    assert torch.equal(cb, codebook) and v == vocab and s == spec
    assert tid == codebook_io.tokenizer_id(codebook)
    assert tok.offsets == "none" and tok.reference is None and tok.scale is None
    _, meta = load_tensors(path)
    assert meta["vocab_size"] == 256 and meta["tokenizer_id"] == tid


def test_corrupt_or_invalid_tokenizer_raises_artifact_error(tmp_path):
    path = tmp_path / layout.TOKENIZER_FILE
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        codebook_io.load_tokenizer(path)  # missing
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        codebook_io.load_tokenizer(path)
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="tokenizer.safetensors"):
        codebook_io.load_tokenizer(path)

    spec_meta = {"field": FieldSpec().to_meta()}
    save_tensors(path, {"codebook": torch.tensor([1.0, 0.0, 2.0])}, {"num_codes": 3, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="sorted"):
        codebook_io.load_tokenizer(path)
    save_tensors(path, {"codebook": torch.tensor([0.0, 1.0])}, {"num_codes": 3, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError):
        codebook_io.load_tokenizer(path)  # wrong length
    save_tensors(path, {"codebook": torch.tensor([0.0, 1.0])}, spec_meta)
    with pytest.raises(ArtifactError, match="vocabulary"):
        codebook_io.load_tokenizer(path)  # no vocabulary metadata
    save_tensors(path, {"codebook": torch.tensor([0.0, float("nan")])}, {"num_codes": 2, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="NaN"):
        codebook_io.load_tokenizer(path)
    save_tensors(path, {"codebook": torch.tensor([0, 1], dtype=torch.int64)}, {"num_codes": 2, "num_classes": 10, **spec_meta})
    with pytest.raises(ArtifactError, match="dtype"):
        codebook_io.load_tokenizer(path)


def test_run_tokenize_on_a_fitted_run(tiny_npz, tmp_path):
    run = tmp_path / "run"
    fit.run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1),
                FitConfig(steps=5, anchor_steps=10, init="random"), run, progress=False)
    report = tokenizer.run_tokenize(TokenizerConfig(num_codes=32, max_iters=20), run)
    tok = codebook_io.load_tokenizer(run / layout.TOKENIZER_FILE)
    codebook, vocab, spec, tid = tok.codebook, tok.vocab, tok.spec, tok.id
    assert vocab == Vocab(32, 10) and spec == FieldSpec()
    assert tok.offsets == "none" and report["offsets"] == "none"
    assert report["tokenizer_id"] == tid and report["vocab_size"] == 43 and report["sos_token"] == 32
    assert report["class_tokens"] == [33, 42]
    assert report["psnr_quantized_mean"] <= report["psnr_fitted_mean"] + 1e-3

    raw, meta = load_tensors(run / layout.TOKENS_FILE)
    assert raw["tokens"].dtype == torch.int16 and raw["tokens"].shape == (60, 561)
    tokens, labels = codebook_io.load_tokens(run, tid)
    nefs, _ = fields_io.load_nefs(run)
    assert torch.equal(tokens, assign(nefs["weights"], codebook))
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    assert torch.equal(labels, nefs["labels"])
    with pytest.raises(ArtifactError, match="tokens.safetensors"):
        codebook_io.load_tokens(run, "0" * 16)

    # The codebook is learned on the training fields only.
    split = json.loads((run / layout.SPLIT_FILE).read_text())
    train_weights = nefs["weights"][torch.tensor(split["train"])]
    expected, _ = learn_codebook(train_weights, TokenizerConfig(num_codes=32, max_iters=20))
    assert torch.equal(codebook, expected)


# Offsets from the shared anchor (tokenize.offsets): none | raw | position | layer, and the principal components
# of the training fields (pca).

WEIGHT_MODES = tuple(m for m in codebook_io.OFFSET_MODES if m != "pca")  # modes whose positions are weights

def anchored_fields(n: int = 120, spec: FieldSpec = FieldSpec(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An anchor and n fields around it whose offsets have a different spread at every position."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(spec.num_params, generator=g)
    spread = torch.logspace(-3, -0.5, spec.num_params)[torch.randperm(spec.num_params, generator=g)]
    weights = anchor + torch.randn(n, spec.num_params, generator=g) * spread
    weights[:, 7] = anchor[7]  # a position no field moved: its std is 0 and the scale must be clamped
    return anchor, weights


def offset_tokenizer(mode: str, num_codes: int = 48) -> tuple[codebook_io.Tokenizer, torch.Tensor, torch.Tensor]:
    anchor, weights = anchored_fields()
    cfg = TokenizerConfig(num_codes=num_codes, max_iters=30, offsets=mode)
    tok, _ = tokenizer.learn_tokenizer(weights[:100], FieldSpec(), cfg, num_classes=10, anchor=anchor)
    return tok, anchor, weights


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_round_trip_error_is_at_most_half_a_code_gap_times_the_scale(mode):
    tok, _, weights = offset_tokenizer(mode)
    assert tok.offsets == mode
    recon = tok.decode(tok.encode(weights))
    assert recon.shape == weights.shape and recon.dtype == torch.float32
    values = tok.values(weights)
    cb = tok.codebook
    scale = torch.ones(weights.shape[1]) if tok.scale is None else tok.scale
    err = (recon - weights).abs()
    half_gap = float((cb[1:] - cb[:-1]).max()) / 2
    inside = (values >= cb[0]) & (values <= cb[-1])
    bound = half_gap * scale.expand_as(weights)
    assert bool((err[inside] <= bound[inside] * (1 + 1e-4) + 1e-6).all())
    # Beyond the end codes a value goes to the nearest end code.
    outside = ~inside
    beyond = torch.minimum((values - cb[0]).abs(), (values - cb[-1]).abs()) * scale
    assert torch.allclose(err[outside], beyond[outside], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", WEIGHT_MODES)  # pca: a rotation in float32, see the pca tests
def test_decode_inverts_encode_on_the_codebook_values(mode):
    tok, _, _ = offset_tokenizer(mode)
    k, p = tok.vocab.num_codes, tok.spec.num_params
    # Every code at every position.
    tokens = (torch.arange(k)[:, None] + torch.arange(p)[None, :]) % k
    decoded = tok.decode(tokens)
    assert torch.equal(tok.decode(tok.encode(decoded)), decoded)
    assert torch.equal(tok.decode(tokens.to(torch.int16)), decoded)  # as tokens are stored
    assert torch.equal(tok.encode(decoded), tokens)  # the learned codes are distinct, so even the tokens return


def test_pca_round_trip_error_is_the_whitened_quantization_error_rotated_back():
    tok, _, weights = offset_tokenizer("pca")
    values = tok.values(weights).double()
    quantized = tok.codebook[tok.encode(weights)].double()
    recon = tok.decode(tok.encode(weights)).double()
    cb = tok.codebook
    inside = (values >= cb[0]) & (values <= cb[-1])
    half_gap = float((cb[1:] - cb[:-1]).max()) / 2
    assert bool(((values - quantized).abs()[inside] <= half_gap * (1 + 1e-4) + 1e-6).all())
    # The basis is orthonormal, so the error in weight space has the norm of the scaled error in component space.
    expected = ((quantized - values) * tok.scale.double()).norm(dim=1)
    assert torch.allclose((recon - weights.double()).norm(dim=1), expected, rtol=1e-3, atol=1e-5)
    # Decoding any tokens and projecting back gives their code values, up to float32 rounding.
    tokens = (torch.arange(48)[:, None] + torch.arange(561)[None, :]) % 48
    assert torch.allclose(tok.values(tok.decode(tokens)), cb[tokens], atol=1e-2)


def test_pca_frame_whitens_and_orders_the_training_fields():
    tok, _, weights = offset_tokenizer("pca")
    train = weights[:100].double()
    assert torch.allclose(tok.reference.double(), train.mean(0), atol=1e-6)
    basis = tok.basis.double()
    assert torch.allclose(basis.T @ basis, torch.eye(561, dtype=torch.float64), atol=1e-4)
    assert bool((tok.scale[1:] <= tok.scale[:-1] * (1 + 1e-6)).all())  # largest variance first
    peak = basis.abs().argmax(0)
    assert bool((basis[peak, torch.arange(561)] > 0).all())  # the sign convention
    # 100 fields span at most 99 directions: those come out with unit variance and uncorrelated.
    z = tok.values(weights[:100]).double()[:, :99]
    cov = z.T @ z / 100
    assert torch.allclose(cov, torch.eye(99, dtype=torch.float64), atol=2e-3)
    # The remaining directions have no variance and are clamped to the scale floor.
    floor = tokenizer.SCALE_FLOOR * float((train - train.mean(0)).std(correction=0))
    assert torch.allclose(tok.scale[99:].double(), torch.full((462,), floor, dtype=torch.float64), rtol=1e-5)


def test_pca_needs_no_anchor_and_no_weight_positions():
    from nefgpt.config import apply_overrides, RunConfig
    from nefgpt.errors import UsageError

    _, weights = anchored_fields()
    tok, _ = tokenizer.learn_tokenizer(weights, FieldSpec(), TokenizerConfig(num_codes=48, max_iters=5, offsets="pca"),
                                       10, anchor=None)
    assert tok.offsets == "pca" and tok.basis.shape == (561, 561)
    assert apply_overrides(RunConfig(), ["fit.init=random", "tokenize.offsets=pca"]).tokenize.offsets == "pca"
    for lever in ("train.struct_pos=true", "train.first_layer_weight=3"):
        with pytest.raises(UsageError, match="tokenize.offsets = pca makes each position a principal component"):
            apply_overrides(RunConfig(), ["tokenize.offsets=pca", lever])


def test_none_mode_gives_todays_tokens_and_id():
    _, weights = anchored_fields()
    cfg = TokenizerConfig(num_codes=48, max_iters=30)
    assert cfg.offsets == "none"
    tok, stats = tokenizer.learn_tokenizer(weights[:100], FieldSpec(), cfg, num_classes=10, anchor=None)
    codebook, expected_stats = learn_codebook(weights[:100], cfg)  # today's tokenizer
    assert torch.equal(tok.codebook, codebook) and stats == expected_stats
    assert torch.equal(tok.encode(weights), assign(weights, codebook))
    tokens = tok.encode(weights)
    assert torch.equal(tok.decode(tokens), codebook[tokens])
    expected_id = hashlib.sha256(codebook.numpy().tobytes()).hexdigest()[:16]
    assert tok.id == codebook_io.tokenizer_id(codebook) == expected_id
    # An anchor makes no difference to a `none` tokenizer.
    with_anchor, _ = tokenizer.learn_tokenizer(weights[:100], FieldSpec(), cfg, 10, anchor=weights[0])
    assert with_anchor.reference is None and with_anchor.id == expected_id


def test_offset_references_and_scales():
    anchor, weights = anchored_fields()
    train = weights[:100]
    offsets = train.double() - anchor.double()
    raw, _, _ = offset_tokenizer("raw")
    assert torch.equal(raw.reference, anchor) and torch.equal(raw.scale, torch.ones(561))
    assert torch.equal(raw.values(weights), weights - anchor)

    pos, _, _ = offset_tokenizer("position")
    std = offsets.std(0, correction=0).float()
    floor = tokenizer.SCALE_FLOOR * float(offsets.std(correction=0))
    moved = std > floor
    assert torch.allclose(pos.scale[moved], std[moved], rtol=1e-5)
    assert pos.scale[7] == pytest.approx(floor, rel=1e-5)  # std 0 is clamped away from 0
    assert bool((pos.scale > 0).all())

    layer, _, _ = offset_tokenizer("layer")
    spec, start = FieldSpec(), 0
    sizes = [s for o, i in spec.layer_shapes for s in (o * i, o)]  # W1, b1, W2, b2, W3, b3
    assert len(sizes) == 6 and sum(sizes) == 561
    for size in sizes:
        part = layer.scale[start:start + size]
        assert torch.all(part == part[0])
        assert float(part[0]) == pytest.approx(float(offsets[:, start:start + size].std(correction=0)), rel=1e-5)
        start += size


def test_offsets_change_the_id_and_round_trip_through_the_file(tmp_path):
    toks = {mode: offset_tokenizer(mode)[0] for mode in codebook_io.OFFSET_MODES}
    assert len({t.id for t in toks.values()}) == len(codebook_io.OFFSET_MODES)
    for mode, tok in toks.items():
        path = tmp_path / f"{mode}.safetensors"
        codebook_io.save_tokenizer(path, tok)
        back = codebook_io.load_tokenizer(path)
        assert back.offsets == mode and back.id == tok.id and torch.equal(back.codebook, tok.codebook)
        for name in ("reference", "scale", "basis"):
            a, b = getattr(tok, name), getattr(back, name)
            assert (a is None and b is None) if a is None else torch.equal(a, b)
        tensors, meta = load_tensors(path)
        assert meta["offsets"] == mode and meta["tokenizer_id"] == tok.id
        expected = {"none": {"codebook"}, "pca": {"codebook", "reference", "scale", "basis"}}
        assert set(tensors) == expected.get(mode, {"codebook", "reference", "scale"})
    pca = toks["pca"]
    turned = codebook_io.Tokenizer(pca.codebook, pca.vocab, pca.spec, "pca", pca.reference, pca.scale, -pca.basis)
    assert turned.id != pca.id
    with pytest.raises(ValueError, match="only an offsets = pca tokenizer has a basis"):
        codebook_io.Tokenizer(pca.codebook, pca.vocab, pca.spec, "position", pca.reference, pca.scale, pca.basis)
    pos = toks["position"]
    moved = codebook_io.Tokenizer(pos.codebook, pos.vocab, pos.spec, "position", pos.reference + 1e-3, pos.scale)
    rescaled = codebook_io.Tokenizer(pos.codebook, pos.vocab, pos.spec, "position", pos.reference, pos.scale * 2)
    assert len({pos.id, moved.id, rescaled.id, toks["none"].id}) == 4


def test_old_tokenizer_files_load_as_none(tmp_path):
    path = tmp_path / layout.TOKENIZER_FILE
    codebook = torch.linspace(-1, 1, 245)
    # The metadata written before offsets existed.
    save_tensors(path, {"codebook": codebook}, {"num_codes": 245, "num_classes": 10, "vocab_size": 256,
                                                "field": FieldSpec().to_meta(),
                                                "tokenizer_id": codebook_io.tokenizer_id(codebook)})
    tok = codebook_io.load_tokenizer(path)
    assert tok.offsets == "none" and tok.reference is None and tok.id == codebook_io.tokenizer_id(codebook)
    tokens = torch.tensor([[0, 244, 3]])
    assert torch.equal(tok.decode(tokens), codebook[tokens])

    # The shipped model's tokenizer still matches the id its checkpoint was trained with.
    from importlib import resources
    shipped = resources.files("nefgpt") / "pretrained_models" / "mnist"
    tok = codebook_io.load_tokenizer(shipped / layout.TOKENIZER_FILE)
    ckpt = torch.load(shipped / "ckpt.pt", map_location="cpu", weights_only=True)
    assert tok.offsets == "none" and tok.id == ckpt["tokenizer_id"]


def test_inconsistent_offset_files_raise_artifact_error(tmp_path):
    path = tmp_path / layout.TOKENIZER_FILE
    codebook = torch.linspace(-1, 1, 4)
    base = {"num_codes": 4, "num_classes": 10, "field": FieldSpec().to_meta()}
    ref, scale = torch.zeros(561), torch.ones(561)
    cases = [
        ({"codebook": codebook}, {**base, "offsets": "position"}, "reference"),  # tensors missing
        ({"codebook": codebook, "reference": ref}, {**base, "offsets": "layer"}, "scale"),
        ({"codebook": codebook, "reference": ref, "scale": scale}, base, "offsets = none"),
        ({"codebook": codebook, "reference": ref, "scale": scale}, {**base, "offsets": "sideways"}, "offsets mode"),
        ({"codebook": codebook, "reference": ref, "scale": scale}, {**base, "offsets": 3}, "offsets mode"),
        ({"codebook": codebook, "reference": ref[:10], "scale": scale}, {**base, "offsets": "raw"}, "reference"),
        ({"codebook": codebook, "reference": ref, "scale": scale.double()}, {**base, "offsets": "raw"}, "scale"),
        ({"codebook": codebook, "reference": ref, "scale": scale * 0}, {**base, "offsets": "raw"}, "> 0"),
    ]
    for tensors, meta, word in cases:
        save_tensors(path, tensors, meta)
        with pytest.raises(ArtifactError, match="tokenizer.safetensors") as info:
            codebook_io.load_tokenizer(path)
        assert word in str(info.value), (word, str(info.value))


def test_offsets_need_a_shared_anchor(tiny_npz, tmp_path):
    from nefgpt.config import apply_overrides, RunConfig
    from nefgpt.errors import UsageError

    _, weights = anchored_fields()
    with pytest.raises(UsageError, match="fit.init = shared"):
        tokenizer.learn_tokenizer(weights, FieldSpec(), TokenizerConfig(offsets="raw"), 10, anchor=None)
    with pytest.raises(UsageError, match="tokenize.offsets = layer needs fit.init = shared"):
        apply_overrides(RunConfig(), ["fit.init=random", "tokenize.offsets=layer"])
    with pytest.raises(UsageError, match="tokenize.offsets"):
        apply_overrides(RunConfig(), ["tokenize.offsets=sideways"])
    assert apply_overrides(RunConfig(), ["tokenize.offsets=position"]).tokenize.offsets == "position"

    run = tmp_path / "run"
    fit.run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1),
                FitConfig(steps=2, init="random"), run, progress=False)
    with pytest.raises(UsageError, match="tokenize.offsets = position"):
        tokenizer.run_tokenize(TokenizerConfig(num_codes=16, max_iters=5, offsets="position"), run)


def test_run_tokenize_with_offsets_reports_weight_space_error(tiny_npz, tmp_path):
    run = tmp_path / "run"
    fit.run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1),
                FitConfig(steps=5, anchor_steps=10), run, progress=False)
    nefs, _ = fields_io.load_nefs(run)
    split = json.loads((run / layout.SPLIT_FILE).read_text())
    train, held = torch.tensor(split["train"]), torch.tensor(split["heldout"])
    reports = {}
    for mode in ("none", "layer"):
        report = tokenizer.run_tokenize(TokenizerConfig(num_codes=32, max_iters=20, offsets=mode), run)
        tok = codebook_io.load_tokenizer(run / layout.TOKENIZER_FILE)
        assert tok.offsets == report["offsets"] == mode and tok.id == report["tokenizer_id"]
        tokens, _ = codebook_io.load_tokens(run, tok.id)
        assert torch.equal(tokens, tok.encode(nefs["weights"]))
        decoded = tok.decode(tokens)
        sq = (decoded.double() - nefs["weights"].double()) ** 2
        assert report["weight_mse"] == pytest.approx(float(sq[train].mean()), rel=1e-6)
        assert report["weight_mse_heldout"] == pytest.approx(float(sq[held].mean()), rel=1e-6)
        # The quantized PSNR is that of the decoded weights.
        from nefgpt import field
        images = load_split_images(run)[1]
        psnr = field.psnr(field.render(tok.spec, decoded, 28), images)
        assert report["psnr_quantized_mean"] == pytest.approx(float(psnr.mean()), abs=1e-4)
        reports[mode] = report
    assert torch.equal(tok.reference, nefs["anchor"])
    assert "offset_scale" in reports["layer"] and "offset_scale" not in reports["none"]
    assert reports["none"]["weight_mse"] == pytest.approx(reports["none"]["mse"], rel=1e-4)  # same units there


def test_cli_fit_tokenize_train_sample_with_position_offsets(tiny_npz, tmp_path):
    from nefgpt.cli import main

    run = tmp_path / "run"
    sets = [f"data.dataset=npz:{tiny_npz}", "data.heldout_per_class=2", "data.tune_per_class=1",
            "fit.steps=10", "fit.anchor_steps=20", "tokenize.max_iters=10", "tokenize.offsets=position",
            "train.max_iters=4", "train.n_layer=1", "train.n_embd=32", "train.n_head=2", "train.batch_size=8",
            "train.warmup_iters=2", "train.eval_interval=2", "train.ckpt_interval=2", "sample.n_per_class=1",
            "sample.critic_fields=3"]  # the critic judges the weights the offsets decode to
    args = [a for s in sets for a in ("--set", s)]
    for stage in ("fit", "tokenize", "train", "sample"):
        assert main([stage, "--out", str(run), "--quiet", *args]) == 0, stage
    tok = codebook_io.load_tokenizer(run / layout.TOKENIZER_FILE)
    assert tok.offsets == "position"
    assert json.loads((run / layout.TOKENIZER_REPORT_FILE).read_text())["offsets"] == "position"
    samples, meta = load_tensors(run / "samples.safetensors")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert meta["tokenizer_id"] == ckpt["tokenizer_id"] == tok.id
    # Samples are decoded with the offsets: reference + scale * code, not the bare code.
    assert torch.equal(samples["weights"], tok.decode(samples["tokens"].long()))
    assert not torch.equal(samples["weights"], tok.codebook[samples["tokens"].long()])


# The order of the weights in the sequence (tokenize.order).

def test_output_first_puts_the_layers_in_reverse_and_keeps_each_layer_whole():
    spec = FieldSpec()
    assert torch.equal(codebook_io.sequence_order(spec, "input_first"), torch.arange(561))
    order = codebook_io.sequence_order(spec, "output_first")
    w3, w2, w1 = torch.arange(544, 561), torch.arange(272, 544), torch.arange(0, 272)  # each layer: weight, then bias
    assert torch.equal(order, torch.cat([w3, w2, w1]))
    with pytest.raises(ValueError, match="order must be one of"):
        codebook_io.sequence_order(spec, "sideways")


def test_output_first_tokens_are_the_flatten_order_tokens_rearranged():
    _, weights = anchored_fields()
    cfg = TokenizerConfig(num_codes=48, max_iters=30)
    flat, _ = tokenizer.learn_tokenizer(weights[:100], FieldSpec(), cfg, 10)
    cfg.order = "output_first"
    reordered, _ = tokenizer.learn_tokenizer(weights[:100], FieldSpec(), cfg, 10)
    assert torch.equal(flat.codebook, reordered.codebook) and flat.id != reordered.id
    tokens = reordered.encode(weights)
    assert torch.equal(tokens, flat.encode(weights)[:, codebook_io.sequence_order(FieldSpec(), "output_first")])
    assert torch.equal(tokens[:, -272:], flat.encode(weights)[:, :272])  # the first layer comes last
    assert torch.equal(reordered.decode(tokens), flat.decode(flat.encode(weights)))  # decode returns flatten order


def test_order_round_trips_through_the_file_and_old_files_are_input_first(tmp_path):
    _, weights = anchored_fields()
    tok, _ = tokenizer.learn_tokenizer(weights[:100], FieldSpec(),
                                       TokenizerConfig(num_codes=48, max_iters=5, order="output_first"), 10)
    path = tmp_path / "tok.safetensors"
    codebook_io.save_tokenizer(path, tok)
    back = codebook_io.load_tokenizer(path)
    assert back.order == "output_first" and back.id == tok.id
    _, meta = load_tensors(path)
    save_tensors(path, {"codebook": tok.codebook}, {k: v for k, v in meta.items() if k != "order"} |
                 {"tokenizer_id": codebook_io.tokenizer_id(tok.codebook)})
    assert codebook_io.load_tokenizer(path).order == "input_first"
    save_tensors(path, {"codebook": tok.codebook}, meta | {"order": "sideways"})
    with pytest.raises(ArtifactError, match="unknown order 'sideways'"):
        codebook_io.load_tokenizer(path)


def test_order_needs_weight_positions_and_leaves_older_runs_fresh():
    from nefgpt.config import apply_overrides, RunConfig
    from nefgpt.errors import UsageError
    from nefgpt.stages import stage_fingerprint

    assert apply_overrides(RunConfig(), ["tokenize.order=output_first"]).tokenize.order == "output_first"
    for bad in (["tokenize.offsets=pca"], ["train.struct_pos=true"], ["train.first_layer_weight=2"]):
        with pytest.raises(UsageError, match="tokenize.o"):
            apply_overrides(RunConfig(), ["tokenize.order=output_first", *bad])
    # The tokenize fingerprint that runs with the default settings recorded before tokenize.order existed.
    assert stage_fingerprint(RunConfig(), "tokenize") == "32a62a4366e707ed"
    assert stage_fingerprint(apply_overrides(RunConfig(), ["tokenize.order=output_first"]), "tokenize") != \
        "32a62a4366e707ed"


def test_tokenize_and_train_learn_from_fits_shifted_copies(tiny_npz, tmp_path):
    from nefgpt import train
    from nefgpt.config import TrainConfig
    from nefgpt.split import load_split

    run = tmp_path / "run"
    fit.run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1),
                FitConfig(steps=5, init="random", augment_shifts=2), run, progress=False)
    cfg = TokenizerConfig(num_codes=32, max_iters=20)
    report = tokenizer.run_tokenize(cfg, run)
    nefs, meta = fields_io.load_nefs(run)
    split = load_split(run)
    rows = fields_io.training_rows(split, meta)
    assert len(rows) == 3 * len(split["train"])
    # The codebook is learned on the training fields and their copies; every field, copies included, is tokenized.
    expected, _ = tokenizer.learn_tokenizer(nefs["weights"][rows], FieldSpec(), cfg, 10)
    tok = codebook_io.load_tokenizer(run / layout.TOKENIZER_FILE)
    assert torch.equal(tok.codebook, expected.codebook)
    raw, tokens_meta = load_tensors(run / layout.TOKENS_FILE)
    assert raw["tokens"].shape == (len(nefs["weights"]), 561) and tokens_meta["augment"] == meta["augment"]
    # The PSNRs are the split's fields', against their real images.
    assert report["psnr_fitted_mean"] == pytest.approx(float(nefs["psnr"][:60].mean()))

    summary = train.run_train(TrainConfig(n_layer=1, n_head=2, n_embd=16, batch_size=8, max_iters=2, warmup_iters=0,
                                          dtype="fp32", device="cpu"), run, progress=False)
    assert summary["train_fields"] == len(rows)
