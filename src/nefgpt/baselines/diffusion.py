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

from ..artifacts import save_checkpoint, save_json
from ..config import DiffusionConfig, RunConfig
from ..errors import ArtifactError, NefgptError, UsageError
from ..train import (TrainInterrupted, append_log, autocast_dtype, batch_indices, deferred_signals, resolve_device,
                     stop_word, truncate_log)
from .common import CKPT_FILE, LOG_FILE, SUMMARY_FILE, check_range, load_baseline_checkpoint, load_fields, \
    sample_classes, write_samples

KIND = "diffusion"


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fractions ab_t, t = 0..T-1 (float64), with betas capped at 0.999 as in the paper."""
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def _coefs(alpha_bar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = alpha_bar.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return ab.sqrt(), (1 - ab).sqrt()


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a, s = _coefs(alpha_bar, t, x0)
    return a * x0 + s * eps


def x0_from_eps(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a, s = _coefs(alpha_bar, t, x_t)
    return (x_t - s * eps) / a


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
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
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


def lr_at(it: int, elapsed_s: float, cfg: DiffusionConfig) -> float:
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1)
    if cfg.max_minutes > 0:
        progress = max(progress, elapsed_s / (60 * cfg.max_minutes))
    min_lr = cfg.lr * cfg.min_lr_frac
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


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
            with torch.autocast(x0.device.type, dtype=amp or torch.float32, enabled=amp is not None):
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


def train(cfg: RunConfig, run_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Train from scratch, or with `resume` continue from ckpt.pt (same data order and noise as one long run)."""
    _check(cfg)
    d = cfg.diffusion
    fields = load_fields(cfg, run_dir, "train")
    heldout = load_fields(cfg, run_dir, "heldout")
    device = resolve_device(d.device)
    amp = autocast_dtype(d.dtype, device)
    mean = fields.weights.double().mean(0).float()
    std = fields.weights.double().std(0, correction=0).float().clamp_min(1e-8)
    x_train = ((fields.weights - mean) / std).to(device)
    y_train = fields.labels.to(device)
    x_val, y_val = ((heldout.weights - mean) / std).to(device), heldout.labels.to(device)
    # The train loss of the summary uses as many training fields as there are held-out ones.
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(d.seed))[: max(len(x_val), 1)]
    null = fields.num_classes

    torch.manual_seed(d.seed)
    model = Denoiser(fields.spec.num_params, fields.num_classes, d.width, d.n_blocks, d.dropout, d.timesteps).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": d.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=d.lr, betas=(0.9, 0.99))
    ckpt_path, log_path = run_dir / CKPT_FILE, run_dir / LOG_FILE
    start, best_val, elapsed_before = 0, float("inf"), 0.0
    if resume and ckpt_path.exists():
        ckpt = load_baseline_checkpoint(run_dir, KIND, fields)
        if ckpt["model_args"] != model.args:
            raise ArtifactError(f"{ckpt_path}: model settings differ from the config; use --force to restart")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        truncate_log(log_path, start)
    else:
        log_path.unlink(missing_ok=True)

    t0 = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - t0

    def save(it: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": dict(model.args),
            "iter_num": it, "best_val_loss": best_val, "norm_mean": mean, "norm_std": std,
            "nefs_id": fields.nefs_id, "config": vars(d).copy(), "elapsed_s": elapsed(),
        })

    done, stopped_by, train_loss, last_t, last_it = start, "max_iters", float("nan"), time.time(), start
    bar = tqdm(range(start, d.max_iters), initial=start, total=d.max_iters, desc="train diffusion",
               disable=not progress)
    with deferred_signals() as interrupted, bar:
        for it in bar:
            lr = lr_at(it, elapsed(), d)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(x_train), d.batch_size, it, d.seed).to(device)
            gen = torch.Generator().manual_seed(d.seed * 1_000_003 + it)  # noise depends on the iteration only
            t = torch.randint(d.timesteps, (len(idx),), generator=gen).to(device)
            eps = torch.randn(len(idx), x_train.shape[1], generator=gen).to(device)
            labels = torch.where(torch.rand(len(idx), generator=gen).to(device) < d.p_uncond, null, y_train[idx])
            if d.dropout > 0:
                torch.manual_seed(d.seed * 1_000_003 + it)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = diffusion_loss(model, x_train[idx], t, eps, labels)
            if not torch.isfinite(loss.detach()):
                raise NefgptError(f"train: diffusion loss became {loss.item()} at iteration {it}; "
                                  f"the last good checkpoint is kept in {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if d.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
            optimizer.step()
            train_loss, done = loss.item(), it + 1
            out_of_time = d.max_minutes > 0 and elapsed() >= 60 * d.max_minutes
            last = done == d.max_iters or out_of_time
            if done % d.eval_interval == 0 or last:
                val_loss = eval_loss(model, x_val, y_val, d, amp)
                best_val = min(best_val, val_loss)
                now = time.time()
                rate = d.batch_size * x_train.shape[1] * (done - last_it) / max(now - last_t, 1e-9)
                last_t, last_it = now, done
                # tokens_per_s counts weights per second, the GPT's tokens.
                append_log(log_path, [done, f"{lr:.6g}", f"{train_loss:.5f}", f"{val_loss:.5f}",
                                                   f"{rate:.0f}", f"{elapsed():.1f}"])
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            if interrupted or last or done % d.ckpt_interval == 0:
                save(done)
            if interrupted:
                raise TrainInterrupted(f"{stop_word(interrupted[0])} at iteration {done}; checkpoint saved to {ckpt_path} "
                                       "(resume with --resume)", interrupted[0])
            if out_of_time:
                stopped_by = "max_minutes"
                break
    if done == start:
        save(done)  # nothing left to train (e.g. a resume of a finished run): keep a complete checkpoint

    summary = {
        "model": KIND,
        "iterations": done,
        "stopped_by": stopped_by,
        "loss": "x0 mean squared error, per-position standardized weights",
        "train_loss": eval_loss(model, x_train[pick.to(device)], y_train[pick.to(device)], d, amp),
        "val_loss": eval_loss(model, x_val, y_val, d, amp),
        "num_params": model.num_params(),
        "device": str(device),
        "autocast": str(amp) if amp else "fp32",
        "train_seconds": elapsed(),
        "config": vars(d).copy(),
    }
    summary["best_val_loss"] = min(best_val, summary["val_loss"])
    save_json(run_dir / SUMMARY_FILE, summary)
    if log_path.exists():
        from ..figures import save_loss_curve

        save_loss_curve(run_dir / "loss.png", log_path, "x0 MSE (standardized weights)")
    return summary


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

