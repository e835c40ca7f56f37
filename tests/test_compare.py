"""`nefgpt compare`: one table row per evaluated run plus the real-data ceiling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nefgpt.artifacts import save_json, save_tensors
from nefgpt.cli import main
from nefgpt.compare import compare_runs
from nefgpt.config import RunConfig
from nefgpt.errors import ArtifactError


def fake_metrics(accuracy: float = 0.9, mmd: float = 0.25) -> dict:
    """A metrics.json with the structure evaluate.run_evaluate writes (2 classes)."""
    per_class = {str(c): {"n_generated": 5, "n_reference": 5, "mmd": mmd, "cov": 0.4, "1nna": 0.8,
                          "accuracy": accuracy, "cross_entropy": 0.3} for c in range(2)}
    return {
        "n_generated": 10, "n_reference": 10, "reference": "rendered held-out fields", "distance": "(1 - SSIM) / 2",
        "mmd": mmd, "cov": 0.4, "1nna": 0.8, "accuracy": accuracy, "cross_entropy": 0.3,
        "classifier_heldout_accuracy": 0.99, "per_class": per_class, "confusion": [[4, 1], [0, 5]],
        "ceiling": {"mmd": 0.19, "cov": 0.58, "1nna": 0.49, "accuracy": 0.998, "cross_entropy": 0.0175,
                    "description": "rendered training fields vs rendered held-out fields, same sizes"},
        "novelty": {"threshold_heldout_p5": 0.04, "near_copy_rate": 0.066, "heldout_near_copy_rate": 0.05,
                    "generated_nn_distance": {}, "heldout_nn_distance": {}},
        "nearest_train_index": list(range(10)), "evaluate_seconds": 1.0,
    }


def make_run(path: Path, model: str = "gpt", *, heldout: list[int] = (0, 3), dataset: str = "mnist",
             seconds_per_field: float | None = 0.0123, train_seconds: float | None = 42.0,
             metrics: dict | None = None) -> Path:
    """A run directory with the artifacts compare and report read (no real fields)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig().to_dict()
    cfg["train"]["model"] = model
    save_json(path / "config.json", cfg)
    save_json(path / "split.json", {"dataset": dataset, "image_size": 28, "num_classes": 2,
                                    "indices": [10, 11, 12, 13], "train": [1, 2], "heldout": list(heldout),
                                    "tune": []})
    save_json(path / "metrics.json", metrics if metrics is not None else fake_metrics())
    if train_seconds is not None:
        save_json(path / "train.json", {"iterations": 10, "train_loss": 3.1, "val_loss": 3.2,
                                        "train_seconds": train_seconds})
    meta = {} if seconds_per_field is None else {"seconds_per_field": seconds_per_field}
    save_tensors(path / "samples.safetensors", {"weights": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}, meta)
    return path


def test_two_runs_give_rows_and_ceiling(tmp_path):
    a = make_run(tmp_path / "gpt_run")
    b = make_run(tmp_path / "diff_run", "diffusion", seconds_per_field=None, train_seconds=None,
                 metrics=fake_metrics(accuracy=0.5, mmd=0.3))
    table = compare_runs([a, b])
    lines = table.splitlines()
    assert lines[0].startswith("| method | run | accuracy | CE | MMD")
    assert len(lines) == 2 + 3  # header, rule, two runs, ceiling
    # fake_metrics is a metrics.json from before the diversity ratio was measured: its cells show "–".
    assert lines[2] == "| gpt | gpt_run | 90.0% | 0.300 | 0.2500 | 40.0% | 80.0% | – | 6.6% | 0.0123 | 42.0 |"
    assert lines[3] == "| diffusion | diff_run | 50.0% | 0.300 | 0.3000 | 40.0% | 80.0% | – | 6.6% | – | – |"
    assert lines[4] == "| real-data ceiling | gpt_run | 99.8% | 0.018 | 0.1900 | 58.0% | 49.0% | – | 5.0% | – | – |"
    assert "warning" not in table


def test_diversity_ratio_column(tmp_path):
    m = fake_metrics()
    m["diversity_ratio"] = 0.8125
    m["ceiling"]["diversity_ratio"] = 1.02
    a, b = make_run(tmp_path / "new", metrics=m), make_run(tmp_path / "old")  # old: no diversity ratio
    lines = compare_runs([a, b]).splitlines()
    assert "| 1-NNA (50% ideal) | diversity ratio (1 ideal) | near-copy rate |" in lines[0]
    assert "| 80.0% | 0.812 | 6.6% |" in lines[2] and "| 80.0% | – | 6.6% |" in lines[3]
    assert lines[4].startswith("| real-data ceiling | new |") and "| 49.0% | 1.020 | 5.0% |" in lines[4]
    m["diversity_ratio"] = "high"
    make_run(tmp_path / "bad", metrics=m)
    with pytest.raises(ArtifactError, match="diversity_ratio"):
        compare_runs([tmp_path / "bad"])


def test_writes_markdown_and_json(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", "gaussian", train_seconds=1234.5)
    md, js = tmp_path / "out" / "cmp.md", tmp_path / "out" / "cmp.json"
    table = compare_runs([a, b], md_path=md, json_path=js)
    assert md.read_text() == table + "\n"
    data = json.loads(js.read_text())
    assert data["warnings"] == []
    rows = data["rows"]
    assert [r["kind"] for r in rows] == ["run", "run", "ceiling"]
    assert [r["method"] for r in rows] == ["gpt", "gaussian", "real-data ceiling"]
    assert rows[0]["accuracy"] == 0.9 and rows[0]["1nna"] == 0.8 and rows[0]["near_copy_rate"] == 0.066
    assert rows[0]["seconds_per_field"] == pytest.approx(0.0123) and rows[1]["train_seconds"] == 1234.5
    assert rows[2]["mmd"] == 0.19 and rows[2]["near_copy_rate"] == 0.05 and rows[2]["seconds_per_field"] is None
    assert "| 1234 |" in table or "| 1235 |" in table
    assert not [p for p in md.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_missing_metrics_is_one_line_error(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b")
    (b / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match=r"b/metrics\.json: file not found") as err:
        compare_runs([a, b])
    assert "\n" not in str(err.value)
    with pytest.raises(ArtifactError, match="run directory not found"):
        compare_runs([a, tmp_path / "nope"])


@pytest.mark.parametrize("broken, match", [
    (lambda m: m.pop("mmd"), "missing 'mmd'"),
    (lambda m: m["ceiling"].pop("cov"), "missing 'ceiling.cov'"),
    (lambda m: m.pop("ceiling"), "missing 'ceiling'"),
    (lambda m: m.update(accuracy="high"), "'accuracy' is not a finite number"),
])
def test_incomplete_metrics_are_named(tmp_path, broken, match):
    metrics = fake_metrics()
    broken(metrics)
    run = make_run(tmp_path / "a", metrics=metrics)
    with pytest.raises(ArtifactError, match=match):
        compare_runs([run])


def test_corrupt_metrics_and_samples(tmp_path):
    run = make_run(tmp_path / "a")
    (run / "samples.safetensors").write_bytes(b"\x05")
    with pytest.raises(ArtifactError, match="samples.safetensors: not a readable safetensors file"):
        compare_runs([run])
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="metrics.json: not valid JSON"):
        compare_runs([run])


def test_different_heldout_sets_warn(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", heldout=[0, 2])
    c = make_run(tmp_path / "c", dataset="fashion-mnist")
    js = tmp_path / "cmp.json"
    table = compare_runs([a, b, c], json_path=js)
    warnings = json.loads(js.read_text())["warnings"]
    assert len(warnings) == 2
    assert "b was evaluated against other held-out images than a" in warnings[0]
    assert "dataset 'fashion-mnist'" in warnings[1]
    assert table.count("> warning:") == 2
    assert capsys.readouterr().err.count("nefgpt: warning:") == 2


def test_same_heldout_images_under_other_positions_do_not_warn(tmp_path):
    """split.json's heldout lists positions in `indices`: what must match is the images they point to."""
    a = make_run(tmp_path / "a", heldout=[0, 3])
    b = make_run(tmp_path / "b", heldout=[3, 0])
    assert "warning" not in compare_runs([a, b])


def test_old_config_without_model_is_gpt_and_same_names_are_paths(tmp_path):
    a = make_run(tmp_path / "x" / "run")
    b = make_run(tmp_path / "y" / "run", "copy_noise")
    cfg = json.loads((a / "config.json").read_text())
    del cfg["train"]["model"]
    (a / "config.json").write_text(json.dumps(cfg))
    lines = compare_runs([a, b]).splitlines()
    assert lines[2].startswith(f"| gpt | {a} |") and lines[3].startswith(f"| copy_noise | {b} |")


def test_cli_compare(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", "regression")
    assert main(["compare", str(a), str(b), "--md", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "| regression | b |" in out and "real-data ceiling" in out
    assert (tmp_path / "t.md").is_file()
    (b / "metrics.json").unlink()
    assert main(["compare", str(a), str(b)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nefgpt: error:") and "metrics.json" in err and "\n" not in err


def test_sample_grids_side_by_side(tmp_path):
    from PIL import Image

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", "diffusion")
    for run, shade in ((a, 40), (b, 200)):
        Image.new("RGB", (60, 50), (shade, shade, shade)).save(run / "samples_grid.png")
    compare_runs([a, b], png_path=tmp_path / "grids.png")
    with Image.open(tmp_path / "grids.png") as img:
        assert img.width == 60 + 12 + 60 and img.height == 20 + 50
        # Each run's grid sits in its own column, in the order given.
        assert img.getpixel((30, 45))[0] == 40 and img.getpixel((72 + 30, 45))[0] == 200
    (b / "samples_grid.png").unlink()
    with pytest.raises(ArtifactError, match="samples_grid.png"):
        compare_runs([a, b], png_path=tmp_path / "grids2.png")
