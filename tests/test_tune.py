"""`nefgpt tune`: the candidate settings, the choice of the best one, its files, and `sample` using it."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nefgpt.artifacts import load_tensors, save_json
from nefgpt.cli import main
from nefgpt.config import TuneConfig
from nefgpt.errors import ArtifactError, UsageError
from nefgpt.figures import save_tune_heatmap
from nefgpt.tune import (
    HEATMAP_FILE,
    TABLE_FILE,
    TUNE_FILE,
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
    assert settings[0] == {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "guidance": 1.0}
    assert settings[1] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9, "guidance": 1.0}
    assert settings[-1] == {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "guidance": 1.0}
    assert all(isinstance(s["top_k"], int) and isinstance(s["temperature"], float) for s in settings)
    cfg.budget = 3
    assert candidate_settings(cfg, 245) == settings[:3]


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


def test_best_by_mmd_and_cov():
    rows = [row(mmd=0.3, cov=0.4), row(mmd=0.2, cov=0.2), row(mmd=0.1, cov=0.5, accuracy=0.5)]
    assert choose_best(rows, "mmd", 0.9) == (1, True)
    assert choose_best(rows, "cov", 0.9) == (0, True)
    assert choose_best(rows, "cov", 0.0) == (2, True)


def test_without_an_eligible_setting_the_most_accurate_wins():
    rows = [row(accuracy=0.5, nna=0.5), row(accuracy=0.7, nna=0.99), row(accuracy=0.7, nna=0.6)]
    assert choose_best(rows, "nna_gap", 0.9) == (1, False)  # the first of the equally accurate


def test_table_has_one_line_per_setting_and_the_best_in_bold():
    rows = [row(k=0, p=1.0, accuracy=0.5), row(k=3, p=0.9, accuracy=0.94)]
    lines = format_table(rows, 1, "nna_gap").splitlines()
    assert len(lines) == 4 and lines[0].startswith("| guidance | T | top-k | top-p |")
    assert "**" not in lines[2] and lines[2].startswith("| 1 | 1 | – | – | 50.0% |")
    assert lines[3].startswith("| **1** | **1** | **3** | **0.9** | **94.0%** |")


def test_load_best_setting_reads_types_and_names_a_bad_file(tmp_path):
    save_json(tmp_path / TUNE_FILE, {"best": {"temperature": 1, "top_k": 3.0, "top_p": 0.9, "accuracy": 0.9}})
    # A tune.json written before guidance was tuned means plain conditional sampling.
    assert load_best_setting(tmp_path) == {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "guidance": 1.0}
    save_json(tmp_path / TUNE_FILE, {"settings": []})
    with pytest.raises(ArtifactError, match="tune.json"):
        load_best_setting(tmp_path)


def test_heatmap_leaves_untried_cells_blank(tmp_path):
    rows = [row(t=0.8, k=0), row(t=0.8, k=3), row(t=1.0, k=3), row(t=1.0, k=3, p=0.9)]  # (1.0, off) never tried
    save_tune_heatmap(tmp_path / "h.png", rows, rows[1])
    with Image.open(tmp_path / "h.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 150


# --- the command line, on a tiny run ---------------------------------------------------------------------

TOY = [
    "data.heldout_per_class=2", "data.tune_per_class=2", "fit.steps=10", "fit.anchor_steps=20",
    "tokenize.max_iters=10", "train.max_iters=6", "train.n_layer=1", "train.n_embd=32", "train.n_head=2",
    "train.batch_size=8", "train.warmup_iters=2", "train.eval_interval=3", "train.ckpt_interval=3",
    "sample.n_per_class=2", "evaluate.classifier_epochs=1",
    "tune.temperatures=[0.5, 1.0]", "tune.top_ks=[0, 2]", "tune.top_ps=[1.0]", "tune.min_accuracy=0.0",
    "tune.guidances=[1.0]", "train.p_uncond=0.0",
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
    return {k: meta[k] for k in ("temperature", "top_k", "top_p", "guidance", "use_tuned")}


def test_tune_writes_every_setting_and_the_best(tuned):
    result = json.loads((tuned / TUNE_FILE).read_text())
    rows = result["settings"]
    assert [(r["temperature"], r["top_k"], r["top_p"]) for r in rows] == [
        (0.5, 0, 1.0), (0.5, 2, 1.0), (1.0, 0, 1.0), (1.0, 2, 1.0)]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["cov"] <= 1 and 0 <= r["1nna"] <= 1 and r["mmd"] >= 0
        assert r["objective"] == pytest.approx(abs(r["1nna"] - 0.5))
        assert set(r["per_class_accuracy"]) == {str(c) for c in range(10)}
    # Equal-size sets: 2 samples per class against the 2 tuning fields per class.
    assert result["n_generated"] == result["n_reference"] == 20
    best = result["best"]
    assert best["qualified"] is True and best["objective"] == min(r["objective"] for r in rows)
    assert (tuned / "classifier.safetensors").is_file()  # trained here, for evaluate to reuse
    assert (tuned / HEATMAP_FILE).read_bytes()[:8] == PNG
    table = (tuned / TABLE_FILE).read_text().splitlines()
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
    assert load_best_setting(run_copy) == {"temperature": 0.6, "top_k": 1, "top_p": 0.8, "guidance": 1.0}
    rc, err = call("sample", "--out", run_copy, "--quiet")
    assert rc == 0 and "[sample] running" in err, err
    assert sampling_used(run_copy) == {"temperature": 0.6, "top_k": 1, "top_p": 0.8, "guidance": 1.0, "use_tuned": True}

    # A setting given by hand wins over the tuned one.
    rc, err = call("sample", "--out", run_copy, "--quiet", "--top-k", "4")
    assert rc == 0, err
    assert sampling_used(run_copy) == {"temperature": 1.0, "top_k": 4, "top_p": 1.0, "guidance": 1.0, "use_tuned": False}


def test_evaluate_writes_its_figures(run_copy):
    for stage in ("sample", "evaluate"):
        rc, err = call(stage, "--out", run_copy, "--quiet")
        assert rc == 0, err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["figures"] == ["samples_nearest.png", "confusion.png", "generation.gif"]
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
