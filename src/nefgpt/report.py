"""`nefgpt report`: one self-contained HTML page per run.

The page must survive being mailed or archived on its own, so every image is a
base64 data URI, the CSS is inline, and a Content-Security-Policy forbids any
network or file access: a reference that slipped out of the page would show up
as a broken image instead of silently depending on the run directory.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .artifacts import atomic_path, load_json
from .compare import collect_rows, read_safetensors_metadata, table_cells
from .errors import ArtifactError
from .layout import (CONFIG_FILE, GRID_FILE, METRICS_FILE, NEFS_FILE, REPORT_FILE, SUMMARY_FILE,
                     TOKENIZER_REPORT_FILE, TUNE_FILE)
MAX_IMAGE_BYTES = 50_000_000
_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_MAGIC = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/gif": (b"GIF87a", b"GIF89a"), "image/jpeg": (b"\xff\xd8\xff",)}

# Figure names are still being settled by the stages that draw them, so they are
# matched by pattern; the first matching rule wins and anything unmatched lands
# in "Other figures", so a new figure is never silently left out.
_FIGURE_RULES: tuple[tuple[str, Callable[[str], bool], str], ...] = (
    ("samples", lambda n: n == GRID_FILE, "generated samples, one row per class"),
    ("samples", lambda n: n.endswith(".gif") or "generation" in n, "generation, weight by weight"),
    ("samples", lambda n: "nearest" in n or "neighbo" in n or n.startswith("nn"),
     "samples beside their nearest training fields"),
    ("per_class", lambda n: "confusion" in n, "classifier confusion on the samples"),
    ("training", lambda n: "loss" in n, "training and held-out cross-entropy"),
    ("tuning", lambda n: "tune" in n or "tuning" in n or "heatmap" in n, "sampling-setting search"),
    ("fields", lambda n: "codebook" in n or "token" in n or "quant" in n, "tokenizer codebook"),
    ("fields", lambda n: "init" in n or "anchor" in n, "initialisation statistics"),
)
_SECTIONS = (("headline", "Headline metrics"), ("samples", "Samples"), ("per_class", "Per-class metrics"),
             ("training", "Training"), ("tuning", "Sampling-setting search"), ("fields", "Fields and tokenizer"),
             ("other", "Other figures"), ("config", "Configuration"))

# Lets a headless browser check that every embedded image decoded (tests/test_report.py);
# the page reads the same without it. Allowed by hash in the CSP, so no other script can run.
_SCRIPT = ('addEventListener("load",function(){var a=document.images,n=0,i;for(i=0;i<a.length;i++)'
           'if(a[i].complete&&a[i].naturalWidth>0)n++;document.body.dataset.imagesLoaded=n;'
           'document.body.dataset.imagesTotal=a.length;});')
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode() + "'")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.ceiling td{font-style:italic;background:#fafafa}
figure{margin:1em 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #ddd}img.px{image-rendering:pixelated}
figcaption{font-size:.85em;color:#555}code{font-size:.9em}
.warn{background:#fff3cd;border:1px solid #e0c66c;padding:.5em .8em;margin:.5em 0}
.note{color:#777;font-size:.85em}nav a{margin-right:1em}details summary{cursor:pointer;font-weight:600}
"""


def write_report(run_dir: Path, baselines: list[Path] = ()) -> Path:
    """Write run_dir/report.html (atomically) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found")
    if not (run_dir / METRICS_FILE).is_file():
        raise ArtifactError(f"{run_dir / METRICS_FILE}: file not found (run nefgpt evaluate on this run first)")
    rows, warnings = collect_rows([run_dir, *map(Path, baselines)])
    for w in warnings:
        print(f"nefgpt: warning: {w}", file=sys.stderr)
    metrics = load_json(run_dir / METRICS_FILE)
    notes: list[str] = []  # optional pieces that exist but couldn't be read
    config = _optional_json(run_dir / CONFIG_FILE, notes)

    sections: dict[str, list[str]] = {key: [] for key, _ in _SECTIONS}
    sections["headline"] += [_warning(w) for w in warnings]
    sections["headline"].append(_headline_table(rows))
    sections["headline"].append(_details(run_dir, metrics, notes))
    sections["per_class"] += [_per_class_table(metrics), _confusion_table(metrics)]
    train = _optional_json(run_dir / SUMMARY_FILE, notes)
    if isinstance(train, dict):
        sections["training"].append(_kv_table({k: v for k, v in train.items() if _is_scalar(v)}))
    tune = _optional_json(run_dir / TUNE_FILE, notes)
    if tune is not None:
        sections["tuning"].append(_json_tables(tune))
    for name, section, caption in _classify_figures(run_dir):
        sections[section].append(_figure(run_dir / name, caption, notes))
    if isinstance(config, dict):
        sections["config"].append(_config_table(config))
    sections["headline"] += [f'<p class="note">{_e(n)}</p>' for n in notes]

    method = rows[0]["method"]
    title = f"nefgpt report: {run_dir.resolve().name} ({method})"
    body = [f"<h1>{_e(title)}</h1>", f'<p class="note">run directory <code>{_e(run_dir)}</code></p>', "<nav>"]
    present = [(key, heading) for key, heading in _SECTIONS if any(sections[key])]
    body += [f'<a href="#{key}">{_e(heading)}</a>' for key, heading in present] + ["</nav>"]
    for key, heading in present:
        body.append(f'<section id="{key}"><h2>{_e(heading)}</h2>')
        body += [part for part in sections[key] if part]
        body.append("</section>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / REPORT_FILE
    with atomic_path(out) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
    return out


def _headline_table(rows: list[dict[str, Any]]) -> str:
    headers, cells = table_cells(rows)
    out = ["<table><tr>" + "".join(f'<th class="{_align(i)}">{_e(h)}</th>' for i, h in enumerate(headers)) + "</tr>"]
    for row, cell_row in zip(rows, cells):
        cls = ' class="ceiling"' if row["kind"] == "ceiling" else ""
        title = f' title="{_e(row["description"])}"' if "description" in row else ""
        out.append(f"<tr{cls}{title}>" + "".join(f'<td class="{_align(i)}">{_e(c)}</td>'
                                                 for i, c in enumerate(cell_row)) + "</tr>")
    out.append("</table>")
    out.append('<p class="note">The real-data ceiling scores rendered <em>training</em> fields against the same '
               "held-out fields: what a model reproducing the data distribution would get. Its near-copy rate is "
               "that of the held-out fields themselves.</p>")
    return "\n".join(out)


def _details(run_dir: Path, metrics: dict, notes: list[str]) -> str:
    """Further single numbers of the run: fitting and quantization quality, classifier, set sizes."""
    items: dict[str, Any] = {}
    nefs = run_dir / NEFS_FILE
    if nefs.is_file():
        try:
            psnr = read_safetensors_metadata(nefs).get("psnr_mean")
            if psnr is not None:
                items["fitting PSNR (dB, mean)"] = float(json.loads(psnr) if isinstance(psnr, str) else psnr)
        except (ArtifactError, ValueError, TypeError) as exc:
            notes.append(f"fitting PSNR not shown: {exc}")
    tok = _optional_json(run_dir / TOKENIZER_REPORT_FILE, notes)
    if isinstance(tok, dict) and _is_scalar(tok.get("psnr_quantized_mean")):
        items["quantized PSNR (dB, mean)"] = tok["psnr_quantized_mean"]
    for key, label in (("classifier_heldout_accuracy", "classifier accuracy on real held-out images"),
                       ("n_generated", "samples scored"), ("n_reference", "held-out fields scored against"),
                       ("reference", "reference set"), ("distance", "distance")):
        if _is_scalar(metrics.get(key)):
            items[label] = metrics[key]
    novelty = metrics.get("novelty")
    if isinstance(novelty, dict) and _is_scalar(novelty.get("threshold_heldout_p5")):
        items["near-copy threshold (5th percentile of held-out distances)"] = novelty["threshold_heldout_p5"]
    return _kv_table(items) if items else ""


def _per_class_table(metrics: dict) -> str:
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return ""
    cols = (("n_generated", "n", "{:.0f}"), ("accuracy", "accuracy", "{:.1%}"), ("cross_entropy", "CE", "{:.3f}"),
            ("mmd", "MMD ↓", "{:.4f}"), ("cov", "COV ↑", "{:.1%}"), ("1nna", "1-NNA", "{:.1%}"))
    out = ['<table><tr><th class="l">class</th>' + "".join(f"<th>{_e(h)}</th>" for _, h, _ in cols) + "</tr>"]
    for c in sorted(per_class, key=_class_order):
        entry = per_class[c] if isinstance(per_class[c], dict) else {}
        cells = [_fmt(entry.get(k), f) for k, _, f in cols]
        out.append(f'<tr><td class="l">{_e(c)}</td>' + "".join(f"<td>{_e(x)}</td>" for x in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _confusion_table(metrics: dict) -> str:
    """The classifier's confusion on the samples (rows: conditioning class, columns: predicted), shaded by row share."""
    conf = metrics.get("confusion")
    if (not isinstance(conf, list) or not conf or not all(isinstance(r, list) and len(r) == len(conf) for r in conf)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in conf for x in r)):
        return ""
    n = len(conf)
    out = ["<p>Confusion of the classifier on the samples: rows are the conditioning class, columns the "
           "predicted class.</p>", '<table><tr><th class="l">class \\ predicted</th>'
           + "".join(f"<th>{j}</th>" for j in range(n)) + "</tr>"]
    for i, row in enumerate(conf):
        total = sum(row) or 1
        shares = [min(max(x / total, 0), 1) for x in row]
        cells = "".join(f'<td style="background:rgba(31,119,180,{a:.2f}){";color:#fff" if a > 0.6 else ""}">'
                        f"{_e(x)}</td>" for x, a in zip(row, shares))
        out.append(f'<tr><th class="l">{i}</th>{cells}</tr>')
    return "\n".join(out + ["</table>"])


def _classify_figures(run_dir: Path) -> list[tuple[str, str, str]]:
    """(file name, section, caption) of every image in the run directory, in a stable order."""
    found = []
    for path in sorted(run_dir.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.suffix.lower() not in _MIME or not path.is_file():
            continue  # hidden names include the temporaries of atomic writes
        low = path.name.lower()
        section, caption = next(((s, c) for s, match, c in _FIGURE_RULES if match(low)), ("other", ""))
        found.append((path.name, section, caption))
    # The sample grid first in its section, whatever sorts before it.
    return sorted(found, key=lambda f: (f[0] != GRID_FILE, f[0]))


def _figure(path: Path, caption: str, notes: list[str]) -> str:
    mime = _MIME[path.suffix.lower()]
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            notes.append(f"{path.name} not embedded: {size / 1e6:.0f} MB is too large for a self-contained page")
            return ""
        data = path.read_bytes()
    except OSError as exc:
        notes.append(f"{path.name} not embedded: {exc.strerror or exc}")
        return ""
    if not data.startswith(_MAGIC[mime]):
        notes.append(f"{path.name} not embedded: not a valid {path.suffix.lstrip('.').upper()} file")
        return ""
    width = _pixel_width(data, mime)
    # Small images (sample grids of 28x28 digits) are shown enlarged with crisp pixels.
    size_attr = f' width="{2 * width}" class="px"' if width and width < 400 else ""
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    text = f"{path.name}: {caption}" if caption else path.name
    return (f'<figure><img src="{uri}" alt="{_e(path.name)}"{size_attr}>'
            f"<figcaption>{_e(text)}</figcaption></figure>")


def _pixel_width(data: bytes, mime: str) -> int | None:
    if mime == "image/png" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big")
    if mime == "image/gif" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little")
    return None


def _config_table(config: dict) -> str:
    out = ["<details><summary>Resolved configuration (config.json)</summary>",
           '<table><tr><th class="l">section</th><th class="l">key</th><th class="l">value</th></tr>']
    for section, values in config.items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            out.append(f'<tr><td class="l">{_e(section)}</td><td class="l">{_e(key)}</td>'
                       f'<td class="l"><code>{_e(json.dumps(value))}</code></td></tr>')
    return "\n".join(out + ["</table></details>"])


def _json_tables(obj: Any, max_rows: int = 500) -> str:
    """A readable rendering of a JSON artifact of unknown shape (tune.json): tables where the shape allows."""
    if not isinstance(obj, dict):
        return f"<pre>{_e(json.dumps(obj, indent=1)[:20000])}</pre>"
    out = []
    scalars = {k: v for k, v in obj.items() if _is_scalar(v)}
    if scalars:
        out.append(_kv_table(scalars))
    # The chosen setting first, then the searched settings.
    for key in sorted((k for k in obj if not _is_scalar(obj[k])), key=lambda k: k != "best"):
        value = obj[key]
        out.append(f"<h3>{_e(key)}</h3>")
        if isinstance(value, dict) and all(_is_scalar(v) for v in value.values()):
            out.append(_kv_table(value))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            cols = list(dict.fromkeys(k for r in value for k, v in r.items() if _is_scalar(v)))
            out.append("<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                    for r in value[:max_rows]]
            out.append("</table>")
            if len(value) > max_rows:
                out.append(f'<p class="note">first {max_rows} of {len(value)} rows</p>')
        else:
            out.append(f"<pre>{_e(json.dumps(value, indent=1)[:20000])}</pre>")
    return "\n".join(out)


def _kv_table(items: dict) -> str:
    rows = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(_fmt(v))}</td></tr>' for k, v in items.items())
    return f"<table>{rows}</table>"


def _optional_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return load_json(path)
    except ArtifactError as exc:
        notes.append(f"skipped: {exc}")
        return None


def _fmt(value: Any, pattern: str | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if pattern:
        return pattern.format(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _class_order(c: str) -> tuple[int, int | str]:
    return (0, int(c)) if str(c).lstrip("-").isdigit() else (1, str(c))


def _align(column: int) -> str:
    return "l" if column < 2 else ""


def _warning(text: str) -> str:
    return f'<div class="warn">warning: {_e(text)}</div>'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
