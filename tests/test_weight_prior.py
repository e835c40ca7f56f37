"""The first-layer Gaussian prior (nefgpt.weight_prior) and its use while sampling."""

from __future__ import annotations

import pytest
import torch

from nefgpt.codebook import Vocab
from nefgpt.errors import UsageError
from nefgpt.gaussian_fit import fit_gaussian
from nefgpt.generate import generate
from nefgpt.model import GPT, GPTConfig
from nefgpt.weight_prior import FirstLayerPrior

VOCAB = Vocab(num_codes=12, num_classes=3)
NUM_WEIGHTS, N_PRIOR = 20, 6
VALUES = torch.linspace(-1, 1, VOCAB.num_codes)


def random_prior(seed: int = 0) -> tuple[FirstLayerPrior, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(VOCAB.num_classes, N_PRIOR, generator=g, dtype=torch.float64) * 0.3
    a = torch.randn(VOCAB.num_classes, N_PRIOR, N_PRIOR, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.transpose(1, 2) + 0.05 * torch.eye(N_PRIOR, dtype=torch.float64)
    return FirstLayerPrior(mean, torch.linalg.cholesky(cov), VALUES), mean, cov


def test_sequential_conditionals_equal_the_gaussian_conditioning_formula():
    # Cross-check the running forward substitution against the textbook conditional of a Gaussian:
    # m_i = mu_i + S[i, <i] S[<i, <i]^-1 (x_<i - mu_<i), s_i^2 = S[i, i] - S[i, <i] S[<i, <i]^-1 S[<i, i].
    prior, mean, cov = random_prior()
    labels = torch.tensor([0, 2, 1, 2])
    codes = torch.randint(0, VOCAB.num_codes, (4, N_PRIOR), generator=torch.Generator().manual_seed(1))
    z = prior.start(4)
    for i in range(N_PRIOR):
        got = prior.log_density(labels, z, i).double()
        for row, c in enumerate(labels.tolist()):
            x = VALUES.double()[codes[row, :i]]
            s_ab, s_bb = cov[c, i, :i], cov[c, :i, :i]
            m = mean[c, i] + (s_ab @ torch.linalg.solve(s_bb, x - mean[c, :i]) if i else 0.0)
            var = cov[c, i, i] - (s_ab @ torch.linalg.solve(s_bb, s_ab) if i else 0.0)
            want = -0.5 * (VALUES.double() - m) ** 2 / var
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        prior.observe(labels, z, i, codes[:, i])


def test_fit_gives_each_class_its_shrunk_gaussian_and_absent_classes_the_pooled_one():
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(40, N_PRIOR, generator=g)
    labels = torch.tensor([0] * 25 + [1] * 15)
    prior = FirstLayerPrior.fit(weights, labels, 3, VALUES)
    for c, rows in ((0, weights[:25]), (1, weights[25:]), (2, weights)):
        ref = fit_gaussian(rows)
        cov = ref["std"][:, None] * (ref["eigvecs"] * ref["eigvals"]) @ ref["eigvecs"].T * ref["std"][None, :]
        torch.testing.assert_close(prior.mean[c], ref["mean"])
        torch.testing.assert_close(prior.chol[c] @ prior.chol[c].T, cov, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=NUM_WEIGHTS + 2, vocab_size=VOCAB.size, num_codes=VOCAB.num_codes,
                      n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def draw(model, labels, prior=None, weight=0.0, seed=0, guidance=1.0, **kw):
    return generate(model, torch.tensor(labels), VOCAB, NUM_WEIGHTS, 1.0, 0, 1.0, torch.Generator().manual_seed(seed),
                    guidance=guidance, prior=prior, prior_weight=weight, **kw)


def test_weight_zero_is_the_plain_sampler_and_a_strong_prior_takes_over_its_positions(model):
    prior, mean, _ = random_prior()
    labels = [0, 1, 2, 1]
    plain = draw(model, labels)
    assert torch.equal(draw(model, labels, prior, 0.0), plain)
    # A very strong prior: the first position's code is the one nearest the class mean; after the prior's
    # positions the model alone decides again (the tokens there still depend only on the model and the prefix).
    strong = draw(model, labels, prior, 1e6)
    nearest = (VALUES[None] - mean[torch.tensor(labels), 0, None].float()).abs().argmin(1)
    assert torch.equal(strong[:, 0], nearest)
    assert not torch.equal(strong[:, :N_PRIOR], plain[:, :N_PRIOR])
    # With guidance the prior is added to the guided logits; the sampler still runs.
    assert draw(model, labels, prior, 0.5, guidance=2.0).shape == (4, NUM_WEIGHTS)


def test_a_given_prefix_is_observed_by_the_prior(model):
    prior, _, _ = random_prior()
    labels = [0, 2]
    prefix = torch.tensor([[3, 4, 5], [6, 7, 8]])
    out = draw(model, labels, prior, 1e6, prefix=prefix)
    assert torch.equal(out[:, :3], prefix)
    # Position 3 follows the conditional given the prefix's values, as the prior computes it.
    z = prior.start(2)
    for i in range(3):
        prior.observe(torch.tensor(labels), z, i, prefix[:, i])
    want = prior.log_density(torch.tensor(labels), z, 3).argmax(1)
    assert torch.equal(out[:, 3], want)


def test_the_prior_needs_classes_and_a_prior(model):
    prior, _, _ = random_prior()
    with pytest.raises(UsageError, match="null class"):
        draw(model, [0, -1], prior, 0.5)
    with pytest.raises(UsageError, match="prior_weight"):
        draw(model, [0, 1], None, 0.5)


def test_run_prior_refuses_tokens_that_are_not_raw_weights_and_runs_without_tokens(tmp_path):
    from types import SimpleNamespace

    from nefgpt.errors import ArtifactError
    from nefgpt.weight_prior import run_prior

    with pytest.raises(UsageError, match="tokenize.offsets = pca"):
        run_prior(tmp_path, SimpleNamespace(offsets="pca", order="input_first"))
    with pytest.raises(UsageError, match="tokenize.order = output_first"):
        run_prior(tmp_path, SimpleNamespace(offsets="none", order="output_first"))
    with pytest.raises(ArtifactError, match="tokens.safetensors"):
        run_prior(tmp_path, SimpleNamespace(offsets="none", order="input_first"))


def test_a_saved_prior_is_what_run_prior_returns_and_must_match_the_tokenizer(tmp_path):
    from types import SimpleNamespace

    from nefgpt.errors import ArtifactError
    from nefgpt.layout import PRIOR_FILE
    from nefgpt.weight_prior import run_prior, save_prior

    prior, _, _ = random_prior()
    save_prior(tmp_path / PRIOR_FILE, prior, "abc")
    tok = SimpleNamespace(id="abc", offsets="none", order="input_first", vocab=VOCAB)
    loaded = run_prior(tmp_path, tok)
    torch.testing.assert_close(loaded.mean, prior.mean.float().double())
    torch.testing.assert_close(loaded.chol, prior.chol.float().double())
    with pytest.raises(ArtifactError, match="another tokenizer"):
        run_prior(tmp_path, SimpleNamespace(**{**vars(tok), "id": "xyz"}))
