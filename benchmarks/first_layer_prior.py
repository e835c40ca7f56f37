"""Sampling the GPT times a per-class prior on the first layer: does a prior with joint structure fix W1?

benchmarks/layer_oracle.py showed that the samples fall short in the first layer (W1, b1): given a real one, the
GPT draws the rest well. The Gaussian baseline captures the first layer's correlations in one covariance, so this
samples from the product of the two on those positions (nefgpt.weight_prior, `sample.prior_weight`):

    logits_i  =  a * logits_i  +  lam * log p(v_c | first-layer values so far)      at first-layer position i,

where m_i and s_i are the class Gaussian's conditional mean and std given the first-layer values decoded so
far (a running forward substitution through the Cholesky factor of its covariance). The Gaussian is fitted per
class on the dequantized training tokens, with the Gaussian baseline's Ledoit-Wolf shrinkage. Temperature,
guidance and the rest apply to the sum as usual; lam = 0 is the plain sampler. a (the GPT's weight on the first
layer, `sample.prior_gpt_weight`) is 1 unless a grid item gives it as a fourth value.
`--components K --dims D` makes the prior a mixture of K Gaussians per class in its D leading principal
directions (`sample.prior_components`, `sample.prior_dims`).

Every (guidance, T, lam[, a]) row of the grid is decoded for 50 fields per class and scored by the `evaluate` stage
against the run's 500 held-out fields (as layer_oracle does), side by side, with the same seed.

`--prior-on all` puts the prior on every weight instead (`sample.prior_positions = all`). `--component-draw first`
draws each field's mixture component before decoding and keeps it (`sample.prior_component_draw = first`).

    python benchmarks/first_layer_prior.py --run runs/demo [--grid "1,1,0 1,1,0.5 1,1,1,0.5 ..."] [--prior-on all]
        [--components 4 --dims 32] [--json out.json]
        [--png grids.png --show "2,0.7,0 1,1,0.5"]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from layer_oracle import score
from nefgpt import field
from nefgpt.checkpoint import load_checked_model
from nefgpt.codebook import Tokenizer, load_tokenizer, load_tokens
from nefgpt.figures import save_sample_grid
from nefgpt.generate import generate
from nefgpt.split import load_split
from nefgpt.weight_prior import WeightPrior

PER_CLASS = 50
DEFAULT_GRID = "1,1,0 1,1,0.5 1,1,1 1,1.1,0.3 1,1.2,0.5 1,1.3,1 2,0.8,0 2,0.8,0.5 2,0.7,0"


def decode(model, tok: Tokenizer, prior: WeightPrior, c: int, n: int, guidance: float, temperature: float,
           lam: float, gpt_weight: float, gen: torch.Generator, component_draw: str = "posterior") -> torch.Tensor:
    """n code sequences of class c, through the package's sampler (nefgpt.generate with sample.prior_weight)."""
    return generate(model, torch.full((n,), c), tok.vocab, tok.spec.num_params, temperature, 0, 1.0, gen,
                    guidance=guidance, prior=prior, prior_weight=lam, prior_gpt_weight=gpt_weight,
                    prior_component_draw=component_draw)


def parse_grid(text: str) -> list[tuple[float, float, float, float]]:
    """"g,T,lam[,a]" items -> (guidance, temperature, prior weight, GPT weight on the first layer) tuples."""
    items = [tuple(float(v) for v in item.split(",")) for item in text.split()]
    return [item if len(item) == 4 else (*item, 1.0) for item in items]


def row_name(g: float, t: float, lam: float, a: float = 1.0) -> str:
    return f"guidance {g:g}, T {t:g}, prior weight {lam:g}" + ("" if a == 1 else f", GPT {a:g}")


def _wrap(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split(" "):
        wider = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(wider, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = wider
    return lines


def save_side_by_side(path: Path, tok: Tokenizer, shown: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    tiles = []
    for name, (tokens, labels) in shown.items():
        tmp = path.with_suffix(f".{len(tiles)}.tmp.png")
        save_sample_grid(tmp, field.render(tok.spec, tok.decode(tokens[::5]), 28), labels[::5], per_row=10)
        tiles.append((name, Image.open(tmp).convert("RGB")))
        tmp.unlink()
    # A title wider than its tile wraps onto more lines instead of running under the next tile's.
    try:
        font = ImageFont.load_default(size=14)  # the size-less default squeezes its spaces to a pixel or two
    except TypeError:  # Pillow < 10.1 has only the bitmap default
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [_wrap(draw, font, name, im.width - 8) for name, im in tiles]
    top = 8 + 17 * max(len(t) for t in titles)
    w = sum(im.width for _, im in tiles) + 20 * (len(tiles) - 1)
    h = max(im.height for _, im in tiles) + top
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for lines, (_, im) in zip(titles, tiles):
        ImageDraw.Draw(canvas).text((x + 4, 4), "\n".join(lines), fill="black", font=font)
        canvas.paste(im, (x, top))
        x += im.width + 20
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a trained run (tokenize.offsets none, input_first)")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="space-separated guidance,temperature,prior-weight triples")
    ap.add_argument("--prior-on", choices=("first", "all"), default="first",
                    help="the positions the Gaussian covers: the first layer (W1, b1) or every weight")
    ap.add_argument("--components", type=int, default=1, help="Gaussians per class (sample.prior_components)")
    ap.add_argument("--dims", type=int, default=0,
                    help="principal directions the mixture lives in; 0 = all positions (sample.prior_dims)")
    ap.add_argument("--component-draw", choices=("posterior", "first"), default="posterior",
                    help="how a field's mixture component is chosen (sample.prior_component_draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="sample grids (5 per class) of the --show rows, side by side")
    ap.add_argument("--show", default="2,0.7,0 1,1,0.5 1,1.1,0.3")
    args = ap.parse_args()
    tok = load_tokenizer(args.run / "tokenizer.safetensors")
    if tok.offsets != "none" or tok.order != "input_first":
        raise SystemExit(f"{args.run}: the prior is on raw first-layer weights; this run's tokens are "
                         f"offsets = {tok.offsets}, order = {tok.order}")
    tokens, labels = load_tokens(args.run, tok.id)
    train = torch.tensor(load_split(args.run)["train"], dtype=torch.long)
    first = tok.spec.layer_params[0] if args.prior_on == "first" else tok.spec.num_params
    prior = WeightPrior.fit(tok.codebook[tokens[train, :first]], labels[train], tok.vocab.num_classes, tok.codebook,
                                   args.components, args.dims)
    model, _ = load_checked_model(args.run, tok.vocab, tok.spec, tok.id)
    model.eval()
    classes = sorted(labels[train].unique().tolist())
    shown_keys = set(parse_grid(args.show))
    results, shown = [], {}
    print(f"{PER_CLASS} samples per class vs the held-out fields; the prior covers the first {first} weights; "
          f"threads {torch.get_num_threads()}")
    print(f"{'':50} {'accuracy':>8} {'MMD':>7} {'COV':>6} {'1-NNA':>6} {'divers.':>7} {'near-copy':>9} {'s':>4}")
    for g, t, lam, a in parse_grid(args.grid):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)
        out = torch.cat([decode(model, tok, prior, c, PER_CLASS, g, t, lam, a, gen, args.component_draw)
                         for c in classes])
        lab = torch.tensor(classes).repeat_interleave(PER_CLASS)
        r = {"guidance": g, "temperature": t, "prior_weight": lam, "prior_gpt_weight": a, **score(args.run, tok, out, lab),
             "seconds": time.perf_counter() - t0}
        results.append(r)
        if (g, t, lam, a) in shown_keys:
            shown[row_name(g, t, lam, a)] = (out, lab)
        print(f"{row_name(g, t, lam, a):50} {r['accuracy']:8.1%} {r['mmd']:7.4f} {r['cov']:6.1%} {r['1nna']:6.1%} "
              f"{r['diversity_ratio']:7.3f} {r['near_copy_rate']:9.1%} {r['seconds']:4.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "seed": args.seed, "per_class": PER_CLASS,
                                         "prior_on": args.prior_on, "prior_positions": first,
                                         "components": args.components, "dims": args.dims,
                                         "component_draw": args.component_draw,
                                         "rows": results}, indent=2) + "\n")
        print(f"json: {args.json}")
    if args.png and shown:
        save_side_by_side(args.png, tok, shown)
        print(f"png: {args.png}")


if __name__ == "__main__":
    main()
