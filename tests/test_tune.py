"""`nefgpt tune`: the candidate settings, the choice of the best one, its files, and `sample` using it."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nefgpt.artifacts import load_tensors, save_json
from nefgpt.cli import main
from nefgpt.config import TuneConfig
from nefgpt.errors import ArtifactError, UsageError
from nefgpt.figures import _tune_axes, save_tune_heatmap
from nefgpt.layout import TUNE_FILE, TUNE_HEATMAP_FILE, TUNE_TABLE_FILE
from nefgpt.objectives import OBJECTIVES
from nefgpt.validation import SAMPLING_KEYS
from nefgpt.tune import (
    candidate_settings,
    choose_best,
    format_table,
    load_best_setting,
)

PNG = b"\x89PNG\r\n\x1a\n"


def row(t=1.0, k=0, p=1.0, accuracy=0.95, nna=0.8, mmd=0.2, cov=0.3, objective=0.0) -> dict:
    return {"temperature": t, "top_k": k, "top_p": p, "accuracy": accuracy, "1nna": nna, "mmd": mmd, "cov": cov,
            "cross_entropy": 0.5, "objective": objective}


def test_candidate_settings_cover_the_grid_in_order_without_duplicates():
    cfg = TuneConfig(temperatures=[0.8, 1.0], top_ks=[0, 3, 3], top_ps=[1.0, 0.9])
    settings = candidate_settings(cfg, num_codes=245)
    assert len(settings) == 8
    off = {"min_p": 0.0, "guidance": 1.0, "oversample": 1.0, "prior_weight": 0.0, "prior_components": 1, "prior_dims": 0, "prior_gpt_weight": 1.0,
           "prior_positions": "first_layer", "prior_component_draw": "posterior"}
    assert settings[0] == {"temperature": 0.8, "top_k": 0, "top_p": 1.0, **off}
    assert settings[1] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9, **off}
    assert settings[-1] == {"temperature": 1.0, "top_k": 3, "top_p": 0.9, **off}
    assert all(isinstance(s["top_k"], int) and isinstance(s["temperature"], float) for s in settings)
    cfg.budget = 3
    assert candidate_settings(cfg, 245) == settings[:3]


def test_the_prior_s_shape_is_searched_only_where_the_prior_is_on():
    cfg = TuneConfig(temperatures=[1.0], top_ks=[0], top_ps=[1.0], prior_weights=[0.0, 1.0], prior_components=[1, 4],
                     prior_dims=[32], prior_gpt_weights=[0.5, 1.0])
    settings = candidate_settings(cfg, num_codes=245)
    shapes = [(s["prior_weight"], s["prior_components"], s["prior_dims"], s["prior_gpt_weight"]) for s in settings]
    assert shapes == [(0.0, 1, 0, 1.0), (1.0, 1, 32, 0.5), (1.0, 1, 32, 1.0), (1.0, 4, 32, 0.5), (1.0, 4, 32, 1.0)]
    cfg = TuneConfig(temperatures=[1.0], top_ks=[0], top_ps=[1.0], prior_weights=[0.0, 1.0],
                     prior_positions=["first_layer", "all"])
    settings = candidate_settings(cfg, num_codes=245)
    assert [(s["prior_weight"], s["prior_positions"]) for s in settings] == [
        (0.0, "first_layer"), (1.0, "first_layer"), (1.0, "all")]
    with pytest.raises(UsageError, match="prior_dims"):
        candidate_settings(TuneConfig(prior_weights=[1.0], prior_components=[4], prior_dims=[0]), 245)


def test_min_p_is_searched_with_the_other_dimensions():
    cfg = TuneConfig(temperatures=[0.5, 0.7], top_ks=[0], top_ps=[1.0], min_ps=[0.0, 0.05, 0.1], guidances=[1.0])
    settings = candidate_settings(cfg, num_codes=245)
    # Temperatures below 1 without top-k are plain settings like any other; min-p varies fastest.
    assert [(s["temperature"], s["min_p"]) for s in settings] == [
        (0.5, 0.0), (0.5, 0.05), (0.5, 0.1), (0.7, 0.0), (0.7, 0.05), (0.7, 0.1)]
    assert all(s["top_k"] == 0 and isinstance(s["min_p"], float) for s in settings)
    cfg.search, cfg.budget = "random", 4
    drawn = candidate_settings(cfg, 245)
    assert len(drawn) == 4 and all(s in settings for s in drawn)


def test_oversample_varies_fastest_and_is_checked():
    cfg = TuneConfig(temperatures=[0.7], top_ks=[0], top_ps=[1.0], min_ps=[0.0, 0.05], oversamples=[1, 2])
    assert [(s["min_p"], s["oversample"]) for s in candidate_settings(cfg, 245)] == [
        (0.0, 1.0), (0.0, 2.0), (0.05, 1.0), (0.05, 2.0)]
    with pytest.raises(UsageError, match="tune.oversamples"):
        candidate_settings(TuneConfig(oversamples=[0.5]), 245)


def test_random_search_draws_a_seeded_subset_of_the_grid():
    grid = candidate_settings(TuneConfig(temperatures=[0.5, 0.8, 1.0], top_ks=[0, 3, 6], top_ps=[1.0, 0.9]), 245)
    cfg = TuneConfig(temperatures=[0.5, 0.8, 1.0], top_ks=[0, 3, 6], top_ps=[1.0, 0.9], search="random", budget=5)
    drawn = candidate_settings(cfg, 245)
    assert len(drawn) == 5 and all(s in grid for s in drawn)
    assert len({tuple(s.values()) for s in drawn}) == 5
    assert candidate_settings(cfg, 245) == drawn  # same seed, same draw
    cfg.seed = 1
    assert candidate_settings(cfg, 245) != drawn
    cfg.budget = 0
    assert sorted(map(str, candidate_settings(cfg, 245))) == sorted(map(str, grid))


@pytest.mark.parametrize("change, word", [
    ({"top_ks": [0, 300]}, "top_k"), ({"top_ps": [0.0]}, "top_p"), ({"temperatures": [-1.0]}, "temperature"),
    ({"temperatures": []}, "tune.temperatures"), ({"min_accuracy": 1.5}, "tune.min_accuracy"),
    ({"objective": "fid"}, "tune.objective"), ({"guidances": [-1.0]}, "guidance"), ({"guidances": []}, "tune.guidances"),
    ({"min_ps": [1.0]}, "min_p"), ({"min_ps": [-0.1]}, "min_p"), ({"min_ps": []}, "tune.min_ps"),
    ({"max_minutes": -1.0}, "tune.max_minutes"), ({"max_minutes": float("nan")}, "tune.max_minutes"),
    ({"objective": "balanced", "n_per_class": 1}, "tune.n_per_class"),
])
def test_bad_settings_are_refused_before_sampling(change, word):
    with pytest.raises(UsageError, match=word):
        candidate_settings(TuneConfig(**change), num_codes=245)


def test_best_is_the_smallest_nna_gap_among_accurate_settings():
    rows = [row(nna=0.52, accuracy=0.6), row(nna=0.9, accuracy=0.99), row(nna=0.7, accuracy=0.92),
            row(nna=0.3, accuracy=0.91)]
    # Row 0 has the smallest gap but is not accurate enough; row 2's gap 0.2 ties row 3's, and row 2 is more accurate.
    assert choose_best(rows, "nna_gap", 0.9) == (2, True)
    assert choose_best(rows, "nna_gap", 0.5) == (0, True)
    assert choose_best(rows, "accuracy", 0.9) == (1, True)


def test_without_an_accurate_setting_the_margin_lets_the_objective_choose():
    rows = [row(nna=0.9, accuracy=0.74), row(nna=0.77, accuracy=0.71), row(nna=0.6, accuracy=0.5)]
    assert choose_best(rows, "nna_gap", 0.85) == (0, False)  # margin 0: the most accurate, as before
    assert choose_best(rows, "nna_gap", 0.85, fallback_margin=0.05) == (1, False)
    assert choose_best(rows, "nna_gap", 0.85, fallback_margin=0.3) == (2, False)
    assert choose_best(rows, "nna_gap", 0.7, fallback_margin=0.3) == (1, True)  # a reachable floor wins over it


def test_best_by_mmd_and_cov():
    rows = [row(mmd=0.3, cov=0.4), row(mmd=0.2, cov=0.2), row(mmd=0.1, cov=0.5, accuracy=0.5)]
    assert choose_best(rows, "mmd", 0.9) == (1, True)
    assert choose_best(rows, "cov", 0.9) == (0, True)
    assert choose_best(rows, "cov", 0.0) == (2, True)


def test_best_by_diversity_and_balanced():
    rows = [row(nna=0.55), row(nna=0.7), row(nna=0.6), row(nna=0.5)]
    for r, ratio in zip(rows, [0.5, 0.95, 0.9, None]):
        r["diversity_ratio"] = ratio
    # balanced: 0.05 + 0.5, 0.2 + 0.05, 0.1 + 0.1; the last could not measure diversity and is never preferred.
    assert [OBJECTIVES["balanced"](r) for r in rows[:3]] == pytest.approx([0.55, 0.25, 0.2])
    assert OBJECTIVES["balanced"](rows[3]) == float("inf")
    assert choose_best(rows, "balanced", 0.9) == (2, True)
    assert choose_best(rows, "diversity", 0.9) == (1, True)
    assert choose_best(rows, "nna_gap", 0.9) == (3, True)
    # Still subject to min_accuracy.
    rows[2]["accuracy"] = 0.5
    assert choose_best(rows, "balanced", 0.9) == (1, True)


def test_objectives_are_one_list_that_config_validates_against():
    from nefgpt.config import RunConfig, apply_overrides

    for name in OBJECTIVES:
        assert apply_overrides(RunConfig(), [f"tune.objective={name}"]).tune.objective == name
    with pytest.raises(UsageError, match="tune.objective must be one of " + ", ".join(OBJECTIVES)):
        apply_overrides(RunConfig(), ["tune.objective=fid"])


def test_without_an_eligible_setting_the_most_accurate_wins():
    rows = [row(accuracy=0.5, nna=0.5), row(accuracy=0.7, nna=0.99), row(accuracy=0.7, nna=0.6)]
    assert choose_best(rows, "nna_gap", 0.9) == (1, False)  # the first of the equally accurate


def test_table_has_one_line_per_setting_and_the_best_in_bold():
    rows = [row(k=0, p=1.0, accuracy=0.5), {**row(k=3, p=0.9, accuracy=0.94), "min_p": 0.05, "diversity_ratio": 0.8}]
    lines = format_table(rows, 1, "nna_gap").splitlines()
    assert len(lines) == 4 and lines[0].startswith("| guidance | T | top-k | top-p | min-p | oversample | prior |")
    assert "| diversity | nna_gap |" in lines[0]
    # A row without min-p or diversity (a tune.json from before they were tuned) shows them as off / unknown.
    assert "**" not in lines[2] and lines[2].startswith("| 1 | 1 | – | – | – | – | – | 50.0% |")
    assert lines[2].endswith("| – | 0.0000 |")
    assert lines[3].startswith("| **1** | **1** | **3** | **0.9** | **0.05** | **–** | **–** | **94.0%** |")
    assert lines[3].endswith("| **0.800** | **0.0000** |")


def test_load_best_setting_reads_types_and_names_a_bad_file(tmp_path):
    save_json(tmp_path / TUNE_FILE, {"best": {"temperature": 1, "top_k": 3.0, "top_p": 0.9, "accuracy": 0.9}})
    # A tune.json written before guidance, min-p and oversampling were tuned means plain conditional sampling.
    assert load_best_setting(tmp_path) == {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "min_p": 0.0, "guidance": 1.0,
                                           "oversample": 1.0, "prior_weight": 0.0, "prior_components": 1, "prior_dims": 0, "prior_gpt_weight": 1.0,
           "prior_positions": "first_layer", "prior_component_draw": "posterior"}
    save_json(tmp_path / TUNE_FILE, {"best": {"temperature": 0.7, "top_k": 0, "top_p": 1, "min_p": 0.1,
                                              "guidance": 2, "oversample": 3}})
    assert load_best_setting(tmp_path) == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.1, "guidance": 2.0,
                                           "oversample": 3.0, "prior_weight": 0.0, "prior_components": 1, "prior_dims": 0, "prior_gpt_weight": 1.0,
           "prior_positions": "first_layer", "prior_component_draw": "posterior"}
    save_json(tmp_path / TUNE_FILE, {"settings": []})
    with pytest.raises(ArtifactError, match="tune.json"):
        load_best_setting(tmp_path)


def test_heatmap_leaves_untried_cells_blank(tmp_path):
    rows = [row(t=0.8, k=0), row(t=0.8, k=3), row(t=1.0, k=3), row(t=1.0, k=3, p=0.9)]  # (1.0, off) never tried
    save_tune_heatmap(tmp_path / "h.png", rows, rows[1])
    with Image.open(tmp_path / "h.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 150


def test_heatmap_axes_are_the_dimensions_that_vary():
    grid = lambda **dims: [{**row(t=t, k=k), "guidance": g, "min_p": m}  # noqa: E731
                           for g in dims.get("g", [1.0]) for t in dims.get("t", [1.0])
                           for k in dims.get("k", [0]) for m in dims.get("m", [0.0])]
    assert _tune_axes(grid(t=[0.8, 1.0], k=[0, 3])) == ("temperature", "top_k")
    assert _tune_axes(grid(g=[1.0, 2.0], k=[0, 3])) == ("guidance", "top_k")
    # No top-k axis: temperature x guidance (the presets' guidance grids at T < 1, without top-k).
    assert _tune_axes(grid(g=[1.0, 2.0, 3.0], t=[0.7, 0.85, 1.0])) == ("temperature", "guidance")
    assert _tune_axes(grid(t=[0.7, 1.0], m=[0.0, 0.1])) == ("temperature", "min_p")
    assert _tune_axes(grid(m=[0.0, 0.1])) == ("min_p", "top_k")
    assert _tune_axes(grid()) == ("temperature", "top_k")


@pytest.mark.parametrize("dims", [dict(g=[1.0, 2.0], t=[0.7, 1.0], k=[0, 3], m=[0.0, 0.1]),
                                  dict(g=[1.0, 2.0, 3.0], t=[0.7, 1.0]), dict(m=[0.0, 0.05, 0.1])])
def test_heatmap_draws_when_several_dimensions_vary(tmp_path, dims):
    rows = [{**row(t=t, k=k, nna=0.5 + 0.1 * k / 3, accuracy=0.9 - 0.1 * (g - 1)), "guidance": g, "min_p": m,
             "diversity_ratio": 0.5 + t / 2 - m}
            for g in dims.get("g", [1.0]) for t in dims.get("t", [1.0]) for k in dims.get("k", [0])
            for m in dims.get("m", [0.0])]
    rows[-1]["diversity_ratio"] = None  # not measured: a blank cell
    save_tune_heatmap(tmp_path / "h.png", rows, rows[len(rows) // 2])
    with Image.open(tmp_path / "h.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 150


# --- the command line, on a tiny run ---------------------------------------------------------------------

TOY = [
    "data.heldout_per_class=2", "data.tune_per_class=2", "fit.steps=10", "fit.anchor_steps=20",
    "tokenize.max_iters=10", "train.max_iters=6", "train.n_layer=1", "train.n_embd=32", "train.n_head=2",
    "train.batch_size=8", "train.warmup_iters=2", "train.eval_interval=3", "train.ckpt_interval=3",
    "sample.n_per_class=2", "evaluate.classifier_epochs=1",
    "tune.temperatures=[0.5, 1.0]", "tune.top_ks=[0, 2]", "tune.top_ps=[1.0]", "tune.min_accuracy=0.0",
    "tune.guidances=[1.0]", "tune.prior_weights=[0.0]", "tune.min_ps=[0.0]", "tune.max_minutes=0",
    "tune.objective=nna_gap", "train.p_uncond=0.0", "tune.samples_per_class=0", "sample.critic_fields=0",
]


def call(*argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, npz_writer) -> Path:
    base = tmp_path_factory.mktemp("tune")
    npz = npz_writer(base / "digits.npz", per_class=7)
    run = base / "run"
    rc, err = call("fit", "--out", run, "--quiet", *sets(f"data.dataset=npz:{npz}", *TOY))
    assert rc == 0, err
    for stage in ("tokenize", "train", "tune"):
        rc, err = call(stage, "--out", run, "--quiet")
        assert rc == 0, err
    return run


@pytest.fixture
def run_copy(tuned, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tuned, dst)
    return dst


def sampling_used(run: Path) -> dict:
    meta = load_tensors(run / "samples.safetensors")[1]["sampling"]
    return {k: meta[k] for k in (*SAMPLING_KEYS, "use_tuned")}


def test_tune_writes_every_setting_and_the_best(tuned):
    result = json.loads((tuned / TUNE_FILE).read_text())
    rows = result["settings"]
    assert [(r["temperature"], r["top_k"], r["top_p"]) for r in rows] == [
        (0.5, 0, 1.0), (0.5, 2, 1.0), (1.0, 0, 1.0), (1.0, 2, 1.0)]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["cov"] <= 1 and 0 <= r["1nna"] <= 1 and r["mmd"] >= 0
        assert r["objective"] == pytest.approx(abs(r["1nna"] - 0.5))
        assert set(r["per_class_accuracy"]) == {str(c) for c in range(10)}
        assert isinstance(r["diversity_ratio"], float) and r["diversity_ratio"] >= 0 and r["min_p"] == 0.0
    assert result["n_settings_tried"] == result["n_settings_planned"] == 4
    assert result["stop_reason"] == "all settings tried" and result["max_minutes"] == 0.0
    # Equal-size sets: 2 samples per class against the 2 tuning fields per class.
    assert result["n_generated"] == result["n_reference"] == 20
    best = result["best"]
    assert best["qualified"] is True and best["objective"] == min(r["objective"] for r in rows)
    assert (tuned / "classifier.safetensors").is_file()  # trained here, for evaluate to reuse
    assert (tuned / TUNE_HEATMAP_FILE).read_bytes()[:8] == PNG
    table = (tuned / TUNE_TABLE_FILE).read_text().splitlines()
    assert len(table) == 2 + len(rows) and sum("**" in line for line in table) == 1


def test_tune_samples_reproducibly_and_skips_when_up_to_date(run_copy, tuned):
    rc, err = call("tune", "--out", run_copy, "--quiet")
    assert rc == 0 and "[tune] up to date, skipped" in err
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force")
    assert rc == 0, err
    again = json.loads((run_copy / TUNE_FILE).read_text())["settings"]
    first = json.loads((tuned / TUNE_FILE).read_text())["settings"]
    scores = ("mmd", "cov", "1nna", "accuracy")
    assert [[r[k] for k in scores] for r in again] == [[r[k] for k in scores] for r in first]


def test_sample_uses_the_tuned_setting_until_told_otherwise(run_copy):
    best = load_best_setting(run_copy)
    rc, err = call("sample", "--out", run_copy, "--quiet")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**best, "use_tuned": True}

    # A new tuning result makes the samples stale: `sample` redoes them with the new best.
    rc, err = call("tune", "--out", run_copy, "--quiet",
                   *sets("tune.temperatures=[0.6]", "tune.top_ks=[1]", "tune.top_ps=[0.8]"))
    assert rc == 0, err
    tuned = {"temperature": 0.6, "top_k": 1, "top_p": 0.8, "min_p": 0.0, "guidance": 1.0, "oversample": 1.0,
             "prior_weight": 0.0, "prior_components": 1, "prior_dims": 0, "prior_gpt_weight": 1.0,
           "prior_positions": "first_layer", "prior_component_draw": "posterior"}
    assert load_best_setting(run_copy) == tuned
    rc, err = call("sample", "--out", run_copy, "--quiet")
    assert rc == 0 and "[sample] running" in err, err
    assert sampling_used(run_copy) == {**tuned, "use_tuned": True}

    # A value given by hand wins over the tuned one for its key only; the tuned setting fills in the rest.
    rc, err = call("sample", "--out", run_copy, "--quiet", "--top-k", "4")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**tuned, "top_k": 4, "use_tuned": True}
    rc, err = call("sample", "--out", run_copy, "--quiet", "--min-p", "0.1", *sets("sample.temperature=0.9"))
    assert rc == 0, err
    # The keys given by hand earlier stay (config.json keeps them), so later commands sample the same way.
    assert sampling_used(run_copy) == {**tuned, "top_k": 4, "min_p": 0.1, "temperature": 0.9, "use_tuned": True}
    assert json.loads((run_copy / "config.json").read_text())["sample"]["explicit"] == ["temperature", "top_k", "min_p"]
    rc, err = call("sample", "--out", run_copy, "--quiet")
    assert rc == 0 and "up to date" in err, err
    # use_tuned = true given by hand starts afresh from the whole tuned setting; false turns it off entirely.
    rc, err = call("sample", "--out", run_copy, "--quiet", *sets("sample.use_tuned=true"))
    assert rc == 0, err
    assert sampling_used(run_copy) == {**tuned, "use_tuned": True}
    rc, err = call("sample", "--out", run_copy, "--quiet", *sets("sample.use_tuned=false"))
    assert rc == 0, err
    # (config.json's own values: the fallback, with the values given by hand above)
    assert sampling_used(run_copy) == {"temperature": 0.9, "top_k": 4, "top_p": 1.0, "min_p": 0.1, "guidance": 1.0,
                                       "oversample": 1.0, "prior_weight": 0.0, "prior_components": 1, "prior_dims": 0, "prior_gpt_weight": 1.0,
           "prior_positions": "first_layer", "prior_component_draw": "posterior", "use_tuned": False}


def test_evaluate_writes_its_figures(run_copy):
    for stage in ("sample", "evaluate"):
        rc, err = call(stage, "--out", run_copy, "--quiet")
        assert rc == 0, err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["figures"] == ["samples_nearest.png", "confusion.png", "generation.gif"]
    # The within-class diversity ratio, overall, per class and for the ceiling (training vs held-out fields).
    assert isinstance(metrics["diversity_ratio"], float) and metrics["diversity_ratio"] >= 0
    assert isinstance(metrics["ceiling"]["diversity_ratio"], float) and metrics["ceiling"]["diversity_ratio"] > 0
    ratios = [v["diversity_ratio"] for v in metrics["per_class"].values()]
    assert len(ratios) == 10 and metrics["diversity_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    assert all(v["mean_pairwise_distance"] >= 0 and v["heldout_mean_pairwise_distance"] > 0
               for v in metrics["per_class"].values())
    for name in ("samples_nearest.png", "confusion.png"):
        assert (run_copy / name).read_bytes()[:8] == PNG
    with Image.open(run_copy / "generation.gif") as gif:
        assert gif.format == "GIF" and 30 <= gif.n_frames <= 61
    with np.load(run_copy / "samples.npz") as z:
        assert len(z["labels"]) == 20


def test_tune_without_a_tuning_split_names_split_json(run_copy):
    split = json.loads((run_copy / "split.json").read_text())
    del split["tune"]
    (run_copy / "split.json").write_text(json.dumps(split))
    before = (run_copy / TUNE_FILE).read_bytes()
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force")
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("nefgpt: error:") and "split.json" in err and "tune_per_class" in err
    assert (run_copy / TUNE_FILE).read_bytes() == before  # the old result stays until a new one is complete


def test_guidance_is_tuned_only_for_a_model_trained_with_the_null_class(run_copy):
    before = (run_copy / TUNE_FILE).read_bytes()
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets("tune.guidances=[1, 2]"))
    assert rc == 2 and "p_uncond" in err and str(run_copy / "ckpt.pt") in err
    assert (run_copy / TUNE_FILE).read_bytes() == before

    rc, err = call("train", "--out", run_copy, "--quiet", *sets("train.p_uncond=0.2"))
    assert rc == 0, err
    rc, err = call("tune", "--out", run_copy, "--quiet", *sets("tune.guidances=[1, 2]", "tune.temperatures=[1.0]",
                                                                  "tune.top_ks=[0]"))
    assert rc == 0, err
    rows = json.loads((run_copy / TUNE_FILE).read_text())["settings"]
    assert [r["guidance"] for r in rows] == [1.0, 2.0]
    assert rows[0]["accuracy"] != rows[1]["accuracy"] or rows[0]["mmd"] != rows[1]["mmd"]  # guidance changed samples
    best = load_best_setting(run_copy)
    rc, err = call("sample", "--out", run_copy, "--quiet")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**best, "use_tuned": True}

    # A tuned guidance g != 1 survives an explicit temperature: only that value is replaced.
    rc, err = call("tune", "--out", run_copy, "--quiet", *sets("tune.guidances=[2.5]", "tune.temperatures=[1.0]",
                                                                  "tune.top_ks=[0, 3]"))
    assert rc == 0, err
    best = load_best_setting(run_copy)
    assert best["guidance"] == 2.5
    rc, err = call("sample", "--out", run_copy, "--quiet", "--temperature", "0.7")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**best, "temperature": 0.7, "use_tuned": True}


def test_oversample_is_tuned_and_sampled_for_a_model_trained_with_the_null_class(run_copy):
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets("tune.oversamples=[1, 2]"))
    assert rc == 2 and "oversample" in err and "p_uncond" in err
    rc, err = call("train", "--out", run_copy, "--quiet", *sets("train.p_uncond=0.2"))
    assert rc == 0, err
    rc, err = call("tune", "--out", run_copy, "--quiet", *sets("tune.oversamples=[1, 2]", "tune.temperatures=[1.0]",
                                                                  "tune.top_ks=[0]"))
    assert rc == 0, err
    rows = json.loads((run_copy / TUNE_FILE).read_text())["settings"]
    assert [r["oversample"] for r in rows] == [1.0, 2.0]
    assert "| oversample |" in (run_copy / TUNE_TABLE_FILE).read_text()
    rc, err = call("sample", "--out", run_copy, "--quiet", "--oversample", "3")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**load_best_setting(run_copy), "oversample": 3.0, "use_tuned": True}
    tensors = load_tensors(run_copy / "samples.safetensors")[0]
    assert torch.bincount(tensors["labels"].long()).tolist() == [2] * len(tensors["labels"].unique())  # n_per_class kept


def test_max_minutes_stops_after_the_settings_tried_in_time(run_copy):
    # A budget that is spent before the second setting starts: one setting is tried, and chosen.
    rc, err = call("tune", "--out", run_copy, "--quiet", *sets("tune.max_minutes=1e-9", "tune.search=random"))
    assert rc == 0, err
    result = json.loads((run_copy / TUNE_FILE).read_text())
    assert result["n_settings_planned"] == 4 and result["n_settings_tried"] == len(result["settings"]) == 1
    assert result["stop_reason"] == "max_minutes" and result["max_minutes"] == 1e-9
    planned = TuneConfig(temperatures=[0.5, 1.0], top_ks=[0, 2], top_ps=[1.0], search="random")
    first = candidate_settings(planned, 245)[0]
    assert {k: result["best"][k] for k in first} == first
    table = (run_copy / TUNE_TABLE_FILE).read_text().splitlines()
    assert len(table) == 3 and (run_copy / TUNE_HEATMAP_FILE).read_bytes()[:8] == PNG


def test_balanced_objective_adds_the_diversity_gap(run_copy):
    rc, err = call("tune", "--out", run_copy, "--quiet", *sets("tune.objective=balanced", "tune.min_ps=[0.0, 0.2]",
                                                                  "tune.top_ks=[0]"))
    assert rc == 0, err
    result = json.loads((run_copy / TUNE_FILE).read_text())
    assert result["objective_definition"].startswith("|1-NNA - 0.5| + |1 - within-class diversity ratio|")
    rows = result["settings"]
    assert [(r["temperature"], r["min_p"]) for r in rows] == [(0.5, 0.0), (0.5, 0.2), (1.0, 0.0), (1.0, 0.2)]
    for r in rows:
        assert r["objective"] == pytest.approx(abs(r["1nna"] - 0.5) + abs(1 - r["diversity_ratio"]))
    assert result["best"]["objective"] == min(r["objective"] for r in rows)


def test_the_first_layer_prior_is_tuned_and_sampled(run_copy):
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets(
        "tune.prior_weights=[0, 0.5]", "tune.prior_components=[1, 2]", "tune.prior_dims=[3]",
        "tune.prior_gpt_weights=[0.5]", 'tune.prior_positions=["first_layer"]', "tune.temperatures=[1.0]",
        "tune.top_ks=[0]", 'tune.prior_component_draws=["posterior"]'))
    assert rc == 0, err
    rows = json.loads((run_copy / TUNE_FILE).read_text())["settings"]
    shapes = [(r["prior_weight"], r["prior_components"], r["prior_dims"], r["prior_gpt_weight"]) for r in rows]
    assert shapes == [(0.0, 1, 0, 1.0), (0.5, 1, 3, 0.5), (0.5, 2, 3, 0.5)]
    table = (run_copy / TUNE_TABLE_FILE).read_text()
    assert "| prior |" in table and "0.5 (2×3 GPT 0.5)" in table
    rc, err = call("sample", "--out", run_copy, "--quiet", "--prior-weight", "2")
    assert rc == 0, err
    assert sampling_used(run_copy) == {**load_best_setting(run_copy), "prior_weight": 2.0, "use_tuned": True}
    rc, err = call("sample", "--out", run_copy, "--quiet", *sets("sample.prior_positions=all"))
    assert rc == 0, err
    assert sampling_used(run_copy)["prior_positions"] == "all"
    rc, err = call("sample", "--out", run_copy, "--quiet", "--prior-weight", "-1")
    assert rc == 2 and "prior_weight must be a finite number >= 0" in err


def test_more_samples_per_class_choose_and_the_set_measures_keep_equal_sizes(run_copy, tuned):
    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets("tune.samples_per_class=1"))
    assert rc == 0, err  # at or below the tuning fields' count (2 per class): nothing changes
    scores = ("mmd", "cov", "1nna", "accuracy", "diversity_ratio")
    again = json.loads((run_copy / TUNE_FILE).read_text())["settings"]
    first = json.loads((tuned / TUNE_FILE).read_text())["settings"]
    assert [[r[k] for k in scores] for r in again] == [[r[k] for k in scores] for r in first]

    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets("tune.samples_per_class=3"))
    assert rc == 0, err
    result = json.loads((run_copy / TUNE_FILE).read_text())
    assert result["n_generated"] == 30 and result["n_set_metrics"] == result["n_reference"] == 20
    for r in result["settings"]:  # accuracy over 3 fields of each class
        assert all(v * 3 == pytest.approx(round(v * 3)) for v in r["per_class_accuracy"].values())

    rc, err = call("tune", "--out", run_copy, "--quiet", "--force", *sets("tune.samples_per_class=-1"))
    assert rc == 2 and "tune.samples_per_class" in err
