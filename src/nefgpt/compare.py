"""`nefgpt compare`: the headline metrics of several evaluated runs in one table.

One row per run (the GPT and any baselines, all scored by the same `evaluate`),
plus the real-data ceiling of the first run: what a model reproducing the data
distribution would score against the same held-out fields. The numbers are only
comparable when every run was scored against the same held-out images, so that
is checked and any mismatch is reported with the table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .artifacts import load_json, save_json, write_bytes
from .errors import ArtifactError
from .layout import CONFIG_FILE, GRID_FILE, METRICS_FILE, SAMPLES_FILE, SPLIT_FILE, SUMMARY_FILE
CEILING = "real-data ceiling"

# (JSON key, column header, formatter kind) in table order.
COLUMNS = (
    ("method", "method", "text"),
    ("run", "run", "text"),
    ("accuracy", "accuracy", "pct"),
    ("cross_entropy", "CE", "f3"),
    ("mmd", "MMD ↓", "f4"),
    ("cov", "COV ↑", "pct"),
    ("1nna", "1-NNA (50% ideal)", "pct"),
    ("diversity_ratio", "diversity ratio (1 ideal)", "f3"),
    ("near_copy_rate", "near-copy rate", "pct"),
    ("seconds_per_field", "sampling s/field", "sec"),
    ("train_seconds", "training s", "sec"),
)
_REQUIRED = ("accuracy", "cross_entropy", "mmd", "cov", "1nna")


def compare_runs(run_dirs: list[Path], md_path: Path | None = None, json_path: Path | None = None,
                 png_path: Path | None = None) -> str:
    """The Markdown comparison table of `run_dirs`; also written to md_path / json_path when given.

    A warning about mismatched held-out sets goes to stderr and under the table.
    """
    rows, warnings = collect_rows(run_dirs)
    for w in warnings:
        print(f"nefgpt: warning: {w}", file=sys.stderr)
    table = markdown_table(rows, warnings)
    if md_path is not None:
        write_bytes(md_path, (table + "\n").encode())
    if json_path is not None:
        save_json(json_path, {"rows": rows, "warnings": warnings})
    if png_path is not None:
        save_grids_side_by_side(png_path, run_dirs, _display_names(run_dirs))
    return table


def save_grids_side_by_side(path: Path, run_dirs: list[Path], names: list[str]) -> None:
    """Every run's samples_grid.png in one row, each titled with its run name."""
    from PIL import Image, ImageDraw

    from .figures import save_png

    grids = []
    for run_dir in run_dirs:
        grid_path = run_dir / GRID_FILE
        try:
            with Image.open(grid_path) as img:
                grids.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{grid_path}: can't read the sample grid ({exc})") from None
    title_h, gap = 20, 12
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, title_h + max(g.height for g in grids)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for grid, name in zip(grids, names):
        canvas.paste(grid, (x, title_h))
        draw.text((x + 4, 4), name, fill=(0, 0, 0))
        x += grid.width + gap
    save_png(path, canvas)


def collect_rows(run_dirs: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The raw rows (runs, then the ceiling of the first run) and held-out-set warnings."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ArtifactError("compare: no run directories given")
    for d in run_dirs:
        if not d.is_dir():
            raise ArtifactError(f"{d}: run directory not found")
    names = _display_names(run_dirs)
    all_metrics = [_load_metrics(d) for d in run_dirs]
    rows = [run_row(d, name, m) for d, name, m in zip(run_dirs, names, all_metrics)]
    rows.append(ceiling_row(run_dirs[0], names[0], all_metrics[0]))
    return rows, heldout_warnings(run_dirs, names)


def run_row(run_dir: Path, name: str, metrics: dict) -> dict[str, Any]:
    config = load_json(run_dir / CONFIG_FILE)
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict):
        raise ArtifactError(f"{run_dir / CONFIG_FILE}: no [train] section")
    # Configs written before baselines existed have no train.model: they are GPT runs.
    model = train.get("model", "gpt")
    if not isinstance(model, str):
        raise ArtifactError(f"{run_dir / CONFIG_FILE}: train.model is not a name ({model!r})")
    novelty = metrics.get("novelty")
    near_copy = novelty.get("near_copy_rate") if isinstance(novelty, dict) else None
    row = {"kind": "run", "method": model, "run": name, "run_dir": str(run_dir)}
    row.update({k: _number(metrics, k, run_dir / METRICS_FILE) for k in _REQUIRED})
    # metrics.json files written before the diversity ratio was measured lack it: their cell shows "–".
    row["diversity_ratio"] = _optional_number(metrics.get("diversity_ratio"), "diversity_ratio", run_dir / METRICS_FILE)
    row["near_copy_rate"] = _optional_number(near_copy, "novelty.near_copy_rate", run_dir / METRICS_FILE)
    row["seconds_per_field"] = sampling_seconds(run_dir)
    row["train_seconds"] = train_seconds(run_dir)
    return row


def ceiling_row(run_dir: Path, name: str, metrics: dict) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    ceiling = metrics.get("ceiling")
    if not isinstance(ceiling, dict):
        raise ArtifactError(f"{path}: missing 'ceiling' (re-run nefgpt evaluate)")
    novelty = metrics.get("novelty")
    # The ceiling's near-copy rate is that of the held-out real fields themselves (5 % by construction).
    held = novelty.get("heldout_near_copy_rate") if isinstance(novelty, dict) else None
    row = {"kind": "ceiling", "method": CEILING, "run": name, "run_dir": str(run_dir),
           "description": str(ceiling.get("description", "rendered training fields vs rendered held-out fields"))}
    row.update({k: _number(ceiling, k, path, "ceiling.") for k in _REQUIRED})
    row["diversity_ratio"] = _optional_number(ceiling.get("diversity_ratio"), "ceiling.diversity_ratio", path)
    row["near_copy_rate"] = _optional_number(held, "novelty.heldout_near_copy_rate", path)
    row["seconds_per_field"] = None
    row["train_seconds"] = None
    return row


def sampling_seconds(run_dir: Path) -> float | None:
    """Generation seconds per field from the samples' safetensors header, without loading the tensors."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        return None
    value = read_safetensors_metadata(path).get("seconds_per_field")
    if value is None:
        return None
    try:
        value = json.loads(value) if isinstance(value, str) else value
        value = float(value)
    except (ValueError, TypeError):
        raise ArtifactError(f"{path}: metadata 'seconds_per_field' is not a number ({value!r})") from None
    return value if math.isfinite(value) and value >= 0 else None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The raw string metadata of a safetensors file (header only: 8-byte length, then JSON)."""
    try:
        with path.open("rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise ValueError("file shorter than its header")
            size = int.from_bytes(size_bytes, "little")
            if size > 100_000_000:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def train_seconds(run_dir: Path) -> float | None:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    value = load_json(path)
    value = value.get("train_seconds") if isinstance(value, dict) else None
    return _optional_number(value, "train_seconds", path)


def heldout_warnings(run_dirs: list[Path], names: list[str]) -> list[str]:
    """Warnings for runs scored against other held-out images than the first run."""
    keys = []
    warnings = []
    for d, name in zip(run_dirs, names):
        path = d / SPLIT_FILE
        if not path.is_file():
            warnings.append(f"{name}: no {SPLIT_FILE}, so its held-out set can't be checked against the others")
            keys.append(None)
            continue
        keys.append(heldout_key(path))
    ref = keys[0]
    for key, name in zip(keys[1:], names[1:]):
        if ref is None or key is None:
            continue
        if key[0] != ref[0]:
            warnings.append(f"{name} was evaluated on dataset '{key[0]}', {names[0]} on '{ref[0]}': "
                            "the rows are not comparable")
        elif key[1] != ref[1]:
            warnings.append(f"{name} was evaluated against other held-out images than {names[0]}: "
                            "the rows are not directly comparable")
    return warnings


def heldout_key(path: Path) -> tuple[str, tuple[int, ...]]:
    """(dataset, dataset positions of the held-out fields): equal keys mean the same held-out images."""
    split = load_json(path)
    if not isinstance(split, dict) or "heldout" not in split or "dataset" not in split:
        raise ArtifactError(f"{path}: missing 'dataset' or 'heldout'")
    heldout, indices = split["heldout"], split.get("indices")
    try:
        # `heldout` holds positions in `indices`: two runs with other subsets share positions but not images.
        positions = tuple(int(indices[i]) for i in heldout) if isinstance(indices, list) else tuple(map(int, heldout))
    except (TypeError, ValueError, IndexError):
        raise ArtifactError(f"{path}: 'heldout' is not a list of positions in 'indices'") from None
    return str(split["dataset"]), tuple(sorted(positions))


def format_cell(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "text":
        return str(value)
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "f3":
        return f"{value:.3f}"
    if kind == "f4":
        return f"{value:.4f}"
    if value < 1:  # seconds: a few significant digits for per-field times, whole seconds for training
        return f"{value:.3g}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells, shared by the Markdown table and the HTML report."""
    headers = [h for _, h, _ in COLUMNS]
    cells = [[format_cell(row.get(key), kind) for key, _, kind in COLUMNS] for row in rows]
    return headers, cells


def markdown_table(rows: list[dict[str, Any]], warnings: list[str] = ()) -> str:
    headers, cells = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells]
    lines += [f"\n> warning: {_md_escape(w)}" for w in warnings]
    return "\n".join(lines)


def _load_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run nefgpt evaluate on this run first)")
    metrics = load_json(path)
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return metrics


def _number(obj: dict, key: str, path: Path, prefix: str = "") -> float:
    if key not in obj:
        raise ArtifactError(f"{path}: missing '{prefix}{key}' (re-run nefgpt evaluate)")
    value = _optional_number(obj[key], prefix + key, path)
    if value is None:
        raise ArtifactError(f"{path}: '{prefix}{key}' is null")
    return value


def _optional_number(value: Any, what: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(f"{path}: '{what}' is not a finite number ({value!r})")
    return float(value)


def _display_names(run_dirs: list[Path]) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
