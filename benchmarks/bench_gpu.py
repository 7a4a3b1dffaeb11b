"""GPU timings of the Triton WKV kernels against fla's, and one-token decode latency with CUDA graphs.

    python benchmarks/bench_gpu.py [--B 8 --T 4096 --H 32 --N 64 --reps 10]

1. Checks our triton backend against the float64 naive spec on a small problem (a benchmark of a wrong kernel is
   worthless) and stops if it disagrees.
2. Forward and forward+backward time of ``wkv7`` / ``wkv6`` with ``backend="recurrent"`` against fla's ``chunk_rwkv7``,
   ``fused_recurrent_rwkv7`` (forward only in fla), ``chunk_rwkv6`` and ``fused_recurrent_rwkv6``, bf16 inputs, fp32
   state from a random initial state. fla is used only if installed. The last column is the relative RMS difference of
   each output from ours on the same inputs (a check that both compute the same thing).
3. Decode latency of the C256 L6 RWKV-7 backbone (one frame, batch 1): the torch ``step`` recurrence and the triton
   step kernel, eager and replayed from a CUDA graph.

Prints markdown tables with the machine and versions. Needs a CUDA GPU and Triton; compare rows as ratios.
"""

import argparse
import inspect
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

import rwkv_torch as rt
from rwkv_torch.ops import wkv6, wkv7


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def cuda_time_ms(fn, reps, warmup=3):
    """Median wall time of fn() on the GPU, in ms, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(version, B, T, H, N, dtype, device="cuda"):
    """RWKV-shaped inputs as leaves that need grad, and an fp32 initial state [B, H, N, N] (our layout)."""
    r, k, v = (torch.randn(B, T, H, N, device=device) for _ in range(3))
    if version == 7:
        w = -0.6065306597126334 * torch.rand(B, T, H, N, device=device)
        kk = F.normalize(torch.randn(B, T, H, N, device=device), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(B, T, H, N, device=device)]
    else:
        w = -torch.exp(torch.randn(B, T, H, N, device=device) - 1.0)
        xs = [r, w, k, v, torch.randn(H, N, device=device)]
    xs = [t.to(dtype).requires_grad_() for t in xs]
    return xs, torch.randn(B, H, N, N, device=device).requires_grad_()


def verify_against_naive():
    """Ours (triton) against the float64 naive spec: outputs, states and every gradient; exits if any is off."""
    for version, op in ((7, wkv7), (6, wkv6)):
        xs, h0 = inputs(version, 2, 100, 2, 64, torch.float32)
        got = run_fwd_bwd(lambda *a, op=op: op(*a, backend="recurrent"), xs, h0, want_grads=True)
        xs64 = [x.detach().double().requires_grad_() for x in xs]
        h64 = h0.detach().double().requires_grad_()
        ref = run_fwd_bwd(lambda *a, op=op: op(*a, backend="naive"), xs64, h64, want_grads=True)
        worst = max(rel_rms(r_, g_) for r_, g_ in zip(ref, got))
        if not worst < 1e-4:
            sys.exit(f"wkv{version} triton disagrees with the naive spec (rel-RMS {worst:.2e}): fix before timing")
        print(f"# verified: wkv{version} triton vs float64 naive, worst rel-RMS over o, ht and all grads {worst:.1e}")


def run_fwd_bwd(fn, xs, h0, want_grads):
    out, ht = fn(*xs, h0)
    if not want_grads:
        return [out, ht]
    g = torch.Generator(device=out.device).manual_seed(1)
    do = torch.randn(out.shape, generator=g, device=out.device).to(out.dtype)
    dht = torch.randn(ht.shape, generator=g, device=out.device).to(ht.dtype)
    return [out, ht, *torch.autograd.grad((out, ht), [*xs, h0], (do, dht))]


def supported(fn, **kwargs):
    """The keyword arguments fn accepts (fla's signatures change between releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def import_fla():
    """((fla.ops.rwkv6, fla.ops.rwkv7) or None, a version string or why it is missing)."""
    try:
        import fla
        import fla.ops.rwkv6 as fla6
        import fla.ops.rwkv7 as fla7
    except ImportError as e:
        return None, f"not installed ({e}; pip install flash-linear-attention to add its rows)"
    return (fla6, fla7), getattr(fla, "__version__", "?")


def candidates(version, fla_ops):
    """(name, fn(*xs, h0) -> (o, ht) in our layouts) for every implementation present."""
    if version == 7:
        rows = [("rwkv-torch triton", lambda *a: wkv7(*a, backend="recurrent"))]
    else:
        rows = [("rwkv-torch triton", lambda *a: wkv6(*a, backend="recurrent"))]
    if fla_ops is None:
        return rows
    fla6, fla7 = fla_ops

    def fla_v7(fn, **extra):
        def call(r, w, k, v, a, b, h0):
            # fla keeps the state transposed: h = Sᵀ [K, V].
            kw = supported(fn, scale=1.0, initial_state=h0.transpose(-1, -2), output_final_state=True, **extra)
            o, ht = fn(r=r, w=w, k=k, v=v, a=a, b=b, **kw)
            return o, ht.transpose(-1, -2)

        return call

    def fla_v6(fn):
        def call(r, w, k, v, u, h0):
            o, ht = fn(r=r, k=k, v=v, w=w, u=u, scale=1.0, initial_state=h0, output_final_state=True)
            return o, ht

        return call

    if version == 7:
        # The fla RWKV-7 layer's own settings for its chunk kernel.
        layer_opts = dict(safe_gate=True, lower_bound=-0.6065306597126334, chunk_size=64)
        rows += [("fla chunk_rwkv7", fla_v7(fla7.chunk_rwkv7, **layer_opts)),
                 ("fla fused_recurrent_rwkv7", fla_v7(fla7.fused_recurrent_rwkv7))]
    else:
        rows += [("fla chunk_rwkv6", fla_v6(fla6.chunk_rwkv6)),
                 ("fla fused_recurrent_rwkv6", fla_v6(fla6.fused_recurrent_rwkv6))]
    return rows


def bench_ops(a, fla_ops):
    print(f"\n## WKV ops: B={a.B} T={a.T} H={a.H} N={a.N}, bf16 inputs, fp32 state, median of {a.reps}\n")
    print("| op | implementation | forward ms | fwd+bwd ms | fwd+bwd tokens/s | rel-RMS of o vs ours |")
    print("|---|---|---|---|---|---|")
    for version in (7, 6):
        xs, h0 = inputs(version, a.B, a.T, a.H, a.N, torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(a.B, a.T, a.H, a.N, generator=g, device="cuda").to(torch.bfloat16)
        dht = torch.randn(h0.shape, generator=g, device="cuda")
        ours = None
        for name, fn in candidates(version, fla_ops):
            def fwd(fn=fn, xs=xs, h0=h0):
                with torch.no_grad():
                    return fn(*xs, h0)

            def fwd_bwd(fn=fn, xs=xs, h0=h0, do=do, dht=dht):
                o, ht = fn(*xs, h0)
                torch.autograd.grad((o, ht.float()), [*xs, h0], (do, dht))

            cells = []
            try:
                o = fwd()[0]
                ours = o if ours is None else ours
                diff = f"{rel_rms(ours.float(), o.float()):.1e}"
                cells.append(f"{cuda_time_ms(fwd, a.reps):.2f}")
            except Exception as e:  # report any failure of a third-party kernel in the table
                diff = "-"
                cells.append(f"failed: {type(e).__name__}")
            try:
                t = cuda_time_ms(fwd_bwd, a.reps)
                cells += [f"{t:.2f}", f"{a.B * a.T / t * 1e3:,.0f}"]
            except Exception as e:  # fla's fused_recurrent_rwkv7 has no backward
                cells += [f"n/a ({type(e).__name__})", "-"]
            print(f"| wkv{version} | {name} | {' | '.join(cells)} | {diff} |")
        del xs, h0, do, dht
        torch.cuda.empty_cache()


def decode_step(model, x_t, state, backend):
    """One frame through the backbone: the body of RWKV.step with a chosen WKV backend and without the input checks
    that read values back to the host (a CUDA graph cannot). Mutates ``state``'s lists; returns [B, out]."""
    h = model.ln0(model.input_proj(x_t)).unsqueeze(1)
    return model._head(model._blocks(h, state, backend)[:, 0])


def bench_decode(a):
    model = rt.build(embed_dim=287, hidden_size=256, num_layers=6, head_size=64, version=7, seed=0).cuda().eval()
    print(f"\n## Decode: RWKV-7 C256 L6 backbone (embed_dim 287), batch 1, fp32, mean over {a.decode_steps} steps\n")
    print("| WKV backend | eager µs/step | CUDA graph µs/step | graph == eager |")
    print("|---|---|---|---|")
    x_t = torch.randn(1, 287, device="cuda")
    for backend in ("naive", "recurrent"):
        static = model.init_state(1)
        for t in static.shift_att + static.shift_ffn + static.wkv:
            t.normal_()

        def step_inplace(static=static, backend=backend):
            # Work on a shallow copy whose lists the layers rebind; copy the new tensors back into the static ones.
            work = static.fork()
            y = decode_step(model, x_t, work, backend)
            for dst, src in zip(static.shift_att + static.shift_ffn + static.wkv,
                                work.shift_att + work.shift_ffn + work.wkv):
                dst.copy_(src)
            return y

        def per_step_us(fn):
            return cuda_time_ms(lambda: [fn() for _ in range(a.decode_steps)], reps=3) * 1e3 / a.decode_steps

        with torch.no_grad():
            start = static.clone()
            eager_y = step_inplace()
            eager_us = per_step_us(step_inplace)
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the default stream (Triton compiles, cuBLAS handles)
                    for _ in range(3):
                        step_inplace()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    graph_y = step_inplace()
                for dst, src in zip(static.shift_att + static.shift_ffn + static.wkv,
                                    start.shift_att + start.shift_ffn + start.wkv):
                    dst.copy_(src)
                graph.replay()
                torch.cuda.synchronize()
                same = f"{rel_rms(eager_y, graph_y):.1e}"
                graph_us = f"{per_step_us(graph.replay):.1f}"
            except RuntimeError as e:
                same, graph_us = "-", f"capture failed: {str(e).splitlines()[0][:60]}"
        print(f"| {backend} | {eager_us:.1f} | {graph_us} | {same} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per op (median)")
    p.add_argument("--decode-steps", type=int, default=200, help="frames per decode timing")
    p.add_argument("--skip-ops", action="store_true", help="only the decode table")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); for CPU timings run "
                 "benchmarks/bench_ops.py")
    try:
        import triton
    except ImportError:
        sys.exit("bench_gpu.py needs Triton: pip install rwkv-torch[gpu]")
    torch.manual_seed(0)
    fla_ops, fla_version = import_fla()
    print(f"# {torch.cuda.get_device_name()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, fla {fla_version}, python {platform.python_version()}")
    verify_against_naive()
    if not a.skip_ops:
        bench_ops(a, fla_ops)
    bench_decode(a)


if __name__ == "__main__":
    main()
