"""WKV op timings on this machine: backends and chunk sizes, forward and forward+backward.

    python benchmarks/bench_ops.py [--B 2 --T 1024 --H 4 --N 64 --threads 2] [--only-recurrent]

The ``recurrent`` rows are the C kernels on CPU (their "chunk" is the backward's checkpoint interval); with
``--only-recurrent`` only they run, for WKV-7 and WKV-6.

Checks the chunk backend against naive first (a benchmark of a wrong kernel is worthless), then prints a table
with the machine and versions. Compare rows as ratios measured in the same run.
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from rwkv_torch.ops import wkv6, wkv7


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
    p.add_argument("--only-recurrent", action="store_true", help="only the C recurrence rows (WKV-7 and WKV-6)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    xs, h0 = inputs(1, 100, 2, 16, torch.float64, False)
    ref, _ = wkv7(*xs, h0.double(), backend="naive")
    for L in (16, 32, 64):
        out, _ = wkv7(*xs, h0.double(), backend="chunk", chunk_size=L)
        assert (out - ref).abs().max() < 1e-9, "chunk disagrees with naive: fix before benchmarking"

    print(f"# B={a.B} T={a.T} H={a.H} N={a.N} fp32, {a.threads} threads (WKV-7 unless marked)")
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, python {platform.python_version()}")
    print("| backend | chunk | forward ms | fwd+bwd ms | tokens/s fwd+bwd |")
    print("|---|---|---|---|---|")
    configs = [] if a.only_recurrent else [("wkv7", "chunk", L) for L in (16, 32, 64, 128)]
    configs += [("wkv7", "recurrent", 32)] + ([("wkv6", "recurrent", 32)] if a.only_recurrent else [])
    if not (a.skip_naive or a.only_recurrent):
        configs.append(("wkv7", "naive", None))
    for op, backend, L in configs:
        xs, h0 = inputs(a.B, a.T, a.H, a.N, torch.float32, True)
        if op == "wkv6":  # r, w, k, v and a bonus u [H, N]; WKV-6's log decay is -exp(.)
            with torch.no_grad():
                xs[1].copy_(-torch.exp(torch.randn_like(xs[1]) * 0.5 - 1))
            xs = xs[:4] + [(0.1 * torch.randn(a.H, a.N)).requires_grad_()]
        fn = wkv7 if op == "wkv7" else wkv6

        def fwd(xs=xs, h0=h0, backend=backend, L=L, fn=fn):
            with torch.no_grad():
                fn(*xs, h0, backend=backend, chunk_size=L)

        def fwd_bwd(xs=xs, h0=h0, backend=backend, L=L, fn=fn):
            out, ht = fn(*xs, h0, backend=backend, chunk_size=L)
            (out.sum() + ht.sum()).backward()

        tf, tb = timeit(fwd, reps=5), timeit(fwd_bwd, reps=5)
        name = backend if op == "wkv7" else f"{backend} (WKV-6)"
        print(f"| {name} | {L or '-'} | {tf * 1e3:.1f} | {tb * 1e3:.1f} | {a.B * a.T / tb:,.0f} |")


if __name__ == "__main__":
    main()
