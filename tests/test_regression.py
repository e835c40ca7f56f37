"""The regression-transformer baseline: causality, training, checkpoints, sampling, and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import signal
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import assert_same_checkpoint

from nefgpt import config as config_mod
from nefgpt.artifacts import load_tensors, save_checkpoint
from nefgpt.baselines import regression as reg
from nefgpt.cli import main
from nefgpt.errors import ArtifactError, UsageError
from nefgpt.train_log import LOG_COLUMNS

SETTINGS = [
    "data.heldout_per_class=2", "data.tune_per_class=1",
    "fit.steps=10", "fit.anchor_steps=20", "tokenize.max_iters=10",
    "train.n_layer=1", "train.n_embd=32", "train.n_head=2", "train.batch_size=8", "train.dtype=fp32",
    "train.max_iters=6", "train.warmup_iters=2", "train.eval_interval=3", "train.ckpt_interval=3",
    "train.p_uncond=0.0",  # plain conditional training, whatever the preset says
    "sample.n_per_class=3", "evaluate.classifier_epochs=1",
]


def call(argv: list) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def make_cfg(npz: Path, *extra: str) -> config_mod.RunConfig:
    return config_mod.apply_overrides(config_mod.load_preset("cpu"),
                                      [f"data.dataset=npz:{npz}", *SETTINGS, "train.model=regression", *extra])


def set_args(npz: Path, *extra: str) -> list[str]:
    return [a for s in [f"data.dataset=npz:{npz}", *SETTINGS, "train.model=regression", *extra]
            for a in ("--set", s)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, npz_writer):
    """A run directory with fitted fields of 60 synthetic images (48 train, 20 held out)."""
    base = tmp_path_factory.mktemp("regression")
    npz = npz_writer(base / "digits.npz", per_class=6)
    run = base / "fitted"
    rc, err = call(["fit", "--out", run, "--quiet", *set_args(npz)])
    assert rc == 0, err
    return {"run": run, "npz": npz}


@pytest.fixture(scope="module")
def trained(fitted, tmp_path_factory):
    """`fitted` plus a regression model trained for 60 iterations."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(fitted["run"], run)
    cfg = make_cfg(fitted["npz"], "train.max_iters=60", "train.eval_interval=15", "train.ckpt_interval=30")
    summary = reg.train(cfg, run, progress=False)
    return {"run": run, "cfg": cfg, "summary": summary, "npz": fitted["npz"]}


def small_model(p: int = 561, seed: int = 0) -> reg.RegressionGPT:
    torch.manual_seed(seed)
    args = {**reg.GPTConfig(block_size=p, vocab_size=11, num_codes=0, n_layer=2, n_head=2, n_embd=32).to_dict(),
            "num_classes": 10}
    return reg.build_model(args).eval()


def test_predictions_are_causal():
    model = small_model()
    labels = torch.tensor([3, 7])
    z = torch.randn(2, 561, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(labels, z[:, :-1])
        assert base.shape == (2, 561)
        for k in (0, 17, 300, 559):
            changed = z.clone()
            changed[:, k] += 5.0
            pred = model(labels, changed[:, :-1])
            # Position p predicts weight p from weights < p: weight k reaches positions > k only.
            torch.testing.assert_close(pred[:, : k + 1], base[:, : k + 1], rtol=0, atol=1e-6)
            assert (pred[:, k + 1 :] - base[:, k + 1 :]).abs().max() > 1e-4
        other = model(torch.tensor([4, 7]), z[:, :-1])
    assert (other[0] - base[0]).abs().max() > 1e-4  # the class conditions every position
    torch.testing.assert_close(other[1], base[1], rtol=0, atol=0)


def test_training_lowers_the_loss_and_writes_artifacts(trained):
    run, cfg, summary = trained["run"], trained["cfg"], trained["summary"]
    data, _, _ = reg._training_data(cfg, run)
    torch.manual_seed(cfg.train.seed)  # the same initialization as train()
    fresh = reg.build_model(reg.model_args(cfg, 561, 10))
    w, y = data["train"]
    fresh.mean.copy_(w.mean(0))
    fresh.std.copy_(w.std(0, correction=0).clamp_min(reg.MIN_STD))
    initial = reg._eval_loss(fresh, w[:20], y[:20], cfg, torch.device("cpu"), None)
    assert summary["train_loss"] < 0.85 * initial, (summary["train_loss"], initial)
    for key in ("train_loss", "val_loss", "train_seconds", "num_params", "iterations"):
        assert key in summary
    assert summary["iterations"] == 60 and summary["num_params"] == fresh.num_params()
    assert json.loads((run / "train.json").read_text())["val_loss"] == summary["val_loss"]
    log = (run / "train_log.csv").read_text().splitlines()
    assert log[0] == ",".join(LOG_COLUMNS)
    assert [row.split(",")[0] for row in log[1:]] == ["15", "30", "45", "60"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 60 and ckpt["model_type"] == "regression" and "optimizer" in ckpt


def test_checkpoint_reload_gives_identical_predictions(trained, tmp_path):
    run, cfg, summary = trained["run"], trained["cfg"], trained["summary"]
    model, _ = reg.load_model(run)
    data, _, _ = reg._training_data(cfg, run)
    w, y = data["heldout"]
    # train() scored the in-memory model in fp32 (train.dtype=fp32): the reloaded one must score the same.
    assert reg._eval_loss(model, w, y, cfg, torch.device("cpu"), None) == summary["val_loss"]
    assert 0 < float(model.resid_std.min()) and float(model.resid_std.max()) < 10
    assert not torch.equal(model.resid_std, torch.ones_like(model.resid_std))  # estimated, not the default

    # A round trip through save_checkpoint/load_model keeps every prediction bit for bit.
    other = tmp_path / "run"
    other.mkdir()
    save_checkpoint(other / "ckpt.pt", torch.load(run / "ckpt.pt", weights_only=True))
    again, _ = reg.load_model(other)
    z = model.standardize(w)
    with torch.no_grad():
        assert torch.equal(model(y, z[:, :-1]), again(y, z[:, :-1]))


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_cached_sampling_equals_recomputation(noise):
    model = small_model(p=80)
    model.resid_std.fill_(0.7)
    labels = torch.tensor([0, 5, 5])
    cached = reg.generate(model, labels, noise, torch.Generator().manual_seed(3), use_cache=True)
    full = reg.generate(model, labels, noise, torch.Generator().manual_seed(3), use_cache=False)
    assert cached.shape == (3, 80)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def samples_of(run: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, meta = load_tensors(run / "samples.safetensors")
    return tensors["weights"], tensors["labels"], meta


def test_deterministic_and_noisy_sampling(trained):
    run, npz = trained["run"], trained["npz"]
    reg.sample(make_cfg(npz), run, progress=False, labels=[2, 5])
    w, labels, meta = samples_of(run)
    assert labels.tolist() == [2, 2, 2, 5, 5, 5] and w.shape == (6, 561)
    assert meta["model"] == "regression" and meta["seconds_per_field"] > 0 and meta["noise"] == 0
    # One field per class. Rows of one batch agree only up to rounding: kernels may take another path for
    # another row position (and do on AVX2 CPUs), so compare with a tolerance, never bit for bit.
    for a, b in ((0, 1), (0, 2), (3, 5)):
        torch.testing.assert_close(w[a], w[b], rtol=1e-4, atol=1e-5)
    assert (w[0] - w[3]).abs().max() > 1e-3
    reg.sample(make_cfg(npz, "sample.seed=9"), run, progress=False, labels=[2, 5])
    assert torch.equal(samples_of(run)[0], w)  # noise 0 ignores the seed

    noisy = make_cfg(npz, "regression.noise=1.0")
    reg.sample(noisy, run, progress=False, labels=[2, 5])
    a = samples_of(run)[0]
    reg.sample(noisy, run, progress=False, labels=[2, 5])
    assert torch.equal(samples_of(run)[0], a)  # same seed, same samples
    assert not torch.equal(a[0], a[1])  # noise makes the samples of a class differ
    reg.sample(make_cfg(npz, "regression.noise=1.0", "sample.seed=1"), run, progress=False, labels=[2, 5])
    assert not torch.equal(samples_of(run)[0], a)


def test_sampling_refuses_bad_settings(trained, tmp_path):
    run, npz = trained["run"], trained["npz"]
    with pytest.raises(UsageError, match="label 10"):
        reg.sample(make_cfg(npz), run, progress=False, labels=[10])
    with pytest.raises(UsageError, match="p_uncond"):
        reg.sample(make_cfg(npz, "sample.guidance=2.0"), run, progress=False)
    cfg = make_cfg(npz)
    cfg.regression.noise = float("nan")
    with pytest.raises(UsageError, match="regression.noise"):
        reg.sample(cfg, run, progress=False)
    with pytest.raises(UsageError, match="regression.loss"):
        make_cfg(npz, "regression.loss=huber")
    gpt_like = tmp_path / "run"
    gpt_like.mkdir()
    save_checkpoint(gpt_like / "ckpt.pt", {"model": {}, "model_args": {}, "iter_num": 1})
    with pytest.raises(ArtifactError, match=str(gpt_like / "ckpt.pt")):
        reg.sample(make_cfg(npz), gpt_like, progress=False)


def test_guidance_and_unconditional(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    npz = fitted["npz"]
    reg.train(make_cfg(npz, "train.p_uncond=0.3", "train.max_iters=3"), run, progress=False)
    reg.sample(make_cfg(npz, "sample.guidance=2.0", "sample.n_per_class=1"), run, progress=False, labels=[1, 4])
    w, labels, _ = samples_of(run)
    assert labels.tolist() == [1, 4] and torch.isfinite(w).all() and (w[0] - w[1]).abs().max() > 1e-3
    reg.train(make_cfg(npz, "train.conditioning=none", "train.max_iters=3"), run, progress=False)
    reg.sample(make_cfg(npz, "train.conditioning=none", "sample.n_per_class=1"), run, progress=False, labels=[1, 4])
    w, _, _ = samples_of(run)
    torch.testing.assert_close(w[0], w[1], rtol=1e-4, atol=1e-5)  # no conditioning: the deterministic model has one field


def test_cli_run_end_to_end(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    rc, err = call(["run", "--out", run, "--quiet", *set_args(fitted["npz"])])
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1
    _, labels, meta = samples_of(run)
    assert meta["model"] == "regression" and labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.load(run / "ckpt.pt", weights_only=True)["model_type"] == "regression"
    assert "[tune] skipped" in err


# --- Resume and interrupts: the shared training loop (nefgpt.trainer) -----------------------------------------

EXACT = ("train.max_iters=12", "train.eval_interval=3", "train.ckpt_interval=4", "train.p_uncond=0.3",
         "train.dropout=0.1", "train.max_minutes=0")  # class dropout and dropout: both must replay on resume


def assert_same_training(a: Path, b: Path) -> None:
    assert_same_checkpoint(a / "ckpt.pt", b / "ckpt.pt", iter_num=12)
    cols = slice(0, 4)  # iter, lr, train_loss, val_loss (not the timings)
    la, lb = ([row.split(",")[cols] for row in (r / "train_log.csv").read_text().splitlines()] for r in (a, b))
    assert la == lb and [row[0] for row in la[1:]] == ["3", "6", "9", "12"]
    ja, jb = (json.loads((r / "train.json").read_text()) for r in (a, b))
    assert (ja["val_loss"], ja["train_loss"], ja["iterations"]) == (jb["val_loss"], jb["train_loss"], jb["iterations"])


@pytest.fixture(scope="module")
def whole_run(fitted, tmp_path_factory):
    """`fitted` trained 12 iterations in one go, keeping a copy of the checkpoint of iteration 4."""
    from nefgpt import trainer

    run = tmp_path_factory.mktemp("whole") / "run"
    shutil.copytree(fitted["run"], run)
    save = trainer.save_checkpoint
    kept = run.parent / "ckpt4.pt"

    def keep_iteration_4(path, ckpt):  # the state a run killed after iteration 4 would leave
        save(path, ckpt)
        if ckpt["iter_num"] == 4:
            shutil.copy(path, kept)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "save_checkpoint", keep_iteration_4)
    try:
        reg.train(make_cfg(fitted["npz"], *EXACT), run, progress=False)
    finally:
        mp.undo()
    return {"run": run, "ckpt4": kept}


def test_resume_matches_one_run(fitted, whole_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    cfg = make_cfg(fitted["npz"], *EXACT)
    shutil.copy(whole_run["ckpt4"], run / "ckpt.pt")
    shutil.copy(whole_run["run"] / "train_log.csv", run)  # with rows after iteration 4, which the resume drops
    reg.train(cfg, run, progress=False, resume=True)
    assert_same_training(run, whole_run["run"])
    # Other model settings, or other fields, are refused rather than resumed.
    with pytest.raises(ArtifactError, match="model settings"):
        reg.train(make_cfg(fitted["npz"], *EXACT, "train.n_embd=16"), run, progress=False, resume=True)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["model"]["mean"] = ckpt["model"]["mean"] + 1
    save_checkpoint(run / "ckpt.pt", ckpt)
    with pytest.raises(ArtifactError, match="other fields"):
        reg.train(cfg, run, progress=False, resume=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_resume_matches_one_run(fitted, whole_run, tmp_path, monkeypatch, signum):
    from nefgpt.trainer import TrainInterrupted

    run = tmp_path / "run"
    shutil.copytree(fitted["run"], run)
    cfg = make_cfg(fitted["npz"], *EXACT)
    real = reg.batch_indices

    def signalling(n, bs, iteration, seed):  # the signal arrives mid-step 6 (iterations count from 0)
        if iteration == 5:
            signal.raise_signal(signum)
        return real(n, bs, iteration, seed)

    with monkeypatch.context() as m:
        m.setattr(reg, "batch_indices", signalling)
        with pytest.raises(TrainInterrupted) as stop:
            reg.train(cfg, run, progress=False)
    assert stop.value.signum == signum and "iteration 6" in str(stop.value)
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 6  # the step it was in is completed
    assert not (run / "train.json").exists()
    reg.train(cfg, run, progress=False, resume=True)
    assert_same_training(run, whole_run["run"])
