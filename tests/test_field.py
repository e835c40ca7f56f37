"""The neural field: shapes, the flatten order, coordinates and rendering."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nefgpt import field
from nefgpt.errors import ArtifactError
from nefgpt.field import FieldSpec


def random_fields(spec: FieldSpec, n: int, seed: int = 0) -> torch.Tensor:
    return field.init_random(spec, n, torch.Generator().manual_seed(seed))


def test_default_spec_has_561_params():
    spec = FieldSpec()
    assert spec.octaves == 4 and spec.hidden == (16, 16)
    assert spec.in_features == 16
    assert spec.layer_shapes == [(16, 16), (16, 16), (1, 16)]
    assert spec.num_params == 561 == 16 * 16 + 16 + 16 * 16 + 16 + 16 + 1


def test_other_architectures_count_params():
    spec = FieldSpec(octaves=2, hidden=(8, 4, 3))
    assert spec.layer_shapes == [(8, 8), (4, 8), (3, 4), (1, 3)]
    assert spec.num_params == (8 * 8 + 8) + (4 * 8 + 4) + (3 * 4 + 3) + (3 + 1)
    with pytest.raises(ValueError):
        FieldSpec(octaves=0)
    with pytest.raises(ValueError):
        FieldSpec(hidden=())
    with pytest.raises(ValueError):
        FieldSpec(hidden=(16, 0))


def test_encode_features():
    coords = torch.tensor([[0.25, 0.75], [0.5, 0.125]])
    feats = field.encode(coords, octaves=3)
    assert feats.shape == (2, 12)
    # Octave k contributes sin(w x), sin(w y), cos(w x), cos(w y) with w = pi * 2^k.
    for k in range(3):
        w = math.pi * 2**k
        for p, (x, y) in enumerate(coords.tolist()):
            expected = [math.sin(w * x), math.sin(w * y), math.cos(w * x), math.cos(w * y)]
            assert feats[p, 4 * k : 4 * k + 4].tolist() == pytest.approx(expected, abs=1e-6)


def test_forward_and_render_shapes():
    spec = FieldSpec()
    weights = random_fields(spec, 3)
    assert weights.shape == (3, 561)
    feats = field.encode(field.pixel_coords(28), spec.octaves)
    assert feats.shape == (784, 16)
    logits = field.forward(spec, weights, feats)
    assert logits.shape == (3, 784)
    images = field.render(spec, weights, 28)
    assert images.shape == (3, 28, 28)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert field.render(spec, weights[:0], 28).shape == (0, 28, 28)
    with pytest.raises(ValueError):
        field.forward(spec, weights[:, :-1], feats)


def test_flatten_order_is_torch_state_dict_order():
    spec = FieldSpec()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    sd = mlp.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    flat = torch.cat([t.flatten() for t in sd.values()])
    assert flat.numel() == spec.num_params

    coords = torch.rand(50, 2, generator=torch.Generator().manual_seed(1))
    feats = field.encode(coords, spec.octaves)
    with torch.no_grad():
        expected = mlp(feats).squeeze(1)
    got = field.forward(spec, flat[None], feats)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    # unflatten hands back the very matrices of the module, row-major (out x in).
    layers = field.unflatten(spec, flat[None])
    for (w, b), lin in zip(layers, (mlp[0], mlp[2], mlp[4])):
        assert torch.equal(w[0], lin.weight.detach())
        assert torch.equal(b[0], lin.bias.detach())


def test_flatten_unflatten_round_trip():
    spec = FieldSpec(octaves=3, hidden=(5, 7))
    weights = torch.randn(4, spec.num_params, generator=torch.Generator().manual_seed(0))
    layers = field.unflatten(spec, weights)
    assert [tuple(w.shape) for w, _ in layers] == [(4, 5, 12), (4, 7, 5), (4, 1, 7)]
    assert [tuple(b.shape) for _, b in layers] == [(4, 5), (4, 7), (4, 1)]
    assert torch.equal(field.flatten(layers), weights)
    with pytest.raises(ValueError):
        field.unflatten(spec, weights[0])


def test_init_random_matches_linear_default_bounds():
    spec = FieldSpec()
    weights = random_fields(spec, 200)
    for (w, b), (_, fan_in) in zip(field.unflatten(spec, weights), spec.layer_shapes):
        bound = 1 / math.sqrt(fan_in)
        assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound
        assert float(w.abs().max()) > 0.9 * bound  # uniform over the whole range, not a narrower one
    assert torch.equal(weights, random_fields(spec, 200))
    assert not torch.equal(weights, random_fields(spec, 200, seed=1))


def test_pixel_coords_are_pixel_centres():
    res = 5
    coords = field.pixel_coords(res)
    assert coords.shape == (res * res, 2)
    centres = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    grid = coords.reshape(res, res, 2)
    for i in range(res):  # row i: y is constant, x runs along the columns
        assert torch.equal(grid[i, :, 0], centres)
        assert torch.equal(grid[i, :, 1], torch.full((res,), float(centres[i])))
    assert float(coords.min()) > 0 and float(coords.max()) < 1


def test_pixel_coords_nest_across_resolutions():
    # The 2x2 pixels of a 56-grid average exactly to the pixel centres of the 28-grid:
    # no half-pixel shift between resolutions.
    fine = field.pixel_coords(56).reshape(28, 2, 28, 2, 2)
    torch.testing.assert_close(fine.mean(dim=(1, 3)), field.pixel_coords(28).reshape(28, 28, 2), atol=1e-6, rtol=0)


def test_fit_and_render_use_the_same_grid(monkeypatch):
    from nefgpt import fit

    seen = []
    original = field.pixel_coords

    def spy(res, device="cpu"):
        out = original(res, device)
        seen.append(out)
        return out

    monkeypatch.setattr(field, "pixel_coords", spy)
    spec = FieldSpec()
    images = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0))
    weights = fit.fit_batch(spec, random_fields(spec, 2), images, steps=1, lr=1e-2)
    field.render(spec, weights, 28)
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0], original(28))


def test_render_28_matches_forward_at_pixel_centres():
    spec = FieldSpec()
    weights = random_fields(spec, 2, seed=3)
    images = field.render(spec, weights, 28)
    for r in range(28):
        for c in (0, 13, 27):
            xy = torch.tensor([[(c + 0.5) / 28, (r + 0.5) / 28]])
            value = torch.sigmoid(field.forward(spec, weights, field.encode(xy, spec.octaves)))[:, 0]
            torch.testing.assert_close(images[:, r, c], value, atol=1e-6, rtol=0)


def test_render_at_higher_resolution():
    spec = FieldSpec()
    weights = random_fields(spec, 3, seed=4)
    big = field.render(spec, weights, 64)
    assert big.shape == (3, 64, 64)
    assert float(big.min()) >= 0 and float(big.max()) <= 1
    expected = torch.sigmoid(field.forward(spec, weights, field.encode(field.pixel_coords(64), spec.octaves)))
    torch.testing.assert_close(big.reshape(3, -1), expected, atol=1e-6, rtol=0)
    # Chunking the batch doesn't change the result.
    torch.testing.assert_close(field.render(spec, weights, 64, batch_size=1), big, atol=1e-6, rtol=0)


def test_psnr():
    a = torch.zeros(2, 4, 4)
    b = torch.full((2, 4, 4), 0.1)
    torch.testing.assert_close(field.psnr(b, a), torch.full((2,), 20.0), atol=1e-4, rtol=0)
    assert torch.isfinite(field.psnr(a, a)).all()  # identical images: capped, not infinite


def test_field_spec_meta_round_trip():
    for spec in (FieldSpec(), FieldSpec(octaves=2, hidden=(8, 4, 3))):
        meta = spec.to_meta()
        assert meta["num_params"] == spec.num_params
        assert FieldSpec.from_meta(meta) == spec
    # Lists (as JSON gives them) and tuples compare equal after construction.
    assert FieldSpec(hidden=[16, 16]) == FieldSpec(hidden=(16, 16))


def test_field_spec_mismatch_and_bad_meta_raise_artifact_error():
    spec = FieldSpec()
    other = FieldSpec(octaves=3)
    spec.check_matches(FieldSpec(), "x.safetensors")  # no error
    with pytest.raises(ArtifactError, match="x.safetensors"):
        spec.check_matches(other, "x.safetensors")
    with pytest.raises(ArtifactError, match="y.safetensors"):
        FieldSpec.from_meta({"hidden": [16, 16]}, "y.safetensors")
    with pytest.raises(ArtifactError):
        FieldSpec.from_meta({"octaves": 4, "hidden": [16, 0]}, "y.safetensors")
    with pytest.raises(ArtifactError):
        FieldSpec.from_meta({"octaves": "many", "hidden": [16]}, "y.safetensors")
