"""Training-step throughput: fp32 eager (math attention) vs. bf16 autocast + fused SDPA vs. torch.compile.

All paths run in one process on the same model initialization and the same batch:

  (a) fp32 eager, attention through SDPA's unfused math kernel ((a') the same with the fused kernel);
  (b) bf16 autocast, fused SDPA (the flash-attention kernel, on CPU as on GPU);
  (c) (b) + ``torch.compile`` (mode "default"), and (d) mode "max-autotune-no-cudagraphs".

Each prints tokens/s (median of per-step times), achieved GFLOP/s, the ratio to (a),
and the spread of its step times; timed steps are interleaved path by path, so a
change of load on a shared machine hits every path alike. Then the compiled paths
are checked: loss and gradient norm on one batch, with weights moved away from the
initialization, must match bf16 eager within bf16 rounding (2 %).

    python benchmarks/train.py [--preset cpu] [--steps 6] [--threads 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nefgpt.config import load_preset
from nefgpt.model import GPT
from nefgpt.tokenizer import Vocab
from nefgpt.train import model_config, sequence_loss


class Runner:
    """One training configuration: its own model and optimizer (same init), stepped one step at a time."""

    def __init__(self, name, cfg, vocab, amp, backend, mode):
        torch.manual_seed(0)
        self.name, self.amp, self.backend, self.mode = name, amp, backend, mode
        self.model = GPT(model_config(cfg.train, vocab, num_params=561))
        self.opt = self.model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
        self.loss_fn = torch.compile(sequence_loss, mode=mode) if mode else sequence_loss
        self.times: list[float] = []

    def step(self, batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        with sdpa_kernel(self.backend), torch.autocast("cpu", dtype=self.amp or torch.float32,
                                                       enabled=self.amp is not None):
            loss = self.loss_fn(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach()), time.perf_counter() - t0


def loss_and_grad_norm(loss_fn, model, batch) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def compile_check(runs, cfg, vocab, batch) -> None:
    """Compiled vs eager bf16 on one batch, for weights far from init (there every logit is ~0 and any path
    gives log(num_codes)): loss and gradient norm must agree within bf16 rounding."""
    torch.manual_seed(1)
    model = GPT(model_config(cfg.train, vocab, num_params=561))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = loss_and_grad_norm(sequence_loss, model, batch)
    print(f"compile check, perturbed weights: eager bf16 loss {ref[0]:.5f}, grad norm {ref[1]:.4f}")
    for r in runs:
        if r.mode:
            got = loss_and_grad_norm(r.loss_fn, model, batch)
            rel = [abs(g - e) / abs(e) for g, e in zip(got, ref)]
            ok = "ok" if max(rel) < 2e-2 else "MISMATCH"
            print(f"  {r.name:36s}: loss {got[0]:.5f} (rel {rel[0]:.1e}), grad norm {got[1]:.4f} "
                  f"(rel {rel[1]:.1e}): {ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile paths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_preset(args.preset)
    vocab = Vocab(cfg.tokenize.num_codes)
    batch = torch.randint(0, vocab.num_codes, (cfg.train.batch_size, 563), generator=torch.Generator().manual_seed(0))
    paths = [("(a) fp32 eager, math SDPA", None, SDPBackend.MATH, None),
             ("(a') fp32 eager, fused SDPA", None, SDPBackend.FLASH_ATTENTION, None),
             ("(b) bf16 autocast, fused SDPA", torch.bfloat16, SDPBackend.FLASH_ATTENTION, None)]
    if not args.no_compile:
        paths += [("(c) (b) + compile default", torch.bfloat16, SDPBackend.FLASH_ATTENTION, "default"),
                  ("(d) (b) + compile max-autotune-nocg", torch.bfloat16, SDPBackend.FLASH_ATTENTION,
                   "max-autotune-no-cudagraphs")]
    print(f"torch {torch.__version__}, {args.preset} preset, batch {cfg.train.batch_size} x 562 tokens, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after warm-up")
    runs = [Runner(name, cfg, vocab, amp, backend, mode) for name, amp, backend, mode in paths]
    # Warm-up: compilation happens in the first step.
    first = {}
    for r in runs:
        for i in range(2 if r.mode else 1):
            loss, dt = r.step(batch)
            first.setdefault(r.name, (loss, dt))
    # Timed steps interleaved round by round, so a change of load on a shared machine hits every path alike.
    for _ in range(args.steps):
        for r in runs:
            r.times.append(r.step(batch)[1])
    tokens = batch.numel() - batch.shape[0]  # inputs per step (T - 1 per sequence)
    base = None
    for r in runs:
        dt = statistics.median(r.times)
        tps, gflops = tokens / dt, tokens * r.model.flops_per_token() / dt / 1e9
        base = base or tps
        note = ""
        if r.mode:
            note = f"  (first step, with compilation: {first[r.name][1]:.0f} s)"
        spread = (max(r.times) - min(r.times)) / dt
        print(f"{r.name:38s}: {tps:8.0f} tokens/s  {gflops:6.1f} GFLOP/s  {tps / base:.2f}x  "
              f"(min-max {spread:.0%} of median){note}", flush=True)
    if not args.no_compile:
        compile_check(runs, cfg, vocab, batch)

if __name__ == "__main__":
    main()
