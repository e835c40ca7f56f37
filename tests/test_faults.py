"""Faults of real processes: SIGKILL mid-stage, Ctrl-C during training, two processes on one run directory.

Each killed or interrupted run is finished by the ordinary rerun and must end
bit-identical to an uninterrupted run. Kill points are random but seeded.
"""

from __future__ import annotations

import fcntl
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable

import pytest
import torch

from nefgpt.artifacts import load_tensors
from nefgpt.cli import main

MAX_ITERS = 40
SETTINGS = [
    "data.heldout_per_class=2", "data.tune_per_class=1",
    "fit.steps=30", "fit.anchor_steps=20", "fit.chunk_size=5", "fit.batch_size=5",  # 12 chunks
    "tokenize.max_iters=10",
    f"train.max_iters={MAX_ITERS}", "train.n_layer=1", "train.n_embd=32", "train.n_head=2", "train.batch_size=8",
    "train.warmup_iters=2", "train.eval_interval=10", "train.ckpt_interval=5",
    "train.max_minutes=0",  # resume is bit-identical only in fixed-iteration mode (no wall-clock in the schedule)
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(npz: Path) -> list[str]:
    return [arg for s in [f"data.dataset=npz:{npz}", *SETTINGS] for arg in ("--set", s)]


def call(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def run_until(argv: list, ready: Callable[[], bool], delay: float, sig: int) -> tuple[int, str]:
    """Start `nefgpt ARGV` as a real process, wait until `ready()`, then `delay` s more, then send `sig`."""
    proc = subprocess.Popen([sys.executable, "-m", "nefgpt.cli", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ready():
            assert proc.poll() is None, f"finished before the fault point: {proc.communicate()}"
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal exactly (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def load_ckpt(run: Path) -> dict:
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)


def assert_same_training(run: Path, ref: Path) -> None:
    got, want = load_ckpt(run), load_ckpt(ref)
    assert got["iter_num"] == want["iter_num"] == MAX_ITERS
    assert_same(got["model"], want["model"], "model")
    assert_same(got["optimizer"], want["optimizer"], "optimizer")
    assert (run / "train.json").exists()


@pytest.fixture(scope="module")
def base(tmp_path_factory, npz_writer) -> dict:
    """A fitted and tokenized run (the fit reference), and a copy of it trained without interruption."""
    root = tmp_path_factory.mktemp("faults")
    npz = npz_writer(root / "tiny.npz", per_class=6)
    run = root / "base"
    for stage in ("fit", "tokenize"):
        rc, err = call([stage, "--out", run, "--quiet", *settings(npz)])
        assert rc == 0, err
    ref = root / "train_ref"
    shutil.copytree(run, ref)
    rc, err = call(["train", "--out", ref, "--quiet"])
    assert rc == 0, err
    return {"npz": npz, "run": run, "train_ref": ref}


def train_copy(base: dict, dst: Path) -> Path:
    shutil.copytree(base["run"], dst)  # copy2 keeps mtimes, so fit and tokenize stay up to date
    return dst


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_sigkill_then_rerun_is_bit_identical(base, tmp_path, seed):
    rng = random.Random(seed)
    run = tmp_path / "run"
    argv = ["fit", "--out", run, "--quiet", *settings(base["npz"])]
    wait_chunks = rng.randint(1, 8)  # of 12

    def chunks_written() -> bool:
        return len(list((run / "fit_chunks").glob("chunk_*.safetensors"))) >= wait_chunks

    rc, err = run_until(argv, chunks_written, rng.uniform(0, 0.05), signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert not (run / "nefs.safetensors").exists()

    rc, err = call(argv)
    assert rc == 0, err
    got, _ = load_tensors(run / "nefs.safetensors")
    want, _ = load_tensors(base["run"] / "nefs.safetensors")
    assert_same(got, want, "nefs")
    assert not (run / "fit_chunks").exists()
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("when", ["after_checkpoint", "before_checkpoint"])
def test_train_sigkill_then_resume_is_bit_identical(base, tmp_path, when):
    rng = random.Random(f"train-{when}")
    run = train_copy(base, tmp_path / "run")
    ckpt = run / "ckpt.pt"
    if when == "after_checkpoint":
        ready, delay = ckpt.exists, rng.uniform(0, 0.8)
    else:  # during start-up, well before iteration 5
        ready, delay = (lambda: True), rng.uniform(0, 0.5)
    rc, err = run_until(["train", "--out", run, "--quiet"], ready, delay, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert ckpt.exists() == (when == "after_checkpoint")
    if ckpt.exists():
        assert load_ckpt(run)["iter_num"] < MAX_ITERS

    rc, err = call(["train", "--out", run, "--quiet", "--resume"])
    assert rc == 0, err
    assert_same_training(run, base["train_ref"])
    assert not list(run.glob(".*.tmp"))


def test_ctrl_c_saves_checkpoint_and_resume_is_bit_identical(base, tmp_path):
    rng = random.Random(7)
    run = train_copy(base, tmp_path / "run")
    ckpt = run / "ckpt.pt"
    def child_setup() -> None:
        # A suite started in the background by a non-interactive shell inherits an ignored SIGINT, which nefgpt
        # rightly keeps ignoring (as under nohup); this test is about Ctrl-C, so the trainer gets the default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The lowest priority: on a loaded machine this test must still see the first checkpoint and send Ctrl-C
        # before the toy training's remaining iterations are done.
        os.nice(19)

    proc = subprocess.Popen([sys.executable, "-m", "nefgpt.cli", "train", "--out", str(run), "--quiet"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_setup)
    try:
        deadline = time.time() + 60

        def wait_for(ready) -> None:
            while not ready():
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline
                time.sleep(0.002)

        # While it runs, a second nefgpt on the same directory is refused, naming the running one. Checked as
        # soon as it holds the lock, so the check's own time can't let the training finish before the Ctrl-C.
        lock = run / ".nefgpt.lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid))
        rc, err = call(["train", "--out", run, "--quiet", "--resume"])
        assert rc == 1
        assert err.strip().splitlines()[-1].startswith(f"nefgpt: error: {run} is in use by another nefgpt process (pid {proc.pid});")

        wait_for(ckpt.exists)
        first = int(load_ckpt(run)["iter_num"])
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    saved = load_ckpt(run)  # weights_only=True
    n = int(saved["iter_num"])
    assert first <= n < MAX_ITERS
    assert err.strip().splitlines()[-1] == (
        f"nefgpt: interrupted at iteration {n}; checkpoint saved to {ckpt} (resume with --resume)")
    assert "Traceback" not in err
    assert not (run / "train.json").exists()

    rc, err = call(["train", "--out", run, "--quiet", "--resume"])
    assert rc == 0, err
    assert_same_training(run, base["train_ref"])


def default_signals_at_low_priority() -> None:
    """The signal tests' children: default SIGINT and SIGTERM (a suite started in the background inherits an
    ignored SIGINT, which nefgpt rightly keeps ignoring), and the lowest priority, so that on a loaded machine
    the test still sends its signal before the toy stage is done."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.nice(19)


def signal_when(argv: list, ready: Callable[[], bool], sig: int, delay: float = 0.0,
                timeout: float = 180) -> tuple[int, str]:
    """Start `nefgpt ARGV` as a real process, poll until `ready()`, wait `delay` s, send `sig`; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "nefgpt.cli", *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals_at_low_priority)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
            assert time.time() < deadline, "the child never reached the signal point"
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def assert_one_nefgpt_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("nefgpt:")] == [expected], err
    assert lines[-1] == expected and "Traceback" not in err, err


def test_sigterm_during_train_saves_checkpoint_exits_143_and_resume_is_bit_identical(base, tmp_path):
    rng = random.Random(15)
    run = train_copy(base, tmp_path / "run")
    ckpt = run / "ckpt.pt"
    rc, err = signal_when(["train", "--out", run, "--quiet"], ckpt.exists, signal.SIGTERM, rng.uniform(0, 0.05))
    assert rc == 143, err
    n = int(load_ckpt(run)["iter_num"])  # weights_only=True
    assert 0 < n < MAX_ITERS
    assert_one_nefgpt_line(err, f"nefgpt: terminated at iteration {n}; checkpoint saved to {ckpt} (resume with --resume)")
    assert not (run / "train.json").exists()
    assert not list(run.glob(".*.tmp"))

    rc, err = call(["train", "--out", run, "--quiet", "--resume"])
    assert rc == 0, err
    assert_same_training(run, base["train_ref"])  # the checkpoint was of a step boundary


def test_sigterm_during_fit_exits_143_and_leaves_no_partial_artifact(base, tmp_path):
    rng = random.Random(143)
    run = tmp_path / "run"
    argv = ["fit", "--out", run, "--quiet", *settings(base["npz"])]

    def chunk_written() -> bool:
        return any((run / "fit_chunks").glob("chunk_*.safetensors"))

    rc, err = signal_when(argv, chunk_written, signal.SIGTERM, rng.uniform(0, 0.05))
    assert rc == 143, err
    assert_one_nefgpt_line(err, "nefgpt: terminated during fit; no partial artifact was kept "
                                "(run the command again to finish it)")
    nefs = run / "nefs.safetensors"
    if nefs.exists():  # only if the signal came after the last write
        load_tensors(nefs)
    for chunk in (run / "fit_chunks").glob("chunk_*.safetensors"):
        load_tensors(chunk)  # every chunk left is whole

    rc, err = call(argv)  # the next command clears stale temporary files as it starts, and resumes the fit
    assert rc == 0, err
    assert not list(run.glob(".*.tmp")) and not (run / "fit_chunks").exists()
    got, _ = load_tensors(nefs)
    want, _ = load_tensors(base["run"] / "nefs.safetensors")
    assert_same(got, want, "nefs")


def test_sigterm_in_a_stage_unwinds_removes_its_temp_file_and_releases_the_lock(base, tmp_path, monkeypatch):
    """In-process: SIGTERM mid-write of an artifact (inside atomic_path) exits 143 with one line, deletes the
    temporary file, keeps the old artifact, releases the run lock and restores the caller's SIGTERM handler."""
    from nefgpt import artifacts, tokenizer

    run = train_copy(base, tmp_path / "run")
    old = (run / "tokens.safetensors").read_bytes()

    def stage(*args, **kwargs):
        with artifacts.atomic_path(run / "tokens.safetensors") as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode; this loop is only a bound
                time.sleep(0.001)
        raise AssertionError("SIGTERM did not stop the stage")

    monkeypatch.setattr(tokenizer, "run_tokenize", stage)
    seen = []

    def handler(signum, frame) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        rc, err = call(["tokenize", "--out", run, "--quiet", "--force"])
        assert signal.getsignal(signal.SIGTERM) is handler and not seen
        os.kill(os.getpid(), signal.SIGTERM)  # main() put the caller's handler back
        for _ in range(100):
            if seen:
                break
            time.sleep(0.001)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 143, err
    assert_one_nefgpt_line(err, "nefgpt: terminated during tokenize; no partial artifact was kept "
                                "(run the command again to finish it)")
    assert (run / "tokens.safetensors").read_bytes() == old
    assert not list(run.glob(".*.tmp"))
    hold_lock(run, 1).close()  # free: nothing holds it any more


def test_deferred_signals_record_the_signal_and_keep_ignored_ones_ignored():
    from nefgpt.trainer import deferred_signals

    got = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: got.append(("previous", signum)))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_signals() as hits:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited ignore (nohup, `cmd &`) kept
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert hits == [signal.SIGTERM] and not got  # deferred: only recorded
            os.kill(os.getpid(), signal.SIGTERM)  # a second one goes to the previous handler at once
            time.sleep(0.01)
            assert got == [("previous", signal.SIGTERM)] and hits == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

        signal.signal(signal.SIGINT, signal.default_int_handler)
        with deferred_signals() as hits:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert hits == [signal.SIGINT]
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with deferred_signals() as hits:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def hold_lock(run: Path, pid: int):
    """Lock the run directory the way another nefgpt process would; returns the open file (close to release)."""
    f = open(run / ".nefgpt.lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(f"{pid}\n")
    f.flush()
    return f


def mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".nefgpt.lock"}


def test_locked_run_directory_is_refused_and_changes_nothing(base, tmp_path):
    run = train_copy(base, tmp_path / "run")
    before = mtimes(run)
    lock = hold_lock(run, 4242)
    try:
        for argv in (["tokenize", "--force"], ["train"], ["run"]):
            rc, err = call([argv[0], "--out", run, "--quiet", *argv[1:]])
            assert rc == 1
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(
                f"nefgpt: error: {run} is in use by another nefgpt process (pid 4242);"), err
        assert mtimes(run) == before
        # render reads one file and writes only where told: it needs no lock.
        rc, err = call(["render", run / "nefs.safetensors", "--res", "8", "-n", "2", "--png", tmp_path / "x.png"])
        assert rc == 0, err
    finally:
        lock.close()
    rc, err = call(["tokenize", "--out", run, "--quiet", "--force"])
    assert rc == 0, err
    assert mtimes(run)["tokens.safetensors"] > before["tokens.safetensors"]


def test_lock_of_a_killed_process_does_not_block(base, tmp_path):
    run = train_copy(base, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write(str(os.getpid()))\n"
         "f.flush(); print('locked', flush=True); time.sleep(60)", str(run / ".nefgpt.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = call(["tokenize", "--out", run, "--quiet", "--force"])
        assert rc == 1 and f"(pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (run / ".nefgpt.lock").exists()  # left behind, stale
    rc, err = call(["tokenize", "--out", run, "--quiet", "--force"])
    assert rc == 0, err
