"""The command line: every stage at toy size, skipping, and one-line errors on bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from nefgpt.artifacts import load_tensors
from nefgpt.cli import main
from nefgpt.errors import UsageError

ARTIFACTS = ("config.json", "split.json", "nefs.safetensors", "tokenizer.safetensors", "tokens.safetensors",
             "tokenizer.json", "ckpt.pt", "train.json", "train_log.csv", "loss.png", "samples.safetensors",
             "samples.npz", "samples_grid.png", "metrics.json")


def toy_settings(npz: Path) -> list[str]:
    sets = [
        f"data.dataset=npz:{npz}", "data.heldout_per_class=2", "data.tune_per_class=1",
        "fit.steps=10", "fit.anchor_steps=20",
        "tokenize.max_iters=10",
        "train.max_iters=6", "train.n_layer=1", "train.n_embd=32", "train.n_head=2", "train.batch_size=8",
        "train.warmup_iters=2", "train.eval_interval=3", "train.ckpt_interval=3",
        "tune.temperatures=[1.0]", "tune.top_ks=[0, 3]", "tune.top_ps=[1.0]", "tune.n_per_class=1",
        "tune.objective=nna_gap", "tune.max_minutes=0",  # one sample per class: no diversity to measure
        "tune.samples_per_class=0",
        "sample.n_per_class=2", "sample.critic_fields=0",
        "evaluate.classifier_epochs=1",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str, *words: str) -> str:
    """The run ends with exactly one `nefgpt: error:` line naming `words`, and shows no traceback."""
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("nefgpt: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    assert "Traceback" not in err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, npz_writer):
    base = tmp_path_factory.mktemp("smoke")
    npz = npz_writer(base / "digits.npz", per_class=6)
    run = base / "run"
    argv = ["run", "--out", run, "--quiet", *toy_settings(npz)]
    rc, out, err = call(argv)
    return {"run": run, "rc": rc, "out": out, "err": err, "argv": argv, "npz": npz}


@pytest.fixture
def run_copy(smoke, tmp_path) -> Path:
    """A private copy of the finished smoke run (mtimes kept, so stages stay up to date)."""
    assert smoke["rc"] == 0, smoke["err"]
    dst = tmp_path / "run"
    shutil.copytree(smoke["run"], dst)
    return dst


def mtimes(run: Path) -> dict[str, int]:
    # `run` rewrites its report every time (it is cheap and reflects any baseline runs added since).
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name not in ("config.json", "report.html")}


def test_run_makes_every_artifact(smoke):
    run = smoke["run"]
    assert smoke["rc"] == 0, smoke["err"]
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
        assert (run / name).stat().st_size > 0, name
    assert not (run / "fit_chunks").exists()
    for stage in ("fit", "tokenize", "train", "sample", "evaluate"):
        assert f"[{stage}] running" in smoke["err"] and f"[{stage}] done" in smoke["err"]
    assert "nefgpt: error" not in smoke["err"]

    nefs, _ = load_tensors(run / "nefs.safetensors")
    assert nefs["weights"].shape == (60, 561) and "psnr" in nefs and "labels" in nefs
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["max_iters"] == 6 and cfg["data"]["dataset"] == f"npz:{smoke['npz']}"

    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_args"]["n_layer"] == 1 and ckpt["model_args"]["vocab_size"] == 256
    log = (run / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("iter,") and [ln.split(",")[0] for ln in log[1:]] == ["3", "6"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "samples_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with np.load(run / "samples.npz", allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (20, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    samples, meta = load_tensors(run / "samples.safetensors")
    assert samples["tokens"].shape == (20, 561) and int(samples["tokens"].max()) < 245
    assert meta["tokenizer_id"] == ckpt["tokenizer_id"]

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("mmd", "cov", "1nna", "accuracy", "cross_entropy", "classifier_heldout_accuracy"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["cov"] <= 1 and 0 <= metrics["1nna"] <= 1
    assert "| quantity | value |" in smoke["out"]  # the summary table on stdout


def test_every_file_of_a_run_has_one_mode(smoke):
    """Every file (artifacts, figures, logs, the lock) gets the mode a plain open() gives: 0o666 minus the umask.

    safetensors' save_file recreates its file as 0600, so atomic writes set the mode just before the rename.
    """
    assert smoke["rc"] == 0, smoke["err"]
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(smoke["run"])): oct(p.stat().st_mode & 0o7777)
             for p in smoke["run"].rglob("*") if p.is_file()}
    assert {"anchor.safetensors", "nefs.safetensors", "samples.safetensors", "ckpt.pt", ".nefgpt.lock"} <= set(modes)
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


def test_second_run_skips_everything(smoke, run_copy):
    before = mtimes(run_copy)
    argv = [run_copy if a == smoke["run"] else a for a in smoke["argv"]]
    for args in (argv, ["run", "--out", run_copy, "--quiet"]):  # same command; then the saved config
        rc, out, err = call(args)
        assert rc == 0, err
        for stage in ("fit", "tokenize", "train", "sample", "evaluate"):
            assert f"[{stage}] up to date, skipped" in err
        assert "running" not in err
        assert mtimes(run_copy) == before
        assert "| quantity | value |" in out


def test_single_stage_force_redoes_it(run_copy):
    before = mtimes(run_copy)
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--force"])
    assert rc == 0, err
    after = mtimes(run_copy)
    assert after["samples.npz"] > before["samples.npz"]
    assert after["ckpt.pt"] == before["ckpt.pt"]
    # Same seed, same samples.
    with np.load(run_copy / "samples.npz") as z:
        assert z["images"].shape == (20, 28, 28)


def test_sample_with_a_critic_trains_it_once_and_records_it(run_copy):
    argv = ["sample", "--out", run_copy, "--quiet", "--set", "sample.critic_fields=4", "--set",
            "sample.critic_quantile=0.3"]
    rc, _, err = call(argv)
    assert rc == 0, err
    critic = run_copy / "critic.safetensors"
    made = critic.stat().st_mtime_ns
    meta = load_tensors(run_copy / "samples.safetensors")[1]
    assert meta["critic"]["n_drawn"] == 40 and meta["critic"]["quantile"] == 0.3
    assert 0 < meta["critic"]["kept_fraction"] <= 1
    assert load_tensors(run_copy / "samples.safetensors")[0]["labels"].tolist() == [c for c in range(10)
                                                                                   for _ in range(2)]
    rc, _, err = call([*argv, "--force"])  # the same setting and seed: the saved critic serves again
    assert rc == 0, err
    assert critic.stat().st_mtime_ns == made
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--set", "sample.critic_quantile=1"])
    assert rc == 2
    assert_one_error_line(err, "sample.critic_quantile")


def test_sample_with_options_resamples(run_copy):
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--temperature", "0", "--label", "3", "-n", "4"])
    assert rc == 0, err
    with np.load(run_copy / "samples.npz") as z:
        assert z["labels"].tolist() == [3, 3, 3, 3]
        greedy = z["images"]
    # Greedy decoding gives one field; rows of one batch may differ in the logits' last bits (row position picks
    # the kernel path on some CPUs), which can flip an exact tie, so nearly every token must agree, not all.
    tokens = load_tensors(run_copy / "samples.safetensors")[0]["tokens"]
    assert (tokens[0] == tokens[3]).float().mean() >= 0.99
    np.testing.assert_allclose(greedy[0], greedy[3], atol=0.05)


def test_missing_run_directory(tmp_path):
    for cmd in ("tokenize", "train", "sample", "evaluate"):
        rc, out, err = call([cmd, "--out", tmp_path / "nope", "--quiet"])
        assert rc == 1
        assert_one_error_line(err, "nope", "run directory not found")
        assert out == ""
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("cmd,missing", [("tokenize", "nefs.safetensors"), ("train", "tokens.safetensors"),
                                         ("sample", "ckpt.pt"), ("evaluate", "samples.safetensors")])
def test_missing_artifact(tmp_path, cmd, missing):
    run = tmp_path / "run"
    run.mkdir()
    rc, _, err = call([cmd, "--out", run, "--quiet"])
    assert rc == 1
    line = assert_one_error_line(err, str(run / missing))
    assert "not found" in line


def test_missing_dataset(tmp_path):
    rc, _, err = call(["fit", "--out", tmp_path / "run", "--quiet", "--set", f"data.dataset=npz:{tmp_path / 'no.npz'}"])
    assert rc == 1
    assert_one_error_line(err, "no.npz")


@pytest.mark.parametrize("name", ["tokenizer.safetensors", "ckpt.pt"])
def test_corrupt_artifact(run_copy, name):
    (run_copy / name).write_bytes(b"this is not a tensor file\x00\xff" * 20)
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--force"])
    assert rc == 1
    assert_one_error_line(err, str(run_copy / name))


def test_truncated_tokens_file(run_copy):
    data = (run_copy / "tokens.safetensors").read_bytes()
    (run_copy / "tokens.safetensors").write_bytes(data[: len(data) // 2])
    rc, _, err = call(["train", "--out", run_copy, "--quiet", "--force"])
    assert rc == 1
    assert_one_error_line(err, "tokens.safetensors")


class RunsShell:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.mark.parametrize("kind", ["plain_pickle", "torch_save_os_system", "torch_save_custom_class"])
def test_pickled_checkpoint_is_refused_without_running_it(run_copy, tmp_path, kind):
    marker = tmp_path / "pwned"
    path = run_copy / "ckpt.pt"
    if kind == "plain_pickle":
        path.write_bytes(pickle.dumps(RunsShell(marker)))
    elif kind == "torch_save_os_system":
        torch.save({"model": RunsShell(marker), "model_args": {}}, path)
    else:
        torch.save({"model": Custom(), "model_args": {}}, path)
    for argv in (["sample", "--out", run_copy, "--quiet", "--force"],
                 ["train", "--out", run_copy, "--quiet", "--force", "--resume"]):
        rc, _, err = call(argv)
        assert rc == 1
        assert_one_error_line(err, str(path))
        assert not marker.exists()


@pytest.mark.parametrize("option,value,word", [
    ("--temperature", "-1", "temperature"),
    ("--temperature", "nan", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-p", "1.5", "top_p"),
    ("--top-k", "-1", "top_k"),
    ("--top-k", "10000", "top_k"),
])
def test_invalid_sampling_options(run_copy, option, value, word):
    config_before = (run_copy / "config.json").read_bytes()
    samples_before = (run_copy / "samples.npz").read_bytes()
    rc, out, err = call(["sample", "--out", run_copy, "--quiet", option, value])
    assert rc == 2
    assert_one_error_line(err, word, value if value != "nan" else "nan")
    # A rejected option changes nothing: the saved config and the earlier samples are kept.
    assert (run_copy / "config.json").read_bytes() == config_before
    assert (run_copy / "samples.npz").read_bytes() == samples_before


def test_top_k_zero_means_off(run_copy):
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--top-k", "0", "-n", "1", "--label", "0"])
    assert rc == 0, err


def test_usage_errors_exit_2(tmp_path):
    rc, _, err = call(["fit", "--out", tmp_path / "r", "--quiet", "--preset", "nope"])
    assert rc == 2
    assert_one_error_line(err, "nope")
    rc, _, err = call(["fit", "--out", tmp_path / "r", "--quiet", "--set", "train.max_iters=-3"])
    assert rc == 2
    assert_one_error_line(err, "train.max_iters")
    rc, _, err = call(["fit", "--out", tmp_path / "r", "--quiet", "--set", "train.nope=1"])
    assert rc == 2
    assert_one_error_line(err, "train.nope")


def test_label_out_of_range(run_copy):
    rc, _, err = call(["sample", "--out", run_copy, "--quiet", "--label", "11"])
    assert rc == 2
    assert_one_error_line(err, "label 11")


def test_debug_shows_the_exception(tmp_path):
    from nefgpt.errors import ArtifactError

    with pytest.raises(ArtifactError):
        call(["sample", "--out", tmp_path / "nope", "--quiet", "--debug"])


def test_entry_point_subprocess(run_copy, tmp_path):
    """The installed `nefgpt` script, on a pickle posing as ckpt.pt: refused, unexecuted, one error line."""
    exe = Path(sys.executable).with_name("nefgpt")
    if not exe.exists():
        exe = Path(shutil.which("nefgpt") or "nefgpt")
    marker = tmp_path / "pwned"
    (run_copy / "ckpt.pt").write_bytes(pickle.dumps(RunsShell(marker)))
    proc = subprocess.run([str(exe), "sample", "--out", str(run_copy), "--quiet"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert not marker.exists()
    # Only the stage's status line and the error: no traceback, no warnings from torch's unpickler.
    assert proc.stderr.splitlines() == ["[sample] running", proc.stderr.splitlines()[-1]]
    line = assert_one_error_line(proc.stderr, str(run_copy / "ckpt.pt"))
    assert "weights_only` set to `False" not in line  # never suggest loading it unsafely


def test_render_draws_any_field_artifact_at_any_resolution(tmp_path, capsys):
    from PIL import Image

    from nefgpt import field
    from nefgpt.artifacts import save_tensors

    spec = field.FieldSpec()
    weights = field.init_random(spec, 5, torch.Generator().manual_seed(0))
    art = tmp_path / "fields.safetensors"
    save_tensors(art, {"weights": weights}, {"field": spec.to_meta()})
    for res in (28, 64):
        png = tmp_path / f"r{res}.png"
        assert main(["render", str(art), "--res", str(res), "-n", "3", "--png", str(png)]) == 0
        width, height = Image.open(png).size
        scale = max(1, 128 // res)
        assert height == res * scale + 4 and width == 3 * (res * scale + 2) + 2

    assert main(["render", str(art), "--res", "4", "--png", str(tmp_path / "x.png")]) == 2
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert main(["render", str(tmp_path / "bad.safetensors"), "--png", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nefgpt: error:") and "bad.safetensors" in err[-1]
    assert not (tmp_path / "x.png").exists()


def test_sample_from_a_pretrained_model_folder(run_copy, tmp_path, monkeypatch):
    from nefgpt import pretrained

    root = tmp_path / "models"
    pretrained.export(run_copy, root / "toy")
    shipped = torch.load(root / "toy" / "ckpt.pt", weights_only=True)
    trained = torch.load(run_copy / "ckpt.pt", weights_only=True)
    assert not {"optimizer", "ema"} & set(shipped) and "ema" in trained  # the smoke run averages (cpu preset)
    assert all(torch.equal(shipped["model"][k], v) for k, v in trained["ema"]["shadow"].items())
    # A run whose tuned setting uses the first-layer prior ships it fitted: the folder has no training tokens.
    from nefgpt.layout import PRIOR_FILE
    from nefgpt.tune import load_best_setting
    assert (root / "toy" / PRIOR_FILE).exists() == (load_best_setting(run_copy)["prior_weight"] > 0)
    monkeypatch.setattr(pretrained, "models_root", lambda: root)
    out = tmp_path / "fresh"
    rc, _, err = call(["sample", "--pretrained", "toy", "--label", "3", "-n", "4", "--out", out, "--quiet"])
    assert rc == 0, err
    tensors, _ = load_tensors(out / "samples.safetensors")
    assert tensors["labels"].tolist() == [3] * 4 and (out / "samples_grid.png").exists()
    rc, _, err = call(["sample", "--pretrained", "nope", "--out", out])
    assert_one_error_line(err, "nope", "toy")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UsageError, match="unfinished.*not a finished, evaluated run"):
        pretrained.export(tmp_path / "unfinished", root / "bad")
