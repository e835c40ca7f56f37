"""The sweep behind the `cpu` preset: GPT shapes and learning rates at a ~15-minute training budget.

Every point trains on the same tokens: the sweep copies a finished run's data
artifacts (fit, split and tokenizer outputs) into `OUT/NAME` and runs
`nefgpt train` there with the point's overrides, one after another, so each
gets the whole machine. It prints one Markdown table (size, iterations, held-out
cross-entropy, minutes), writes it with the raw numbers to `--json`, and draws
the held-out cross-entropy of every point over training time to `--png`.

    python benchmarks/cpu_sweep.py --base runs/demo --out runs/sweep [--only NAME ...] [--include NAME=DIR ...]

`--only` reruns some points and keeps the others' recorded results; `--include`
adds a run trained elsewhere (the preset's own run) to the table and the figure.

Timings only mean something on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# Data artifacts the train stage reads; everything after train is left out so each point starts clean.
DATA_ARTIFACTS = ("config.json", "split.json", "anchor.safetensors", "nefs.safetensors", "tokenizer.json",
                  "tokenizer.safetensors", "tokens.safetensors", "stages.json")

# name -> train overrides. Each point trains for 11-15 minutes on 2 cores
# (the 4-layer, 128-wide model ran at 0.75-1.15 s per iteration of 32 sequences on this machine).
POINTS: dict[str, dict[str, object]] = {
    "L4-E128-lr3e-3": {"n_layer": 4, "n_head": 4, "n_embd": 128, "max_iters": 750, "lr": 3e-3},
    "L4-E128-lr6e-3": {"n_layer": 4, "n_head": 4, "n_embd": 128, "max_iters": 750, "lr": 6e-3},
    "L4-E128-lr1e-2": {"n_layer": 4, "n_head": 4, "n_embd": 128, "max_iters": 750, "lr": 1e-2},
    "L2-E128-lr6e-3": {"n_layer": 2, "n_head": 4, "n_embd": 128, "max_iters": 1400, "lr": 6e-3},
}


def run_point(base: Path, out: Path, name: str, overrides: dict[str, object]) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for artifact in DATA_ARTIFACTS:
        shutil.copy2(base / artifact, run_dir / artifact)
    cmd = [sys.executable, "-m", "nefgpt", "train", "--out", str(run_dir), "--force"]
    cmd += [arg for key, value in overrides.items() for arg in ("--set", f"train.{key}={value}")]
    cmd += ["--set", f"train.eval_interval={overrides['max_iters'] // 4}",
            "--set", f"train.ckpt_interval={overrides['max_iters'] // 4}"]
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    return read_point(name, run_dir)


def read_point(name: str, run_dir: Path) -> dict:
    """A trained point's row, from its run's train.json and the config.json it was trained with."""
    train = json.loads((run_dir / "config.json").read_text())["train"]
    summary = json.loads((run_dir / "train.json").read_text())
    return {"name": name, **{k: train[k] for k in ("n_layer", "n_head", "n_embd", "max_iters", "lr")},
            "p_uncond": train.get("p_uncond", 0.0), "params": summary["num_params"], "val_ce": summary["val_loss"],
            "train_ce": summary["train_loss"], "minutes": summary["train_seconds"] / 60, "run_dir": str(run_dir)}


def save_curves(path: Path, rows: list[dict], out: Path) -> None:
    """Held-out cross-entropy against training minutes, one line per point."""
    import csv

    from nefgpt.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for r in rows:
        log = Path(r.get("run_dir", out / r["name"])) / "train_log.csv"
        if not log.exists():
            continue
        with log.open() as f:
            points = [(float(x["elapsed_s"]) / 60, float(x["val_loss"])) for x in csv.DictReader(f) if x["val_loss"]]
        ax.plot(*zip(*points), marker="o", label=f"{r['name']} ({r['val_ce']:.3f})")
    ax.axvline(15, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("held-out cross-entropy (nats / token)")
    ax.set_title("cpu preset sweep: held-out cross-entropy over training time", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| point | layers × width | params | iterations | lr | null-class share | val CE | train CE | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = min(r["val_ce"] for r in rows)
    for r in rows:
        mark = "**" if r["val_ce"] == best else ""
        lines.append(f"| {mark}{r['name']}{mark} | {r['n_layer']} × {r['n_embd']} | {r['params'] / 1e6:.2f} M "
                     f"| {r['max_iters']} | {r['lr']:g} | {r.get('p_uncond', 0.0):g} | {mark}{r['val_ce']:.3f}{mark} "
                     f"| {r['train_ce']:.3f} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a run directory that has been tokenized")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--only", nargs="*", help="run just these points (others are read from earlier results); "
                                              "with no names, only redo the table and figure")
    ap.add_argument("--include", nargs="*", default=[], metavar="NAME=DIR",
                    help="also list runs trained elsewhere (e.g. the preset's own run) from their train.json")
    ap.add_argument("--json", type=Path, default=Path("docs/cpu_sweep.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/cpu_sweep.png"))
    args = ap.parse_args()
    missing = [a for a in DATA_ARTIFACTS if not (args.base / a).exists()]
    if missing:
        sys.exit(f"cpu_sweep: error: {args.base} lacks {', '.join(missing)}; run `nefgpt tokenize --out {args.base}`")
    restricted = args.only is not None  # `--only` with no names runs nothing new: just the table and figure
    rows = json.loads(args.json.read_text())["points"] if restricted and args.json.exists() else []
    rows = [r for r in rows if r["name"] not in (args.only or [])]
    for name, overrides in POINTS.items():
        if restricted and name not in args.only:
            continue
        rows.append(run_point(args.base, args.out, name, overrides))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"points": rows}, indent=1) + "\n")
    for item in args.include:
        name, _, run_dir = item.partition("=")
        rows = [r for r in rows if r["name"] != name] + [read_point(name, Path(run_dir))]
    rows.sort(key=lambda r: list(POINTS).index(r["name"]) if r["name"] in POINTS else len(POINTS))
    table = markdown(rows)
    save_curves(args.png, rows, args.out)
    print(table)
    args.json.write_text(json.dumps({"points": rows, "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
