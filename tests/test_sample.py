"""Stage `sample`: logit filtering, parameter checks and generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nefgpt import train
from nefgpt.artifacts import load_tensors
from nefgpt.config import RunConfig, SampleConfig, apply_overrides
from nefgpt.errors import UsageError
from nefgpt.model import GPT, GPTConfig
from nefgpt.validation import check_sampling
from nefgpt.generate import check_guidance, condition_tokens, draw_tokens, filter_logits, generate, generate_scored
from nefgpt.layout import SAMPLES_FILE
from nefgpt.sample import run_sample
from nefgpt.codebook import Vocab

FAST = settings(max_examples=80, deadline=None)
# Rows of logits without ties (at least 0.01 apart, so no temperature makes two of them equal in float32).
distinct_rows = st.lists(st.integers(-800, 800), min_size=2, max_size=30, unique=True).map(
    lambda xs: np.array(xs, dtype=np.float32) / 100
)


def distinct_logits(v: int, seed: int) -> torch.Tensor:
    """A row of v logits without ties."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(v, generator=g).float() + torch.rand(v, generator=g) * 0.5)[None]


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> np.ndarray:
    """The documented pipeline for one row, written out plainly: T, then top-k, then top-p, then min-p."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(len(z), dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        kept = order[mass_before < top_p]
        keep2 = np.zeros(len(z), dtype=bool)
        keep2[kept] = True
        p = np.where(keep2, p, 0.0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


@FAST
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(2, 30)), elements=st.floats(-8, 8, width=32)))
def test_temperature_zero_is_one_hot_argmax(logits):
    x = torch.from_numpy(logits)
    probs = filter_logits(x, 0.0, 0, 1.0)
    expected = torch.zeros_like(x)
    expected[torch.arange(len(x)), x.argmax(dim=1)] = 1
    assert torch.equal(probs, expected)
    # top-k and top-p don't matter when greedy.
    assert torch.equal(filter_logits(x, 0.0, 1, 0.3), expected)


@FAST
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(2, 30)), elements=st.floats(-8, 8, width=32)),
       st.floats(0.05, 5.0))
def test_temperature_scaling_is_softmax_of_scaled_logits(logits, temperature):
    x = torch.from_numpy(logits)
    probs = filter_logits(x, temperature, 0, 1.0)
    torch.testing.assert_close(probs, torch.softmax(x / temperature, dim=1), atol=1e-6, rtol=1e-5)


@FAST
@given(st.integers(2, 40), st.integers(0, 10_000), st.data())
def test_top_k_keeps_exactly_the_k_largest(v, seed, data):
    k = data.draw(st.integers(1, v))
    x = distinct_logits(v, seed)
    probs = filter_logits(x, 1.0, k, 1.0)[0]
    kept = probs > 0
    assert int(kept.sum()) == k
    assert set(torch.nonzero(kept).flatten().tolist()) == set(x[0].topk(k).indices.tolist())
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    # Renormalized softmax over the survivors.
    torch.testing.assert_close(probs[kept], torch.softmax(x[0][kept], dim=0), atol=1e-6, rtol=1e-5)


@FAST
@given(distinct_rows, st.floats(0.01, 0.999))
def test_top_p_keeps_the_smallest_prefix_reaching_p(row, p):
    x = torch.from_numpy(row)[None]
    full = torch.softmax(x[0].double(), dim=0)
    sorted_p = full.sort(descending=True).values
    cum = sorted_p.cumsum(0)
    assume(bool(((cum - p).abs() > 1e-4).all()))  # no boundary case decided by rounding
    probs = filter_logits(x, 1.0, 0, p)[0]
    kept = probs > 0
    n = int(kept.sum())
    assert n >= 1
    # The kept tokens are the n most likely ones, and n is the smallest count whose mass reaches p.
    assert set(torch.nonzero(kept).flatten().tolist()) == set(full.topk(n).indices.tolist())
    assert float(cum[n - 1]) >= p or n == len(row)
    if n > 1:
        assert float(cum[n - 2]) < p
    torch.testing.assert_close(probs.double(), torch.from_numpy(reference(row, 1.0, 0, p)), atol=1e-5, rtol=1e-4)


def test_top_p_always_keeps_at_least_one_token():
    x = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    probs = filter_logits(x, 1.0, 0, 1e-9)
    assert (probs > 0).sum(dim=1).tolist() == [1, 1]
    assert probs[0].tolist() == [1.0, 0.0, 0.0]


@FAST
@given(distinct_rows, st.floats(0.2, 3.0), st.floats(0.05, 0.999) | st.just(1.0), st.data())
def test_composition_matches_the_reference_pipeline(row, temperature, p, data):
    k = data.draw(st.integers(0, len(row)))
    ref = reference(row, temperature, k, p)
    # Skip boundary cases where float rounding decides whether a token survives top-p.
    z = row.astype(np.float64) / temperature
    keep = np.ones(len(z), bool) if not k else z >= np.sort(z)[::-1][k - 1]
    q = np.where(keep, np.exp(z - z.max()), 0)
    q = np.sort(q / q.sum())[::-1]
    assume(p == 1.0 or np.all(np.abs(np.cumsum(q) - p) > 1e-4))
    probs = filter_logits(torch.from_numpy(row)[None], temperature, k, p)[0]
    torch.testing.assert_close(probs.double(), torch.from_numpy(ref), atol=1e-5, rtol=1e-4)


def test_order_is_temperature_then_top_k_then_top_p():
    x = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    # top-k first: {0.5, 0.3} renormalized to {0.625, 0.375}; top-p 0.6 then keeps only the first.
    probs = filter_logits(x, 1.0, 2, 0.6)[0]
    assert probs.tolist() == pytest.approx([1.0, 0.0, 0.0])
    # (top-p first would keep {0.5, 0.3} and top-k 2 would keep both.)
    # Temperature before top-p: at T=4 the distribution is flatter and 0.6 needs two tokens.
    probs = filter_logits(x, 4.0, 0, 0.6)[0]
    assert int((probs > 0).sum()) == 2
    flat = torch.softmax(x[0] / 4.0, dim=0)
    assert float(flat[0]) < 0.6 < float(flat[:2].sum())
    # Temperature before top-k changes nothing about which tokens survive, only their weights.
    probs = filter_logits(x, 0.5, 2, 1.0)[0]
    expected = torch.softmax(x[0, :2] / 0.5, dim=0)
    torch.testing.assert_close(probs[:2], expected)
    assert float(probs[2]) == 0.0


def test_min_p_zero_changes_nothing():
    x = distinct_logits(30, 4).repeat(3, 1) * torch.tensor([[0.3], [1.0], [4.0]])
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.0, 0, 1.0), (0.5, 3, 0.5)]:
        assert torch.equal(filter_logits(x, t, k, p, 0.0), filter_logits(x, t, k, p)), (t, k, p)


def test_min_p_by_hand():
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # Threshold 0.25 x 0.5 = 0.125: the first three survive, renormalized by their mass 0.95.
    assert filter_logits(x, 1.0, 0, 1.0, 0.25)[0].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # Temperature first: at T = 2 the probabilities go as sqrt(p), ratios to the top 0.775, 0.548 and 0.316, so
    # min-p 0.5 keeps three tokens, where at T = 1 (ratios 0.6, 0.3, 0.1) it keeps two.
    assert int((filter_logits(x, 1.0, 0, 1.0, 0.5) > 0).sum()) == 2
    probs = filter_logits(x, 2.0, 0, 1.0, 0.5)[0]
    root = torch.tensor([0.5, 0.3, 0.15]).sqrt()
    torch.testing.assert_close(probs[:3], root / root.sum())
    assert float(probs[3]) == 0.0
    # After top-k and top-p: min-p compares with the top token's probability, which renormalizing doesn't change.
    assert int((filter_logits(x, 1.0, 2, 1.0, 0.55) > 0).sum()) == 2  # 0.3 / 0.5 = 0.6 >= 0.55
    assert filter_logits(x, 1.0, 2, 1.0, 0.65)[0].tolist() == pytest.approx([1.0, 0, 0, 0])
    assert int((filter_logits(x, 1.0, 0, 0.9, 0.2) > 0).sum()) == 3  # top-p keeps 3, min-p 0.1 threshold keeps 3
    assert int((filter_logits(x, 1.0, 0, 0.7, 0.2) > 0).sum()) == 2  # top-p keeps 2 before min-p sees them


@FAST
@given(distinct_rows, st.floats(0.2, 3.0), st.floats(0.001, 0.999), st.data())
def test_min_p_keeps_the_tokens_within_min_p_of_the_top(row, temperature, min_p, data):
    k = data.draw(st.integers(0, len(row)))
    z = row.astype(np.float64) / temperature
    ratio = np.exp(z - z.max())
    assume(bool(np.all(np.abs(ratio - min_p) > 1e-4)))  # no boundary case decided by rounding
    probs = filter_logits(torch.from_numpy(row)[None], temperature, k, 1.0, min_p)[0]
    kept = (probs > 0).numpy()
    assert kept[np.argmax(row)]  # the most likely token always survives
    in_top_k = np.ones(len(z), bool) if not k else z >= np.sort(z)[::-1][k - 1]
    assert np.array_equal(kept, (ratio >= min_p) & in_top_k)
    torch.testing.assert_close(probs.double(), torch.from_numpy(reference(row, temperature, k, 1.0, min_p)),
                               atol=1e-5, rtol=1e-4)


@FAST
@given(distinct_rows, st.floats(0.2, 3.0), st.floats(0.05, 0.999) | st.just(1.0), st.floats(0.0, 0.999), st.data())
def test_composition_with_min_p_matches_the_reference_pipeline(row, temperature, p, min_p, data):
    k = data.draw(st.integers(0, len(row)))
    z = row.astype(np.float64) / temperature
    keep = np.ones(len(z), bool) if not k else z >= np.sort(z)[::-1][k - 1]
    q = np.where(keep, np.exp(z - z.max()), 0)
    assume(bool(np.all(np.abs(q[keep] - min_p) > 1e-4)))  # ratios to the top token: away from the min-p boundary
    q = np.sort(q / q.sum())[::-1]
    assume(p == 1.0 or np.all(np.abs(np.cumsum(q) - p) > 1e-4))
    probs = filter_logits(torch.from_numpy(row)[None], temperature, k, p, min_p)[0]
    torch.testing.assert_close(probs.double(), torch.from_numpy(reference(row, temperature, k, p, min_p)),
                               atol=1e-5, rtol=1e-4)


def test_min_p_always_keeps_the_argmax():
    x = torch.tensor([[10.0, 9.99, 0.0], [1.0, 1.0, 1.0], [-3.0, 5.0, 4.0]])
    for t in (1e-30, 0.5, 1.0, 1e30):
        probs = filter_logits(x, t, 0, 1.0, 0.999)
        assert (probs.gather(1, x.argmax(1, keepdim=True)) > 0).all(), t
        torch.testing.assert_close(probs.sum(1), torch.ones(3))
    # Exact ties with the top token are all kept.
    assert (filter_logits(x, 1.0, 0, 1.0, 0.999)[1] > 0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_min_p_must_be_in_zero_one(bad):
    with pytest.raises(UsageError, match="min_p"):
        check_sampling(1.0, 0, 1.0, num_codes=245, min_p=bad)
    with pytest.raises(UsageError, match="sample.min_p"):
        apply_overrides(RunConfig(), [f"sample.min_p={bad}"])
    check_sampling(1.0, 0, 1.0, num_codes=245, min_p=0.0)
    check_sampling(1.0, 0, 1.0, num_codes=245, min_p=0.99)


def test_check_sampling_accepts_valid_values():
    for t, k, p in [(0.0, 0, 1.0), (1.0, 1, 0.5), (2.5, 245, 1e-3), (1, 10, 1)]:
        check_sampling(t, k, p, num_codes=245)


@pytest.mark.parametrize("t,k,p,word", [
    (-1.0, 0, 1.0, "temperature"),
    (-1e-9, 0, 1.0, "temperature"),
    (float("nan"), 0, 1.0, "temperature"),
    (float("inf"), 0, 1.0, "temperature"),
    (1.0, 0, 0.0, "top_p"),
    (1.0, 0, -0.5, "top_p"),
    (1.0, 0, 1.5, "top_p"),
    (1.0, 0, float("nan"), "top_p"),
    (1.0, -1, 1.0, "top_k"),
    (1.0, 246, 1.0, "top_k"),
    (1.0, 10_000, 1.0, "top_k"),
])
def test_check_sampling_rejects_invalid_values(t, k, p, word):
    with pytest.raises(UsageError, match=word):
        check_sampling(t, k, p, num_codes=245)


VOCAB = Vocab(num_codes=12, num_classes=3)
NUM_WEIGHTS = 20


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=NUM_WEIGHTS + 2, vocab_size=VOCAB.size, num_codes=VOCAB.num_codes,
                    n_layer=2, n_head=2, n_embd=16)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        # Make the special tokens the most attractive rows, were they scoreable at all.
        m.wte.weight[VOCAB.num_codes:] *= 10
    return m


def gen(model, labels, seed, use_cache=True, temperature=1.0, top_k=0, top_p=1.0, guidance=1.0, **kw):
    return generate(model, torch.tensor(labels), VOCAB, NUM_WEIGHTS, temperature, top_k, top_p,
                    torch.Generator().manual_seed(seed), use_cache=use_cache, guidance=guidance, **kw)


def test_generate_with_and_without_cache_agree(model):
    labels = [0, 1, 2, 2]
    for kw in (dict(), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)):
        a = gen(model, labels, seed=3, use_cache=True, **kw)
        b = gen(model, labels, seed=3, use_cache=False, **kw)
        assert torch.equal(a, b), kw


def test_generate_yields_only_code_tokens(model):
    out = gen(model, [0, 1, 2] * 10, seed=0, temperature=3.0)
    assert out.shape == (30, NUM_WEIGHTS) and out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB.num_codes
    assert len(torch.unique(out)) > VOCAB.num_codes // 2  # high temperature explores the codes


def test_generate_is_seeded(model):
    a = gen(model, [0, 1, 2], seed=7)
    assert torch.equal(a, gen(model, [0, 1, 2], seed=7))
    assert not torch.equal(a, gen(model, [0, 1, 2], seed=8))
    # Greedy decoding ignores the seed.
    assert torch.equal(gen(model, [0, 1], seed=1, temperature=0.0), gen(model, [0, 1], seed=2, temperature=0.0))


def test_generate_completes_a_given_prefix(model):
    labels = [0, 1, 2, 2]
    for kw in (dict(temperature=0.0), dict(temperature=0.0, guidance=2.0)):
        greedy = gen(model, labels, seed=0, **kw)
        for m in (1, 7, NUM_WEIGHTS - 1, NUM_WEIGHTS):
            # Greedy decoding from its own first m tokens continues exactly as it did.
            assert torch.equal(gen(model, labels, seed=0, prefix=greedy[:, :m], **kw), greedy), (kw, m)
    other = torch.randint(0, VOCAB.num_codes, (4, 5), generator=torch.Generator().manual_seed(1))
    for cache in (True, False):
        out = gen(model, labels, seed=3, use_cache=cache, prefix=other, guidance=1.5)
        assert torch.equal(out[:, :5], other)  # the given tokens are kept
        assert torch.equal(out, gen(model, labels, seed=3, use_cache=not cache, prefix=other, guidance=1.5))
    with pytest.raises(ValueError, match="prefix must be"):
        gen(model, labels, seed=0, prefix=other[:3])


def test_generate_is_class_conditioned(model):
    greedy = gen(model, [0, 1, 2], seed=0, temperature=0.0)
    assert len({tuple(r) for r in greedy.tolist()}) > 1


def test_generate_top_k_one_is_greedy(model):
    assert torch.equal(gen(model, [0, 1, 2], seed=5, top_k=1), gen(model, [0, 1, 2], seed=6, temperature=0.0))


def test_generate_with_min_p(model):
    labels = [0, 1, 2, 2]
    # min-p 0 is plain sampling, draw for draw.
    assert torch.equal(gen(model, labels, seed=3, min_p=0.0), gen(model, labels, seed=3))
    for kw in (dict(min_p=0.3), dict(min_p=0.5, temperature=0.7, top_k=5), dict(min_p=0.2, guidance=2.0)):
        cached, full = gen(model, labels, seed=3, use_cache=True, **kw), gen(model, labels, seed=3, use_cache=False, **kw)
        assert torch.equal(cached, full), kw
    # A threshold next to 1 leaves only the top token: greedy decoding.
    assert torch.equal(gen(model, labels, seed=5, min_p=0.999999), gen(model, labels, seed=6, temperature=0.0))
    # A high threshold explores fewer codes than plain sampling at a high temperature.
    hot = gen(model, [0, 1, 2] * 10, seed=0, temperature=3.0)
    cut = gen(model, [0, 1, 2] * 10, seed=0, temperature=3.0, min_p=0.6)
    assert len(torch.unique(cut)) < len(torch.unique(hot))


def test_null_class_is_sos_at_the_class_position():
    assert condition_tokens(torch.tensor([0, -1, 2]), VOCAB).tolist() == [VOCAB.class_token(0), VOCAB.sos,
                                                                          VOCAB.class_token(2)]


@pytest.mark.parametrize("guidance", [0.0, 0.5, 3.0])
def test_guided_generation_with_and_without_cache_agree(model, guidance):
    for kw in (dict(), dict(temperature=0.7, top_k=5), dict(temperature=0.0)):
        a = gen(model, [0, 1, 2, -1], seed=3, use_cache=True, guidance=guidance, **kw)
        b = gen(model, [0, 1, 2, -1], seed=3, use_cache=False, guidance=guidance, **kw)
        assert torch.equal(a, b), kw
        assert a.shape == (4, NUM_WEIGHTS) and int(a.max()) < VOCAB.num_codes


def test_guidance_mixes_conditional_and_null_logits(model):
    """Greedy guided decoding against a plain reference: every step recomputes both sequences in full."""
    labels, g = [0, 1, 2], 2.5
    out = gen(model, labels, seed=0, temperature=0.0, guidance=g)
    cond = torch.tensor([[VOCAB.sos, VOCAB.class_token(c)] for c in labels])
    null = torch.full_like(cond, VOCAB.sos)
    ref = torch.empty(len(labels), 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(NUM_WEIGHTS):
            lc = model(torch.cat([cond, ref], dim=1))[:, -1]
            lu = model(torch.cat([null, ref], dim=1))[:, -1]
            ref = torch.cat([ref, (lu + g * (lc - lu)).argmax(dim=1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    # Guidance 0 is the null class alone; guidance 1 is plain conditional decoding.
    assert torch.equal(gen(model, labels, seed=0, temperature=0.0, guidance=0.0),
                       gen(model, [-1, -1, -1], seed=0, temperature=0.0))
    assert not torch.equal(out, gen(model, labels, seed=0, temperature=0.0))


def class_score_reference(model, labels, tokens):
    """log p(w | c) - log p(w | null) of whole sequences, from two plain teacher-forced forward passes."""
    cond = torch.tensor([[VOCAB.sos, VOCAB.class_token(c)] for c in labels])
    null = torch.full_like(cond, VOCAB.sos)
    with torch.no_grad():
        def logp(prefix):
            logits = model(torch.cat([prefix, tokens[:, :-1]], dim=1))[:, 1:].double()
            return torch.log_softmax(logits, dim=-1).gather(2, tokens[..., None])[..., 0].sum(dim=1)
        return logp(cond) - logp(null)


@pytest.mark.numerics  # tokens compared across batch sizes (the null-class half doubles it)
@pytest.mark.parametrize("kw", [dict(), dict(guidance=2.0), dict(temperature=0.7, min_p=0.05)])
def test_generate_scored_gives_the_same_tokens_and_the_implicit_class_score(model, kw):
    labels = [0, 1, 2, 2]
    tokens, score = generate_scored(model, torch.tensor(labels), VOCAB, NUM_WEIGHTS, kw.get("temperature", 1.0), 0,
                                    1.0, torch.Generator().manual_seed(5), guidance=kw.get("guidance", 1.0),
                                    min_p=kw.get("min_p", 0.0))
    assert torch.equal(tokens, gen(model, labels, seed=5, **kw))
    # The score reads the model's raw logits, whatever the sampling setting.
    assert torch.allclose(score, class_score_reference(model, labels, tokens), atol=1e-4)


SETTING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "guidance": 1.0, "oversample": 1.0}


@pytest.mark.numerics  # tokens compared across batch sizes (the null-class half doubles it)
def test_oversample_keeps_the_best_scored_candidates_of_each_class_in_drawing_order(model):
    labels = torch.tensor([2, 0, 2, 0, 1, 2])
    out = draw_tokens(model, labels, VOCAB, NUM_WEIGHTS, dict(SETTING, oversample=2.5),
                      torch.Generator().manual_seed(4), batch_size=4)
    # The candidates: ceil(2.5 k) per class, classes in order, drawn in batches of 4 from the same generator.
    cand_labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 8)
    gen = torch.Generator().manual_seed(4)
    drawn = [generate_scored(model, b, VOCAB, NUM_WEIGHTS, 1.0, 0, 1.0, gen) for b in cand_labels.split(4)]
    tokens, scores = torch.cat([t for t, _ in drawn]), torch.cat([s for _, s in drawn])
    for c in range(3):
        cands = (cand_labels == c).nonzero()[:, 0]
        kept = [int(i) for i in cands if any(torch.equal(tokens[i], row) for row in out[labels == c])]
        assert len(kept) == int((labels == c).sum())
        dropped = [int(i) for i in cands if int(i) not in kept]
        assert min(scores[kept]) >= max(scores[dropped])
        assert torch.equal(out[labels == c], tokens[kept])  # in the order they were drawn


@pytest.mark.numerics  # tokens compared across batch sizes (the null-class half doubles it)
def test_oversample_one_is_plain_generation_and_the_null_class_has_no_score(model):
    labels = torch.tensor([0, 1, 1])
    plain = draw_tokens(model, labels, VOCAB, NUM_WEIGHTS, SETTING, torch.Generator().manual_seed(2), batch_size=2)
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(plain, torch.cat([generate(model, b, VOCAB, NUM_WEIGHTS, 1.0, 0, 1.0, gen)
                                         for b in labels.split(2)]))
    with pytest.raises(UsageError, match="oversample"):
        draw_tokens(model, torch.tensor([-1, -1]), VOCAB, NUM_WEIGHTS, dict(SETTING, oversample=2.0),
                    torch.Generator().manual_seed(2), batch_size=2)


@pytest.mark.parametrize("bad", [0.5, 0.0, 101.0, float("nan"), float("inf")])
def test_oversample_must_be_between_one_and_the_cap(bad):
    with pytest.raises(UsageError, match="oversample"):
        check_sampling(1.0, 0, 1.0, num_codes=245, oversample=bad)
    with pytest.raises(UsageError, match="sample.oversample"):
        apply_overrides(RunConfig(), ["train.p_uncond=0.1", f"sample.oversample={bad}"])
    check_sampling(1.0, 0, 1.0, num_codes=245, oversample=3.0)


def test_oversample_needs_a_model_trained_with_the_null_class():
    with pytest.raises(UsageError, match="sample.oversample = 2.0 needs train.conditioning = class"):
        apply_overrides(RunConfig(), ["sample.oversample=2.0"])  # p_uncond 0
    apply_overrides(RunConfig(), ["train.p_uncond=0.1", "sample.oversample=2.0"])
    with pytest.raises(UsageError, match="sample.oversample = 2.0 needs a class-conditional model"):
        check_guidance(2.0, {"conditioning": "class", "p_uncond": 0.0}, "ckpt.pt", key="oversample")


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_guidance_must_be_finite_and_non_negative(bad):
    with pytest.raises(UsageError, match="guidance"):
        check_sampling(1.0, 0, 1.0, num_codes=245, guidance=bad)
    with pytest.raises(UsageError, match="sample.guidance"):
        apply_overrides(RunConfig(), ["train.p_uncond=0.1", f"sample.guidance={bad}"])
    check_sampling(1.0, 0, 1.0, num_codes=245, guidance=0.0)


def test_guidance_needs_a_model_trained_with_the_null_class():
    check_guidance(1.0, {}, "ckpt.pt")  # plain sampling suits any model
    check_guidance(2.0, {"conditioning": "class", "p_uncond": 0.1}, "ckpt.pt")
    for trained in ({}, {"conditioning": "class", "p_uncond": 0.0}, {"conditioning": "none", "p_uncond": 0.1}):
        with pytest.raises(UsageError, match="ckpt.pt.*guidance 1"):
            check_guidance(2.0, trained, "ckpt.pt")
    # The config is refused up front too, before any stage runs.
    with pytest.raises(UsageError, match="p_uncond"):
        apply_overrides(RunConfig(), ["sample.guidance=2"])
    assert apply_overrides(RunConfig(), ["sample.guidance=2", "train.p_uncond=0.1"]).sample.guidance == 2


def trained_run(tmp_path, **train_kw):
    from test_train import cfg, make_run

    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=2, **train_kw), run, progress=False)
    return run


def test_run_sample_with_guidance(tmp_path):
    run = trained_run(tmp_path, p_uncond=0.2)
    out = run_sample(SampleConfig(n_per_class=2, guidance=2.0), run, progress=False)
    assert out["n"] == 20 and out["conditioned"]
    tensors, meta = load_tensors(run / SAMPLES_FILE)
    assert tensors["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert meta["sampling"]["guidance"] == 2.0 and meta["conditioned"] is True
    with pytest.raises(UsageError, match="guidance"):
        run_sample(SampleConfig(n_per_class=2, guidance=2.0), trained_run(tmp_path / "b"), progress=False)


def test_unconditional_model_samples_without_conditions(tmp_path):
    run = trained_run(tmp_path, conditioning="none")
    out = run_sample(SampleConfig(n_per_class=2), run, progress=False)
    tensors, meta = load_tensors(run / SAMPLES_FILE)
    # As many fields as a conditional run; the labels only number the slots, and the file says so.
    assert out["n"] == 20 and not out["conditioned"] and meta["conditioned"] is False
    assert tensors["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    with pytest.raises(UsageError, match="unconditional"):
        run_sample(SampleConfig(n_per_class=2), run, progress=False, labels=[3])
    with pytest.raises(UsageError, match="guidance"):
        run_sample(SampleConfig(n_per_class=2, guidance=1.5), run, progress=False)
