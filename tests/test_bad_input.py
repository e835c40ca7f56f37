"""Hardening: every bad input of docs/hardening.md ends in one error line, the right exit code, no traceback,
and leaves every artifact of the run directory as it was.

Rows already covered elsewhere (test_cli.py, test_data.py, test_config.py, test_sample.py, test_train.py)
are not repeated here; docs/hardening.md maps each row to all of its tests.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nefgpt import artifacts
from nefgpt.errors import ArtifactError, NefgptError, UsageError
from nefgpt.field import FieldSpec
from test_cli import assert_one_error_line, call, toy_settings


# --- a finished toy run, built once, copied per test ---


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, npz_writer):
    base = tmp_path_factory.mktemp("bad_input")
    npz = npz_writer(base / "digits.npz", per_class=6)
    run = base / "run"
    rc, _, err = call(["run", "--out", run, "--quiet", *toy_settings(npz)])
    assert rc == 0, err
    return run


@pytest.fixture
def run(toy_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(toy_run, dst)  # copy2 keeps mtimes, so every stage stays up to date
    return dst


LOCK = ".nefgpt.lock"  # the CLI's lock file (see test_faults.py) is not an artifact


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtimes of every file; config.json is rewritten (same bytes) by each command, so bytes only."""
    return {str(p.relative_to(run)): (p.read_bytes(), 0 if p.name == "config.json" else p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != LOCK}


def assert_unchanged(run: Path, before: dict) -> None:
    after = snapshot(run)
    assert sorted(after) == sorted(before), set(after) ^ set(before)  # nothing added (no temp files), nothing lost
    for name in before:
        assert after[name] == before[name], f"{name} changed"


def make_stale(run: Path, name: str) -> None:
    """Make `name` newer than everything, so the stage that reads it runs again (without --force)."""
    t = max(p.stat().st_mtime for p in run.iterdir()) + 10
    os.utime(run / name, (t, t))


def rewrite(path: Path, tensors=None, meta=None) -> None:
    """Re-save a safetensors file with changed tensors and/or (JSON-decoded) metadata, bypassing nefgpt."""
    ts = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        md = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    ts = tensors(ts) if tensors else ts
    md = meta(md) if meta else md
    save_file(ts, str(path), metadata={k: json.dumps(v) for k, v in md.items()})


def fails(run: Path, argv: list, code: int, *words: str) -> str:
    rc, out, err = call(argv)
    assert rc == code, err
    assert out == ""
    return assert_one_error_line(err, *words)


# The stage each input belongs to, and the file to make stale so that stage runs again.
STAGE_INPUT = {"nefs.safetensors": ("tokenize", "nefs.safetensors"), "split.json": ("tokenize", "nefs.safetensors"),
               "tokens.safetensors": ("train", "tokens.safetensors"),
               "tokenizer.safetensors": ("sample", "ckpt.pt"), "ckpt.pt": ("sample", "ckpt.pt"),
               "samples.safetensors": ("evaluate", "samples.safetensors")}


def bad_artifact(run: Path, name: str, mutate, *words: str) -> str:
    """Mutate `name`, run the stage that reads it: exit 1, one line naming the file, nothing else changed."""
    path = run / name
    mutate(path)
    cmd, input_name = STAGE_INPUT[name]
    make_stale(run, input_name)
    before = snapshot(run)
    line = fails(run, [cmd, "--out", run, "--quiet"], 1, str(path), *words)
    assert_unchanged(run, before)
    return line


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot an artifact at all\n" * 40)


# --- row 1: the run directory, or the stage's input, is missing ---


@pytest.mark.parametrize("cmd,missing", [("tokenize", "nefs.safetensors"), ("train", "tokens.safetensors"),
                                         ("sample", "ckpt.pt"), ("evaluate", "samples.safetensors")])
def test_missing_input_is_an_error_even_when_outputs_exist(run, cmd, missing):
    (run / missing).unlink()
    before = snapshot(run)
    fails(run, [cmd, "--out", run, "--quiet"], 1, str(run / missing), "not found")
    assert_unchanged(run, before)


def test_missing_run_directory_is_not_created(tmp_path):
    for cmd in ("tokenize", "train", "sample", "evaluate", "run"):
        target = tmp_path / "absent" / "run"
        if cmd == "run":  # `run` starts with fit, which makes the directory: only a missing parent's data fails
            continue
        fails(target, [cmd, "--out", target, "--quiet"], 1, str(target), "run directory not found")
        assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
@pytest.mark.parametrize("cmd", ["fit", "tokenize", "train", "tune", "sample", "evaluate", "run", "pretrained"])
def test_out_that_is_a_file_or_under_one(tmp_path, cmd, kind):
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory\n")
    out = afile if kind == "file" else afile / "sub" / "run"
    argv = ["sample", "--pretrained", "mnist"] if cmd == "pretrained" else [cmd]
    words = ("not a directory", "a file of that name exists") if kind == "file" else (
        "can't be a run directory", f"{afile} is a file, not a directory")
    fails(out, [*argv, "--out", out, "--quiet"], 1, str(out), *words)
    assert afile.read_bytes() == b"not a directory\n" and sorted(tmp_path.iterdir()) == [afile]


# --- row 2: truncated, not the format at all, wrong dtype or shape ---


@pytest.mark.parametrize("name", ["nefs.safetensors", "tokens.safetensors", "ckpt.pt", "samples.safetensors"])
def test_truncated_artifact(run, name):
    bad_artifact(run, name, truncate)


@pytest.mark.parametrize("name", ["nefs.safetensors", "tokens.safetensors", "tokenizer.safetensors", "ckpt.pt",
                                  "samples.safetensors", "split.json"])
def test_artifact_of_another_format(run, name):
    bad_artifact(run, name, garbage)


def test_json_artifact_that_is_valid_json_of_the_wrong_shape(run):
    bad_artifact(run, "split.json", lambda p: p.write_text('{"dataset": "mnist"}'), "missing")


def test_tokens_int64_instead_of_int16(run):
    bad_artifact(run, "tokens.safetensors", lambda p: rewrite(p, lambda t: {**t, "tokens": t["tokens"].long()}),
                 "tokens", "dtype torch.int64", "torch.int16")


def test_tokens_of_the_wrong_shape(run):
    bad_artifact(run, "tokens.safetensors", lambda p: rewrite(p, lambda t: {**t, "tokens": t["tokens"][:-1]}),
                 "don't match")


def test_weights_with_560_columns(run):
    bad_artifact(run, "nefs.safetensors", lambda p: rewrite(p, lambda t: {**t, "weights": t["weights"][:, :560].contiguous()}),
                 "560 columns", "561")


def test_codebook_of_the_wrong_shape(run):
    bad_artifact(run, "tokenizer.safetensors",
                 lambda p: rewrite(p, lambda t: {"codebook": t["codebook"].reshape(5, 49)}), "codebook")


def test_checkpoint_without_a_model(run):
    bad_artifact(run, "ckpt.pt", lambda p: torch.save({"model_args": {}}, p), "'model'")


def test_checkpoint_with_missing_weights(run):
    def drop(p):
        ckpt = torch.load(p, weights_only=True)
        ckpt["model"].pop(next(iter(ckpt["model"])))
        torch.save(ckpt, p)

    bad_artifact(run, "ckpt.pt", drop, "valid GPT")


# --- row 3: the field architecture in an artifact differs from the config or the other artifacts ---


SMALL = FieldSpec(octaves=4, hidden=(8, 8))


def test_nefs_architecture_differs_from_its_weights(run):
    bad_artifact(run, "nefs.safetensors", lambda p: rewrite(p, meta=lambda m: {**m, "field": SMALL.to_meta()}),
                 "561 columns", f"needs {SMALL.num_params}")


def test_tokenizer_architecture_differs_from_the_checkpoint(run):
    # Same codebook, so the tokenizer id still matches: only the architecture check can catch it.
    bad_artifact(run, "tokenizer.safetensors", lambda p: rewrite(p, meta=lambda m: {**m, "field": SMALL.to_meta()}),
                 "field architecture", str(SMALL.num_params))


def test_samples_architecture_differs_from_the_fitted_fields(run):
    def small(p):
        rewrite(p, lambda t: {**t, "weights": torch.zeros(len(t["weights"]), SMALL.num_params)},
                lambda m: {**m, "field": SMALL.to_meta()})

    bad_artifact(run, "samples.safetensors", small, "field architecture", "differs")


def test_fit_refuses_an_anchor_of_another_architecture(tiny_npz, tmp_path):
    from nefgpt.config import DataConfig, FitConfig
    from nefgpt.fit import run_fit
    from nefgpt.layout import ANCHOR_FILE

    run = tmp_path / "run"
    anchor = run / ANCHOR_FILE
    artifacts.save_tensors(anchor, {"weights": torch.zeros(1, SMALL.num_params)}, {"field": SMALL.to_meta()})
    before = anchor.read_bytes()
    with pytest.raises(ArtifactError, match="field architecture .* differs from the configured"):
        run_fit(DataConfig(dataset=f"npz:{tiny_npz}", heldout_per_class=2, tune_per_class=1), FitConfig(steps=1), run, progress=False)
    assert anchor.read_bytes() == before
    assert not (run / "nefs.safetensors").exists()


def test_load_nefs_checks_the_configured_architecture(run):
    from nefgpt.fields_io import load_nefs

    load_nefs(run, FieldSpec())
    with pytest.raises(ArtifactError, match="differs from the configured"):
        load_nefs(run, SMALL)


# --- row 4: tokenizer and checkpoint disagree ---


def test_checkpoint_from_another_tokenizer(run):
    shift = lambda t: {"codebook": t["codebook"] + 1e-3}  # noqa: E731  still sorted, other content hash
    bad_artifact(run, "tokenizer.safetensors", lambda p: rewrite(p, shift), "another tokenizer")


def test_tokenizer_vocabulary_differs_from_the_checkpoint(run):
    # More classes, same codebook (same tokenizer id): the vocabulary size no longer matches the model's.
    line = bad_artifact(run, "tokenizer.safetensors", lambda p: rewrite(p, meta=lambda m: {**m, "num_classes": 12}),
                        "vocabulary")
    assert "256" in line and "258" in line


def test_tokens_from_another_tokenizer(run):
    bad_artifact(run, "tokens.safetensors", lambda p: rewrite(p, meta=lambda m: {**m, "tokenizer_id": "0" * 16}),
                 "another tokenizer")


# --- row 5: NaN or Inf ---


def _poison(value):
    def tensors(t):
        name = next(k for k, v in t.items() if v.is_floating_point())
        t[name] = t[name].clone()
        t[name].view(-1)[-1] = value
        return t

    return tensors


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["nefs.safetensors", "tokenizer.safetensors", "samples.safetensors"])
def test_non_finite_values_in_safetensors(run, name, value):
    bad_artifact(run, name, lambda p: rewrite(p, _poison(value)), "NaN or Inf")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_model_weights(run, value):
    def poison(p):
        ckpt = torch.load(p, weights_only=True)
        name = next(iter(ckpt["model"]))
        ckpt["model"][name].view(-1)[0] = value
        torch.save(ckpt, p)

    bad_artifact(run, "ckpt.pt", poison, "NaN or Inf")


# --- row 6: sampling options (temperature, top-p, top-k and --label are in test_cli.py) ---


@pytest.mark.parametrize("option,value,word", [("-n", "0", "n_per_class"), ("-n", "-3", "n_per_class"),
                                               ("--temperature", "inf", "temperature"),
                                               ("--top-k", "246", "top_k")])
def test_more_invalid_sampling_options(run, option, value, word):
    before = snapshot(run)
    fails(run, ["sample", "--out", run, "--quiet", option, value], 2, word, value)
    assert_unchanged(run, before)


def test_negative_label(run):
    before = snapshot(run)
    fails(run, ["sample", "--out", run, "--quiet", "--label", "-1"], 2, "--label -1")
    assert_unchanged(run, before)


# --- row 7: datasets (unit tests of every case are in test_data.py; here the CLI end to end) ---


@pytest.mark.parametrize("argv", [["sample", "-n", "100000000"], ["run", "-n", "100000000"],
                                  ["sample", "--set", "sample.n_per_class=100000000"],
                                  ["sample", "--label", "3", "-n", "100000000"]])
def test_absurd_sample_count_is_refused_before_any_work(run, argv):
    before = snapshot(run)
    line = fails(run, [argv[0], "--out", run, "--quiet", *argv[1:]], 2, "sample.n_per_class = 100000000",
                 "estimated", "of memory")
    assert "TiB" in line  # 10^9 fields of 561 weights
    assert_unchanged(run, before)


def test_sampling_size_estimates(monkeypatch):
    from nefgpt import sample

    assert sample.check_sampling_size(50, 10, 561) is None  # the default: 500 fields, about a minute at most
    warning = sample.check_sampling_size(10_000, 10, 561, 0.05, measured=True)
    assert warning.startswith("nefgpt: warning: sampling 100000 fields") and "estimated 1.4 h" in warning
    assert "measured" in warning
    assert "rough CPU figure" in sample.check_sampling_size(10_000, 10, 561)
    monkeypatch.setattr(sample, "physical_memory", lambda: 2 * 2**30)  # a 2 GiB machine
    with pytest.raises(UsageError, match=r"sample.n_per_class = 10000: 100000 fields .* estimated 1.3 GiB"):
        sample.check_sampling_size(10_000, 10, 561)
    monkeypatch.setattr(sample, "physical_memory", lambda: None)  # unknown: no memory cap, only the warning
    assert "estimated" in sample.check_sampling_size(10_000, 10, 561)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((30, 28, 28), np.uint8)
LABELS = np.arange(30) % 10


@pytest.mark.parametrize("arrays,words", [
    ({"images": np.zeros((0, 28, 28), np.uint8), "labels": np.zeros(0, np.int64)}, ("no images",)),
    ({"images": IMAGES, "labels": LABELS[:29]}, ("30 images but 29 labels",)),
    ({"images": IMAGES, "labels": np.where(LABELS == 3, 10, LABELS)}, ("label 10", "outside 0..9")),
    ({"images": np.zeros((30, 28, 27), np.uint8), "labels": LABELS}, ("square",)),
    ({"images": np.array([None] * 30, dtype=object), "labels": LABELS}, ("can't read array 'images'",)),
])
def test_fit_on_a_bad_npz(tmp_path, arrays, words):
    data = _npz(tmp_path / "bad.npz", **arrays)
    run = tmp_path / "run"
    fails(run, ["fit", "--out", run, "--quiet", "--set", f"data.dataset=npz:{data}"], 1, str(data), *words)
    assert sorted(p.name for p in run.iterdir() if p.name != LOCK) == ["config.json"]  # no split, no anchor, no chunks


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04\x00\x00 broken zip", b"\x93NUMPY\x01\x00 an .npy"])
def test_fit_on_an_unreadable_npz(tmp_path, content):
    data = tmp_path / "bad.npz"
    data.write_bytes(content)
    run = tmp_path / "run"
    fails(run, ["fit", "--out", run, "--quiet", "--set", f"data.dataset=npz:{data}"], 1, str(data), "npz archive")


def test_fit_on_idx_with_a_wrong_magic_number(tmp_path):
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(struct.pack(">IIII", 0x00000801, 2, 28, 28) + bytes(2 * 784))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x00000801, 2) + bytes(2))
    run = tmp_path / "run"
    fails(run, ["fit", "--out", run, "--quiet", "--set", f"data.dataset=idx:{images}"], 1, str(images),
          "magic number 0x00000801", "expected 0x00000803")
    assert not (run / "split.json").exists()


# --- row 8: configuration ---


def test_preset_file_with_an_unknown_key(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text("[train]\nmax_iters = 5\nmax_iter = 6\n")
    run = tmp_path / "run"
    fails(run, ["fit", "--out", run, "--quiet", "--preset", str(preset)], 2, str(preset), "train.max_iter")
    assert not run.exists() or not (run / "config.json").exists()


def test_preset_file_with_an_unknown_table_or_bad_toml(tmp_path):
    for text, word in [("[training]\nmax_iters = 5\n", "training.max_iters"), ("[train\n", "invalid TOML")]:
        preset = tmp_path / "mine.toml"
        preset.write_text(text)
        fails(tmp_path / "run", ["fit", "--out", tmp_path / "run", "--quiet", "--preset", str(preset)], 2, word)


@pytest.mark.parametrize("item", ["fit.steps=-1", "train.max_iters=-5", "tokenize.max_iters=-1", "train.nope=1",
                                  "nope.max_iters=1"])
def test_bad_setting_leaves_an_existing_run_alone(run, item):
    before = snapshot(run)
    fails(run, ["run", "--out", run, "--quiet", "--set", item], 2, item.split("=")[0])
    assert_unchanged(run, before)


# --- row 9: nothing is unpickled ---


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npz_that_is_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    data = tmp_path / "data.npz"
    data.write_bytes(pickle.dumps(RunsShell(marker)))
    fails(tmp_path / "run", ["fit", "--out", tmp_path / "run", "--quiet", "--set", f"data.dataset=npz:{data}"], 1,
          str(data), "not an .npz archive")
    assert not marker.exists()


def test_npz_with_a_malicious_object_array(tmp_path):
    marker = tmp_path / "pwned"
    data = tmp_path / "data.npz"
    np.savez(data, images=np.array([RunsShell(marker)] * 2, dtype=object), labels=np.zeros(2, np.int64))
    assert not marker.exists()
    fails(tmp_path / "run", ["fit", "--out", tmp_path / "run", "--quiet", "--set", f"data.dataset=npz:{data}"], 1,
          str(data), "can't read array 'images'")
    assert not marker.exists()


def test_malicious_checkpoint_leaves_the_run_alone(run, tmp_path):
    marker = tmp_path / "pwned"
    bad_artifact(run, "ckpt.pt", lambda p: p.write_bytes(pickle.dumps(RunsShell(marker))), "refused")
    assert not marker.exists()


# --- row 10: a failing write keeps the old artifact (atomic replace) ---


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _enospc_after_half(write):
    """Wrap a writer of (obj, path) so it writes half its output, then fails as a full disk does."""
    def failing(obj, path, *args, **kwargs):
        write(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return failing


@pytest.mark.parametrize("kind", ["tensors", "json", "checkpoint", "bytes"])
def test_full_disk_mid_write_keeps_the_old_file(tmp_path, monkeypatch, kind):
    path = tmp_path / f"artifact.{kind}"
    old = {"tensors": lambda: artifacts.save_tensors(path, {"x": torch.arange(100.0)}, {"a": 1}),
           "json": lambda: artifacts.save_json(path, {"a": list(range(100))}),
           "checkpoint": lambda: artifacts.save_checkpoint(path, {"model": {"w": torch.ones(50)}, "model_args": {}}),
           "bytes": lambda: artifacts.write_bytes(path, b"old" * 100)}
    old[kind]()
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    if kind == "tensors":
        monkeypatch.setattr(artifacts, "save_file", _enospc_after_half(artifacts.save_file))
    elif kind == "checkpoint":
        monkeypatch.setattr(torch, "save", _enospc_after_half(torch.save))
    else:
        original = Path.write_bytes

        def failing(self, data):
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Path, "write_bytes", failing)
    new = {"tensors": lambda: artifacts.save_tensors(path, {"x": torch.zeros(100)}),
           "json": lambda: artifacts.save_json(path, {"b": 2}),
           "checkpoint": lambda: artifacts.save_checkpoint(path, {"model": {}, "model_args": {}}),
           "bytes": lambda: artifacts.write_bytes(path, b"new" * 100)}
    with pytest.raises(ArtifactError, match="No space left on device") as info:
        new[kind]()
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert _temp_files(tmp_path) == []


def test_failing_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    artifacts.save_json(path, {"old": True})
    before = path.read_bytes()

    def no_replace(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(artifacts.os, "replace", no_replace)
    with pytest.raises(ArtifactError, match=str(path)):
        artifacts.save_json(path, {"old": False})
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    """What a read-only directory does to any user, root included: creating the temp file fails."""
    path = tmp_path / "a.json"
    artifacts.save_json(path, {"old": True})
    before = path.read_bytes()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(artifacts.tempfile, "mkstemp", denied)
    with pytest.raises(ArtifactError, match="Permission denied"):
        artifacts.save_json(path, {"old": False})
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 0o555 does not stop root from writing; "
                                               "test_unwritable_directory_simulated covers this case")
def test_read_only_directory(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "a.json"
    artifacts.save_json(path, {"old": True})
    before = path.read_bytes()
    directory.chmod(0o555)
    try:
        with pytest.raises(ArtifactError, match="Permission denied"):
            artifacts.save_json(path, {"old": False})
        assert path.read_bytes() == before and _temp_files(directory) == []
    finally:
        directory.chmod(0o755)


def test_full_disk_during_a_stage_is_one_error_line(run, monkeypatch):
    """`nefgpt sample` hitting ENOSPC on its first output: exit 1, one line, every artifact as it was."""
    make_stale(run, "ckpt.pt")
    before = snapshot(run)
    monkeypatch.setattr(artifacts, "save_file", _enospc_after_half(artifacts.save_file))
    fails(run, ["sample", "--out", run, "--quiet"], 1, str(run / "samples.safetensors"), "No space left on device")
    assert_unchanged(run, before)


def test_errors_are_nefgpt_errors():
    # The CLI turns only NefgptError into one line; ArtifactError must be one.
    assert issubclass(ArtifactError, NefgptError)


def test_one_dimensional_weights_in_nefs(tmp_path):
    from nefgpt.fields_io import load_nefs

    artifacts.save_tensors(tmp_path / "nefs.safetensors", {"weights": torch.zeros(3), "psnr": torch.zeros(3),
                                                           "labels": torch.zeros(3, dtype=torch.int64)},
                           {"field": FieldSpec().to_meta()})
    with pytest.raises(ArtifactError, match="weights"):
        load_nefs(tmp_path)


@pytest.mark.parametrize("writer", ["tensors", "checkpoint", "json", "npz", "png", "figure"])
def test_every_writer_gives_the_plain_open_mode(tmp_path, monkeypatch, writer):
    """Under umask 027 every kind of artifact is 0640, like a file made by open(); none stays 0600."""
    from nefgpt import figures, samples_io

    path = tmp_path / f"artifact.{writer}"
    write = {
        "tensors": lambda: artifacts.save_tensors(path, {"w": torch.zeros(3)}),  # save_file recreates the file
        "checkpoint": lambda: artifacts.save_checkpoint(path, {"model": {}}),
        "json": lambda: artifacts.save_json(path, {}),
        "npz": lambda: samples_io.save_images_npz(path, torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long)),
        "png": lambda: figures.save_sample_grid(path, torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long)),
        "figure": lambda: figures.save_figure(path, figures.pyplot().figure(figsize=(1, 1))),  # matplotlib
    }[writer]
    monkeypatch.setattr(artifacts, "_UMASK", 0o027)
    old = os.umask(0o027)
    try:
        write()
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o7777) == oct((tmp_path / "plain").stat().st_mode & 0o7777) == oct(0o640)


def test_artifacts_get_the_mode_a_plain_open_would_give(tmp_path):
    # Atomic writes go through mkstemp, whose files are owner-only; artifacts must be shareable like any file.
    artifacts.save_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777
    assert os.access(tmp_path / "a.json", os.R_OK)
