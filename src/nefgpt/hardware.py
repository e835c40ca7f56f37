"""What this machine is, for choosing the fast path and for naming the machine next to every timing.

Budgets and timings differ several-fold between CPUs (an AVX-512 machine with bf16 runs the GPT's
matmuls ~4x faster than an AVX2-only one), so every recorded time says which kind of CPU made it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# Set to fp32 to turn bf16 autocast off wherever a setting says "auto" (CI does, to test an older CPU's path).
AUTOCAST_ENV = "NEFGPT_AUTOCAST"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's name, with family and model numbers: virtual machines often report only "AMD EPYC"."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def aten_capability() -> str:
    """The SIMD level ATen dispatches to (e.g. AVX512, AVX2, DEFAULT); ATEN_CPU_CAPABILITY can lower it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return os.environ.get("ATEN_CPU_CAPABILITY", "unknown")


def bf16_autocast_allowed() -> bool:
    return os.environ.get(AUTOCAST_ENV, "").lower() != "fp32"


def describe(threads: int | None = None) -> dict:
    """The facts a timing needs beside it: CPU model, cores, ATen capability, bf16, torch threads."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "aten_capability": aten_capability(),
        "bf16_native": cpu_has_bf16(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
    }


def describe_line(threads: int | None = None) -> str:
    d = describe(threads)
    return (f"{d['cpu']} ({d['cores']} cores, ATen {d['aten_capability']}, "
            f"{'bf16' if d['bf16_native'] else 'no bf16'}, {d['torch_threads']} torch threads, torch {d['torch']})")
