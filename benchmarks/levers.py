"""The GPT's levers side by side, at the same training wall-clock, on the same fields and tuning split.

Each variant copies one base run's fields, split, tokenizer, tokens and classifier (a variant that
changes the tokenizer re-tokenizes its copy), trains the GPT for the same ``--minutes`` of wall-clock
(``train.max_minutes``; the iteration cap is set out of reach), then runs ``nefgpt tune`` on the tuning
split with one small grid, the same seed and the same number of samples for every variant. One table:

- the levers on, iterations reached, held-out CE (comparable only between variants that share the
  tokenizer; the offsets variant has its own);
- untruncated sampling (guidance 1, T 1): accuracy, MMD, COV, 1-NNA, within-class diversity ratio;
- the grid's best setting by the tune objective: the same columns and the setting.

Variants run one after another on an otherwise idle machine (their timings would mean nothing in
parallel). Writes ``OUT/levers.json``, ``OUT/levers.md`` and ``OUT/levers_grids.png`` (every variant's
sample grid at its best setting, side by side).

    python benchmarks/levers.py --base runs/demo --out runs/levers --minutes 3 [--variants a,b,...]
    python benchmarks/levers.py --base runs/demo --out runs/levers --minutes 15 \\
        --variant best="train.class_embed=true train.pos_bias=class"   # a named combination
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from nefgpt import hardware

COPIED = ("config.json", "split.json", "anchor.safetensors", "nefs.safetensors", "tokenizer.safetensors",
          "tokens.safetensors", "tokenizer.json", "classifier.safetensors", "stages.json")
# Every lever off: the GPT as it was before the levers (the talk's model with today's cpu-preset sizes).
PLAIN = ["train.class_embed=false", "train.pos_bias=none", "train.value_embed=false", "train.hl_sigma=0.0",
         "train.struct_pos=false", "tokenize.offsets=none", "train.ema_decay=0.0", "train.dropout=0.0"]
# One lever on at a time, against PLAIN.
SCREEN = {
    "plain": [],
    "class_embed": ["train.class_embed=true"],
    "pos_bias=class": ["train.pos_bias=class"],
    "value_embed": ["train.value_embed=true"],
    "hl_sigma=1": ["train.hl_sigma=1.0"],
    "struct_pos": ["train.struct_pos=true"],
    "offsets=position": ["tokenize.offsets=position"],
    "ema=0.995": ["train.ema_decay=0.995"],  # also scores the raw weights of the same training
    "dropout=0.1": ["train.dropout=0.1"],
}
# The grid tune searches for every variant (plain sampling is its first row).
TUNE = ["tune.guidances=[1.0, 2.0]", "tune.temperatures=[1.0, 0.8]", "tune.top_ks=[0]", "tune.top_ps=[1.0]",
        "tune.min_ps=[0.0]", "tune.max_minutes=0"]


def nefgpt(*args: str) -> None:
    cmd = [sys.executable, "-m", "nefgpt", *args, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_variant(base: Path, out: Path, name: str, overrides: list[str], minutes: float, per_class: int) -> list[dict]:
    """Train and score one variant; with train.ema_decay on, its raw weights are scored too, as a second row."""
    run = out / name.replace("=", "-").replace(" ", "_")
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    for f in COPIED:
        if (base / f).exists():
            shutil.copy2(base / f, run / f)
    settings = [*PLAIN, *overrides, f"train.max_minutes={minutes}", "train.max_iters=1000000",
                *TUNE, f"tune.n_per_class={per_class}"]
    t0 = time.time()
    if any(o.startswith("tokenize.") for o in overrides):
        nefgpt("tokenize", "--out", str(run), "--force", *sets(settings))
    nefgpt("train", "--out", str(run), "--force", *sets(settings))
    train = json.loads((run / "train.json").read_text())
    rows = [score(run, name, overrides, settings, train, train["val_loss"], t0)]
    if "val_loss_raw" in train:  # the same training without the moving average: what EMA alone changes
        raw = run.with_name(run.name + "-raw")
        shutil.rmtree(raw, ignore_errors=True)
        shutil.copytree(run, raw)
        ckpt = torch.load(raw / "ckpt.pt", weights_only=True)
        del ckpt["ema"]
        torch.save(ckpt, raw / "ckpt.pt")
        rows.append(score(raw, f"{name} (raw weights)", overrides, settings, train, train["val_loss_raw"], time.time()))
    return rows


def score(run: Path, name: str, overrides: list[str], settings: list[str], train: dict, val_ce: float,
          t0: float) -> dict:
    """Tune's grid on the tuning split, and a small sample for the grid figure."""
    nefgpt("tune", "--out", str(run), "--force", *sets(settings))
    nefgpt("sample", "--out", str(run), "--force", *sets([*settings, "sample.n_per_class=10"]))  # the grid figure
    tune = json.loads((run / "tune.json").read_text())
    plain = next(r for r in tune["settings"] if r["guidance"] == 1 and r["temperature"] == 1 and not r["top_k"]
                 and r["top_p"] == 1 and not r.get("min_p", 0))
    return {"variant": name, "overrides": overrides, "run": str(run), "iterations": train["iterations"],
            "train_seconds": train["train_seconds"], "val_ce": val_ce,
            "tokenizer": json.loads((run / "tokenizer.json").read_text()).get("tokenizer_id"),
            "untruncated": plain, "best": tune["best"], "seconds": time.time() - t0}


def score_cells(r: dict) -> list[str]:
    div = r.get("diversity_ratio")
    return [f"{r['accuracy']:.1%}", f"{r['mmd']:.3f}", f"{r['cov']:.1%}", f"{r['1nna']:.1%}",
            "–" if div is None else f"{div:.2f}"]


def ensure_classifier(base: Path) -> None:
    """Train the evaluation classifier once in the base run, as `tune`/`evaluate` would, so every variant shares it."""
    from nefgpt.classifier import get_classifier
    from nefgpt.config import load_preset
    from nefgpt.split import load_split_images

    split, images, labels = load_split_images(base)
    tr, held = (torch.tensor(split[k], dtype=torch.long) for k in ("train", "heldout"))
    get_classifier(base, load_preset("cpu").evaluate, images[tr], labels[tr], images[held], labels[held],
                   split["num_classes"], False)


def markdown(rows: list[dict]) -> str:
    head = ("| variant | iterations | held-out CE | untruncated: acc | MMD | COV | 1-NNA | diversity "
            "| best setting | acc | MMD | COV | 1-NNA | diversity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r["best"]
        setting = f"g {b['guidance']:g}, T {b['temperature']:g}" + (f", min-p {b['min_p']:g}" if b.get("min_p") else "")
        lines.append("| " + " | ".join([r["variant"], str(r["iterations"]), f"{r['val_ce']:.3f}",
                                        *score_cells(r["untruncated"]), setting, *score_cells(b)]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a run with fit, tokenize and the classifier done")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="training wall-clock of every variant")
    ap.add_argument("--per-class", type=int, default=20, help="samples per class for every scored setting")
    ap.add_argument("--variants", default=",".join(SCREEN), help=f"comma-separated, from {', '.join(SCREEN)}")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="KEY=V KEY=V"',
                    help="an extra variant: a name and its overrides (repeatable)")
    args = ap.parse_args()
    ensure_classifier(args.base)
    variants = {n: SCREEN[n] for n in args.variants.split(",") if n}
    for item in args.variant:
        name, _, rest = item.partition("=")
        variants[name] = rest.strip('"').split()
    machine = hardware.describe_line()
    print("machine:", machine, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants.items():
        new = run_variant(args.base, args.out, name, overrides, args.minutes, args.per_class)
        rows.extend(new)
        for r in new:
            print(f"{r['variant']}: {r['iterations']} it, val CE {r['val_ce']:.3f}, untruncated acc "
                  f"{r['untruncated']['accuracy']:.1%} 1-NNA {r['untruncated']['1nna']:.1%}; best acc "
                  f"{r['best']['accuracy']:.1%} 1-NNA {r['best']['1nna']:.1%} ({r['seconds']:.0f} s)", flush=True)
        (args.out / "levers.json").write_text(json.dumps({"machine": machine, "minutes": args.minutes,
                                                          "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    (args.out / "levers.md").write_text(f"Machine: {machine}; {args.minutes:g} min of training per variant.\n\n{table}")
    print(table)
    from nefgpt.compare import save_grids_side_by_side

    save_grids_side_by_side(args.out / "levers_grids.png", [Path(r["run"]) for r in rows], [r["variant"] for r in rows])


if __name__ == "__main__":
    main()
