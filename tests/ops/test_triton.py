"""The Triton recurrences (backend="recurrent" on CUDA: wkv7 training + decode kernels, wkv6) against the float64 naive
spec, from a non-zero initial state.

On a machine without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set while the op is called; tiny
shapes, `@pytest.mark.triton`); with CUDA compiled, at bigger shapes (`@pytest.mark.gpu`). A process runs Triton one
way only (see tests/conftest.py). Every check covers the output, the final state and the gradients of every input and
of the initial state, against the naive loop in float64 on the *same* (rounded) inputs, by relative RMS per dtype. One
more test compiles every kernel for an H100 in a subprocess, which needs no GPU; others check that on CPU tensors
without the interpreter backend="recurrent" is the C kernel and never imports Triton.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_torch.ops import _common, wkv6, wkv7
from rwkv_torch.ops.wkv6.recurrent_cpu import wkv6_c
from rwkv_torch.ops.wkv7.recurrent_cpu import wkv7_c
from tests.ops import test_wkv6 as t6
from tests.ops import test_wkv7 as t7
from tests.utils import (
    assert_all_close,
    assert_close,
    assert_varlen_matches,
    cu_seqlens_of,
    each_sequence,
    float64_leaves,
    grads_of,
    needs_c_kernel,
)

KERNEL_MODULES = ("rwkv_torch.ops.wkv7.triton_recurrent", "rwkv_torch.ops.wkv6.triton_recurrent")
TRITON_MODULES = (*KERNEL_MODULES, "rwkv_torch.ops._triton")  # every module that imports Triton


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
    for name in TRITON_MODULES:
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


def inputs7(B, T, H, N, dtype, **kwargs):
    """RWKV-7-shaped inputs needing grad and a random non-zero state (test_wkv7.make_inputs)."""
    return t7.make_inputs(B, T, H, N, dtype, requires_grad=True, **kwargs)


def inputs6(B, T, H, N, dtype, **kwargs):
    """RWKV-6-shaped inputs needing grad and a random non-zero state (test_wkv6.make_inputs)."""
    return t6.make_inputs(B, T, H, N, dtype, requires_grad=True, **kwargs)


NAMES = {wkv7: t7.NAMES, wkv6: t6.NAMES}


def assert_matches_naive(fn, xs, h0, rtol, **kwargs):
    """``fn(..., backend="recurrent", **kwargs)`` against the float64 naive op on the same (rounded) inputs, with the
    same (rounded) loss weights: output, final state and the gradients of every input and of h0. Returns the run's
    ``grads_of`` result."""
    got = grads_of(lambda *a: fn(*a, backend="recurrent", **kwargs), xs, h0)
    like = (xs[0].dtype, _common.compute_dtype(xs[0].dtype) if h0 is None else h0.dtype)
    ref = grads_of(lambda *a: fn(*a, backend="naive"), *float64_leaves(xs, h0), like=like)
    assert_all_close(ref, got, rtol, NAMES[fn])
    return got


def assert_dtypes(got, xs, h0):
    """Output in the input dtype, the state in h0's, every gradient in its input's."""
    assert got[0].dtype == xs[0].dtype and got[1].dtype == h0.dtype
    assert all(g.dtype == x.dtype for g, x in zip(got[2], [*xs, h0], strict=True))


def assert_varlen_matches_naive(fn, xs, h0, cu, rtol, **kwargs):
    """One packed ``backend="recurrent"`` call against each sequence alone through the float64 naive op."""
    packed = lambda *a: fn(*a, cu_seqlens=cu, backend="recurrent", **kwargs)  # noqa: E731
    separate = each_sequence(fn, cu, 6 if fn is wkv7 else 4, backend="naive")
    assert_varlen_matches(packed, separate, xs, h0, cu, rtol, grad_names=NAMES[fn],
                          ref_inputs=float64_leaves(xs, h0), per_sequence=False)


# (B, T, H, N, checkpoint interval): one token, T below / across checkpoints, odd T, N not a power of two.
CASES = [(2, 1, 2, 8, 4), (1, 7, 2, 8, 4), (2, 37, 1, 16, 16), (1, 9, 1, 6, 4)]
CASE_IDS = [f"B{b}-T{t}-H{h}-N{n}-C{c}" for b, t, h, n, c in CASES]


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=CASE_IDS)
def test_wkv7_triton_interpreter(B, T, H, N, chunk, dtype, interpreter):
    xs, h0 = inputs7(B, T, H, N, dtype)
    assert_dtypes(assert_matches_naive(wkv7, xs, h0, RTOL[dtype], chunk_size=chunk), xs, h0)


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=CASE_IDS)
def test_wkv6_triton_interpreter(B, T, H, N, chunk, dtype, interpreter):
    # decay_max 20: per-token decays down to e^-20, the regime where back-stepping or factorising would break.
    xs, h0 = inputs6(B, T, H, N, dtype, decay_max=20.0)
    assert_dtypes(assert_matches_naive(wkv6, xs, h0, RTOL[dtype], chunk_size=chunk), xs, h0)


@pytest.mark.triton
@needs_interpreter
def test_triton_without_initial_state_interpreter(interpreter):
    for fn, make in ((wkv7, inputs7), (wkv6, inputs6)):
        xs, _ = make(1, 5, 2, 8, torch.float32)
        got = assert_matches_naive(fn, xs, None, RTOL[torch.float32], chunk_size=2)
        assert len(got[2]) == len(xs)  # gradients of the inputs only


LENS = [5, 1, 0, 13, 4]  # includes a one-token and an empty sequence; 13 crosses three checkpoints of 4


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_triton_interpreter(dtype, interpreter):
    cu = cu_seqlens_of(LENS, dtype=torch.int32)
    for fn, make in ((wkv7, inputs7), (wkv6, inputs6)):
        xs, h0 = make(1, sum(LENS), 2, 8, dtype, n_states=len(LENS))
        assert_varlen_matches_naive(fn, xs, h0, cu, RTOL[dtype], chunk_size=4)


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3])
def test_wkv7_decode_kernel_interpreter(T, dtype, interpreter):
    from rwkv_torch.ops.wkv7.triton_recurrent import wkv7_decode_triton

    xs, h0 = inputs7(3, T, 2, 20, dtype)  # N = 20: two value blocks of 16, the second one masked
    xs, h0 = [x.detach() for x in xs], h0.detach()
    ref_o, ref_h = wkv7(*[x.double() for x in xs], h0.double(), backend="naive")
    with torch.no_grad():  # no gradient needed: the public op takes the decode kernel
        out, ht = wkv7(*xs, h0, backend="recurrent")
    assert_close("o", ref_o, out, RTOL[dtype])
    assert_close("ht", ref_h, ht, RTOL[dtype])
    state = h0.clone()
    out2, ht2 = wkv7_decode_triton(*xs, state, out_state=state)  # in place, as a CUDA-graph decode loop does
    assert ht2.data_ptr() == state.data_ptr()
    assert torch.equal(out2, out) and torch.equal(state, ht)


@pytest.mark.triton
@needs_interpreter
def test_gradcheck_tiny_interpreter(interpreter):
    xs, h0 = inputs7(1, 3, 1, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv7(*a[:6], a[6], backend="recurrent", chunk_size=2), (*xs, h0))
    xs, h0 = inputs6(1, 3, 1, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv6(*a[:5], a[5], backend="recurrent", chunk_size=2), (*xs, h0))


# Compiles every kernel, as the launchers call it at N = 64, for an H100 (sm_90): Triton -> PTX -> ptxas cubin.
_COMPILE_SCRIPT = """
import importlib, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    sys.exit(f"SKIP this Triton has no ahead-of-time compile API: {e}")
c7, t6 = (importlib.import_module(m) for m in sys.argv[2:4])
for dt in sys.argv[1].split(","):
    x, acc = "*" + dt, "*fp32"
    seqs = dict(seq_offsets="*i64", chunk_offsets="*i64")
    in7, in6 = dict.fromkeys("rwkvab", x), dict.fromkeys("rwkv", x) | dict(u=acc)
    fwd = dict(h0=acc, o=x, ht=acc, hc=acc, **seqs)
    bwd = dict(hc=acc, do=x, dht=acc, dh0=acc, dv=x, dr=acc, dw=acc, dk=acc, scratch=acc, total="i32", **seqs)
    shape = dict(H=4, N=64, BK=64, BV=32)
    kernels = [
        (c7.wkv7_fwd_kernel_recurrent, in7 | fwd | dict(T="i32"),
         shape | dict(CHUNK=32, USE_H0=True, SAVE=True, VARLEN=True), 4),
        (c7.wkv7_fwd_kernel_recurrent, in7 | fwd | dict(T="i32"),  # as the decode path launches it
         shape | dict(BV=16, CHUNK=1, USE_H0=True, SAVE=False, VARLEN=False), 4),
        (c7.wkv7_bwd_kernel_recurrent, in7 | bwd | dict(da=acc, db=acc), shape | dict(CHUNK=32, USE_DHT=True), 8),
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


@needs_c_kernel()
def test_recurrent_on_cpu_without_the_interpreter_runs_the_c_kernel(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _forget_kernels()
    cpu = torch.device("cpu")
    for fn, make, c_kernel in ((wkv7, inputs7, wkv7_c), (wkv6, inputs6, wkv6_c)):
        xs, h0 = make(1, 4, 2, 8, torch.float32)
        xs, h0 = [x.detach() for x in xs], h0.detach()
        assert _common.resolve_backend(fn.__name__, "recurrent", cpu, 4, grad=False) == "c"
        out, ht = fn(*xs, h0, backend="recurrent")
        c_out, c_ht = c_kernel(*xs, h0)
        assert torch.equal(out, c_out) and torch.equal(ht, c_ht)
        ref_o, ref_h = fn(*(x.double() for x in xs), h0.double(), backend="naive")
        assert_close(f"o-{fn.__name__}", ref_o, out, RTOL[torch.float32])
        assert_close(f"ht-{fn.__name__}", ref_h, ht, RTOL[torch.float32])
        # auto on CPU is the C kernel too, and with grad the C backward runs (not Triton's)
        assert torch.equal(fn(*xs, h0)[0], out)
        out_g, _ = fn(*(x.requires_grad_() for x in xs), h0, backend="recurrent")
        assert torch.equal(out_g.detach(), out) and "WKV" in type(out_g.grad_fn).__name__
    # None of this imported Triton's kernels.
    assert not any(name in sys.modules for name in TRITON_MODULES)


def test_missing_triton_package_names_the_install_command(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "triton_importable", lambda: False)
    for fn, make in ((wkv7, inputs7), (wkv6, inputs6)):
        xs, h0 = make(1, 4, 2, 8, torch.float32)
        with pytest.raises(ImportError, match=r"needs the triton package.*pip install rwkv-torch\[gpu\]"):
            fn(*xs, h0, backend="recurrent")


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,T,H,N", [(2, 300, 4, 64), (1, 1000, 2, 32)], ids=["B2-T300-H4-N64", "B1-T1000-H2-N32"])
def test_triton_gpu(B, T, H, N, dtype, compiled):
    for fn, make in ((wkv7, inputs7), (wkv6, inputs6)):
        xs, h0 = make(B, T, H, N, dtype, device="cuda")
        assert_matches_naive(fn, xs, h0, RTOL[dtype])


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_varlen_gpu(dtype, compiled):
    lens = [1, 100, 0, 257, 64]
    cu = cu_seqlens_of(lens, dtype=torch.int32, device="cuda")
    for fn, make in ((wkv7, inputs7), (wkv6, inputs6)):
        xs, h0 = make(1, sum(lens), 4, 64, dtype, device="cuda", n_states=len(lens))
        assert_varlen_matches_naive(fn, xs, h0, cu, RTOL[dtype])


@pytest.mark.gpu
@needs_compiled
def test_decode_kernel_cuda_graph_and_auto(compiled):
    from rwkv_torch.ops.wkv7.triton_recurrent import wkv7_decode_triton

    xs, h0 = inputs7(4, 1, 4, 64, torch.bfloat16, device="cuda")
    xs, h0 = [x.detach() for x in xs], h0.detach()
    ref_o, ref_h = wkv7(*[x.double() for x in xs], h0.double(), backend="naive")
    with torch.no_grad():
        out, ht = wkv7(*xs, h0)  # auto on CUDA with triton installed, no grad: the Triton decode kernel
    assert_close("o-auto", ref_o, out, RTOL[torch.bfloat16])
    assert_close("ht-auto", ref_h, ht, RTOL[torch.float32])
    state = h0.clone()
    wkv7_decode_triton(*xs, state, out_state=state)  # warm-up (compiles) outside the capture
    state.copy_(h0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, _ = wkv7_decode_triton(*xs, state, out_state=state)
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
    mod, fn, make = (t7, wkv7, inputs7) if op == "wkv7" else (t6, wkv6, inputs6)
    xs, h0 = make(2, 11, 2, 8, dtype)
    ref_o, ref_h = mod.reference(*(x.detach().double() for x in xs), h0.detach().double())
    out, ht = fn(*xs, h0, backend="recurrent", chunk_size=4)  # inputs need grad: the kernel with state checkpoints
    with torch.no_grad():  # no grad: for wkv7 the decode kernel
        out_ng, ht_ng = fn(*xs, h0, backend="recurrent", chunk_size=4)
    for name, o, h in (("grad", out, ht), ("no grad", out_ng, ht_ng)):
        assert_close(f"o ({name})", ref_o, o, RTOL[dtype])
        assert_close(f"ht ({name})", ref_h, h, RTOL[dtype])
