"""Training-step throughput: fp32 eager vs. bf16 autocast, with and without torch.compile.

Prints tokens/s and achieved GFLOP/s of each path and the ratio to fp32 eager,
all measured in one run on the same model and batch.

    python benchmarks/train.py [--preset cpu] [--steps 5] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from nefgpt.config import load_preset
from nefgpt.model import GPT
from nefgpt.tokenizer import Vocab
from nefgpt.train import model_config, sequence_loss


def tokens_per_second(cfg, vocab, amp, compiled: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(model_config(cfg.train, vocab, num_params=561))
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
    loss_fn = torch.compile(sequence_loss) if compiled else sequence_loss
    batch = torch.randint(0, vocab.num_codes, (cfg.train.batch_size, 563))
    for i in range(steps + 2):  # two warm-up steps (compilation happens there)
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / steps
    tokens = cfg.train.batch_size * 562
    return tokens / dt, tokens * model.flops_per_token() / dt / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    args = ap.parse_args()
    cfg = load_preset(args.preset)
    vocab = Vocab(cfg.tokenize.num_codes)
    paths = [("fp32 eager", None, False), ("bf16 autocast", torch.bfloat16, False)]
    if args.compile:
        paths.append(("bf16 autocast + compile", torch.bfloat16, True))
    print(f"{args.preset} preset, batch {cfg.train.batch_size} x 562 tokens, {torch.get_num_threads()} threads")
    base = None
    for name, amp, compiled in paths:
        tps, gflops = tokens_per_second(cfg, vocab, amp, compiled, args.steps)
        base = base or tps
        print(f"{name:26s}: {tps:8.0f} tokens/s  {gflops:6.1f} GFLOP/s  {tps / base:.2f}x")


if __name__ == "__main__":
    main()
