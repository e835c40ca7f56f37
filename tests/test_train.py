"""Stage `train`: sequences, the loss, the data order, the schedule, checkpoints and resume."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_checkpoint

from nefgpt import checkpoint, distributed, layout, train, trainer
from nefgpt.artifacts import save_json, save_tensors
from nefgpt.config import RunConfig, TrainConfig, apply_overrides
from nefgpt.errors import ArtifactError, NefgptError, UsageError
from nefgpt.field import FieldSpec
from nefgpt.layout import TOKENIZER_FILE, TOKENS_FILE
from nefgpt.train_log import LOG_COLUMNS
from nefgpt.model import GPT, GPTConfig
from nefgpt.codebook import Vocab, load_tokens, save_tokenizer, tokenizer_id

VOCAB = Vocab(num_codes=8, num_classes=10)
SPEC = FieldSpec(octaves=1, hidden=(3,))  # 19 weights: sequences of 21 tokens


def test_build_sequences_layout():
    tokens = torch.tensor([[3, 1, 4], [0, 7, 2]], dtype=torch.int16)
    labels = torch.tensor([5, 0])
    seq = train.build_sequences(tokens, labels, VOCAB)
    assert seq.dtype == torch.int64
    assert seq.tolist() == [[8, 9 + 5, 3, 1, 4], [8, 9 + 0, 0, 7, 2]]


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=SPEC.num_params + 2, vocab_size=VOCAB.size, num_codes=VOCAB.num_codes,
                          n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_sequence_loss_counts_only_weight_tokens():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB.num_codes, (5, SPEC.num_params), generator=g)
    labels = torch.randint(0, 10, (5,), generator=g)
    seq = train.build_sequences(tokens, labels, VOCAB)
    with torch.no_grad():
        loss = train.sequence_loss(model, seq)
        logits = model(seq)  # (B, T, num_codes); position i predicts token i + 1
        manual = torch.stack([
            F.cross_entropy(logits[b, i], seq[b, i + 1]) for b in range(5) for i in range(1, seq.shape[1] - 1)
        ]).mean()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    assert loss.ndim == 0
    # The class token is an input that conditions every prediction, not a target.
    other = seq.clone()
    other[:, 1] = VOCAB.class_token((labels + 1) % 10)
    with torch.no_grad():
        assert abs(float(train.sequence_loss(model, other)) - float(loss)) > 1e-4


def test_batch_indices_are_deterministic_and_cover_each_epoch():
    n, bs = 23, 5
    per_epoch = n // bs  # 4 batches; the last partial batch is dropped
    for epoch in range(3):
        batches = [trainer.batch_indices(n, bs, epoch * per_epoch + j, seed=1) for j in range(per_epoch)]
        assert all(len(b) == bs for b in batches)
        seen = torch.cat(batches)
        assert len(torch.unique(seen)) == per_epoch * bs  # no index twice within an epoch
        assert int(seen.max()) < n and int(seen.min()) >= 0
    assert torch.equal(trainer.batch_indices(n, bs, 6, seed=1), trainer.batch_indices(n, bs, 6, seed=1))
    assert not torch.equal(trainer.batch_indices(n, bs, 0, seed=1), trainer.batch_indices(n, bs, 4, seed=1))  # new epoch
    assert not torch.equal(trainer.batch_indices(n, bs, 0, seed=1), trainer.batch_indices(n, bs, 0, seed=2))
    # Over many epochs every example is drawn.
    drawn = torch.cat([trainer.batch_indices(n, bs, it, seed=1) for it in range(40)])
    assert len(torch.unique(drawn)) == n
    # Fewer examples than a batch: the whole set, shuffled.
    small = trainer.batch_indices(3, 8, 0, seed=0)
    assert sorted(small.tolist()) == [0, 1, 2]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-2, warmup_iters=10, max_iters=110, min_lr_frac=0.1)
    lrs = [trainer.lr_at(it, cfg) for it in range(130)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warmup ...
    assert lrs[9] == pytest.approx(1e-2) and lrs[10] == pytest.approx(1e-2)  # ... up to the peak
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # cosine decay
    assert lrs[60] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))  # halfway: midpoint of peak and floor
    assert lrs[110] == pytest.approx(1e-3) and lrs[129] == pytest.approx(1e-3)  # floor afterwards
    assert trainer.lr_at(0, TrainConfig(lr=1e-2, warmup_iters=0, max_iters=10)) == pytest.approx(1e-2)


def make_run(run: Path, n_per_class: int = 4, heldout_per_class: int = 1, seed: int = 0) -> str:
    """A run directory with split, tokenizer and tokens whose weights follow their class."""
    run.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    pattern = (labels[:, None] * 3 + torch.arange(SPEC.num_params)[None]) % VOCAB.num_codes
    noise = torch.rand(pattern.shape, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, VOCAB.num_codes, pattern.shape, generator=g), pattern)
    codebook = torch.linspace(-1, 1, VOCAB.num_codes)
    save_tokenizer(run / TOKENIZER_FILE, codebook, VOCAB, SPEC)
    tid = tokenizer_id(codebook)
    save_tensors(run / TOKENS_FILE, {"tokens": tokens.to(torch.int16), "labels": labels}, {"tokenizer_id": tid})
    held = [c * n_per_class + i for c in range(10) for i in range(heldout_per_class)]
    train_idx = [i for i in range(len(labels)) if i not in held]
    save_json(run / "split.json", {"dataset": "synthetic", "image_size": 28, "num_classes": 10,
                                   "indices": list(range(len(labels))), "train": train_idx, "heldout": held})
    return tid


def cfg(**kw) -> TrainConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, batch_size=8, max_iters=12, lr=1e-2, warmup_iters=2,
                eval_interval=4, ckpt_interval=3, dtype="fp32", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def read_log(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_run_train_lowers_the_loss(tmp_path):
    run = tmp_path / "run"
    tid = make_run(run)
    c = cfg(max_iters=40, eval_interval=10, ckpt_interval=20)
    summary = train.run_train(c, run, progress=False)
    start = math.log(VOCAB.num_codes)  # a fresh model is close to uniform over the codes
    assert summary["train_loss"] < start - 0.5
    assert summary["val_loss"] < start - 0.5
    assert summary["iterations"] == 40 and summary["tokenizer_id"] == tid and summary["autocast"] == "fp32"
    assert json.loads((run / layout.SUMMARY_FILE).read_text()) == summary

    log = read_log(run / layout.LOG_FILE)
    assert list(log[0]) == list(LOG_COLUMNS)
    assert [int(r["iter"]) for r in log] == [10, 20, 30, 40]
    assert float(log[-1]["val_loss"]) < float(log[0]["val_loss"])


def test_checkpoint_is_a_weights_only_dict(tmp_path):
    run = tmp_path / "run"
    tid = make_run(run)
    c = cfg(max_iters=3)
    train.run_train(c, run, progress=False)
    ckpt = torch.load(run / layout.CKPT_FILE, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "tokenizer_id", "config"} <= set(ckpt)
    assert ckpt["iter_num"] == 3 and ckpt["tokenizer_id"] == tid
    assert ckpt["model_args"] == train.model_config(c, VOCAB, SPEC.num_params).to_dict()
    assert ckpt["model_args"]["block_size"] == SPEC.num_params + 2 and ckpt["model_args"]["vocab_size"] == 19
    model, loaded = checkpoint.load_model(run)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_ema_is_the_average_that_sampling_loads_and_scores(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    summary = train.run_train(cfg(max_iters=6, ema_decay=0.5), run, progress=False)
    ckpt = torch.load(run / layout.CKPT_FILE, weights_only=True)
    shadow = ckpt["ema"]["shadow"]
    assert ckpt["ema"]["updates"] == 6 and shadow.keys() == ckpt["model"].keys()
    assert any(not torch.equal(shadow[k], v) for k, v in ckpt["model"].items() if v.is_floating_point())
    model, _ = checkpoint.load_model(run)  # sample, tune and the API load the average
    for k, v in model.state_dict().items():
        assert torch.equal(v, shadow[k]), k
    # train.json's held-out CE is the average's; the raw weights' is kept beside it.
    seqs = train.build_sequences(*load_tokens(run, ckpt["tokenizer_id"]), VOCAB)
    heldout = seqs[torch.tensor(json.loads((run / "split.json").read_text())["heldout"])]
    assert summary["val_loss"] == pytest.approx(train.evaluate_loss(model, heldout, 8, torch.device("cpu"), None))
    raw = GPT(GPTConfig(**ckpt["model_args"]))
    raw.load_state_dict(ckpt["model"])
    assert summary["val_loss_raw"] == pytest.approx(train.evaluate_loss(raw, heldout, 8, torch.device("cpu"), None))


def test_ema_follows_the_warmed_up_decay():
    from nefgpt.ema import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay min(0.99, 2 / 11): the new weights get 9/11 of the average
    assert torch.allclose(ema.shadow["weight"], start + 9 / 11)
    ema.updates = 10_000
    assert ema.current_decay() == 0.99
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_resume_without_the_average_is_refused(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=3), run, progress=False)
    with pytest.raises(ArtifactError, match="no weight average"):
        train.run_train(cfg(max_iters=6, ema_decay=0.9), run, resume=True, progress=False)


def interrupted_then_resumed(run: Path, c: TrainConfig, crash_at: int, monkeypatch) -> None:
    real = train.batch_indices

    class Crash(Exception):
        pass

    def crashing(n, bs, iteration, seed):
        if iteration == crash_at:
            raise Crash
        return real(n, bs, iteration, seed)

    with monkeypatch.context() as m:
        m.setattr(train, "batch_indices", crashing)
        with pytest.raises(Crash):
            train.run_train(c, run, progress=False)
    ckpt = torch.load(run / layout.CKPT_FILE, weights_only=True)
    assert ckpt["iter_num"] == (crash_at // c.ckpt_interval) * c.ckpt_interval
    train.run_train(c, run, resume=True, progress=False)


@pytest.mark.parametrize("dtype,p_uncond,extra", [("fp32", 0.0, {}), ("bf16", 0.0, {}), ("fp32", 0.3, {}),
                                                   ("fp32", 0.0, {"ema_decay": 0.9, "dropout": 0.1})])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, dtype, p_uncond, extra):
    c = cfg(dtype=dtype, p_uncond=p_uncond, **extra)
    whole, part = tmp_path / "whole", tmp_path / "part"
    make_run(whole)
    make_run(part)
    train.run_train(c, whole, progress=False)
    interrupted_then_resumed(part, c, crash_at=7, monkeypatch=monkeypatch)  # checkpoint at 6, crash at 7

    assert_same_checkpoint(whole / layout.CKPT_FILE, part / layout.CKPT_FILE, iter_num=12)

    # The log of the resumed run has each evaluation once, with the same numbers.
    cols = ("iter", "lr", "train_loss", "val_loss")
    la = [[r[c] for c in cols] for r in read_log(whole / layout.LOG_FILE)]
    lb = [[r[c] for c in cols] for r in read_log(part / layout.LOG_FILE)]
    assert la == lb and [int(r[0]) for r in la] == [4, 8, 12]


def test_existing_checkpoint_needs_resume(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=3), run, progress=False)
    with pytest.raises(NefgptError, match="--resume"):
        train.run_train(cfg(max_iters=6), run, progress=False)
    # Resuming with other model settings is refused, naming the checkpoint.
    with pytest.raises(ArtifactError, match="ckpt.pt"):
        train.run_train(cfg(max_iters=6, n_embd=32), run, resume=True, progress=False)
    # Resuming with the same settings continues to the new end.
    train.run_train(cfg(max_iters=6), run, resume=True, progress=False)
    assert torch.load(run / layout.CKPT_FILE, weights_only=True)["iter_num"] == 6


def test_checkpoint_of_another_tokenizer_is_refused(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=3), run, progress=False)
    codebook = torch.linspace(-2, 2, VOCAB.num_codes)
    save_tokenizer(run / TOKENIZER_FILE, codebook, VOCAB, SPEC)
    with pytest.raises(ArtifactError, match="tokens.safetensors"):
        train.run_train(cfg(max_iters=6), run, resume=True, progress=False)  # tokens are stale too
    save_tensors(run / TOKENS_FILE, {"tokens": torch.zeros(40, SPEC.num_params, dtype=torch.int16),
                                     "labels": torch.arange(10).repeat_interleave(4)},
                 {"tokenizer_id": tokenizer_id(codebook)})
    with pytest.raises(ArtifactError, match="ckpt.pt"):
        train.run_train(cfg(max_iters=6), run, resume=True, progress=False)


def test_load_model_refuses_a_checkpoint_without_a_model(tmp_path):
    torch.save({"model": {"nope": torch.zeros(1)}, "model_args": {"n_layer": 1}}, tmp_path / layout.CKPT_FILE)
    with pytest.raises(ArtifactError, match="ckpt.pt"):
        checkpoint.load_model(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / layout.CKPT_FILE)
    with pytest.raises(ArtifactError, match="ckpt.pt"):
        checkpoint.load_model(tmp_path)


def test_null_class_dropout_is_seeded_per_iteration_and_shards_like_the_global_batch():
    g = torch.Generator().manual_seed(0)
    seqs = train.build_sequences(torch.randint(0, VOCAB.num_codes, (40, 5), generator=g), torch.arange(40) % 10, VOCAB)
    before = seqs.clone()
    c, plain_cfg = cfg(p_uncond=0.3), cfg()
    batch = train.training_batch(seqs, c, 5, VOCAB.sos)
    assert torch.equal(batch, train.training_batch(seqs, c, 5, VOCAB.sos))  # a pure function of (seed, iteration)
    plain = train.training_batch(seqs, plain_cfg, 5, VOCAB.sos)
    assert torch.equal(seqs, before)  # the training set itself is never changed
    assert (plain[:, 1] != VOCAB.sos).all()
    dropped = batch[:, 1] == VOCAB.sos
    assert torch.equal(batch[~dropped], plain[~dropped])  # the same batch, only class tokens replaced
    assert torch.equal(batch[:, [0, *range(2, 7)]], plain[:, [0, *range(2, 7)]])
    # About p of the sequences, in different places at different iterations.
    masks = torch.stack([train.null_class_mask(8, it, c) for it in range(400)])
    assert 0.25 < float(masks.float().mean()) < 0.35
    assert len({tuple(m.tolist()) for m in masks}) > 100
    assert not train.null_class_mask(8, 3, plain_cfg).any() and train.null_class_mask(8, 3, cfg(conditioning="none")).all()
    # Each rank's share: its contiguous part of the same global batch, so together they are the global batch.
    shards = [train.training_batch(seqs, c, 5, VOCAB.sos, SimpleNamespace(shard=lambda n, r=r: distributed.Group.shard(
        SimpleNamespace(rank=r, world_size=2), n))) for r in range(2)]
    assert [len(x) for x in shards] == [4, 4] and torch.equal(torch.cat(shards), batch)


def test_p_uncond_must_be_a_share():
    for bad in ("-0.1", "1.5", "nan", "inf"):
        with pytest.raises(UsageError, match="train.p_uncond"):
            apply_overrides(RunConfig(), [f"train.p_uncond={bad}"])
    for good in ("0", "0.1", "1"):
        assert apply_overrides(RunConfig(), [f"train.p_uncond={good}"]).train.p_uncond == float(good)


def test_unconditional_training_sees_only_the_null_class(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run)
    seen = []
    real = train.sequence_loss
    monkeypatch.setattr(train, "sequence_loss",
                        lambda model, seq, *rest: seen.append(seq[:, 1].clone()) or real(model, seq, *rest))
    summary = train.run_train(cfg(conditioning="none", max_iters=4), run, progress=False)
    assert summary["conditioning"] == "none" and summary["processes"] == 1
    assert len(seen) >= 4 and all((s == VOCAB.sos).all() for s in seen)  # training and held-out batches
    assert torch.load(run / layout.CKPT_FILE, weights_only=True)["config"]["conditioning"] == "none"


def test_tensorboard_scalars_follow_the_csv_log_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole, part = tmp_path / "whole", tmp_path / "part"
    make_run(whole)
    make_run(part)
    c = cfg()
    train.run_train(c, whole, progress=False)
    interrupted_then_resumed(part, c, crash_at=7, monkeypatch=monkeypatch)  # events 7.. of the first try are purged
    for run in (whole, part):
        acc = EventAccumulator(str(run / layout.TB_DIR))
        acc.Reload()
        assert {"train/loss", "val/loss", "lr", "tokens_per_s"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
        log = read_log(run / layout.LOG_FILE)
        assert [e.step for e in acc.Scalars("val/loss")] == [int(r["iter"]) for r in log]
        assert [round(e.value, 5) for e in acc.Scalars("val/loss")] == [float(r["val_loss"]) for r in log]
    values = [[e.value for e in EventAccumulator(str(r / layout.TB_DIR)).Reload().Scalars("train/loss")]
              for r in (whole, part)]
    assert values[0] == values[1]


def test_without_tensorboard_only_the_csv_log_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=4), run, progress=False)
    assert not (run / layout.TB_DIR).exists()
    assert [int(r["iter"]) for r in read_log(run / layout.LOG_FILE)] == [4]


def test_lr_schedule_follows_the_faster_of_iterations_and_time():
    cfg = TrainConfig(lr=1e-2, warmup_iters=0, max_iters=1000, min_lr_frac=0.1, max_minutes=10.0)
    # Half the time used at 1 % of the iterations: the schedule is halfway, as at iteration 500 without a budget.
    assert trainer.lr_at(10, cfg, elapsed_s=300.0) == pytest.approx(trainer.lr_at(500, TrainConfig(
        lr=1e-2, warmup_iters=0, max_iters=1000, min_lr_frac=0.1)))
    assert trainer.lr_at(10, cfg, elapsed_s=600.0) == pytest.approx(1e-3)  # the budget is spent: the floor
    assert trainer.lr_at(900, cfg, elapsed_s=1.0) == trainer.lr_at(900, TrainConfig(
        lr=1e-2, warmup_iters=0, max_iters=1000, min_lr_frac=0.1))  # iterations ahead of time: they lead
    # Without a budget the schedule ignores the clock entirely (exact, reproducible runs).
    plain = TrainConfig(lr=1e-2, warmup_iters=0, max_iters=1000)
    assert trainer.lr_at(10, plain, elapsed_s=1e9) == trainer.lr_at(10, plain)


def test_time_budget_stops_training_and_resume_keeps_the_budget(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run)
    clock = {"t": 1000.0}

    def fake_time():  # each call advances 1 s: the budget of 0.1 min (6 s) runs out after a few steps
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(trainer.time, "time", fake_time)
    c = cfg(max_iters=1000, max_minutes=0.1)
    summary = train.run_train(c, run, progress=False)
    assert summary["stopped_by"] == "max_minutes" and 1 <= summary["iterations"] < 1000
    ckpt = torch.load(run / layout.CKPT_FILE, weights_only=True)
    assert ckpt["iter_num"] == summary["iterations"] and ckpt["elapsed_s"] >= 6.0
    log = read_log(run / layout.LOG_FILE)
    assert int(log[-1]["iter"]) == summary["iterations"]  # the last step is evaluated and logged
    assert float(log[-1]["lr"]) == pytest.approx(c.lr * c.min_lr_frac)  # and the schedule reached its floor
    # A resume continues the same budget: it is spent, so nothing more is trained.
    again = train.run_train(c, run, resume=True, progress=False)
    assert again["iterations"] == summary["iterations"] and again["stopped_by"] == "max_minutes"
    assert torch.load(run / layout.CKPT_FILE, weights_only=True)["iter_num"] == summary["iterations"]
    # A larger budget on resume trains on from there.
    more = train.run_train(cfg(max_iters=1000, max_minutes=0.3), run, resume=True, progress=False)
    assert more["iterations"] > summary["iterations"]


# --- Levers: HL-Gauss targets, and training with class_embed / pos_bias / value_embed / struct_pos ---------------

LEVERS = dict(class_embed=True, pos_bias="class", value_embed=True, struct_pos=True, hl_sigma=1.0)


def dense_hl_gauss(targets: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """(N, K) HL-Gauss targets written out plainly: bin masses of N(y, sigma^2), band ceil(4 sigma), renormalized."""
    r = math.ceil(4 * sigma)
    rows = []
    for y in targets.tolist():
        row = [0.5 * (math.erf((j - y + 0.5) / (sigma * math.sqrt(2))) - math.erf((j - y - 0.5) / (sigma * math.sqrt(2))))
               if abs(j - y) <= r else 0.0 for j in range(k)]
        rows.append([v / sum(row) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


def test_hl_gauss_with_sigma_to_zero_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 12, generator=g) * 3, torch.randint(0, 12, (50,), generator=g)
    targets[:2] = torch.tensor([0, 11])  # the codebook's ends
    plain = F.cross_entropy(logits, targets)
    assert torch.equal(train.hl_gauss_loss(logits, targets, 0.0), plain)
    torch.testing.assert_close(train.hl_gauss_loss(logits, targets, 1e-3), plain)
    with pytest.raises(ValueError, match="hl_sigma"):
        train.hl_gauss_loss(logits, targets, float("nan"))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 50.0])
def test_hl_gauss_is_cross_entropy_against_the_normalized_gaussian(sigma):
    g = torch.Generator().manual_seed(1)
    k = 12
    targets = torch.cat([torch.tensor([0, 1, k - 1]), torch.randint(0, k, (37,), generator=g)])
    logits = (torch.randn(len(targets), k, generator=g, dtype=torch.float64) * 2).requires_grad_()
    p = dense_hl_gauss(targets, k, sigma)
    assert torch.allclose(p.sum(1), torch.ones(len(p), dtype=torch.float64))
    ref = -(p * logits.log_softmax(1)).sum(1).mean()
    loss = train.hl_gauss_loss(logits.float(), targets, sigma)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(train.hl_gauss_loss(logits, targets, sigma), logits)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # A proper scoring rule: the target itself scores its entropy, and anything else scores more.
    best = p.clamp_min(1e-300).log()
    entropy = -(p * best).sum(1).mean()
    torch.testing.assert_close(train.hl_gauss_loss(best, targets, sigma), entropy)
    assert loss.item() > entropy.item()


def test_hl_sigma_trains_but_the_evaluated_loss_stays_plain_cross_entropy():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    seq = train.build_sequences(torch.randint(0, VOCAB.num_codes, (6, SPEC.num_params), generator=g),
                                torch.arange(6), VOCAB)
    with torch.no_grad():
        plain = train.sequence_loss(model, seq)
        smooth = train.sequence_loss(model, seq, 1.0)
        logits = model(seq[:, :-1])[:, 1:].reshape(-1, VOCAB.num_codes)
        evaluated = train.evaluate_loss(model, seq, 4, torch.device("cpu"), None)
    torch.testing.assert_close(smooth, train.hl_gauss_loss(logits, seq[:, 2:].reshape(-1), 1.0))
    assert abs(float(smooth) - float(plain)) > 1e-3
    assert evaluated == pytest.approx(float(plain), rel=1e-5)


def test_first_layer_weight_is_a_weighted_mean_of_the_per_token_cross_entropy():
    assert train.first_layer_weights(SPEC.num_params, 6, 1.0) is None  # 1: the plain loss, unchanged
    w = train.first_layer_weights(SPEC.num_params, 6, 3.0)
    assert w.tolist() == [3.0] * 6 + [1.0] * (SPEC.num_params - 6)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    seq = train.build_sequences(torch.randint(0, VOCAB.num_codes, (4, SPEC.num_params), generator=g),
                                torch.arange(4), VOCAB)
    with torch.no_grad():
        logits = model(seq[:, :-1])[:, 1:]
        per_token = F.cross_entropy(logits.reshape(-1, VOCAB.num_codes), seq[:, 2:].reshape(-1),
                                    reduction="none").view(4, SPEC.num_params)
        weighted = train.sequence_loss(model, seq, 0.0, w)
        torch.testing.assert_close(weighted, (per_token * w).sum() / (4 * w.sum()))
        torch.testing.assert_close(train.sequence_loss(model, seq, 0.0, torch.ones(SPEC.num_params)),
                                   train.sequence_loss(model, seq))
        # With HL-Gauss targets the same weights apply to each token's smoothed loss.
        smooth = train.hl_gauss_loss(logits.reshape(-1, VOCAB.num_codes), seq[:, 2:].reshape(-1), 1.0,
                                     reduction="none").view(4, SPEC.num_params)
        torch.testing.assert_close(train.sequence_loss(model, seq, 1.0, w), (smooth * w).sum() / (4 * w.sum()))
    with pytest.raises(UsageError, match="train.first_layer_weight"):
        apply_overrides(RunConfig(), ["train.first_layer_weight=0"])


def test_model_config_carries_the_levers():
    plain = train.model_config(cfg(), VOCAB, SPEC.num_params, SPEC)
    assert plain == train.model_config(cfg(), VOCAB, SPEC.num_params)  # no spec needed without struct_pos
    assert plain.to_dict() == GPTConfig(**{k: v for k, v in plain.to_dict().items()
                                           if k not in ("class_embed", "pos_bias", "value_embed", "struct_pos",
                                                        "field_sizes")}).to_dict()  # levers off = defaults
    args = train.model_config(cfg(**LEVERS), VOCAB, SPEC.num_params, SPEC)
    assert (args.class_embed, args.pos_bias, args.value_embed, args.struct_pos) == (True, "class", True, True)
    assert args.field_sizes == (4, 3, 1)  # 4 * octaves inputs, hidden (3,), one output
    with pytest.raises(ValueError, match="struct_pos"):
        train.model_config(cfg(struct_pos=True), VOCAB, SPEC.num_params)


def test_lever_settings_are_validated():
    for bad in ("train.pos_bias=both", "train.hl_sigma=-1", "train.hl_sigma=nan", "train.pos_bias_decay=-0.1",
                "train.class_embed=1"):
        with pytest.raises(UsageError, match=bad.split("=")[0]):
            apply_overrides(RunConfig(), [bad])
    c = apply_overrides(RunConfig(), ["train.pos_bias=class", "train.hl_sigma=0.75", "train.pos_bias_decay=0",
                                      "train.class_embed=true", "train.value_embed=true", "train.struct_pos=true"]).train
    assert (c.pos_bias, c.hl_sigma, c.pos_bias_decay, c.class_embed, c.value_embed, c.struct_pos) == (
        "class", 0.75, 0.0, True, True, True)
    d = TrainConfig()
    assert (d.class_embed, d.pos_bias, d.value_embed, d.hl_sigma, d.struct_pos) == (False, "none", False, 0.0, False)


@pytest.mark.parametrize("extra", [dict(p_uncond=0.3), dict(conditioning="none", pos_bias="position")])
def test_training_with_every_lever_reloads_resumes_and_samples(tmp_path, extra):
    from nefgpt.generate import generate
    from nefgpt.codebook import load_tokenizer

    run = tmp_path / "run"
    make_run(run)
    c = cfg(max_iters=6, pos_bias_decay=0.3, **{**LEVERS, **extra})
    summary = train.run_train(c, run, progress=False)
    assert math.isfinite(summary["val_loss"])
    model, ckpt = checkpoint.load_model(run)
    mc = model.config
    assert (mc.class_embed, mc.pos_bias, mc.value_embed, mc.struct_pos) == (True, c.pos_bias, True, True)
    torch.testing.assert_close(model.code_values, load_tokenizer(run / TOKENIZER_FILE).codebook)  # from the tokenizer
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert model.pos_bias.abs().max() > 0 and model.cls_emb.weight.abs().max() > 0  # learned, from zero
    assert ckpt["optimizer"]["param_groups"][2]["weight_decay"] == 0.3  # the bias's own group
    # The held-out loss of the summary is the plain cross-entropy of the saved model.
    val = torch.tensor(json.loads((run / "split.json").read_text())["heldout"])
    seqs = train.build_sequences(*load_tokens(run, ckpt["tokenizer_id"]), VOCAB)[val]
    if c.conditioning == "none":
        seqs[:, 1] = VOCAB.sos
    assert summary["val_loss"] == pytest.approx(train.evaluate_loss(model, seqs, 8, torch.device("cpu"), None),
                                                rel=1e-4)
    # Sampling: cache and full recompute agree, with guidance where the model learned the null class.
    labels = torch.tensor([0, 3, 9, -1]) if c.conditioning == "class" else torch.full((4,), -1)
    for guidance in ((1.0, 2.0) if c.p_uncond > 0 else (1.0,)):
        out = [generate(model, labels, VOCAB, SPEC.num_params, 1.0, 0, 1.0, torch.Generator().manual_seed(5),
                        use_cache=use_cache, guidance=guidance) for use_cache in (True, False)]
        assert torch.equal(out[0], out[1]) and out[0].shape == (4, SPEC.num_params)
        assert 0 <= int(out[0].min()) and int(out[0].max()) < VOCAB.num_codes
    # Resume continues with the same levers; other lever settings are refused.
    train.run_train(cfg(max_iters=8, pos_bias_decay=0.3, **{**LEVERS, **extra}), run, resume=True, progress=False)
    assert torch.load(run / layout.CKPT_FILE, weights_only=True)["iter_num"] == 8
    with pytest.raises(ArtifactError, match="model settings"):
        train.run_train(cfg(max_iters=9, **extra), run, resume=True, progress=False)


def test_checkpoint_from_before_the_levers_loads_and_resumes(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=3), run, progress=False)
    path = run / layout.CKPT_FILE
    ckpt = torch.load(path, weights_only=True)
    new_keys = ("class_embed", "pos_bias", "value_embed", "struct_pos", "field_sizes")
    ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items() if k not in new_keys}
    torch.save(ckpt, path)
    model, _ = checkpoint.load_model(run)
    assert not model.config.class_embed and model.config.pos_bias == "none"
    with pytest.raises(ArtifactError, match="model settings"):
        train.run_train(cfg(max_iters=6, class_embed=True), run, resume=True, progress=False)
    train.run_train(cfg(max_iters=6), run, resume=True, progress=False)
    assert torch.load(path, weights_only=True)["iter_num"] == 6


def test_a_follower_takes_the_bias_decay_from_rank_0s_optimizer_state():
    """A follower's optimizer gets the bias decay from rank 0's state alone (train.follow_train loads it)."""
    model = GPT(GPTConfig(block_size=SPEC.num_params + 2, vocab_size=VOCAB.size, num_codes=VOCAB.num_codes,
                          n_layer=1, n_head=2, n_embd=16, pos_bias="position"))
    lead = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), pos_bias_decay=0.3)
    follower = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
    follower.load_state_dict(lead.state_dict())
    assert [g["weight_decay"] for g in follower.param_groups] == [0.1, 0.0, 0.3]


def test_pos_bias_learning_rate_is_a_multiple_of_the_schedule(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    train.run_train(cfg(max_iters=3, pos_bias="position", pos_bias_lr_mult=10.0), run, progress=False)
    groups = torch.load(run / layout.CKPT_FILE, weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["lr_mult"] == 10.0
    assert groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[1]["lr"] == groups[0]["lr"]
