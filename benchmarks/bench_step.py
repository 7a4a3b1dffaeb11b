"""The batched RWKV-7 step on CPU against its GEMM floor (issue 33, "Many games per step").

For each shape, weight format and batch N: ``model.step_`` over N independent streams (``decode.blocks_step``: the
fused C step below ``decode.batched.MIN_ROWS`` rows, the batched engine from there): p50/p99 of the wall time per
step, and the p50 of this thread's CPU time per step (``cpu ms``: what the step itself cost on a machine shared with
other work). Beside it the GEMM floor: 2 x parameters x N FLOPs at the matrix-product rate torch reaches here for the
model's own projections at that N (``torch.mm`` over the six matrices of every layer in fp32; for bf16/int8 on a CPU
with bf16 matrix units, the better of that and the same products in bf16, which the engine runs); with ``--fused``,
the fused C step at the same N. Prints the CPU flags that matter, torch's version and one table.

    PYTHONPATH=src python benchmarks/bench_step.py                 # ~1-2 minutes, 1 thread
    PYTHONPATH=src python benchmarks/bench_step.py --threads 2 --fused --shapes C256L6
"""

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

import rwkv_torch as rt
from rwkv_torch.decode import batched

SHAPES = {"C128L2": (128, 2), "C256L6": (256, 6)}
EMBED = 287  # the replay features' width (ExPhil's shape)


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return " ".join(f for f in keep if f in flags)


def times(fn, budget_s: float, min_reps: int = 5, max_reps: int = 400, cpu: list | None = None) -> list[float]:
    """Sorted wall times of ``fn``; ``cpu`` (a list) gets the sorted CPU times of this thread (what the step cost
    itself on a machine shared with other work)."""
    fn()
    fn()
    out, used, t_end = [], [], time.perf_counter() + budget_s
    while len(out) < max_reps and (len(out) < min_reps or time.perf_counter() < t_end):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        out.append(time.perf_counter() - t0)
        used.append(time.thread_time() - c0)
    if cpu is not None:
        cpu.extend(sorted(used))
    return sorted(out)


def pct(ts: list[float], q: float) -> float:
    return ts[min(len(ts) - 1, int(q * len(ts)))] * 1e3


def gemm_rate(model, n: int, dtype: torch.dtype, budget_s: float) -> float:
    """FLOP/s of torch's matrix products over the model's six projections of every layer at n rows."""
    mats = []
    for block in model.blocks:
        for lin in (block.att.receptance, block.att.key, block.att.value, block.att.output, block.ffn.key,
                    block.ffn.value):
            w = lin.weight.detach()
            mats.append((w.float() if w.dtype == torch.int8 else w).to(dtype).t())
    xs = {m.shape[0]: torch.randn(n, m.shape[0]).to(dtype) for m in mats}

    def run():
        for m in mats:
            torch.mm(xs[m.shape[0]], m)

    flops = 2 * n * sum(m.numel() for m in mats)
    return flops / (pct(times(run, budget_s), 0.5) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="C128L2,C256L6")
    ap.add_argument("--formats", default="fp32,bf16,int8")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of timing per cell (at least 5 steps)")
    ap.add_argument("--fused", action="store_true", help="also time the fused C step at every N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU: {cpu_flags()}; bf16 matrix units: "
          f"{batched.bf16_matmul()}; engine from N = { {str(k)[6:]: v for k, v in batched.MIN_ROWS.items()} }")
    head = (f"{'shape':7} {'fmt':5} {'N':>4} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms':>8} {'floor ms':>8} {'x floor':>7} "
            f"{'GF/s':>6}")
    print(head + (f" {'fused ms':>8}" if args.fused else ""))
    for shape in args.shapes.split(","):
        C, L = SHAPES[shape]
        base = rt.build(embed_dim=EMBED, hidden_size=C, num_layers=L, seed=0).eval()
        P = base.param_count()
        for fmt in args.formats.split(","):
            model = base if fmt == "fp32" else rt.quantize(copy.deepcopy(base), fmt).eval()
            narrow = fmt != "fp32" and batched.bf16_matmul()
            dw = model.decode_weights()
            for n in map(int, args.batches.split(",")):
                x, state = torch.randn(n, EMBED), model.init_state(n)

                def step(model=model, x=x, state=state, dw=dw):
                    model.step_(x, state, weights=dw)

                with torch.no_grad():
                    cpu: list[float] = []
                    ts = times(step, args.budget, cpu=cpu)
                    rate = gemm_rate(model, n, torch.float32, args.budget / 2)
                    if narrow:  # the better of the two rates torch has for these products
                        rate = max(rate, gemm_rate(model, n, torch.bfloat16, args.budget / 2))
                    floor = 2 * P * n / rate * 1e3
                    row = (f"{shape:7} {fmt:5} {n:4d} {pct(ts, 0.5):8.3f} {pct(ts, 0.99):8.3f} {pct(cpu, 0.5):8.3f} "
                           f"{floor:8.3f} {pct(ts, 0.5) / floor:7.2f} {rate / 1e9:6.1f}")
                    if args.fused:
                        saved = batched.MIN_ROWS
                        batched.MIN_ROWS = dict.fromkeys(saved, 1 << 30)
                        try:
                            row += f" {pct(times(step, args.budget), 0.5):8.3f}"
                        finally:
                            batched.MIN_ROWS = saved
                print(row, flush=True)


if __name__ == "__main__":
    main()
