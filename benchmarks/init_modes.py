"""Shared init vs random init: how far fields move, and how much each weight position varies.

Fits the same MNIST images both ways (same steps and learning rate as the `fit`
stage) and prints, side by side: PSNR, the distance of each field from its init,
and the standard deviation of each flattened weight position across fields
(mean over positions, and relative to the pooled std of all weights). Writes the
per-position std of both modes as a figure.

    python benchmarks/init_modes.py [--fields 1000] [--png docs/init_modes.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nefgpt import field
from nefgpt.config import FitConfig
from nefgpt.data import load_dataset
from nefgpt.fields_io import spec_from_config
from nefgpt.fit import fit_anchor, fit_batch
from nefgpt.weight_stats import init_stats, save_position_std_figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=1000)
    ap.add_argument("--png", type=Path, default=Path("docs/init_modes.png"))
    args = ap.parse_args()
    cfg = FitConfig()
    spec = spec_from_config(cfg)
    images = load_dataset("mnist").images[: args.fields]
    anchor = fit_anchor(spec, images[0], cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    inits = {"shared": anchor.expand(len(images), -1), "random": field.init_random(spec, len(images), gen)}
    stds, rows = {}, []
    for mode, init in inits.items():
        t0 = time.perf_counter()
        w = torch.cat([fit_batch(spec, i, x, cfg.steps, cfg.lr)
                       for i, x in zip(init.split(cfg.batch_size), images.split(cfg.batch_size))])
        seconds = time.perf_counter() - t0
        psnr = field.psnr(field.render(spec, w), images).mean()
        rows.append((mode, float(psnr), seconds, init_stats(w, init)))
        stds[f"{mode} init"] = w.std(dim=0)
    print(f"{len(images)} MNIST fields, {cfg.steps} steps, lr {cfg.lr}, threads {torch.get_num_threads()}")
    print(f"{'init':8} {'PSNR dB':>8} {'fit s':>6} {'|w-w0| mean':>12} {'rel.':>6} {'pos. std':>9} {'std/pooled':>11}")
    for mode, psnr, seconds, s in rows:
        print(f"{mode:8} {psnr:8.2f} {seconds:6.1f} {s['init_distance_mean']:12.3f} {s['init_distance_relative']:6.3f} "
              f"{s['position_std_mean']:9.4f} {s['position_std_over_pooled_std']:11.3f}")
    ratio = rows[1][3]["position_std_mean"] / rows[0][3]["position_std_mean"]
    print(f"per-position std, random / shared: {ratio:.1f}x")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    save_position_std_figure(args.png, stds)
    print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
