"""The public Python API (nefgpt.load / nefgpt.load_pretrained): offline sampling that matches the CLI."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import nefgpt
from nefgpt.critic import load_critic
from nefgpt import cli
from nefgpt.artifacts import load_tensors
from nefgpt.errors import ArtifactError, NefgptError, UsageError
from nefgpt.tune import load_best_setting


@pytest.fixture(scope="module")
def gen():
    return nefgpt.load_pretrained("mnist")


def test_load_pretrained_offline(gen):
    assert isinstance(gen, nefgpt.Generator)
    assert gen.num_classes == 10
    # The tuned setting of the shipped model's tune.json is the default.
    assert set(gen.setting) == {"temperature", "top_k", "top_p", "min_p", "guidance", "oversample", "prior_weight",
                                "prior_components", "prior_dims", "prior_gpt_weight", "prior_positions",
                                "prior_component_draw"}
    assert gen.setting == load_best_setting(gen.run_dir)


def test_sample_shapes_labels_and_render(gen):
    fields = gen.sample(labels=[7] * 3 + [2], seed=0)
    assert isinstance(fields, nefgpt.Fields) and len(fields) == 4
    assert fields.weights.shape == (4, gen.spec.num_params) == (4, 561)
    assert fields.weights.dtype == torch.float32 and torch.isfinite(fields.weights).all()
    assert fields.labels.tolist() == [7, 7, 7, 2]
    assert fields.spec == gen.spec
    images = fields.render(res=32)
    assert images.shape == (4, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_no_labels_samples_every_class(gen):
    fields = gen.sample(n_per_class=1, seed=0)
    assert fields.labels.tolist() == list(range(gen.num_classes))
    assert fields.tokens.shape == fields.weights.shape and fields.tokens.dtype == torch.long


def test_same_seed_same_fields_other_seed_others(gen):
    a = gen.sample(labels=[3, 5], seed=1)
    b = gen.sample(labels=[3, 5], seed=1)
    c = gen.sample(labels=[3, 5], seed=2)
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


def test_every_seed_of_the_tuned_setting_uses_the_shipped_critic(gen):
    assert gen.config.sample.critic_fields > 0
    shipped = load_critic(gen.run_dir / "critic.safetensors", gen.tokenizer.decode)
    for seed in (0, 7):
        gen.sample(labels=[4], seed=seed)
    (critic,) = gen._critics.values()  # one critic, loaded, not trained again
    assert critic.info == shipped.info and 0 < critic.kept_fraction <= 1


def test_the_prior_is_fitted_once_per_shape(monkeypatch):
    from nefgpt import api
    fitted = []

    def counting(*args):
        fitted.append(args[2:])
        return run_prior(*args)

    run_prior = api.run_prior
    monkeypatch.setattr(api, "run_prior", counting)
    g = nefgpt.load_pretrained("mnist")
    # critic_fields 0: another prior shape is another setting, for which a critic would first be trained
    first = g.sample(labels=[1], seed=0, prior_weight=1.0, prior_components=2, prior_dims=8, critic_fields=0)
    again = g.sample(labels=[1], seed=0, prior_weight=1.0, prior_components=2, prior_dims=8, critic_fields=0)
    g.sample(labels=[1], seed=0, prior_weight=1.0, prior_components=3, prior_dims=8, critic_fields=0)
    assert torch.equal(first.tokens, again.tokens)
    assert [shape[:2] for shape in fitted] == [(2, 8), (3, 8)]


def test_api_matches_the_cli_sample_command(gen, tmp_path):
    out = tmp_path / "p"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        rc = cli.main(["sample", "--pretrained", "mnist", "--out", str(out), "--label", "7", "-n", "4",
                       "--seed", "0", "--quiet"])
    assert rc == 0, err.getvalue()
    tensors, meta = load_tensors(out / "samples.safetensors")
    # `--label 7 -n 4` samples class 7 four times, in that order, like labels=[7] * 4.
    assert tensors["labels"].tolist() == [7] * 4
    fields = gen.sample(labels=[7] * 4, seed=0)
    assert torch.equal(fields.weights, tensors["weights"])
    assert {k: meta["sampling"][k] for k in gen.setting} == gen.setting


def test_explicit_override_changes_the_setting(gen):
    default = gen.sample(labels=[1, 1], seed=0, critic_fields=0)
    hotter = gen.sample(labels=[1, 1], seed=0, temperature=0.5, critic_fields=0)
    assert hotter.setting == {**gen.setting, "temperature": 0.5}
    assert default.setting == gen.setting and gen.setting["temperature"] != 0.5
    assert not torch.equal(default.weights, hotter.weights)


def test_load_a_run_directory_reads_it_in_place(gen):
    again = nefgpt.load(gen.run_dir)
    assert torch.equal(again.sample(labels=[0], seed=4).weights, gen.sample(labels=[0], seed=4).weights)


@pytest.mark.parametrize("call,error,words", [
    (lambda g: nefgpt.load_pretrained("nope"), UsageError, ("no pretrained model 'nope'", "mnist")),
    (lambda g: g.sample(labels=[10]), UsageError, ("label 10", "0..9")),
    (lambda g: g.sample(labels=[-1]), UsageError, ("label -1",)),
    (lambda g: g.sample(labels=[1.5]), UsageError, ("not an integer",)),
    (lambda g: g.sample(labels=[]), UsageError, ("empty",)),
    (lambda g: g.sample(labels=7), UsageError, ("list of class indices",)),
    (lambda g: g.sample(labels=[1], top_k=2.5), UsageError, ("top_k",)),
    (lambda g: g.sample(labels=[1], temperature=-1), UsageError, ("temperature",)),
    (lambda g: g.sample(n_per_class=0), UsageError, ("n_per_class",)),
    (lambda g: g.sample(labels=[1], seed=1.5), UsageError, ("seed",)),
    (lambda g: g.sample(labels=[1], guidance=2.0, batch_size=0), UsageError, ("batch_size",)),
    (lambda g: g.sample(labels=[1]).render(res=0), UsageError, ("res",)),
    (lambda g: g.sample(labels=[1], top_p=0), UsageError, ("top_p",)),
])
def test_clear_errors(gen, call, error, words):
    with pytest.raises(error) as info:
        call(gen)
    assert isinstance(info.value, NefgptError)
    message = str(info.value)
    assert "\n" not in message  # one line, as the CLI prints it
    for w in words:
        assert w in message, (w, message)


def test_unknown_keyword_is_a_type_error(gen):
    # The overrides are real keyword parameters (completion and help work in notebooks), so a typo is Python's
    # usual TypeError naming it.
    with pytest.raises(TypeError, match="temprature"):
        gen.sample(labels=[1], temprature=0.5)


def test_missing_or_untrained_run_directory(tmp_path):
    with pytest.raises(ArtifactError, match="run directory not found"):
        nefgpt.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="tokenizer.safetensors: file not found; run `nefgpt tokenize"):
        nefgpt.load(tmp_path / "empty")
