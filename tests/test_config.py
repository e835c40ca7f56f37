"""Configuration: presets, overrides and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nefgpt import config, validation
from nefgpt.config import RunConfig, apply_overrides, from_dict, load_preset
from nefgpt.validation import validate
from nefgpt.errors import UsageError
from nefgpt.field import FieldSpec
from nefgpt.model import GPT
from nefgpt.codebook import Vocab
from nefgpt.train import model_config


@pytest.mark.parametrize("name", config.PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_preset(name)
    assert isinstance(cfg, RunConfig)
    validate(cfg)
    assert from_dict(cfg.to_dict(), source="round trip") == cfg


def test_preset_names():
    assert set(config.PRESETS) == {"cpu", "seed", "fashion"}
    assert load_preset("fashion").data.dataset == "fashion-mnist"
    assert load_preset("cpu").data.dataset == "mnist"


def test_seed_preset_is_the_talks_setup():
    cfg = load_preset("seed")
    t = cfg.train
    assert (t.n_embd, t.n_head, t.n_layer, t.head_dim) == (64, 12, 12, 16)
    assert t.lr == 3e-3 and t.max_iters == 30_000 and t.batch_size == 64
    assert cfg.tokenize.num_codes == 245
    vocab = Vocab(cfg.tokenize.num_codes, 10)
    assert vocab.size == 245 + 1 + 10 == 256
    spec = FieldSpec(cfg.fit.octaves, tuple(cfg.fit.hidden))
    assert spec.num_params == 561
    gpt_cfg = model_config(t, vocab, spec.num_params)
    assert gpt_cfg.block_size == 563 and gpt_cfg.vocab_size == 256 and gpt_cfg.num_codes == 245
    model = GPT(gpt_cfg)  # 12 heads don't divide 64: the decoupled head width makes it build
    assert model.blocks[0].attn.c_attn.out_features == 3 * 12 * 16


def test_cpu_preset_defaults():
    cfg = load_preset("cpu")
    assert cfg.fit.hidden == [16, 16] and cfg.fit.octaves == 4 and cfg.fit.init == "shared"
    # The fallback without tune.json: no top-k (it collapses each class onto one shape), T 0.8.
    assert cfg.sample.top_k == 0 and cfg.sample.top_p == 1.0 and cfg.sample.temperature == 0.8
    # Budgeted training and tuning, so the whole run fits 30 minutes on an AVX2-only CPU too.
    assert cfg.train.max_minutes == 15 and cfg.tune.max_minutes == 4 and cfg.tune.objective == "balanced"
    assert cfg.data.dataset == "mnist" and cfg.data.heldout_per_class == 50 and cfg.sample.n_per_class == 50


def test_unknown_preset_and_preset_files(tmp_path):
    with pytest.raises(UsageError, match="nope"):
        load_preset("nope")
    with pytest.raises(UsageError, match="missing.toml"):
        load_preset(str(tmp_path / "missing.toml"))
    good = tmp_path / "mine.toml"
    good.write_text("[train]\nmax_iters = 7\n[fit]\nhidden = [8, 8]\n")
    cfg = load_preset(str(good))
    assert cfg.train.max_iters == 7 and cfg.fit.hidden == [8, 8]
    assert cfg.train.n_layer == RunConfig().train.n_layer  # unset keys keep the defaults
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[train]\nmax_iter = 7\n")
    with pytest.raises(UsageError, match="train.max_iter"):
        load_preset(str(bad_key))
    bad_section = tmp_path / "bad_section.toml"
    bad_section.write_text("[trian]\nmax_iters = 7\n")
    with pytest.raises(UsageError, match="trian"):
        load_preset(str(bad_section))
    not_table = tmp_path / "not_table.toml"
    not_table.write_text("train = 3\n")
    with pytest.raises(UsageError, match="train"):
        load_preset(str(not_table))
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nmax_iters = \n")
    with pytest.raises(UsageError, match="broken.toml"):
        load_preset(str(broken))


def test_overrides_parse_values():
    cfg = apply_overrides(RunConfig(), [
        "train.max_iters=500",
        "train.lr=1e-4",
        "train.min_lr_frac=1",  # an int where a float is expected is fine
        "train.compile=true",
        "train.bias=false",
        "fit.hidden=[8, 4, 2]",
        "data.dataset=npz:/tmp/some file.npz",  # not TOML: taken as a bare string
        "sample.temperature=0.5",
        "tokenize.init=random",
    ])
    assert cfg.train.max_iters == 500 and type(cfg.train.max_iters) is int
    assert cfg.train.lr == 1e-4
    assert cfg.train.min_lr_frac == 1.0 and type(cfg.train.min_lr_frac) is float
    assert cfg.train.compile is True and cfg.train.bias is False
    assert cfg.fit.hidden == [8, 4, 2]
    assert cfg.data.dataset == "npz:/tmp/some file.npz"
    assert cfg.sample.temperature == 0.5
    assert cfg.tokenize.init == "random"


def test_override_with_equals_in_the_value_and_spaces_around_the_key():
    cfg = apply_overrides(RunConfig(), [" data.dataset =npz:/tmp/a=b.npz"])
    assert cfg.data.dataset == "npz:/tmp/a=b.npz"


@pytest.mark.parametrize("item,word", [
    ("train.nope=1", "train.nope"),
    ("nope.max_iters=1", "nope.max_iters"),
    ("train=1", "train"),
    ("train.max_iters", "section.key=value"),
    ("train.max_iters=abc", "train.max_iters"),
    ("train.max_iters=1.5", "train.max_iters"),
    ("train.max_iters=true", "train.max_iters"),
    ("train.lr=true", "train.lr"),
    ("train.compile=1", "train.compile"),
    ("fit.hidden=16", "fit.hidden"),
    ("fit.hidden=[1.5]", "fit.hidden"),
    ("fit.init=3", "fit.init"),
])
def test_bad_overrides_raise_usage_error(item, word):
    with pytest.raises(UsageError, match=word.replace(".", r"\.")):
        apply_overrides(RunConfig(), [item])


@pytest.mark.parametrize("item,word", [
    ("fit.steps=-1", "fit.steps"),
    ("fit.anchor_steps=-5", "fit.anchor_steps"),
    ("fit.init_l2=-1e-3", "fit.init_l2"),
    ("fit.init_l2=nan", "fit.init_l2"),
    ("fit.augment_shifts=-1", "fit.augment_shifts"),
    ("fit.augment_shifts=9", "fit.augment_shifts"),
    ("sample.prior_weight=-0.5", "sample.prior_weight"),
    ("tune.prior_weights=[nan]", "tune.prior_weights"),
    ("sample.prior_components=0", "sample.prior_components"),
    ("sample.prior_components=4", "sample.prior_dims"),
    ("sample.prior_dims=-1", "sample.prior_dims"),
    ("sample.prior_gpt_weight=1.5", "sample.prior_gpt_weight"),
    ("tune.prior_gpt_weights=[-1]", "tune.prior_gpt_weights"),
    ("tune.prior_components=[0]", "tune.prior_components"),
    ("sample.prior_positions=second", "sample.prior_positions"),
    ("tune.prior_positions=['every']", "tune.prior_positions"),
    ("sample.prior_component_draw=last", "sample.prior_component_draw"),
    ("tune.prior_component_draws=['any']", "tune.prior_component_draws"),
    ("baseline.components=0", "baseline.components"),
    ("baseline.dims=0", "baseline.dims"),
    ("train.max_iters=-1", "train.max_iters"),
    ("train.warmup_iters=-1", "train.warmup_iters"),
    ("tokenize.max_iters=-1", "tokenize.max_iters"),
    ("data.subset_per_class=-1", "data.subset_per_class"),
    ("data.heldout_per_class=0", "data.heldout_per_class"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("fit.chunk_size=0", "fit.chunk_size"),
    ("tokenize.num_codes=0", "tokenize.num_codes"),
    ("sample.n_per_class=0", "sample.n_per_class"),
    ("sample.top_k=-1", "sample.top_k"),
    ("fit.hidden=[]", "fit.hidden"),
    ("fit.hidden=[16, 0]", "fit.hidden"),
    ("fit.init=other", "fit.init"),
    ("train.dtype=fp16", "train.dtype"),
    ("train.device=tpu", "train.device"),
    ("tokenize.num_codes=70000", "tokenize.num_codes"),
])
def test_invalid_values_raise_usage_error(item, word):
    with pytest.raises(UsageError, match=word.replace(".", r"\.")):
        apply_overrides(RunConfig(), [item])


@pytest.mark.parametrize("item,word", [
    ("sample.temperature=-1", "temperature"),
    ("sample.temperature=nan", "temperature"),
    ("sample.top_p=0", "top_p"),
    ("sample.top_p=1.5", "top_p"),
    ("sample.top_k=246", "top_k"),
    ("sample.min_p=1", "sample.min_p"),
    ("sample.min_p=-0.1", "sample.min_p"),
    ("sample.min_p=nan", "sample.min_p"),
    ('sample.explicit=["n_per_class"]', "sample.explicit"),
    ("tune.min_ps=[0.0, 1.0]", "tune.min_ps"),
    ("tune.max_minutes=-1", "tune.max_minutes"),
    ("tune.max_minutes=nan", "tune.max_minutes"),
    ("tune.objective=fid", "tune.objective"),
    ("train.model=histogram", "train.model"),
])
def test_invalid_sampling_values_are_caught_by_validation(item, word):
    # Rejected with the configuration, before a stage runs or config.json is saved.
    with pytest.raises(UsageError, match=word):
        apply_overrides(RunConfig(), [item])


def test_sampling_and_tuning_keys_added_for_min_p_diversity_and_budgets():
    cfg = apply_overrides(RunConfig(), ["sample.min_p=0.05", 'sample.explicit=["temperature", "min_p"]',
                                        "tune.min_ps=[0, 0.1]", "tune.max_minutes=2.5", "tune.objective=balanced",
                                        "train.model=marginals"])
    assert cfg.sample.min_p == 0.05 and cfg.sample.explicit == ["temperature", "min_p"]
    assert cfg.tune.min_ps == [0.0, 0.1] and cfg.tune.max_minutes == 2.5 and cfg.tune.objective == "balanced"
    assert cfg.train.model == "marginals"
    d = RunConfig()
    assert d.sample.min_p == 0.0 and d.sample.explicit == [] and d.tune.min_ps == [0.0] and d.tune.max_minutes == 0.0


def test_zero_steps_are_allowed():
    cfg = apply_overrides(RunConfig(), ["fit.steps=0", "train.warmup_iters=0", "sample.top_k=0", "sample.temperature=0"])
    assert cfg.fit.steps == 0 and cfg.train.warmup_iters == 0 and cfg.sample.temperature == 0.0


def test_from_dict_rejects_unknown_keys_and_types():
    with pytest.raises(UsageError, match="config.json"):
        from_dict({"train": {"max_iters": "many"}}, source="config.json")
    with pytest.raises(UsageError, match="train.wat"):
        from_dict({"train": {"wat": 1}}, source="config.json")


# --- preset inheritance -------------------------------------------------------------------------------------

SNAPSHOTS = Path(__file__).parent / "data" / "preset_snapshots.json"


@pytest.mark.parametrize("name", config.PRESETS)
def test_every_preset_resolves_exactly_to_its_snapshot(name):
    # Taken before presets could inherit (fashion = base "cpu" + its differences): the resolved values are pinned.
    assert load_preset(name).to_dict() == json.loads(SNAPSHOTS.read_text())[name]


def test_user_preset_inherits_from_a_builtin(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "cpu"\n[train]\nmax_iters = 7\n')
    cfg = load_preset(str(mine))
    expected = load_preset("cpu")
    expected.train.max_iters = 7
    assert cfg == expected


def test_base_chain_of_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.toml").write_text('base = "seed"\n[train]\nlr = 1e-4\n[sample]\nn_per_class = 3\n')
    (tmp_path / "sub" / "b.toml").write_text('base = "../a.toml"\n[train]\nmax_iters = 9\n')
    cfg = load_preset(str(tmp_path / "sub" / "b.toml"))
    seed = load_preset("seed")
    assert (cfg.train.n_layer, cfg.train.head_dim) == (seed.train.n_layer, seed.train.head_dim)
    assert cfg.train.lr == 1e-4 and cfg.train.max_iters == 9 and cfg.sample.n_per_class == 3


def test_base_cycle_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n[train]\nmax_iters = 1\n')
    with pytest.raises(UsageError, match=r"b\.toml: base = 'a\.toml' makes a cycle") as info:
        load_preset(str(tmp_path / "a.toml"))
    assert "\n" not in str(info.value)
    (tmp_path / "self.toml").write_text('base = "self.toml"\n')
    with pytest.raises(UsageError, match="self.toml.*cycle"):
        load_preset(str(tmp_path / "self.toml"))


def test_unknown_base_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "gpu"\n')
    with pytest.raises(UsageError, match=r"bad\.toml: base = 'gpu': unknown preset 'gpu' \(choose from cpu, seed"):
        load_preset(str(bad))
    bad.write_text('base = "missing.toml"\n')
    with pytest.raises(UsageError, match=r"bad\.toml: base = 'missing\.toml': preset file .*missing\.toml: not found"):
        load_preset(str(bad))
    bad.write_text('base = 3\n')
    with pytest.raises(UsageError, match=r"bad\.toml: base must be"):
        load_preset(str(bad))
    # An error inside a base names the base file.
    (tmp_path / "parent.toml").write_text("[train]\nmax_iter = 1\n")
    bad.write_text('base = "parent.toml"\n')
    with pytest.raises(UsageError, match=r"parent\.toml: unknown setting 'train\.max_iter'"):
        load_preset(str(bad))


def test_vocab_check_uses_the_datas_class_count():
    validation.check_vocab_size(65536 - 1 - 20, 20)
    with pytest.raises(UsageError, match="tokenize.num_codes is too large.*21 classes"):
        validation.check_vocab_size(65536 - 1 - 20, 21)


def test_defaults_stay_the_values_that_reproduce_older_config_json():
    # TrainConfig's defaults are not the cpu preset's: keys an older config.json lacks take them. This one, of
    # the model shipped on 2026-11-26, predates the levers and budgets, and must still read as trained.
    saved = Path(__file__).parent / "data" / "pre_levers_config.json"
    tables = json.loads(saved.read_text())
    assert "class_embed" not in tables["train"] and "max_minutes" not in tables["train"]
    cfg = validate(from_dict(tables, source=str(saved)))
    t = cfg.train
    assert (t.class_embed, t.pos_bias, t.pos_bias_lr_mult, t.max_minutes) == (False, "none", 1.0, 0.0)
    assert cfg.tune.max_minutes == 0.0 and cfg.tune.min_ps == [0.0] and cfg.sample.min_p == 0.0


@pytest.mark.parametrize("items", [["tune.top_ks=[0, 300]"], ["tune.temperatures=[]"], ["tune.min_accuracy=1.5"],
                                   ["tune.search=walk"], ["tune.n_per_class=0"], ["tune.min_ps=[0.5, 1.0]"],
                                   ["tune.objective=balanced", "tune.n_per_class=1"]])
def test_tune_settings_have_one_check_for_config_and_tune(items):
    # config validation and tune.candidate_settings run the same check (tune.check_tune): the same message.
    from nefgpt.tune import candidate_settings

    with pytest.raises(UsageError) as at_config:
        apply_overrides(RunConfig(), items)
    unchecked = RunConfig()  # the same values, set without validation
    for item in items:
        dotted, raw = item.split("=", 1)
        value = raw if raw.isalpha() else config.tomllib.loads(f"v = {raw}")["v"]
        config.set_value(unchecked, dotted, value, source="test")
    with pytest.raises(UsageError) as at_tune:
        candidate_settings(unchecked.tune, num_codes=unchecked.tokenize.num_codes)
    assert str(at_config.value) == str(at_tune.value)
