"""The regression transformer: the GPT's backbone over continuous weights (the talk's first approach).

Input position 0 is a class embedding (the null class when unconditional), and
position p >= 1 a linear embedding of weight p-1, standardized with the
per-position mean and std of the training fields; learned positions are added.
The transformer blocks are those of :mod:`nefgpt.model`. A scalar head at
position p predicts standardized weight p, so the sequence is as long as the
field (no SOS: the class token already starts it). Loss: MSE or L1.

A deterministic regressor yields one field per class. ``regression.noise``
(default 0) adds Gaussian noise of that many residual stds at every step of
sampling; the residual std of each position is measured on training fields
after training and kept in the checkpoint.

Training is nefgpt.trainer's loop (the GPT's): exact resume, and a checkpoint at the
step boundary on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..config import RunConfig
from ..errors import ArtifactError, UsageError
from ..field import FieldSpec
from ..fields_io import load_nefs, spec_from_config
from ..layout import CKPT_FILE, SPLIT_FILE
from ..model import GPT, Block, GPTConfig, KVCache
from ..split import load_split
from ..trainer import Task, Trainer, autocast, autocast_dtype, batch_indices, resolve_device

MODEL_TYPE = "regression"
MIN_STD = 1e-6  # a weight that no field moved from the anchor would otherwise divide by zero


class RegressionGPT(nn.Module):
    """Predicts standardized weights (B, T) from a class label and the weights before each position."""

    def __init__(self, cfg: GPTConfig, num_classes: int) -> None:
        super().__init__()
        self.config, self.num_classes = cfg, num_classes
        self.cls = nn.Embedding(num_classes + 1, cfg.n_embd)  # the last row is the null class
        self.w_in = nn.Linear(1, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, 1)
        # Raw-weight statistics travel with the model, so a checkpoint alone can sample.
        self.register_buffer("mean", torch.zeros(cfg.block_size))
        self.register_buffer("std", torch.ones(cfg.block_size))
        self.register_buffer("resid_std", torch.ones(cfg.block_size))  # in standardized units
        self.apply(GPT._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled residual init, as in model.GPT
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @property
    def null_class(self) -> int:
        return self.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, labels: torch.Tensor, z: torch.Tensor, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        """Predictions (B, T) for positions start .. start+T-1; position p predicts weight p.

        `z` (B, n) holds standardized weights fed as inputs: at start 0 the class token
        comes first and z are weights 0..n-1 (T = n + 1); at start > 0 z are weights
        start-1 .. start+n-2 (T = n), for incremental decoding with `cache`.
        """
        x = self.w_in(z.unsqueeze(-1).to(self.w_in.weight.dtype))
        if start == 0:
            x = torch.cat([self.cls(labels).unsqueeze(1), x], dim=1)
        t = x.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} exceeds the {self.config.block_size} weights of a field")
        x = self.drop(x + self.wpe(torch.arange(start, start + t, device=x.device)))
        for block in self.blocks:
            x = block(x, cache, start)
        x = self.ln_f(x)
        # The scalar head in fp32: bf16 would round every prediction to ~3 significant digits.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float()).squeeze(-1)

    def standardize(self, w: torch.Tensor) -> torch.Tensor:
        return (w - self.mean) / self.std

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def regression_loss(model: RegressionGPT, labels: torch.Tensor, z: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over all weight positions, teacher-forced on standardized weights z (B, P)."""
    pred = model(labels, z[:, :-1])
    return F.l1_loss(pred, z) if kind == "l1" else F.mse_loss(pred, z)


def model_args(cfg: RunConfig, num_weights: int, num_classes: int) -> dict:
    t = cfg.train
    try:
        gcfg = GPTConfig(block_size=num_weights, vocab_size=num_classes + 1, num_codes=0, n_layer=t.n_layer,
                         n_head=t.n_head, n_embd=t.n_embd, head_dim=t.head_dim, dropout=t.dropout, bias=t.bias)
    except ValueError as exc:
        raise UsageError(f"train: {exc}") from None
    return {**gcfg.to_dict(), "num_classes": num_classes}


def build_model(args: dict) -> RegressionGPT:
    names = {f.name for f in dataclass_fields(GPTConfig)}
    return RegressionGPT(GPTConfig(**{k: v for k, v in args.items() if k in names}), int(args["num_classes"]))


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[RegressionGPT, dict]:
    path = run_dir / CKPT_FILE
    ckpt = load_checkpoint(path)
    if ckpt.get("model_type") != MODEL_TYPE:
        raise ArtifactError(f"{path}: not a regression-transformer checkpoint (model_type "
                            f"{ckpt.get('model_type', 'gpt')!r}); train it with --set train.model=regression")
    try:
        model = build_model(ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: does not hold a valid regression transformer "
                            f"({str(exc).splitlines()[0][:160]})") from None
    return model.to(device).eval(), ckpt


def _training_data(cfg: RunConfig, run_dir: Path) -> tuple[dict, FieldSpec, int]:
    tensors, meta = load_nefs(run_dir, spec_from_config(cfg.fit))
    split = load_split(run_dir)
    n = tensors["weights"].shape[0]
    for key in ("train", "heldout"):
        if not split[key] or max(split[key]) >= n or min(split[key]) < 0:
            raise ArtifactError(f"{run_dir / SPLIT_FILE}: '{key}' rows are empty or outside nefs.safetensors' {n}")
    data = {}
    for key in ("train", "heldout"):
        rows = torch.tensor(split[key], dtype=torch.long)
        data[key] = (tensors["weights"][rows], tensors["labels"][rows])
    return data, meta["spec"], int(split["num_classes"])


def _condition(labels: torch.Tensor, model: RegressionGPT, cfg: RunConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Class labels as the model sees them: all null when unconditional, a p_uncond share null for guidance."""
    if cfg.train.conditioning == "none":
        return torch.full_like(labels, model.null_class)
    if gen is not None and cfg.train.p_uncond > 0:
        drop = torch.rand(labels.shape, generator=gen) < cfg.train.p_uncond
        return torch.where(drop, torch.full_like(labels, model.null_class), labels)
    return labels


@torch.no_grad()
def _eval_loss(model: RegressionGPT, w: torch.Tensor, labels: torch.Tensor, cfg: RunConfig,
               device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    total = 0.0
    for wb, lb in zip(w.split(cfg.train.batch_size), labels.split(cfg.train.batch_size)):
        with autocast(device, amp):
            loss = regression_loss(model, _condition(lb, model, cfg, None).to(device),
                                   model.standardize(wb.to(device)), cfg.regression.loss)
        total += float(loss) * len(wb)
    model.train()
    return total / max(len(w), 1)


@torch.no_grad()
def residual_std(model: RegressionGPT, w: torch.Tensor, labels: torch.Tensor, cfg: RunConfig,
                 device: torch.device) -> torch.Tensor:
    """Per-position std of the teacher-forced residuals (standardized units), in fp32 as sampling runs."""
    model.eval()
    sq = torch.zeros(model.config.block_size, dtype=torch.float64, device=device)
    for wb, lb in zip(w.split(cfg.train.batch_size), labels.split(cfg.train.batch_size)):
        z = model.standardize(wb.to(device))
        r = z - model(_condition(lb, model, cfg, None).to(device), z[:, :-1])
        sq += r.double().pow(2).sum(0)
    model.train()
    return (sq / max(len(w), 1)).sqrt().float()


class RegressionTask(Task):
    """Teacher-forced regression of the standardized weights; class dropout draws from one seeded generator."""

    def __init__(self, model: RegressionGPT, cfg: RunConfig, args: dict, spec: FieldSpec, data: dict,
                 device: torch.device, amp: torch.dtype | None) -> None:
        tc = cfg.train
        self.model, self.model_args, self.cfg, self.spec, self.device, self.amp = model, args, cfg, spec, device, amp
        self.optimizer = GPT.configure_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
        (self.train_w, self.train_y), (self.val_w, self.val_y) = data["train"], data["heldout"]
        self.cond_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + 7)  # class dropout for p_uncond

    def skip_to(self, start: int) -> None:
        """Advance the class-dropout generator past the draws of iterations 0 .. start-1, as a run that went
        through them left it (this baseline's order predates per-iteration seeding; every batch has
        min(batch_size, N) rows, see batch_indices)."""
        tc = self.cfg.train
        if tc.conditioning != "none" and tc.p_uncond > 0:
            rows = min(tc.batch_size, len(self.train_w))
            for _ in range(start):
                torch.rand(rows, generator=self.cond_gen)

    def batch(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        tc = self.cfg.train
        idx = batch_indices(len(self.train_w), tc.batch_size, it, tc.seed)
        labels = _condition(self.train_y[idx], self.model, self.cfg, self.cond_gen).to(self.device)
        return labels, self.model.standardize(self.train_w[idx].to(self.device))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return regression_loss(self.model, *batch, self.cfg.regression.loss)

    def evaluate(self) -> float:
        return _eval_loss(self.model, self.val_w, self.val_y, self.cfg, self.device, self.amp)

    def checkpoint(self) -> dict:
        return {"model_type": MODEL_TYPE, "field": self.spec.to_meta(),
                "config": {"train": vars(self.cfg.train).copy(), "regression": vars(self.cfg.regression).copy()}}

    def finish(self) -> None:
        n_resid = min(len(self.train_w), self.cfg.regression.residual_fields)
        self.model.resid_std.copy_(residual_std(self.model, self.train_w[:n_resid], self.train_y[:n_resid], self.cfg,
                                                self.device))


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Train from scratch, or with `resume` continue from ckpt.pt (the same steps as one long run)."""
    tc = cfg.train
    data, spec, num_classes = _training_data(cfg, run_dir)
    train_w, train_y = data["train"]
    val_w, val_y = data["heldout"]
    device = resolve_device(tc.device)
    amp = autocast_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    args = model_args(cfg, spec.num_params, num_classes)
    model = build_model(args).to(device)
    model.mean.copy_(train_w.mean(0))
    model.std.copy_(train_w.std(0, correction=0).clamp_min(MIN_STD))
    task = RegressionTask(model, cfg, args, spec, data, device, amp)
    trainer = Trainer(task, tc, device, amp, run_dir=run_dir, progress=progress, desc="train regression",
                      tokens_per_iter=tc.batch_size * spec.num_params)
    ckpt_path = run_dir / CKPT_FILE
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("model_type") != MODEL_TYPE:
            raise ArtifactError(f"{ckpt_path}: not a regression-transformer checkpoint (model_type "
                                f"{ckpt.get('model_type', 'gpt')!r}); use --force to restart")
        if ckpt.get("model_args") != args:
            raise ArtifactError(f"{ckpt_path}: model settings differ from the config; use --force to restart")
        saved = ckpt.get("model", {})
        if not all(torch.equal(saved.get(k, torch.empty(0)).to(device), getattr(model, k)) for k in ("mean", "std")):
            raise ArtifactError(f"{ckpt_path}: trained on other fields than this run's; use --force to restart")
        trainer.resume(ckpt)
        task.skip_to(trainer.start)
    else:
        trainer.fresh()
    trainer.train()

    final_train = _eval_loss(model, train_w[: len(val_w)], train_y[: len(val_w)], cfg, device, amp)
    final_val = _eval_loss(model, val_w, val_y, cfg, device, amp)
    summary = trainer.summary(final_train, final_val, head={"model": MODEL_TYPE, "loss": cfg.regression.loss},
                              tail={"residual_std_mean": float(model.resid_std.mean())})
    return trainer.write_summary(summary, f"{cfg.regression.loss.upper()} (standardized weights)")


@torch.no_grad()
def generate(model: RegressionGPT, labels: torch.Tensor, noise: float, generator: torch.Generator | None,
             guidance: float = 1.0, use_cache: bool = True) -> torch.Tensor:
    """Raw weights (B, P) for class labels (B,), one weight at a time (fp32)."""
    device = model.mean.device
    b, p = labels.shape[0], model.config.block_size
    guided = guidance != 1.0
    # Guidance runs the conditional and the null-class rows as one batch and mixes their predictions.
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cond = cond.to(device)
    rows = cond.shape[0]
    cache = KVCache(model.config, rows, device, model.mean.dtype) if use_cache else None
    z = torch.empty(rows, p, device=device)

    def step(pred: torch.Tensor, i: int) -> None:
        if guided:
            pred = pred[b:] + guidance * (pred[:b] - pred[b:])
        if noise > 0:
            eps = torch.randn(b, generator=generator).to(device)
            pred = pred + noise * model.resid_std[i] * eps
        z[:, i] = pred.repeat(2) if guided else pred

    step(model(cond, z[:, :0], cache, 0)[:, -1], 0)
    for i in range(1, p):
        if use_cache:
            pred = model(cond, z[:, i - 1 : i], cache, i)[:, -1]
        else:
            pred = model(cond, z[:, :i])[:, -1]
        step(pred, i)
    return model.unstandardize(z[:b])


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    from ..samples_io import save_samples

    sc, rc = cfg.sample, cfg.regression
    ckpt_path = run_dir / CKPT_FILE
    if not (math.isfinite(rc.noise) and rc.noise >= 0):
        raise UsageError(f"regression.noise must be a finite number >= 0, got {rc.noise}")
    model, ckpt = load_model(run_dir, resolve_device(cfg.train.device))
    spec = FieldSpec.from_meta(ckpt.get("field", {}), str(ckpt_path))
    spec.check_matches(spec_from_config(cfg.fit), str(ckpt_path))
    if spec.num_params != model.config.block_size:
        raise ArtifactError(f"{ckpt_path}: model generates {model.config.block_size} weights, "
                            f"the field needs {spec.num_params}")
    trained = ckpt.get("config", {}).get("train", {})
    if sc.guidance != 1.0 and not trained.get("p_uncond", 0) > 0:
        raise UsageError(f"sample.guidance = {sc.guidance} needs a model trained with train.p_uncond > 0 "
                         f"({ckpt_path} was not)")
    classes = list(range(model.num_classes)) if labels is None else list(labels)
    for c in classes:
        if not 0 <= c < model.num_classes:
            raise UsageError(f"label {c} is not a class of this model (0..{model.num_classes - 1})")
    classes_in = [model.null_class] * len(classes) if trained.get("conditioning") == "none" else classes
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(sc.n_per_class)
    gen = torch.Generator().manual_seed(sc.seed)
    t0 = time.perf_counter()
    if rc.noise == 0:
        # Deterministic: one field per class, repeated, so copies are identical by construction.
        unique = generate(model, torch.tensor(classes_in, dtype=torch.long), 0.0, None, sc.guidance).cpu()
        weights = unique.repeat_interleave(sc.n_per_class, dim=0)
    else:
        inputs = torch.tensor(classes_in, dtype=torch.long).repeat_interleave(sc.n_per_class)
        chunks = [generate(model, batch, rc.noise, gen, sc.guidance).cpu()
                  for batch in tqdm(inputs.split(sc.batch_size), desc="sample regression", disable=not progress)]
        weights = torch.cat(chunks)
    seconds = time.perf_counter() - t0
    meta = {"model": MODEL_TYPE, "noise": rc.noise, "seed": sc.seed, "n_per_class": sc.n_per_class,
            "guidance": sc.guidance, "unique_fields": len(classes) if rc.noise == 0 else len(all_labels),
            "seconds_per_field": seconds / len(all_labels)}
    save_samples(run_dir, spec, weights, all_labels, meta, per_row=min(sc.n_per_class, 10))
    return {"n": len(all_labels), "noise": rc.noise}
