"""WKV op timings on this machine: backends and chunk sizes, forward and forward+backward.

    python benchmarks/bench_ops.py [--B 2 --T 1024 --H 4 --N 64 --threads 2]

Checks the chunk backend against naive first (a benchmark of a wrong kernel is worthless), then prints a table
with the machine and versions. Compare rows as ratios measured in the same run.
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from rwkv_torch.ops import wkv7


def inputs(B, T, H, N, dtype, requires_grad):
    r, k, v = (torch.randn(B, T, H, N, dtype=dtype) for _ in range(3))
    w = -0.6065 * torch.rand(B, T, H, N, dtype=dtype)
    kk = F.normalize(torch.randn(B, T, H, N, dtype=dtype), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, dtype=dtype)
    xs = [t.requires_grad_(requires_grad) for t in (r, w, k, v, a, b)]
    return xs, torch.randn(B, H, N, N)


def timeit(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-naive", action="store_true", help="skip the slow naive rows")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    xs, h0 = inputs(1, 100, 2, 16, torch.float64, False)
    ref, _ = wkv7(*xs, h0.double(), backend="naive")
    for L in (16, 32, 64):
        out, _ = wkv7(*xs, h0.double(), backend="chunk", chunk_size=L)
        assert (out - ref).abs().max() < 1e-9, "chunk disagrees with naive: fix before benchmarking"

    print(f"# wkv7, B={a.B} T={a.T} H={a.H} N={a.N} fp32, {a.threads} threads")
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, python {platform.python_version()}")
    print("| backend | chunk | forward ms | fwd+bwd ms | tokens/s fwd+bwd |")
    print("|---|---|---|---|---|")
    configs = [("chunk", L) for L in (16, 32, 64, 128)]
    if not a.skip_naive:
        configs.append(("naive", None))
    for backend, L in configs:
        xs, h0 = inputs(a.B, a.T, a.H, a.N, torch.float32, True)

        def fwd(xs=xs, h0=h0, backend=backend, L=L):
            with torch.no_grad():
                wkv7(*xs, h0, backend=backend, chunk_size=L)

        def fwd_bwd(xs=xs, h0=h0, backend=backend, L=L):
            out, ht = wkv7(*xs, h0, backend=backend, chunk_size=L)
            (out.sum() + ht.sum()).backward()

        tf, tb = timeit(fwd), timeit(fwd_bwd, reps=2)
        print(f"| {backend} | {L or '-'} | {tf * 1e3:.1f} | {tb * 1e3:.1f} | {a.B * a.T / tb:,.0f} |")


if __name__ == "__main__":
    main()
