"""Batched field fitting vs. a reference-style loop, at equal PSNR, measured side by side.

The reference code fitted one field at a time: Adam at lr 4e-3 on shuffled
64-pixel minibatches, up to 250 epochs, with ReduceLROnPlateau. Here the loop
runs on the same images from the same anchor and stops each field as soon as it
reaches the PSNR that batched fitting gave that image (checked every
`--check-every` epochs), so the two are compared at equal quality. The script
also prints the GFLOP/s of the batched step next to a plain fp32 matmul measured
in the same run, i.e. how close fitting gets to the machine's matmul limit.

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
from nefgpt.fields_io import spec_from_config
from nefgpt.fit import fit_anchor, fit_batch


def reference_loop(spec, init, images, targets_db, max_epochs: int, check_every: int, lr: float = 4e-3,
                   batch: int = 64) -> tuple[torch.Tensor, list[int]]:
    """One field at a time until it reaches its target PSNR; returns the fields and the epochs each took."""
    res = images.shape[-1]
    feats = field.encode(field.pixel_coords(res), spec.octaves)
    out, epochs_used = [], []
    gen = torch.Generator().manual_seed(0)
    for w0, img, target_db in zip(init, images, targets_db):
        w = w0[None].clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10)
        target = img.reshape(1, -1)
        epoch = 0
        while epoch < max_epochs:
            total = 0.0
            for idx in torch.randperm(res * res, generator=gen).split(batch):
                loss = F.binary_cross_entropy_with_logits(field.forward(spec, w, feats[idx]), target[:, idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
            plateau.step(total)
            epoch += 1
            if epoch % check_every == 0 and field.psnr(field.render(spec, w.detach()), img[None]) >= target_db:
                break
        out.append(w.detach()[0])
        epochs_used.append(epoch)
    return torch.stack(out), epochs_used


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=512)
    ap.add_argument("--loop-fields", type=int, default=8)
    ap.add_argument("--max-epochs", type=int, default=250)
    ap.add_argument("--check-every", type=int, default=5)
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
    targets = psnr_batched[: len(loop_images)]
    t0 = time.perf_counter()
    looped, epochs = reference_loop(spec, anchor.expand(len(loop_images), -1), loop_images, targets.tolist(),
                                    args.max_epochs, args.check_every)
    t_loop = time.perf_counter() - t0
    psnr_loop = field.psnr(field.render(spec, looped), loop_images)
    reached = int((psnr_loop >= targets).sum())
    peak = matmul_gflops()

    # Forward + backward of the layers at every pixel: 2 FLOPs per MAC, backward twice the forward.
    macs = sum(o * i for o, i in spec.layer_shapes) * images.shape[-1] ** 2
    gflops = 3 * 2 * macs * cfg.steps * len(images) / t_batched / 1e9
    rate_b, rate_l = len(images) / t_batched, len(loop_images) / t_loop
    print(f"threads: {torch.get_num_threads()}")
    print(f"batched : {len(images)} fields, batches of {cfg.batch_size}, {cfg.steps} full-image steps, "
          f"{t_batched:.1f}s, {rate_b:.1f} fields/s, PSNR {psnr_batched.mean():.2f} dB "
          f"(first {len(loop_images)}: {targets.mean():.2f})")
    print(f"loop    : {len(loop_images)} fields, 64-pixel minibatches until each reaches its batched PSNR "
          f"(max {args.max_epochs} epochs; epochs used {epochs}), {t_loop:.1f}s, {rate_l:.3f} fields/s, "
          f"PSNR {psnr_loop.mean():.2f} dB, {reached}/{len(loop_images)} reached the target")
    print(f"speedup : {rate_b / rate_l:.1f}x fields/s at equal PSNR"
          + ("" if reached == len(loop_images) else " (a lower bound: some loop fields hit the epoch cap)"))
    print(f"GFLOP/s : batched fitting {gflops:.1f}, fp32 1024^2 matmul {peak:.1f} "
          f"({gflops / peak:.0%} of the matmul rate)")


if __name__ == "__main__":
    main()
