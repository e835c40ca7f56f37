"""Sampling with and without the key/value cache, measured side by side.

Both paths decode the same tokens for the same seed (tests/test_sample.py checks
it); this prints fields/s of each and the ratio.

    python benchmarks/sample.py [--fields 20] [--preset cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from nefgpt.config import load_preset
from nefgpt.data import NUM_CLASSES
from nefgpt.generate import generate
from nefgpt.model import GPT
from nefgpt.codebook import Vocab
from nefgpt.train import model_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=20)
    ap.add_argument("--preset", default="cpu")
    args = ap.parse_args()
    cfg = load_preset(args.preset)
    vocab = Vocab(cfg.tokenize.num_codes, NUM_CLASSES)
    torch.manual_seed(0)
    model = GPT(model_config(cfg.train, vocab, num_params=561)).eval()
    labels = torch.arange(args.fields) % 10
    rates = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        generate(model, labels, vocab, 561, 1.0, 0, 1.0, torch.Generator().manual_seed(0), use_cache=use_cache)
        rates[use_cache] = args.fields / (time.perf_counter() - t0)
    print(f"model: {args.preset} preset, {model.num_params() / 1e6:.2f}M parameters, batch of {args.fields} fields, "
          f"{torch.get_num_threads()} threads")
    print(f"with KV cache   : {rates[True]:.2f} fields/s")
    print(f"full recompute  : {rates[False]:.2f} fields/s")
    print(f"speedup         : {rates[True] / rates[False]:.1f}x")


if __name__ == "__main__":
    main()
