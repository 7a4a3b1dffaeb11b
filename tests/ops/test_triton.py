"""Triton kernels (wkv7 chunk + step, wkv6) against the float64 naive spec, from a non-zero initial state.

On a machine without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, tiny shapes, `@pytest.mark.triton`);
with CUDA compiled, at bigger shapes (`@pytest.mark.gpu`). A process runs Triton one way only (see tests/conftest.py).
Every check covers the output, the final state and the gradients of every input and of the initial state, against the
naive loop in float64 on the *same* (rounded) inputs, by relative RMS per dtype. One more test compiles every kernel for
an H100 in a subprocess, which needs no GPU.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv_torch.ops import _common, wkv6, wkv7
from tests.utils import assert_close

KERNEL_MODULES = ("rwkv_torch.ops.wkv7.triton_chunk", "rwkv_torch.ops.wkv7.triton_step", "rwkv_torch.ops.wkv6.triton")


def _import_triton_mode() -> str | None:
    """How this process runs Triton kernels: "interpreted", "compiled", or None (no triton).

    Triton decorates its own library (tl.sum, tl.cdiv, ...) once, when it is first imported, and a process can then
    only run kernels that way; tests/conftest.py imports it before any test (interpreted on a machine without CUDA).
    """
    if importlib.util.find_spec("triton") is None:
        return None
    import triton.language as tl

    return "interpreted" if type(tl.cdiv).__name__ == "InterpretedFunction" else "compiled"


MODE = _import_triton_mode()
needs_triton = pytest.mark.skipif(MODE is None, reason="triton is not installed (pip install rwkv-torch[gpu])")
needs_interpreter = pytest.mark.skipif(
    MODE != "interpreted",
    reason="triton is not installed" if MODE is None else "Triton runs compiled in this process (CUDA present, or it "
    "was imported before this module); the GPU tests cover the kernels here",
)
needs_compiled = pytest.mark.skipif(
    MODE != "compiled", reason=f"needs a CUDA GPU and compiled Triton (Triton is {MODE or 'not installed'} here)"
)

# Relative-RMS bounds against float64: float64 checks the algebra of the hand-written backward; the others are
# bounded by rounding the output and the gradients to the input dtype (accumulation is always fp32).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(RTOL)
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]


def _forget_kernels():
    # Kernel modules are decorated for the TRITON_INTERPRET of the moment they are imported; re-import them fresh:
    # drop the module and the package attribute that `from package import module` would otherwise return.
    for name in KERNEL_MODULES:
        sys.modules.pop(name, None)
        package, _, module = name.rpartition(".")
        if package in sys.modules:
            vars(sys.modules[package]).pop(module, None)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forget_kernels()
    yield
    _forget_kernels()


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _forget_kernels()
    yield
    _forget_kernels()


def inputs7(B, T, H, N, dtype, device="cpu", n_states=None):
    """RWKV-7-shaped inputs (w in [-0.6065, 0), a = -kk, b = kk * a_rate) and a random non-zero state."""
    r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64) for _ in range(3))
    w = -0.6065 * torch.rand(B, T, H, N, dtype=torch.float64)
    kk = F.normalize(torch.randn(B, T, H, N, dtype=torch.float64), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, dtype=torch.float64)
    xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (r, w, k, v, a, b)]
    h0 = torch.randn(n_states or B, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return xs, h0.to(device).requires_grad_()


def inputs6(B, T, H, N, dtype, device="cpu", n_states=None, decay_max=3.0):
    """RWKV-6-shaped inputs (w = log decay in (-decay_max, 0), a bonus u [H, N]) and a random non-zero state."""
    r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64) for _ in range(3))
    w = -decay_max * torch.rand(B, T, H, N, dtype=torch.float64)
    u = torch.randn(H, N, dtype=torch.float64)
    xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (r, w, k, v, u)]
    h0 = torch.randn(n_states or B, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return xs, h0.to(device).requires_grad_()


def run(fn, xs, h0, like=None, seed=1):
    """(out, final state, grads of xs and h0) through (out * do).sum() + (ht * dht).sum() with random do, dht.

    ``like`` = (output dtype, state dtype) of the run under test: the reference then gets do, dht rounded the same."""
    out, ht = fn(*xs, h0)
    g = torch.Generator().manual_seed(seed)
    o_dt, h_dt = like or (out.dtype, ht.dtype)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(o_dt).to(out)
    dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(h_dt).to(ht)
    leaves = [*xs, h0] if h0 is not None else list(xs)
    grads = torch.autograd.grad((out * do).sum() + (ht * dht).sum(), leaves)
    return [out, ht, *grads]


def double(xs, h0):
    """The same values in float64, as fresh leaves: the reference sees exactly what the kernel saw."""
    leaf = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    return [leaf(x) for x in xs], (None if h0 is None else leaf(h0))


def check_all(names, ref, got, rtol):
    assert len(ref) == len(got) == len(names)
    for name, r_, g_ in zip(names, ref, got):
        assert_close(name, r_, g_, rtol)


NAMES7 = ["o", "ht", "dr", "dw", "dk", "dv", "da", "db", "dh0"]
NAMES6 = ["o", "ht", "dr", "dw", "dk", "dv", "du", "dh0"]
# (B, T, H, N, checkpoint interval): one token, T below / across checkpoints, odd T, N not a power of two.
CASES = [(2, 1, 2, 8, 4), (1, 7, 2, 8, 4), (2, 37, 1, 16, 16), (1, 9, 1, 6, 4)]
CASE_IDS = [f"B{b}-T{t}-H{h}-N{n}-C{c}" for b, t, h, n, c in CASES]


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=CASE_IDS)
def test_wkv7_triton_interpreter(B, T, H, N, chunk, dtype, interpreter):
    xs, h0 = inputs7(B, T, H, N, dtype)
    got = run(lambda *a: wkv7(*a, backend="triton", chunk_size=chunk), xs, h0)
    ref = run(lambda *a: wkv7(*a, backend="naive"), *double(xs, h0), like=(dtype, h0.dtype))
    assert got[0].dtype == dtype and got[1].dtype == h0.dtype
    assert all(g.dtype == x.dtype for g, x in zip(got[2:], [*xs, h0]))
    check_all(NAMES7, ref, got, RTOL[dtype])


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=CASE_IDS)
def test_wkv6_triton_interpreter(B, T, H, N, chunk, dtype, interpreter):
    # decay_max 20: per-token decays down to e^-20, the regime where back-stepping or factorising would break.
    xs, h0 = inputs6(B, T, H, N, dtype, decay_max=20.0)
    got = run(lambda *a: wkv6(*a, backend="triton", chunk_size=chunk), xs, h0)
    ref = run(lambda *a: wkv6(*a, backend="naive"), *double(xs, h0), like=(dtype, h0.dtype))
    assert got[0].dtype == dtype and got[1].dtype == h0.dtype
    assert all(g.dtype == x.dtype for g, x in zip(got[2:], [*xs, h0]))
    check_all(NAMES6, ref, got, RTOL[dtype])


@pytest.mark.triton
@needs_interpreter
def test_triton_without_initial_state_interpreter(interpreter):
    xs, _ = inputs7(1, 5, 2, 8, torch.float32)
    got = run(lambda *a: wkv7(*a, backend="triton", chunk_size=2), xs, None)
    ref = run(lambda *a: wkv7(*a, backend="naive"), *double(xs, None), like=(torch.float32, torch.float32))
    check_all(NAMES7[:-1], ref, got, RTOL[torch.float32])
    xs, _ = inputs6(1, 5, 2, 8, torch.float32)
    got = run(lambda *a: wkv6(*a, backend="triton", chunk_size=2), xs, None)
    ref = run(lambda *a: wkv6(*a, backend="naive"), *double(xs, None), like=(torch.float32, torch.float32))
    check_all(NAMES6[:-1], ref, got, RTOL[torch.float32])


def varlen_reference(op, xs, h0, cu, n_seq_inputs, seed=1):
    """Each sequence alone through the float64 naive op; the same loss weights as run() uses on the packed call."""
    like = (xs[0].dtype, h0.dtype)
    xs, h0 = double(xs, h0)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(xs[0].shape, generator=g, dtype=torch.float64).to(like[0]).to(xs[0])
    dht = torch.randn(h0.shape, generator=g, dtype=torch.float64).to(like[1]).to(h0)
    outs, states = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seq = [x[:, s:e] for x in xs[:n_seq_inputs]] + list(xs[n_seq_inputs:])
        o_i, h_i = op(*seq, h0[i : i + 1], backend="naive")
        outs.append(o_i)
        states.append(h_i)
    out, ht = torch.cat(outs, 1), torch.cat(states, 0)
    grads = torch.autograd.grad((out * do).sum() + (ht * dht).sum(), [*xs, h0])
    return [out, ht, *grads]


LENS = [5, 1, 0, 13, 4]  # includes a one-token and an empty sequence; 13 crosses three checkpoints of 4


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_triton_interpreter(dtype, interpreter):
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    xs, h0 = inputs7(1, sum(LENS), 2, 8, dtype, n_states=len(LENS))
    got = run(lambda *a: wkv7(*a, cu_seqlens=cu, backend="triton", chunk_size=4), xs, h0)
    check_all(NAMES7, varlen_reference(wkv7, xs, h0, cu, 6), got, RTOL[dtype])
    xs, h0 = inputs6(1, sum(LENS), 2, 8, dtype, n_states=len(LENS))
    got = run(lambda *a: wkv6(*a, cu_seqlens=cu, backend="triton", chunk_size=4), xs, h0)
    check_all(NAMES6, varlen_reference(wkv6, xs, h0, cu, 4), got, RTOL[dtype])


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3])
def test_wkv7_step_kernel_interpreter(T, dtype, interpreter):
    from rwkv_torch.ops.wkv7.triton_step import wkv7_step_triton

    xs, h0 = inputs7(3, T, 2, 20, dtype)  # N = 20: two value blocks of 16, the second one masked
    xs, h0 = [x.detach() for x in xs], h0.detach()
    ref_o, ref_h = wkv7(*[x.double() for x in xs], h0.double(), backend="naive")
    with torch.no_grad():  # no gradient needed: the public op takes the step kernel
        out, ht = wkv7(*xs, h0, backend="triton")
    assert_close("o", ref_o, out, RTOL[dtype])
    assert_close("ht", ref_h, ht, RTOL[dtype])
    state = h0.clone()
    out2, ht2 = wkv7_step_triton(*xs, state, out_state=state)  # in place, as a CUDA-graph decode loop does
    assert ht2.data_ptr() == state.data_ptr()
    assert torch.equal(out2, out) and torch.equal(state, ht)


@pytest.mark.triton
@needs_interpreter
def test_gradcheck_tiny_interpreter(interpreter):
    xs, h0 = inputs7(1, 3, 1, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv7(*a[:6], a[6], backend="triton", chunk_size=2), (*xs, h0))
    xs, h0 = inputs6(1, 3, 1, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv6(*a[:5], a[5], backend="triton", chunk_size=2), (*xs, h0))


# Compiles every kernel, as the launchers call it at N = 64, for an H100 (sm_90): Triton -> PTX -> ptxas cubin.
_COMPILE_SCRIPT = """
import importlib, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    sys.exit(f"SKIP this Triton has no ahead-of-time compile API: {e}")
c7, s7, t6 = (importlib.import_module(m) for m in sys.argv[2:5])
for dt in sys.argv[1].split(","):
    x, acc = "*" + dt, "*fp32"
    seqs = dict(seq_offsets="*i64", chunk_offsets="*i64")
    in7, in6 = dict.fromkeys("rwkvab", x), dict.fromkeys("rwkv", x) | dict(u=acc)
    fwd = dict(h0=acc, o=x, ht=acc, hc=acc, **seqs)
    bwd = dict(hc=acc, do=x, dht=acc, dh0=acc, dv=x, dr=acc, dw=acc, dk=acc, scratch=acc, total="i32", **seqs)
    shape = dict(H=4, N=64, BK=64, BV=32)
    kernels = [
        (c7.wkv7_fwd_kernel_recurrent, in7 | fwd, shape | dict(CHUNK=32, USE_H0=True, SAVE=True), 4),
        (c7.wkv7_bwd_kernel_recurrent, in7 | bwd | dict(da=acc, db=acc), shape | dict(CHUNK=32, USE_DHT=True), 8),
        (s7.wkv7_fwd_kernel_step, in7 | dict(h0=acc, o=x, ht=acc, T="i32"), shape | dict(BV=16, USE_H0=True), 4),
        (t6.wkv6_fwd_kernel_recurrent, in6 | fwd, shape | dict(CHUNK=32, USE_H0=True, SAVE=True), 4),
        (t6.wkv6_bwd_kernel_recurrent, in6 | bwd | dict(du=acc), shape | dict(CHUNK=32, USE_DHT=True), 8),
    ]
    for fn, types, consts, warps in kernels:
        signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        try:
            src = ASTSource(fn, signature, constexprs=consts)
        except (TypeError, KeyError) as e:
            sys.exit(f"SKIP this Triton's ASTSource takes another signature format: {e}")
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        assert kernel.asm["cubin"], fn.__name__
        print("compiled", fn.__name__, dt)
"""


@pytest.mark.triton
@needs_triton
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # The interpreter runs kernels as Python; the real compiler also checks types and lowering. A fresh process,
    # because this one may have Triton in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env |= dict(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
                PYTHONPATH=os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")]))
    args = [sys.executable, "-c", _COMPILE_SCRIPT, "fp32,bf16", *KERNEL_MODULES]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "SKIP " in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1].removeprefix("SKIP "))
    assert proc.returncode == 0, f"Triton failed to compile a kernel:\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("compiled") == 10, proc.stdout


def test_triton_backend_errors_and_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _forget_kernels()
    xs, h0 = inputs7(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*pip install rwkv-torch\[gpu\]"):
        wkv7(*xs, h0, backend="triton")
    xs6, h6 = inputs6(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*pip install rwkv-torch\[gpu\]"):
        wkv6(*xs6, h6, backend="triton")
    # auto on CPU is unchanged (chunk / step) and never imports Triton's kernels.
    ref, _ = wkv7(*xs, h0, backend="chunk")
    assert torch.equal(wkv7(*xs, h0)[0], ref)
    assert not any(name in sys.modules for name in KERNEL_MODULES)
    # A missing triton package names the install command.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "triton_importable", lambda: False)
    with pytest.raises(ImportError, match=r"pip install rwkv-torch\[gpu\]"):
        wkv7(*xs, h0, backend="triton")
    with pytest.raises(ImportError, match=r"pip install rwkv-torch\[gpu\]"):
        wkv6(*xs6, h6, backend="triton")


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N", [(2, 300, 4, 64), (1, 1000, 2, 32)], ids=["B2-T300-H4-N64", "B1-T1000-H2-N32"])
def test_triton_gpu(B, T, H, N, dtype, compiled):
    xs, h0 = inputs7(B, T, H, N, dtype, device="cuda")
    got = run(lambda *a: wkv7(*a, backend="triton"), xs, h0)
    ref = run(lambda *a: wkv7(*a, backend="naive"), *double(xs, h0), like=(dtype, h0.dtype))
    check_all(NAMES7, ref, got, RTOL[dtype])
    xs, h0 = inputs6(B, T, H, N, dtype, device="cuda")
    got = run(lambda *a: wkv6(*a, backend="triton"), xs, h0)
    ref = run(lambda *a: wkv6(*a, backend="naive"), *double(xs, h0), like=(dtype, h0.dtype))
    check_all(NAMES6, ref, got, RTOL[dtype])


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_varlen_gpu(dtype, compiled):
    lens = [1, 100, 0, 257, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    xs, h0 = inputs7(1, sum(lens), 4, 64, dtype, device="cuda", n_states=len(lens))
    got = run(lambda *a: wkv7(*a, cu_seqlens=cu, backend="triton"), xs, h0)
    check_all(NAMES7, varlen_reference(wkv7, xs, h0, cu, 6), got, RTOL[dtype])
    xs, h0 = inputs6(1, sum(lens), 4, 64, dtype, device="cuda", n_states=len(lens))
    got = run(lambda *a: wkv6(*a, cu_seqlens=cu, backend="triton"), xs, h0)
    check_all(NAMES6, varlen_reference(wkv6, xs, h0, cu, 4), got, RTOL[dtype])


@pytest.mark.gpu
@needs_compiled
def test_step_kernel_cuda_graph_and_auto(compiled):
    from rwkv_torch.ops.wkv7.triton_step import wkv7_step_triton

    xs, h0 = inputs7(4, 1, 4, 64, torch.bfloat16, device="cuda")
    xs, h0 = [x.detach() for x in xs], h0.detach()
    ref_o, ref_h = wkv7(*[x.double() for x in xs], h0.double(), backend="naive")
    with torch.no_grad():
        out, ht = wkv7(*xs, h0)  # auto on CUDA with triton installed: the triton step kernel
    assert_close("o-auto", ref_o, out, RTOL[torch.bfloat16])
    assert_close("ht-auto", ref_h, ht, RTOL[torch.float32])
    state = h0.clone()
    wkv7_step_triton(*xs, state, out_state=state)  # warm-up (compiles) outside the capture
    state.copy_(h0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, _ = wkv7_step_triton(*xs, state, out_state=state)
    state.copy_(h0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close("o-graph", ref_o, out_g, RTOL[torch.bfloat16])
    assert_close("ht-graph", ref_h, state, RTOL[torch.float32])


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_matches_independent_float64_recurrence(op, dtype, interpreter):
    """Besides the naive backend: the independent float64 loops of test_wkv7/test_wkv6 (the spec's matrix form),
    from a non-zero initial state, odd T across state checkpoints."""
    from tests.ops import test_wkv6 as t6
    from tests.ops import test_wkv7 as t7

    mod, fn, make = (t7, wkv7, inputs7) if op == "wkv7" else (t6, wkv6, inputs6)
    xs, h0 = make(2, 11, 2, 8, dtype)
    ref_o, ref_h = mod.reference(*(x.detach().double() for x in xs), h0.detach().double())
    out, ht = fn(*xs, h0, backend="triton", chunk_size=4)  # inputs need grad: the kernel with state checkpoints
    with torch.no_grad():  # no grad: for wkv7 the decode kernel
        out_ng, ht_ng = fn(*xs, h0, backend="triton", chunk_size=4)
    for name, o, h in (("grad", out, ht), ("no grad", out_ng, ht_ng)):
        assert_close(f"o ({name})", ref_o, o, RTOL[dtype])
        assert_close(f"ht ({name})", ref_h, h, RTOL[dtype])
