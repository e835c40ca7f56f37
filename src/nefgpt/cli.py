"""The `nefgpt` command line: one subcommand per stage, and `run` for all of them.

Every stage reads and writes artifacts in the run directory (``--out``). A stage
whose outputs exist and are newer than its inputs is skipped; ``--force`` redoes
it. Errors print one line on stderr and exit 1 (runtime) or 2 (usage);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from . import config as config_mod
from . import distributed, train
from .artifacts import load_json, load_tensors, save_json
from .compare import compare_runs
from .config import RunConfig
from .errors import ArtifactError, NefgptError, Terminated
from .figures import render_artifact
from .layout import CHUNK_DIR, CONFIG_FILE, METRICS_FILE, NEFS_FILE, SUMMARY_FILE, TOKENIZER_REPORT_FILE
from .lock import run_lock
from .pretrained import install
from .report import write_report
from .stages import RUN_HELP, STAGES, check_architecture, check_inputs, check_sampling_budget, run_stage
from .validation import SAMPLING_KEYS

def resolve_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Preset (or the run's saved config) + --set overrides, validated."""
    saved = run_dir / CONFIG_FILE
    if args.preset is None and saved.exists():
        cfg = config_mod.from_dict(load_json(saved), source=str(saved))
    else:
        cfg = config_mod.load_preset(args.preset or "cpu")
    overrides = list(args.set or [])
    overrides += [f"sample.{k}={v}" for k, v in _sample_overrides(args).items()]
    saved_explicit = list(cfg.sample.explicit)
    cfg = config_mod.apply_overrides(cfg, overrides)
    # A sampling value given by hand wins over the tuned one for that key only (sampling_config fills in the
    # others). The keys given earlier stay (config.json keeps them) unless this command sets sample.explicit
    # itself, or sets sample.use_tuned, which starts afresh from the tuned setting.
    given = {o.split("=", 1)[0].strip() for o in overrides}
    kept = (cfg.sample.explicit if "sample.explicit" in given
            else [] if "sample.use_tuned" in given else saved_explicit)
    cfg.sample.explicit = [k for k in SAMPLING_KEYS if k in kept or f"sample.{k}" in given]
    return cfg


def _sample_overrides(args: argparse.Namespace) -> dict:
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "oversample": "oversample", "prior_weight": "prior_weight", "n": "n_per_class", "seed": "seed"}
    return {dst: getattr(args, src) for src, dst in names.items() if getattr(args, src, None) is not None}


def check_out(run_dir: Path) -> None:
    """`--out` must be a directory, or a path where one can be made: not a file, nor a path under a file."""
    if run_dir.is_dir():
        return
    if run_dir.is_symlink() and not run_dir.exists():
        raise ArtifactError(f"{run_dir}: not a directory (a symbolic link to a missing target); "
                            "--out needs a run directory")
    if run_dir.exists():
        what = "a file" if run_dir.is_file() else "not a directory"
        raise ArtifactError(f"{run_dir}: not a directory ({what} of that name exists); --out needs a run directory")
    for parent in run_dir.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            what = "a file, not a directory" if parent.is_file() else "not a directory"
            raise ArtifactError(f"{run_dir}: can't be a run directory: {parent} is {what}")


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def sigterm_unwinds() -> Callable[[], None]:
    """Make SIGTERM raise `Terminated` in the main thread, so a command stops as on Ctrl-C; returns the undo.

    Training defers it to a step boundary instead (trainer.deferred_signals). An ignored SIGTERM stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return lambda: None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind.

    Safe only under the run lock: no other process can be writing one now.
    """
    for d in (run_dir, run_dir / CHUNK_DIR):
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def summary_table(run_dir: Path) -> str:
    """The headline numbers of a run as a Markdown table (rows whose artifacts are missing are left out)."""
    fitted = load_tensors(run_dir / NEFS_FILE)[1]
    tok = _maybe_json(run_dir / TOKENIZER_REPORT_FILE)
    trained = _maybe_json(run_dir / SUMMARY_FILE)
    m = load_json(run_dir / METRICS_FILE)
    rows = [("fitting PSNR (dB, mean)", f"{fitted['psnr_mean']:.2f}")]
    if "psnr_quantized_mean" in tok:
        rows.append(("quantized PSNR (dB, mean)", f"{tok['psnr_quantized_mean']:.2f}"))
    if "train_loss" in trained and "val_loss" in trained:
        # Baselines say what their loss is; the GPT's is the cross-entropy per weight token.
        what = trained.get("loss", "cross-entropy (nats)")
        rows.append((f"train / val loss: {what}", f"{trained['train_loss']:.3f} / {trained['val_loss']:.3f}"))
    rows += [
        ("classifier accuracy of samples", f"{m['accuracy']:.1%}"),
        ("classifier cross-entropy of samples", f"{m['cross_entropy']:.3f}"),
        ("classifier held-out accuracy (real images)", f"{m['classifier_heldout_accuracy']:.1%}"),
        ("MMD (lower better)", f"{m['mmd']:.4f}  (real-data ceiling {m['ceiling']['mmd']:.4f})"),
        ("COV (higher better)", f"{m['cov']:.1%}  (ceiling {m['ceiling']['cov']:.1%})"),
        ("1-NNA (50% ideal)", f"{m['1nna']:.1%}  (ceiling {m['ceiling']['1nna']:.1%})"),
    ]
    if m.get("diversity_ratio") is not None:  # metrics.json files from before it was measured lack it
        ceiling = m["ceiling"].get("diversity_ratio")
        rows.append(("within-class diversity ratio (1 ideal)",
                     f"{m['diversity_ratio']:.3f}" + (f"  (ceiling {ceiling:.3f})" if ceiling is not None else "")))
    rows += [
        ("near-copy rate", f"{m['novelty']['near_copy_rate']:.1%}  (held-out real {m['novelty']['heldout_near_copy_rate']:.1%})"),
    ]
    lines = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _maybe_json(path: Path) -> dict:
    return load_json(path) if path.exists() else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nefgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", "-o", type=Path, help="run directory (required)")
    common.add_argument("--preset", help="cpu (default), seed, fashion, or a .toml file")
    common.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    common.add_argument("--force", action="store_true", help="redo the stage even if its outputs are up to date")
    common.add_argument("--resume", action="store_true", help="train: continue from the last checkpoint")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    render = sub.add_parser("render", help="render fields of any field artifact at any resolution",
                            description="Render the fields of a field artifact (nefs, samples or anchor "
                                        ".safetensors) at any resolution, as a PNG grid.")
    render.add_argument("artifact", type=Path, help="a .safetensors file with a 'weights' tensor")
    render.add_argument("--res", type=int, default=128, help="image side in pixels (default 128)")
    render.add_argument("-n", type=int, default=16, help="number of fields, from the first (default 16)")
    render.add_argument("--stride", type=int, default=1, help="take every k-th field (default 1)")
    render.add_argument("--png", type=Path, required=True, help="output PNG")
    render.add_argument("--debug", action="store_true", help="show tracebacks")
    for name, text in [(s.name, s.help) for s in STAGES] + [("run", RUN_HELP)]:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name in ("sample", "run"):
            p.add_argument("--temperature", type=float)
            p.add_argument("--top-k", dest="top_k", type=int)
            p.add_argument("--top-p", dest="top_p", type=float)
            p.add_argument("--min-p", dest="min_p", type=float,
                           help="keep tokens at least this share of the top token's probability (0 = off)")
            p.add_argument("--oversample", type=float,
                           help="draw this many candidates per field and keep those the model places most "
                                "clearly in their class (1 = off)")
            p.add_argument("--prior-weight", dest="prior_weight", type=float,
                           help="multiply a per-class prior on the first layer into the model, to this power "
                                "(0 = off; its shape: --set sample.prior_components=K sample.prior_dims=D)")
            p.add_argument("-n", type=int, help="samples per class")
            p.add_argument("--seed", type=int, help="sampling seed")
        if name == "sample":
            p.add_argument("--label", type=int, action="append", help="sample only this class (repeatable)")
            p.add_argument("--pretrained", metavar="NAME",
                           help="sample from a shipped model (mnist); --out defaults to runs/pretrained-NAME")
    compare = sub.add_parser("compare", help="one table of the metrics of several runs (Markdown + JSON)",
                             description="Compare evaluated runs (the GPT and baselines) in one table.")
    compare.add_argument("runs", type=Path, nargs="+", help="evaluated run directories")
    compare.add_argument("--md", type=Path, help="write the Markdown table here")
    compare.add_argument("--json", type=Path, help="write the table as JSON here")
    compare.add_argument("--png", type=Path, help="write every run's sample grid, side by side, here")
    compare.add_argument("--debug", action="store_true", help="show tracebacks")
    report = sub.add_parser("report", help="write a self-contained report.html for a run",
                            description="Write RUN_DIR/report.html: config, metrics, figures, images embedded.")
    report.add_argument("run", type=Path, help="an evaluated run directory")
    report.add_argument("--baseline", type=Path, action="append", default=[],
                        help="an evaluated baseline run to include in the comparison table (repeatable)")
    report.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    doing = args.command  # the stage running now, for the line a SIGTERM prints
    restore_sigterm = sigterm_unwinds()
    try:
        if args.command == "render":
            n = render_artifact(args.artifact, args.res, args.n, args.png, args.stride)
            print(f"rendered {n} fields at {args.res}x{args.res} into {args.png}")
            return 0
        if args.command == "compare":
            print(compare_runs(args.runs, md_path=args.md, json_path=args.json, png_path=args.png))
            return 0
        if args.command == "report":
            print(f"report: {write_report(args.run, baselines=args.baseline)}")
            return 0
        if getattr(args, "pretrained", None):
            out = args.out or Path("runs") / f"pretrained-{args.pretrained}"
            check_out(out)
            args.out = install(args.pretrained, out)
        if args.out is None:
            parser.error(f"{args.command}: the following arguments are required: --out/-o")
        run_dir: Path = args.out
        check_out(run_dir)
        if distributed.is_follower():  # under torchrun, rank 0 leads and ranks > 0 follow (docs/distributed.md)
            return distributed.follow(train.follow_train)
        if args.command != "run" and args.command != "fit" and not run_dir.is_dir():
            raise ArtifactError(f"{run_dir}: run directory not found")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"{run_dir}: can't create the run directory ({exc.strerror or exc})") from None
        with distributed.leading(args.command), run_lock(run_dir):  # two writers would corrupt a run directory
            remove_stale_temps(run_dir)
            cfg = resolve_config(args, run_dir)
            stages = [s.name for s in STAGES] if args.command == "run" else [args.command]
            # Checked before config.json is written, so a failed command changes nothing.
            check_inputs(stages[0], run_dir)
            if args.command not in ("fit", "run"):
                check_architecture(cfg, run_dir)
            if "sample" in stages:
                check_sampling_budget(cfg, run_dir, getattr(args, "label", None), args.force)
            save_json(run_dir / CONFIG_FILE, cfg.to_dict())
            for stage in stages:
                doing = stage
                run_stage(stage, cfg, run_dir, args)
            doing = args.command
            if args.command in ("run", "evaluate"):
                print(summary_table(run_dir))
            if args.command == "run":
                print(f"report: {write_report(run_dir)}")
    except NefgptError as exc:
        if args.debug:
            raise
        print(f"nefgpt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # train raises one that says where its checkpoint is
        signum = getattr(exc, "signum", signal.SIGINT)  # Ctrl-C, or SIGTERM (Terminated, or train's)
        if str(exc):
            print(f"nefgpt: {exc}", file=sys.stderr)
        elif signum == signal.SIGTERM:
            where = doing if doing == args.command else f"{args.command} (stage {doing})"
            print(f"nefgpt: terminated during {where}; no partial artifact was kept "
                  "(run the command again to finish it)", file=sys.stderr)
        else:
            print("nefgpt: interrupted", file=sys.stderr)
        return 128 + signum
    finally:
        restore_sigterm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
