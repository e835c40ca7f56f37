"""Training-step throughput of the GPT, every path on the same model initialization and batch.

It first prints the machine: CPU model, ATen capability (AVX512 / AVX2 / DEFAULT), whether the CPU
has native bf16, and the thread count, because the fastest path depends on them. Paths:

  (a) fp32 eager, attention through SDPA's unfused math kernel ((a') the same with the fused kernel);
  (b) bf16 autocast, fused SDPA (fast only on CPUs with native bf16: AVX-512 BF16 or AMX; on an
      AVX2-only CPU bf16 is emulated, and this path shows how slow that is);
  (c) the fastest of (a') and (b) for this CPU + ``torch.compile`` (mode "default"), and (d) mode
      "max-autotune-no-cudagraphs";
  (e) the default path (what train.dtype = auto picks here) at 1 thread instead of --threads, and at
      half and double the preset's batch size (tokens/s; the optimizer step is per batch).

Each prints tokens/s (median of per-step times), achieved GFLOP/s, the ratio to (a), and the
spread of its step times; timed steps are interleaved path by path, so a change of load on a
shared machine hits every path alike. Then the compiled paths are checked: loss and gradient
norm on one batch, with weights moved away from the initialization, must match eager within
2 % (bf16 rounding).

    python benchmarks/train.py [--preset cpu] [--steps 6] [--threads 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nefgpt import hardware
from nefgpt.config import load_preset
from nefgpt.data import NUM_CLASSES
from nefgpt.model import GPT
from nefgpt.codebook import Vocab
from nefgpt.train import autocast_dtype, model_config, sequence_loss


class Runner:
    """One training configuration: its own model and optimizer (same init), stepped one step at a time."""

    def __init__(self, name, cfg, vocab, amp, backend, mode, threads, batch):
        torch.manual_seed(0)
        self.name, self.amp, self.backend, self.mode = name, amp, backend, mode
        self.threads, self.batch = threads, batch
        self.model = GPT(model_config(cfg.train, vocab, num_params=561))
        self.opt = self.model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
        self.loss_fn = torch.compile(sequence_loss, mode=mode) if mode else sequence_loss
        self.times: list[float] = []

    def step(self) -> tuple[float, float]:
        batch = self.batch
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        with sdpa_kernel(self.backend), torch.autocast("cpu", dtype=self.amp or torch.float32,
                                                       enabled=self.amp is not None):
            loss = self.loss_fn(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach()), time.perf_counter() - t0


def loss_and_grad_norm(loss_fn, model, batch, amp) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cpu", dtype=amp or torch.float32,
                                                                 enabled=amp is not None):
        loss = loss_fn(model, batch)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def compile_check(runs, cfg, vocab, batch, amp) -> None:
    """Compiled vs eager bf16 on one batch, for weights far from init (there every logit is ~0 and any path
    gives log(num_codes)): loss and gradient norm must agree within bf16 rounding."""
    torch.manual_seed(1)
    model = GPT(model_config(cfg.train, vocab, num_params=561))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = loss_and_grad_norm(sequence_loss, model, batch, amp)
    what = "bf16" if amp else "fp32"
    print(f"compile check, perturbed weights: eager {what} loss {ref[0]:.5f}, grad norm {ref[1]:.4f}")
    for r in runs:
        if r.mode:
            got = loss_and_grad_norm(r.loss_fn, model, batch, amp)
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
    vocab = Vocab(cfg.tokenize.num_codes, NUM_CLASSES)
    bs = cfg.train.batch_size

    def batch_of(n: int) -> torch.Tensor:
        return torch.randint(0, vocab.num_codes, (n, 563), generator=torch.Generator().manual_seed(0))

    batch = batch_of(bs)
    default_amp = autocast_dtype("auto", torch.device("cpu"))
    fused = SDPBackend.FLASH_ATTENTION
    default_name = "bf16 autocast" if default_amp else "fp32"
    paths = [("(a) fp32 eager, math SDPA", None, SDPBackend.MATH, None, args.threads, batch),
             ("(a') fp32 eager, fused SDPA", None, fused, None, args.threads, batch),
             ("(b) bf16 autocast, fused SDPA" + ("" if hardware.cpu_has_bf16() else " (emulated)"),
              torch.bfloat16, fused, None, args.threads, batch)]
    if not args.no_compile:
        paths += [(f"(c) {default_name} + compile default", default_amp, fused, "default", args.threads, batch),
                  (f"(d) {default_name} + compile max-autotune-nocg", default_amp, fused,
                   "max-autotune-no-cudagraphs", args.threads, batch)]
    paths += [(f"(e) {default_name}, 1 thread", default_amp, fused, None, 1, batch),
              (f"(e) {default_name}, batch {bs // 2}", default_amp, fused, None, args.threads, batch_of(bs // 2)),
              (f"(e) {default_name}, batch {2 * bs}", default_amp, fused, None, args.threads, batch_of(2 * bs))]
    print("machine:", hardware.describe_line(args.threads))
    print(f"default path here (train.dtype = auto): {default_name}; "
          f"NEFGPT_AUTOCAST={hardware.os.environ.get(hardware.AUTOCAST_ENV, '') or '(unset)'}")
    print(f"torch {torch.__version__}, {args.preset} preset, batch {bs} x 562 tokens unless named, "
          f"median of {args.steps} steps after warm-up")
    runs = [Runner(*p[:1], cfg, vocab, *p[1:]) for p in paths]
    # Warm-up: compilation happens in the first step.
    first = {}
    for r in runs:
        for i in range(2 if r.mode else 1):
            loss, dt = r.step()
            first.setdefault(r.name, (loss, dt))
    # Timed steps interleaved round by round, so a change of load on a shared machine hits every path alike.
    for _ in range(args.steps):
        for r in runs:
            r.times.append(r.step()[1])
    base = None
    for r in runs:
        tokens = r.batch.numel() - r.batch.shape[0]  # inputs per step (T - 1 per sequence)
        dt = statistics.median(r.times)
        tps, gflops = tokens / dt, tokens * r.model.flops_per_token() / dt / 1e9
        base = base or tps
        note = ""
        if r.mode:
            note = f"  (first step, with compilation: {first[r.name][1]:.0f} s)"
        spread = (max(r.times) - min(r.times)) / dt
        print(f"{r.name:44s}: {tps:8.0f} tokens/s  {gflops:6.1f} GFLOP/s  {tps / base:.2f}x  "
              f"(min-max {spread:.0%} of median){note}", flush=True)
    torch.set_num_threads(args.threads)
    if not args.no_compile:
        compile_check(runs, cfg, vocab, batch, default_amp)


if __name__ == "__main__":
    main()
