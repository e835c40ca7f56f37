"""Baseline: a DDPM over the flattened field weights (HyperDiffusion-style), sampled with DDIM.

- Data: each of the 561 weight positions is standardized by its mean and std
  over the training fields. Since every field starts from the shared anchor,
  this is the same as modelling the offset from the anchor, standardized.
- Noise: the cosine schedule of Nichol & Dhariwal, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
- Denoiser: an MLP of pre-LayerNorm residual blocks, modulated (scale, shift)
  by a timestep + class embedding; class `num_classes` is the null class,
  given to `p_uncond` of the training fields, for classifier-free guidance
  (``sample.guidance``). It predicts x0 as ``sqrt(ab_t) x_t + sqrt(1 - ab_t) F``:
  the first term is the best linear guess for unit-variance data, so F starts
  at zero (zero-initialized output) and the net only learns the correction.
- Loss: mean squared error of x0 (standardized units), at uniform timesteps.
  The held-out loss scores every held-out field at `eval_timesteps` fixed,
  evenly spread timesteps with fixed noise, so its values compare across iterations.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import DiffusionConfig, RunConfig
from ..errors import ArtifactError, UsageError
from ..layout import CKPT_FILE
from ..trainer import Task, Trainer, autocast, autocast_dtype, batch_indices, decay_groups, resolve_device
from .common import check_range, load_baseline_checkpoint, load_fields, sample_classes, write_samples

KIND = "diffusion"


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fractions ab_t, t = 0..T-1 (float64), with betas capped at 0.999 as in the paper."""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def _coefs(alpha_bar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ab_t) and sqrt(1 - ab_t), shaped to broadcast over `like`; computed in alpha_bar's precision
    (float64 for sampling, as DDIM always did), then rounded to like's dtype."""
    ab = alpha_bar.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))
    return ab.sqrt().to(like.dtype), (1 - ab).sqrt().to(like.dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a, s = _coefs(alpha_bar, t, x0)
    return a * x0 + s * eps


def eps_from_x0(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a, s = _coefs(alpha_bar, t, x_t)
    return (x_t - a * x0) / s


def timestep_embedding(t: torch.Tensor, dim: int, timesteps: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = (t.float() * (1000.0 / timesteps))[:, None] * freqs[None]  # scaled so any T spans the same angles
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)  # every block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(emb).chunk(2, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(F.silu(self.fc1(y))))


class Denoiser(nn.Module):
    """x0 prediction from (x_t, t, class); class `num_classes` is the null class."""

    def __init__(self, num_params: int, num_classes: int, width: int, n_blocks: int, dropout: float, timesteps: int,
                 kind: str = KIND):
        super().__init__()
        self.args = {"kind": kind, "num_params": num_params, "num_classes": num_classes, "width": width,
                     "n_blocks": n_blocks, "dropout": dropout, "timesteps": timesteps}
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps).float(), persistent=False)
        self.inp = nn.Linear(num_params, width)
        self.time = nn.Sequential(nn.Linear(128, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_params)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_args(cls, args: dict) -> Denoiser:
        return cls(args["num_params"], args["num_classes"], args["width"], args["n_blocks"], args["dropout"],
                   args["timesteps"])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time(timestep_embedding(t, 128, self.args["timesteps"])) + self.label(labels))
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, emb)
        a, s = _coefs(self.alpha_bar, t, x_t)
        return a * x_t + s * self.out(self.norm(h)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def ddim_sample(predict_x0: Callable[[torch.Tensor, int], torch.Tensor], shape: tuple[int, ...],
                alpha_bar: torch.Tensor, steps: int, eta: float, generator: torch.Generator,
                clip_x0: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021) from x_T ~ N(0, I) with an x0-predictor; eta = 0 is deterministic."""
    ab = alpha_bar.double()
    ts = torch.linspace(len(ab) - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive().tolist()
    x = torch.randn(shape, generator=generator)
    for i, t in enumerate(ts):
        x0 = predict_x0(x, t)
        if clip_x0 > 0:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if i + 1 == len(ts):
            return x0  # the last step lands on t = 0 with ab = 1: x_0 is the prediction itself
        ab_t, ab_prev = float(ab[t]), float(ab[ts[i + 1]])
        eps = eps_from_x0(x, torch.full((len(x),), t), x0, ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator)
    return x


def guided_predictor(model: Denoiser, labels: torch.Tensor,
                     guidance: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    null = torch.full_like(labels, model.args["num_classes"])

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((len(x),), t, dtype=torch.long)
        if guidance == 1.0:
            return model(x, tt, labels)
        cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
        return uncond + guidance * (cond - uncond)

    return predict


def diffusion_loss(model: Denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(q_sample(x0, t, eps, model.alpha_bar), t, labels).float(), x0)


@torch.no_grad()
def eval_loss(model: Denoiser, x0: torch.Tensor, labels: torch.Tensor, cfg: DiffusionConfig,
              amp: torch.dtype | None) -> float:
    """x0 MSE of every field at `eval_timesteps` evenly spread timesteps, with noise fixed by the seed."""
    if len(x0) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 7_919)
    total = 0.0
    k = cfg.eval_timesteps
    for j in range(k):
        t_value = min(int((j + 0.5) * cfg.timesteps / k), cfg.timesteps - 1)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        for xb, eb, lb in zip(x0.split(cfg.batch_size), eps.split(cfg.batch_size), labels.split(cfg.batch_size)):
            t = torch.full((len(xb),), t_value, dtype=torch.long, device=x0.device)
            with autocast(x0.device, amp):
                total += float(diffusion_loss(model, xb, t, eb, lb)) * len(xb)
    model.train(was_training)
    return total / (k * len(x0))


def _check(cfg: RunConfig) -> None:
    d = cfg.diffusion
    check_range("diffusion.p_uncond", d.p_uncond, 0.0, 1.0, high_open=True)
    check_range("diffusion.dropout", d.dropout, 0.0, 1.0, high_open=True)
    check_range("diffusion.min_lr_frac", d.min_lr_frac, 0.0, 1.0)
    if d.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("diffusion.device = cuda, but no CUDA device is available")


class DiffusionTask(Task):
    """Denoising at uniform timesteps: batch, timesteps, noise and null classes are seeded by the iteration."""

    def __init__(self, model: Denoiser, cfg: DiffusionConfig, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_val: torch.Tensor, y_val: torch.Tensor, amp: torch.dtype | None, extra: dict) -> None:
        self.model, self.model_args = model, dict(model.args)
        self.optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
        self.cfg, self.x_train, self.y_train, self.x_val, self.y_val = cfg, x_train, y_train, x_val, y_val
        self.amp, self.extra, self.null = amp, extra, model.args["num_classes"]

    def batch(self, it: int) -> tuple[torch.Tensor, ...]:
        d, device = self.cfg, self.x_train.device
        idx = batch_indices(len(self.x_train), d.batch_size, it, d.seed).to(device)
        gen = torch.Generator().manual_seed(d.seed * 1_000_003 + it)  # noise depends on the iteration only
        t = torch.randint(d.timesteps, (len(idx),), generator=gen).to(device)
        eps = torch.randn(len(idx), self.x_train.shape[1], generator=gen).to(device)
        labels = torch.where(torch.rand(len(idx), generator=gen).to(device) < d.p_uncond, self.null, self.y_train[idx])
        return self.x_train[idx], t, eps, labels

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return diffusion_loss(self.model, *batch)

    def evaluate(self) -> float:
        return eval_loss(self.model, self.x_val, self.y_val, self.cfg, self.amp)

    def checkpoint(self) -> dict:
        return {**self.extra, "config": vars(self.cfg).copy()}


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Train from scratch, or with `resume` continue from ckpt.pt (same data order and noise as one long run)."""
    _check(cfg)
    d = cfg.diffusion
    fields = load_fields(cfg, run_dir, "train")
    heldout = load_fields(cfg, run_dir, "heldout")
    device = resolve_device(d.device, "diffusion.device")
    amp = autocast_dtype(d.dtype, device)
    mean = fields.weights.double().mean(0).float()
    std = fields.weights.double().std(0, correction=0).float().clamp_min(1e-8)
    x_train = ((fields.weights - mean) / std).to(device)
    y_train = fields.labels.to(device)
    x_val, y_val = ((heldout.weights - mean) / std).to(device), heldout.labels.to(device)
    # The train loss of the summary uses as many training fields as there are held-out ones.
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(d.seed))[: max(len(x_val), 1)]

    torch.manual_seed(d.seed)
    model = Denoiser(fields.spec.num_params, fields.num_classes, d.width, d.n_blocks, d.dropout, d.timesteps).to(device)
    task = DiffusionTask(model, d, x_train, y_train, x_val, y_val, amp,
                         {"norm_mean": mean, "norm_std": std, "nefs_id": fields.nefs_id})
    trainer = Trainer(task, d, device, amp, run_dir=run_dir, progress=progress, desc="train diffusion",
                      tokens_per_iter=d.batch_size * x_train.shape[1])  # weights per second, the GPT's tokens
    if resume and (run_dir / CKPT_FILE).exists():
        ckpt = load_baseline_checkpoint(run_dir, KIND, fields)
        if ckpt["model_args"] != model.args:
            raise ArtifactError(f"{run_dir / CKPT_FILE}: model settings differ from the config; use --force to restart")
        trainer.resume(ckpt)
    else:
        trainer.fresh()
    trainer.train()

    pick = pick.to(device)
    summary = trainer.summary(eval_loss(model, x_train[pick], y_train[pick], d, amp),
                              eval_loss(model, x_val, y_val, d, amp),
                              head={"model": KIND, "loss": "x0 mean squared error, per-position standardized weights"},
                              tail={"config": vars(d).copy()})
    return trainer.write_summary(summary, "x0 MSE (standardized weights)")


def load_model(run_dir: Path, fields) -> tuple[Denoiser, dict]:
    ckpt = load_baseline_checkpoint(run_dir, KIND, fields)
    path = run_dir / CKPT_FILE
    try:
        model = Denoiser.from_args(ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
        mean, std = ckpt["norm_mean"], ckpt["norm_std"]
        if mean.shape != (fields.spec.num_params,) or std.shape != mean.shape:
            raise ValueError("normalization has the wrong shape")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: not a valid {KIND} checkpoint ({str(exc).splitlines()[0][:160]})") from None
    return model.eval(), ckpt


def sample(cfg: RunConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    d, s = cfg.diffusion, cfg.sample
    if d.sample_steps < 1 or d.eta < 0:
        raise UsageError(f"diffusion.sample_steps must be >= 1 and diffusion.eta >= 0, got {d.sample_steps}, {d.eta}")
    fields = load_fields(cfg, run_dir, "train")
    model, ckpt = load_model(run_dir, fields)
    if s.guidance != 1.0 and float(ckpt.get("config", {}).get("p_uncond", 0.0)) <= 0:
        raise UsageError(f"sample.guidance = {s.guidance} needs a model trained with diffusion.p_uncond > 0")
    classes = sample_classes(labels, fields)
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(s.n_per_class)
    gen = torch.Generator().manual_seed(s.seed)
    t0 = time.perf_counter()
    out = []
    for batch in tqdm(all_labels.split(s.batch_size), desc="sample diffusion", disable=not progress):
        x = ddim_sample(guided_predictor(model, batch, s.guidance), (len(batch), fields.spec.num_params),
                        model.alpha_bar, d.sample_steps, d.eta, gen, d.clip_x0)
        out.append(x * ckpt["norm_std"] + ckpt["norm_mean"])
    weights = torch.cat(out)
    meta = {"model": KIND, "sampling": {"seed": s.seed, "n_per_class": s.n_per_class, "steps": d.sample_steps,
                                        "eta": d.eta, "guidance": s.guidance, "clip_x0": d.clip_x0},
            "seconds_per_field": (time.perf_counter() - t0) / len(all_labels)}
    return write_samples(cfg, run_dir, fields, weights, all_labels, meta)

