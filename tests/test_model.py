"""The GPT: configuration, output head, causality and the key/value cache."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- Levers (class_embed, pos_bias, value_embed, struct_pos) -------------------------------------------------------

# tiny(): block 24 = 22 weights + SOS + class; vocab 20 = 15 codes + SOS (15) + 4 classes (16 .. 19).
FIELD = (2, 4, 2)  # a field of 2*4 + 4 + 4*2 + 2 = 22 weights
ALL_LEVERS = dict(class_embed=True, pos_bias="class", value_embed=True, struct_pos=True, field_sizes=FIELD)
EACH_LEVER = [dict(class_embed=True), dict(pos_bias="position"), dict(pos_bias="class"), dict(value_embed=True),
              dict(struct_pos=True, field_sizes=FIELD), ALL_LEVERS]
SOS = 15


def plain_and(seed: int = 0, **levers) -> tuple[GPT, GPT]:
    """A fresh plain model and a fresh model with `levers`, both built from the same seed (no perturbation)."""
    base = dict(block_size=24, vocab_size=20, num_codes=15, n_layer=2, n_head=3, n_embd=24)
    torch.manual_seed(seed)
    plain = GPT(GPTConfig(**base)).eval()
    torch.manual_seed(seed)
    return plain, GPT(GPTConfig(**base, **levers)).eval()


def with_classes(seq: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """seq with SOS first and token 1 set to class c's token (-1: the null class, SOS)."""
    seq = seq.clone()
    seq[:, 0] = SOS
    seq[:, 1] = torch.tensor([SOS if c < 0 else 16 + c for c in classes])
    return seq


def test_default_model_is_the_pre_levers_checkpoints_model():
    """Levers off: the same parameters and buffers, of the same shapes, as before, so old checkpoints load strictly."""
    old = json.loads((Path(__file__).parent / "data" / "pre_levers_checkpoint.json").read_text())
    cfg = GPTConfig(**old["model_args"])  # written before the levers: their keys are absent
    assert (cfg.class_embed, cfg.pos_bias, cfg.value_embed, cfg.struct_pos, cfg.field_sizes) == (False, "none", False,
                                                                                                 False, ())
    model = GPT(cfg)
    # In order, as before: the JSON keeps the checkpoint's key order.
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(old["state_dict"].items())
    model.load_state_dict({k: torch.zeros(shape) for k, shape in old["state_dict"].items()})  # strict
    assert len(model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), pos_bias_decay=0.5).param_groups) == 2


@pytest.mark.parametrize("levers", EACH_LEVER)
def test_a_fresh_model_with_levers_is_the_plain_model(levers):
    """Each lever adds only its own tables, at zero, drawing no random numbers: same weights, same logits."""
    plain, model = plain_and(**levers)
    ps, ms = plain.state_dict(), model.state_dict()
    assert set(ps) < set(ms)
    for k in ps:
        assert torch.equal(ps[k], ms[k]), k
    seq = with_classes(tokens(3, 24), [0, 3, -1])
    with torch.no_grad():
        torch.testing.assert_close(model(seq), plain(seq))
    assert GPTConfig(**model.config.to_dict()) == model.config


def test_pos_bias_starts_at_zero_and_matches_the_plain_model():
    for mode, shape in (("position", (24, 15)), ("class", (5, 24, 15))):  # 4 classes + the null class
        plain, model = plain_and(pos_bias=mode)
        assert model.pos_bias.shape == shape and not model.pos_bias.any()
        seq = with_classes(tokens(2, 24), [1, -1])
        with torch.no_grad():
            torch.testing.assert_close(model(seq), plain(seq))


@pytest.mark.parametrize("levers", [ALL_LEVERS, dict(ALL_LEVERS, pos_bias="position")])
def test_causality_with_every_lever(levers):
    model = tiny(**levers)
    seq = with_classes(tokens(2, 20, seed=1), [2, -1])
    with torch.no_grad():
        base = model(seq)
        for j in (0, 1, 5, 19):
            changed = seq.clone()
            changed[:, j] = 16 if j == 1 else (changed[:, j] + 7) % 20  # at 1: another class (and the null one)
            out = model(changed)
            torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
            assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3


@pytest.mark.parametrize("levers", [ALL_LEVERS, dict(ALL_LEVERS, pos_bias="position")])
def test_kv_cache_equals_full_recompute_with_every_lever(levers):
    model = tiny(**levers)
    seq = with_classes(tokens(4, 24, seed=2), [0, 1, 3, -1])
    with torch.no_grad():
        full = model(seq)
        for first in (1, 2):  # SOS alone first (the class arrives in the next step), or SOS and class together
            cache = KVCache(model.config, 4, torch.device("cpu"), torch.float32)
            steps = [model(seq[:, :first], cache, 0)] + [model(seq[:, i : i + 1], cache, i) for i in range(first, 24)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
            assert cache.cls.tolist() == [0, 1, 3, 4]  # 4 = the null row
    # Without a cache the model cannot know the class after position 1.
    with pytest.raises(ValueError, match="token 1"):
        model(seq[:, 5:6], None, 5)


def test_class_embedding_conditions_every_position():
    """With attention cut, positions see only themselves: the class embedding alone carries the class to each."""
    for levers, reaches in ((dict(class_embed=True), range(1, 24)), (dict(), range(1, 2))):
        model = tiny(**levers)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.c_proj.weight.zero_()
                block.attn.c_proj.bias.zero_()
            seq = with_classes(tokens(1, 24, seed=3).repeat(5, 1), [0, 1, 2, 3, -1])
            out = model(seq)
        torch.testing.assert_close(out[:, 0], out[:1, 0].expand(5, -1))  # position 0 precedes the class
        for p in range(1, 24):
            diff = (out[:, None, p] - out[None, :, p]).abs().amax(-1)  # (5, 5) between the five classes
            off_diagonal = diff[~torch.eye(5, dtype=torch.bool)]
            if p in reaches:
                assert off_diagonal.min() > 1e-3, p
            else:
                assert off_diagonal.max() < 1e-6, p


def test_position_classes_read_token_1():
    model = tiny(class_embed=True)
    seq = with_classes(tokens(3, 6), [2, -1, 0])
    cls = model.position_classes(seq, 0, None)
    assert cls.tolist() == [[4, 2, 2, 2, 2, 2], [4] * 6, [4, 0, 0, 0, 0, 0]]
    assert model.position_classes(seq[:, :1], 0, None).tolist() == [[4], [4], [4]]


@pytest.mark.parametrize("mode", ["position", "class"])
def test_pos_bias_adds_the_row_of_each_position(mode):
    model = tiny(pos_bias=mode)
    seq = with_classes(tokens(3, 24), [1, -1, 3])
    with torch.no_grad():
        biased = model(seq)
        table = model.pos_bias.clone()
        model.pos_bias.zero_()
        plain = model(seq)
    cls = torch.tensor([1, 4, 3])
    rows = table.expand(3, -1, -1) if mode == "position" else table[cls]
    rows = rows.clone()
    if mode == "class":
        rows[:, 0] = table[4, 0]  # position 0 comes before the class: the null row
    torch.testing.assert_close(biased - plain, rows)


def test_value_embedding_depends_on_the_code_value_only():
    model = tiny(value_embed=True)
    assert "code_values" in model.state_dict()
    with torch.no_grad():
        model.code_values.copy_(torch.tensor([-3.0, -1, -1, 0, 0.1, 0.2, 0.5, 1, 1.5, 2, 2, 3, 4, 8, 20]))
        emb = model.token_embeddings()
        extra = emb[:15] - model.wte.weight[:15]
        assert torch.equal(emb[15:], model.wte.weight[15:])  # SOS and class tokens have no value
        torch.testing.assert_close(extra[1], extra[2])  # equal values, equal features
        assert (extra[0] - extra[1]).abs().max() > 1e-3
        # Standardized: shifting and scaling the codebook changes nothing.
        model.code_values.mul_(7.5).add_(-2.0)
        torch.testing.assert_close(model.token_embeddings(), emb, atol=1e-4, rtol=1e-4)  # sin of ~190 rad in fp32
        # The tied head scores with the same value-aware rows.
        seq = tokens(1, 1)
        logits = model(seq)
        h = model.ln_f(model.blocks[1](model.blocks[0](emb[seq] + model.wpe.weight[:1])))
        torch.testing.assert_close(logits, torch.nn.functional.linear(h, emb[:15]), atol=1e-4, rtol=1e-4)


def test_struct_indices_follow_the_field_flattening_order():
    from nefgpt.field import FieldSpec, unflatten
    from nefgpt.model import struct_indices

    spec = FieldSpec(octaves=4, hidden=(16, 16))
    sizes = (16, 16, 16, 1)
    idx = struct_indices(sizes)
    assert idx.shape == (4, spec.num_params + 2)
    layer, out, inp, kind = idx
    assert idx[:, 0].tolist() == [3, 16, 16, 2] and idx[:, 1].tolist() == [3, 16, 16, 3]  # SOS, class: specials
    b1_3 = 2 + 16 * 16 + 3  # b1[3] comes after W1 (16 x 16, row-major)
    assert (int(layer[b1_3]), int(out[b1_3]), int(kind[b1_3])) == (0, 3, 1)
    # Every weight position against field.unflatten of the position numbers themselves.
    where = unflatten(spec, torch.arange(spec.num_params)[None] + 2)
    for l, (w, b) in enumerate(where):
        for o in range(w.shape[1]):
            for i in range(w.shape[2]):
                assert idx[:, int(w[0, o, i])].tolist() == [l, o, i, 0]
            assert idx[:, int(b[0, o])].tolist() == [l, o, 16, 1]
    model = GPT(GPTConfig(block_size=spec.num_params + 2, n_layer=1, n_head=2, n_embd=16, struct_pos=True,
                          field_sizes=[16, 16, 16, 1]))  # a list (as from JSON) is kept as a tuple
    assert model.config.field_sizes == sizes and torch.equal(model.struct_idx, idx)
    assert "struct_idx" not in model.state_dict()  # derived from the config, not saved
    with pytest.raises(ValueError, match="field_sizes"):
        GPTConfig(block_size=30, struct_pos=True, field_sizes=(16, 16, 16, 1))
    with pytest.raises(ValueError, match="pos_bias"):
        GPTConfig(pos_bias="both")


def test_optimizer_gives_pos_bias_its_own_decay_and_flops_skip_lookups():
    model = tiny(**ALL_LEVERS)
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), pos_bias_decay=0.5)
    decay, no_decay, bias = opt.param_groups
    assert bias["params"] == [model.pos_bias] and bias["weight_decay"] == 0.5
    assert all(p is not model.pos_bias for p in decay["params"] + no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    # The tables are lookups (and the value map runs once per forward): no FLOPs per token to speak of.
    assert model.flops_per_token() == tiny().flops_per_token()
