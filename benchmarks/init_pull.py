"""The fit's pull toward the anchor (fit.init_l2): PSNR, fitting time and how much each weight position varies.

Fits the same MNIST images from one shared anchor with each (init_l2, steps) setting, one after another in
one process, and prints side by side: PSNR against the source images, seconds, the distance of each field
from the anchor, the per-position std across fields (and its ratio to the first setting's), and the share
of weights left within 1e-3 of the anchor. Writes the per-position std of every setting as a figure.

    python benchmarks/init_pull.py [--fields 1000] [--setting 0:200 --setting 1e-3:300 ...] [--png docs/init_pull.png]
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

DEFAULT_SETTINGS = ["0:200", "1e-4:200", "3e-4:200", "1e-3:200", "1e-3:300", "2e-3:400", "3e-3:400"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=1000)
    ap.add_argument("--setting", action="append", metavar="INIT_L2:STEPS",
                    help=f"a setting to fit (repeatable; default {' '.join(DEFAULT_SETTINGS)})")
    ap.add_argument("--png", type=Path, default=Path("docs/init_pull.png"))
    args = ap.parse_args()
    settings = [(float(a), int(b)) for a, b in (s.split(":") for s in args.setting or DEFAULT_SETTINGS)]
    cfg = FitConfig()
    spec = spec_from_config(cfg)
    images = load_dataset("mnist").images[: args.fields]
    anchor = fit_anchor(spec, images[0], cfg).expand(len(images), -1)
    stds, rows = {}, []
    for l2, steps in settings:
        t0 = time.perf_counter()
        w = torch.cat([fit_batch(spec, i, x, steps, cfg.lr, l2)
                       for i, x in zip(anchor.split(cfg.batch_size), images.split(cfg.batch_size))])
        seconds = time.perf_counter() - t0
        psnr = field.psnr(field.render(spec, w), images)
        still = float(((w - anchor).abs() < 1e-3).float().mean())
        rows.append((l2, steps, float(psnr.mean()), float(psnr.min()), seconds, still, init_stats(w, anchor)))
        stds[f"init_l2 {l2:g}, {steps} steps"] = w.std(dim=0)
    print(f"{len(images)} MNIST fields from one anchor, lr {cfg.lr}, batch {cfg.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'init_l2':>8} {'steps':>5} {'PSNR dB':>8} {'min':>6} {'fit s':>6} {'|w-w0|':>7} {'pos. std':>9} "
          f"{'std ratio':>9} {'at anchor':>9}")
    base = rows[0][6]["position_std_mean"]
    for l2, steps, psnr, low, seconds, still, s in rows:
        print(f"{l2:8g} {steps:5d} {psnr:8.2f} {low:6.2f} {seconds:6.1f} {s['init_distance_mean']:7.3f} "
              f"{s['position_std_mean']:9.4f} {s['position_std_mean'] / base:9.2f} {still:9.3f}")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    save_position_std_figure(args.png, stds)
    print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
