"""Batched field fitting vs. a reference-style loop, measured side by side.

The reference code fitted one field at a time with Adam on 64-pixel minibatches.
This script fits the same MNIST images both ways and prints fields/s, PSNR and
the speed ratio, plus the GFLOP/s of the batched full-image step.

    python benchmarks/fit.py [--fields 512] [--loop-fields 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nefgpt import field
from nefgpt.config import FitConfig
from nefgpt.data import load_dataset
from nefgpt.fit import fit_anchor, fit_batch, spec_from_config


def reference_loop(spec, init, images, epochs: int, lr: float = 4e-3, batch: int = 64) -> torch.Tensor:
    """One field at a time, Adam, shuffled 64-pixel minibatches, as the reference implementation did."""
    res = images.shape[-1]
    feats = field.encode(field.pixel_coords(res), spec.octaves)
    out = []
    gen = torch.Generator().manual_seed(0)
    for w0, img in zip(init, images):
        w = w0[None].clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        target = img.reshape(1, -1)
        for _ in range(epochs):
            for idx in torch.randperm(res * res, generator=gen).split(batch):
                loss = F.binary_cross_entropy_with_logits(field.forward(spec, w, feats[idx]), target[:, idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out.append(w.detach()[0])
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=512)
    ap.add_argument("--loop-fields", type=int, default=8)
    ap.add_argument("--loop-epochs", type=int, default=30)
    args = ap.parse_args()
    cfg = FitConfig()
    spec = spec_from_config(cfg)
    images = load_dataset("mnist").images[: args.fields]
    anchor = fit_anchor(spec, images[0], cfg)

    t0 = time.perf_counter()
    batched = torch.cat([fit_batch(spec, anchor.expand(len(x), -1), x, cfg.steps, cfg.lr)
                         for x in images.split(cfg.batch_size)])
    t_batched = time.perf_counter() - t0
    psnr_batched = field.psnr(field.render(spec, batched), images)

    loop_images = images[: args.loop_fields]
    t0 = time.perf_counter()
    looped = reference_loop(spec, anchor.expand(len(loop_images), -1), loop_images, args.loop_epochs)
    t_loop = time.perf_counter() - t0
    psnr_loop = field.psnr(field.render(spec, looped), loop_images)

    # Forward + backward of the three layers at every pixel: 2 FLOPs per MAC, backward twice the forward.
    macs = sum(o * i for o, i in spec.layer_shapes) * images.shape[-1] ** 2
    gflops = 3 * 2 * macs * cfg.steps * len(images) / t_batched / 1e9
    rate_b, rate_l = len(images) / t_batched, len(loop_images) / t_loop
    print(f"threads: {torch.get_num_threads()}")
    print(f"batched : {len(images)} fields, {cfg.steps} full-image steps, {t_batched:.1f}s, {rate_b:.1f} fields/s, "
          f"PSNR {psnr_batched.mean():.2f} dB (first {len(loop_images)}: {psnr_batched[: len(loop_images)].mean():.2f}), "
          f"{gflops:.1f} GFLOP/s")
    print(f"loop    : {len(loop_images)} fields, {args.loop_epochs} epochs of 64-pixel batches, {t_loop:.1f}s, "
          f"{rate_l:.2f} fields/s, PSNR {psnr_loop.mean():.2f} dB")
    print(f"speedup : {rate_b / rate_l:.1f}x fields/s")


if __name__ == "__main__":
    main()
