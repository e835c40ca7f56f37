"""The first-layer prior (nefgpt.weight_prior): one Gaussian or a mixture per class, and its use while sampling."""

from __future__ import annotations

import pytest
import torch

from nefgpt.codebook import Vocab
from nefgpt.errors import UsageError
from nefgpt.gaussian_fit import fit_gaussian, fit_mixture, mixture_moments
from nefgpt.generate import generate
from nefgpt.model import GPT, GPTConfig
from nefgpt.weight_prior import WeightPrior, code_log_widths

VOCAB = Vocab(num_codes=12, num_classes=3)
NUM_WEIGHTS, N_PRIOR = 20, 6
VALUES = torch.linspace(-1, 1, VOCAB.num_codes)


def random_prior(seed: int = 0) -> tuple[WeightPrior, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(VOCAB.num_classes, N_PRIOR, generator=g, dtype=torch.float64) * 0.3
    a = torch.randn(VOCAB.num_classes, N_PRIOR, N_PRIOR, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.transpose(1, 2) + 0.05 * torch.eye(N_PRIOR, dtype=torch.float64)
    return WeightPrior(mean, torch.linalg.cholesky(cov), VALUES), mean, cov


def test_sequential_conditionals_equal_the_gaussian_conditioning_formula():
    # Cross-check the running forward substitution against the textbook conditional of a Gaussian:
    # m_i = mu_i + S[i, <i] S[<i, <i]^-1 (x_<i - mu_<i), s_i^2 = S[i, i] - S[i, <i] S[<i, <i]^-1 S[<i, i].
    prior, mean, cov = random_prior()
    labels = torch.tensor([0, 2, 1, 2])
    codes = torch.randint(0, VOCAB.num_codes, (4, N_PRIOR), generator=torch.Generator().manual_seed(1))
    z = prior.start(4, labels)
    for i in range(N_PRIOR):
        got = torch.log_softmax(prior.log_density(labels, z, i).double(), 1)
        for row, c in enumerate(labels.tolist()):
            x = VALUES.double()[codes[row, :i]]
            s_ab, s_bb = cov[c, i, :i], cov[c, :i, :i]
            m = mean[c, i] + (s_ab @ torch.linalg.solve(s_bb, x - mean[c, :i]) if i else 0.0)
            var = cov[c, i, i] - (s_ab @ torch.linalg.solve(s_bb, s_ab) if i else 0.0)
            want = torch.log_softmax(-0.5 * (VALUES.double() - m) ** 2 / var + code_log_widths(VALUES.double()), 0)
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        prior.observe(labels, z, i, codes[:, i])


def test_fit_gives_each_class_its_shrunk_gaussian_and_absent_classes_the_pooled_one():
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(40, N_PRIOR, generator=g)
    labels = torch.tensor([0] * 25 + [1] * 15)
    prior = WeightPrior.fit(weights, labels, 3, VALUES)
    for c, rows in ((0, weights[:25]), (1, weights[25:]), (2, weights)):
        ref = fit_gaussian(rows)
        cov = ref["std"][:, None] * (ref["eigvecs"] * ref["eigvals"]) @ ref["eigvecs"].T * ref["std"][None, :]
        torch.testing.assert_close(prior.mean[c, 0], ref["mean"])
        torch.testing.assert_close(prior.chol[c, 0] @ prior.chol[c, 0].T, cov, rtol=1e-6, atol=1e-6)


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
    nearest = (VALUES[None] - mean[torch.tensor(labels), 0, None].float()).abs().argmin(1)  # equal code cells
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
    z = prior.start(2, torch.tensor(labels))
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

    spec = SimpleNamespace(layer_params=[N_PRIOR, 4], num_params=N_PRIOR + 4)
    with pytest.raises(UsageError, match="tokenize.offsets = pca"):
        run_prior(tmp_path, SimpleNamespace(offsets="pca", order="input_first", spec=spec))
    with pytest.raises(UsageError, match="tokenize.order = output_first"):
        run_prior(tmp_path, SimpleNamespace(offsets="none", order="output_first", spec=spec))
    with pytest.raises(ArtifactError, match="tokens.safetensors"):
        run_prior(tmp_path, SimpleNamespace(offsets="none", order="input_first", spec=spec))


def test_a_shipped_prior_is_refitted_from_its_codes_and_must_match_the_tokenizer(tmp_path):
    from types import SimpleNamespace

    from nefgpt.artifacts import save_tensors
    from nefgpt.errors import ArtifactError
    from nefgpt.layout import PRIOR_FILE
    from nefgpt.weight_prior import run_prior, save_prior

    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, VOCAB.num_codes, (60, N_PRIOR + 4), generator=g)  # every weight's code
    labels = torch.arange(60) % 3
    save_prior(tmp_path / PRIOR_FILE, codes, labels, "abc")
    tok = SimpleNamespace(id="abc", offsets="none", order="input_first", vocab=VOCAB, codebook=VALUES,
                          spec=SimpleNamespace(layer_params=[N_PRIOR, 4], num_params=N_PRIOR + 4))
    # Any shape and either set of positions: the codes are what the prior is fitted on.
    for shape, positions, n in (((1, 0), "first_layer", N_PRIOR), ((3, 4), "first_layer", N_PRIOR),
                                ((3, 4), "all", N_PRIOR + 4)):
        loaded = run_prior(tmp_path, tok, *shape, positions)
        want = WeightPrior.fit(VALUES[codes[:, :n]], labels, 3, VALUES, *shape)
        assert loaded.n == n
        torch.testing.assert_close(loaded.mean, want.mean)
        torch.testing.assert_close(loaded.chol, want.chol)
    with pytest.raises(ArtifactError, match="another tokenizer"):
        run_prior(tmp_path, SimpleNamespace(**{**vars(tok), "id": "xyz"}))
    save_prior(tmp_path / PRIOR_FILE, codes[:, :N_PRIOR], labels, "abc")  # too few positions for "all"
    with pytest.raises(ArtifactError, match="codes"):
        run_prior(tmp_path, tok, 1, 0, "all")
    save_prior(tmp_path / PRIOR_FILE, codes[:, :2], labels, "abc")
    with pytest.raises(ArtifactError, match="codes"):
        run_prior(tmp_path, tok)
    # The first shipped priors held one fitted Gaussian per class; they still load, as that shape only.
    prior, _, _ = random_prior()
    save_tensors(tmp_path / PRIOR_FILE, {"mean": prior.mean[:, 0].float(), "chol": prior.chol[:, 0].float(),
                                         "values": VALUES}, {"tokenizer_id": "abc"})
    torch.testing.assert_close(run_prior(tmp_path, tok).chol, prior.chol.float().double())
    with pytest.raises(UsageError, match="prior_components = 1"):
        run_prior(tmp_path, tok, 4, 32)


def random_mixture(seed: int = 0, k: int = 3) -> WeightPrior:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(VOCAB.num_classes, k, N_PRIOR, generator=g, dtype=torch.float64) * 0.5
    a = torch.randn(VOCAB.num_classes, k, N_PRIOR, N_PRIOR, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.transpose(-1, -2) + 0.05 * torch.eye(N_PRIOR, dtype=torch.float64)
    logw = torch.log_softmax(torch.randn(VOCAB.num_classes, k, generator=g, dtype=torch.float64), 1)
    return WeightPrior(mean, torch.linalg.cholesky(cov), VALUES, logw)


def test_a_mixture_s_sequential_conditionals_are_its_exact_conditionals():
    # Brute force: p(v | x_<i) is proportional to the mixture's joint density of (x_<i, v), times the code's cell.
    prior = random_mixture()
    uneven = torch.tensor(sorted(torch.rand(VOCAB.num_codes, generator=torch.Generator().manual_seed(5)) * 2 - 1))
    prior = WeightPrior(prior.mean, prior.chol, uneven, prior.log_weights)
    cov = prior.chol @ prior.chol.transpose(-1, -2)
    labels = torch.tensor([0, 2, 1])
    codes = torch.randint(0, VOCAB.num_codes, (3, N_PRIOR), generator=torch.Generator().manual_seed(1))
    state = prior.start(3, labels)
    values = uneven.double()
    for i in range(N_PRIOR):
        got = torch.log_softmax(prior.log_density(labels, state, i).double(), 1)
        for row, c in enumerate(labels.tolist()):
            x = torch.cat([values[codes[row, :i]].expand(len(values), i), values[:, None]], 1)  # (V, i + 1)
            joint = torch.stack([prior.log_weights[c, k] + torch.distributions.MultivariateNormal(
                prior.mean[c, k, :i + 1], cov[c, k, :i + 1, :i + 1]).log_prob(x) for k in range(3)]).logsumexp(0)
            want = torch.log_softmax(joint + code_log_widths(values), 0)
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
        prior.observe(labels, state, i, codes[:, i])


def test_code_cells_are_the_spans_nearest_each_value():
    widths = code_log_widths(torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64)).exp()
    torch.testing.assert_close(widths, torch.tensor([1.0, 1.5, 3.0, 4.0], dtype=torch.float64))


def test_fit_mixture_finds_separated_clusters_as_scikit_learn_does():
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [-4.0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0]], dtype=torch.float64)
    sizes = [120, 60, 20]
    x = torch.cat([c + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64) for c, n in zip(centres, sizes)])
    got = fit_mixture(x, 3, 5)
    got["means"], got["covs"] = mixture_moments(got)
    ref = sklearn_mixture.GaussianMixture(3, covariance_type="full", reg_covar=1e-6 * float(x.var(0).mean()),
                                          random_state=0).fit(x.numpy())
    order = lambda means: torch.as_tensor(means)[:, 0].argsort()  # noqa: E731 - match components by position
    a, b = order(got["means"]), order(ref.means_)
    torch.testing.assert_close(got["means"][a], torch.as_tensor(ref.means_)[b], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["log_weights"][a].exp(), torch.as_tensor(ref.weights_)[b], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["covs"][a], torch.as_tensor(ref.covariances_)[b], rtol=0, atol=1e-3)


def test_fit_mixture_keeps_the_residual_outside_its_directions_and_pads_small_classes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 8, dtype=torch.float64)
    m = fit_mixture(x, 2, 3)
    m["means"], m["covs"] = mixture_moments(m)
    # Its covariance keeps the total variance of the rows: the directions' share plus the residual's.
    total = torch.einsum("k,kii->", m["log_weights"].exp(), m["covs"]) + (
        m["log_weights"].exp()[:, None] * (m["means"] - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(total, x.var(0, correction=0).sum(), rtol=1e-3, atol=1e-3)
    # A class with fewer rows than components gets padding components of no weight; it still samples.
    labels = torch.tensor([0] * 48 + [1] * 2)
    prior = WeightPrior.fit(x.float(), labels, 2, VALUES, components=3, dims=2)
    assert prior.mean.shape == (2, 3, 8) and prior.log_weights[1].exp().sum() == pytest.approx(1.0)
    state = prior.start(2, torch.tensor([0, 1]))
    assert torch.isfinite(prior.log_density(torch.tensor([0, 1]), state, 0)).all()
    with pytest.raises(UsageError, match="prior_dims"):
        WeightPrior.fit(x.float(), labels, 2, VALUES, components=3, dims=0)


def test_the_prior_gpt_weight_scales_the_model_on_the_prior_s_positions_only(model):
    prior = random_mixture()
    labels = [0, 1, 2, 1]
    # GPT weight 0 with a strong prior: the prior alone picks the first positions, whatever the model says.
    alone = draw(model, labels, prior, 1e6, prior_gpt_weight=0.0)
    assert torch.equal(alone[:, :N_PRIOR], draw(model, labels, prior, 1e6, prior_gpt_weight=0.0, seed=7)[:, :N_PRIOR])
    assert draw(model, labels, prior, 1.0, prior_gpt_weight=0.5).shape == (4, NUM_WEIGHTS)


def test_a_prior_on_every_position_steers_the_whole_sequence(model):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(VOCAB.num_classes, NUM_WEIGHTS, NUM_WEIGHTS, generator=g, dtype=torch.float64) * 0.1
    cov = a @ a.transpose(1, 2) + 0.02 * torch.eye(NUM_WEIGHTS, dtype=torch.float64)
    mean = torch.randn(VOCAB.num_classes, NUM_WEIGHTS, generator=g, dtype=torch.float64) * 0.5
    prior = WeightPrior(mean, torch.linalg.cholesky(cov), VALUES)
    labels = [0, 1, 2]
    # A strong prior with the GPT at weight 0: its most likely codes, at every position of the field.
    out = draw(model, labels, prior, 1e6, prior_gpt_weight=0.0)
    state = prior.start(3, torch.tensor(labels))
    for i in range(NUM_WEIGHTS):
        want = prior.log_density(torch.tensor(labels), state, i).argmax(1)
        assert torch.equal(out[:, i], want)
        prior.observe(torch.tensor(labels), state, i, out[:, i])


def test_a_component_drawn_first_holds_the_field_whatever_is_decoded():
    # sample.prior_component_draw = first: each field draws one component by its weight, then decodes in it alone,
    # so every position's density is that component's own Gaussian conditional.
    g = torch.Generator().manual_seed(4)
    weights = torch.cat([torch.randn(30, N_PRIOR, generator=g) * 0.2 - 0.5, torch.randn(30, N_PRIOR, generator=g) * 0.2 + 0.5])
    prior = WeightPrior.fit(weights, torch.zeros(60, dtype=torch.long), 1, VALUES, components=2, dims=3)
    labels = torch.zeros(400, dtype=torch.long)
    state = prior.start(400, labels, torch.Generator().manual_seed(0))
    chosen = state.loglik.argmax(1)
    assert (state.loglik.gather(1, chosen[:, None]) == 0).all() and (state.loglik < -1e29).sum() == 400
    share = torch.softmax(prior.log_weights[0], 0)[1].item()
    assert abs(chosen.float().mean().item() - share) < 0.1  # drawn by the components' weights
    codes = torch.randint(0, VOCAB.num_codes, (400, N_PRIOR), generator=g)
    for i in range(N_PRIOR):
        got = prior.log_density(labels, state, i)
        m, s = prior._conditional(labels, state, i)
        own_m, own_s = m.gather(1, chosen[:, None]), s.gather(1, chosen[:, None])
        want = -0.5 * ((prior.values - own_m) / own_s) ** 2 - own_s.log() + prior.log_widths
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        prior.observe(labels, state, i, codes[:, i])
    assert (state.loglik.argmax(1) == chosen).all()


def test_the_component_draw_is_a_sampling_option_of_generate(model):
    prior = WeightPrior.fit(torch.randn(60, N_PRIOR, generator=torch.Generator().manual_seed(5)),
                            torch.arange(60) % 3, 3, VALUES, components=3, dims=3)
    first = draw(model, [0, 1, 2] * 4, prior, 1.0, prior_component_draw="first")
    assert torch.equal(first, draw(model, [0, 1, 2] * 4, prior, 1.0, prior_component_draw="first"))
    assert not torch.equal(first, draw(model, [0, 1, 2] * 4, prior, 1.0))
