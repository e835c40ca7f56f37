"""`nefgpt report`: a self-contained report.html, checked as text and in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nefgpt.artifacts import save_json
from nefgpt.cli import main
from nefgpt.errors import ArtifactError
from nefgpt.report import write_report
from test_compare import make_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def build_run(tmp_path: Path) -> tuple[Path, Path, set[str]]:
    """A fake evaluated run and baseline; returns them and the image names the report must embed."""
    run = make_run(tmp_path / "gpt_run")
    base = make_run(tmp_path / "diffusion_run", "diffusion")
    _png(run / "samples_grid.png", (60, 40), 0)
    _png(run / "loss.png", (300, 200), 1)
    _png(run / "confusion.png", (100, 100), 2)
    _png(run / "samples_nearest.png", (120, 60), 4)
    _png(run / "tune_heatmap.png", (200, 100), 5)
    _png(run / "mystery_plot.png", (80, 50), 3)  # a name no section knows: goes under "Other figures"
    frames = [Image.fromarray(np.full((20, 20), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(run / "generation.gif", save_all=True, append_images=frames[1:], duration=100)
    (run / "broken.png").write_bytes(b"not a png")  # must be skipped, not embedded as a broken image
    (run / ".loss.png.x.tmp").write_bytes(b"")  # a temporary of an atomic write: ignored
    save_json(run / "tune.json", {"best": {"temperature": 1.0, "top_k": 3, "top_p": 1.0},
                                  "settings": [{"temperature": t, "top_k": k, "accuracy": 0.9, "mmd": 0.2}
                                              for t in (0.8, 1.0) for k in (0, 3)]})
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["dataset"] = "npz:<script>alert('x')</script>&.npz"
    save_json(run / "config.json", cfg)
    return run, base, {"samples_grid.png", "loss.png", "confusion.png", "mystery_plot.png", "generation.gif",
                       "samples_nearest.png", "tune_heatmap.png"}


def test_report_is_self_contained_and_complete(tmp_path):
    run, base, images = build_run(tmp_path)
    out = write_report(run, baselines=[base])
    assert out == run / "report.html"
    page = out.read_text()
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == len(images) == page.count("<img ")
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,")) for s in srcs)
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the page
    assert "http://" not in page and "https://" not in page
    for name in images:
        assert f'alt="{name}"' in page
    assert "broken.png not embedded: not a valid PNG file" in page
    def section(heading: str) -> str:
        return page.split(f"<h2>{heading}</h2>")[1].split("</section>")[0]

    other = section("Other figures")
    assert 'alt="mystery_plot.png"' in other and "<figcaption>mystery_plot.png</figcaption>" in other
    assert other.count("<img ") == 1
    assert 'alt="samples_nearest.png"' in section("Samples") and 'alt="generation.gif"' in section("Samples")
    assert 'alt="tune_heatmap.png"' in section("Sampling-setting search")
    assert 'alt="confusion.png"' in section("Per-class metrics") and 'alt="loss.png"' in section("Training")
    assert page.index('alt="samples_grid.png"') < page.index('alt="generation.gif"')
    # Headline: the run, the baseline and the ceiling; per-class and tuning tables; the config, escaped.
    assert ">diffusion_run<" in page and ">real-data ceiling<" in page and ">gpt_run<" in page
    assert "<h2>Per-class metrics</h2>" in page and "<h3>settings</h3>" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;.npz" in page
    assert "<details>" in page


def test_report_skips_missing_optional_pieces(tmp_path):
    run = make_run(tmp_path / "bare", seconds_per_field=None, train_seconds=None)
    page = write_report(run).read_text()
    assert "<img" not in page and "Other figures" not in page and "Sampling-setting search" not in page
    assert ">real-data ceiling<" in page


def test_report_without_metrics_is_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match=r"metrics\.json: file not found"):
        write_report(run)
    assert not (run / "report.html").exists()
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nefgpt: error:") and "\n" not in err


def test_cli_report_with_baseline(tmp_path, capsys):
    run, base, _ = build_run(tmp_path)
    assert main(["report", str(run), "--baseline", str(base)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert ">diffusion_run<" in (run / "report.html").read_text()


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *args]
    # A private HOME: chromium writes caches and crash dumps there.
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_report_renders_in_headless_chromium(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (install it with `apt-get install -y chromium`); "
                    "the browser check of report.html did not run")
    run, base, images = build_run(tmp_path)
    url = write_report(run, baselines=[base]).resolve().as_uri()

    dom = _chromium(binary, tmp_path, "--dump-dom", url)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, f"chromium printed no DOM (exit {dom.returncode}): {dom.stderr[-2000:]}"
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(1))
    total = re.search(r'data-images-total="(\d+)"', body.group(1))
    assert loaded and total, f"the report's load script did not run: <body{body.group(1)}>"
    assert int(total.group(1)) == len(images)
    assert int(loaded.group(1)) == len(images), "some embedded images did not decode"

    shot = tmp_path / "report.png"
    res = _chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", url)
    assert shot.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 5  # something was drawn, not a blank page
