"""Weight-space statistics of fitted fields, and the tokenizer figure."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nefgpt import field
from nefgpt.weight_stats import init_stats, save_position_std_figure, save_tokenizer_figure


def test_init_stats_measures_movement_and_per_position_spread():
    gen = torch.Generator().manual_seed(0)
    inits = torch.randn(50, 20, generator=gen)
    moved = inits + 0.1 * torch.randn(50, 20, generator=gen)
    s = init_stats(moved, inits)
    assert s["init_distance_mean"] == pytest.approx(float((moved - inits).norm(dim=1).mean()), rel=1e-6)
    assert s["position_std_mean"] == pytest.approx(float(moved.std(dim=0).mean()), rel=1e-6)
    # Fields that didn't move have distance 0; identical fields have no per-position spread.
    assert init_stats(inits, inits)["init_distance_mean"] == 0
    same = inits[:1].expand(10, -1)
    assert init_stats(same, same)["position_std_mean"] == 0


def test_shared_init_fields_vary_less_per_position_than_random_init_fields():
    # Fields near one anchor agree position by position; random-init fields don't, even with equal movement.
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(1, 30, generator=gen)
    shared = anchor + 0.05 * torch.randn(40, 30, generator=gen)
    random_inits = torch.randn(40, 30, generator=gen)
    random = random_inits + 0.05 * torch.randn(40, 30, generator=gen)
    s, r = init_stats(shared, anchor.expand(40, -1)), init_stats(random, random_inits)
    assert s["position_std_over_pooled_std"] < 0.2 < 0.8 < r["position_std_over_pooled_std"]


def test_figures_are_written(tmp_path):
    spec = field.FieldSpec()
    gen = torch.Generator().manual_seed(0)
    w = field.init_random(spec, 4, gen)
    codebook = torch.linspace(-1, 1, 16)
    quantized = codebook[(w[..., None] - codebook).abs().argmin(-1)]
    save_tokenizer_figure(tmp_path / "tok.png", w, codebook, spec, w, quantized, torch.rand(4, 28, 28))
    save_position_std_figure(tmp_path / "std.png", {"shared": w.std(0), "random": w.std(0) * 2})
    for name in ("tok.png", "std.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size[0] > 300 and img.size[1] > 100
