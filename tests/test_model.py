"""The GPT: configuration, output head, causality and the key/value cache."""

from __future__ import annotations

import pytest
import torch

from nefgpt.model import GPT, GPTConfig, KVCache


def tiny(**kw) -> GPT:
    base = dict(block_size=24, vocab_size=20, num_codes=15, n_layer=2, n_head=3, n_embd=24, head_dim=0)
    base.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).eval()
    # Bigger-than-init weights so that attention is far from uniform and a cache bug would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def tokens(b: int, t: int, vocab: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_head_dim_is_independent_of_width():
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=12, n_embd=64, head_dim=16)
    model = GPT(cfg)
    attn = model.blocks[0].attn
    assert attn.c_attn.weight.shape == (3 * 12 * 16, 64)
    assert attn.c_proj.weight.shape == (64, 12 * 16)
    logits = model(tokens(2, 10, vocab=256))
    assert logits.shape == (2, 10, cfg.num_codes)
    assert torch.isfinite(logits).all()


def test_default_head_dim_and_invalid_widths():
    assert GPTConfig(n_embd=128, n_head=4).head_dim == 32
    assert GPTConfig(n_embd=64, n_head=12, head_dim=16).head_dim == 16
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=64, n_head=12)
    with pytest.raises(ValueError):
        GPTConfig(n_embd=64, n_head=12, head_dim=0)


def test_config_round_trips_through_a_dict():
    cfg = GPTConfig(block_size=30, vocab_size=40, num_codes=29, n_layer=1, n_head=2, n_embd=8, head_dim=5)
    assert GPTConfig(**cfg.to_dict()) == cfg


def test_output_scores_only_codes():
    model = tiny()
    logits = model(tokens(3, 7))
    assert logits.shape == (3, 7, 15)  # num_codes, not vocab_size
    # The head is tied to the first num_codes rows of the token embedding.
    x = model.ln_f(torch.randn(1, 1, 24))
    torch.testing.assert_close(torch.nn.functional.linear(x, model.wte.weight[:15]),
                               torch.nn.functional.linear(x, model.wte.weight)[..., :15])


def test_causality():
    model = tiny()
    seq = tokens(2, 20)
    with torch.no_grad():
        base = model(seq)
        for j in (0, 5, 19):
            changed = seq.clone()
            changed[:, j] = (changed[:, j] + 7) % 20
            out = model(changed)
            torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
            assert (out[:, j] - base[:, j]).abs().max() > 1e-3  # the changed position itself does change


def test_kv_cache_incremental_equals_full_recompute():
    model = tiny()
    seq = tokens(3, 24)
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.config, 3, torch.device("cpu"), torch.float32)
        steps = [model(seq[:, :2], cache, 0)]
        for i in range(2, 24):
            steps.append(model(seq[:, i : i + 1], cache, i))
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_decoupled_head_dim():
    model = tiny(n_head=5, n_embd=16, head_dim=6)
    seq = tokens(2, 12)
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
        out = [model(seq[:, :1], cache, 0)] + [model(seq[:, i : i + 1], cache, i) for i in range(1, 12)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sequence_and_cache_limits():
    model = tiny()
    with pytest.raises(ValueError, match="block size"):
        model(tokens(1, 25))
    cache = KVCache(model.config, 1, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model(tokens(1, 3), cache, 0)
        with pytest.raises(ValueError):
            model(tokens(1, 2), cache, 3)  # multi-token blocks only at position 0
        with pytest.raises(ValueError, match="block size"):
            model(tokens(1, 1), cache, 24)


def test_optimizer_decays_matrices_only():
    model = tiny()
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert model.flops_per_token() > 6 * (model.num_params() - model.wpe.weight.numel())
