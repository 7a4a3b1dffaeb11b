"""WKV-4: every backend against the naive stable recurrence, the recurrence against the textbook formula, stability."""

import pytest
import torch

from rwkv_torch.ops import _common, wkv4
from rwkv_torch.ops.wkv4 import PP_INIT
from tests.utils import assert_all_close, assert_close, grads_of

NAMES = ("w", "u", "k", "v", "aa0", "bb0", "pp0")  # the inputs, then the initial state
STATE_NAMES = ("aa", "bb", "pp")


def make_inputs(B, T, C, dtype=torch.float64, requires_grad=False, k_scale=2.0, decay_scale=1.0):
    """RWKV-4-shaped inputs: w = -decay_scale * exp(time_decay) [C], u = time_first [C], k, v [B, T, C]."""
    w = -decay_scale * torch.exp(torch.randn(C, dtype=torch.float64))
    u = torch.randn(C, dtype=torch.float64)
    k = k_scale * torch.randn(B, T, C, dtype=torch.float64)
    v = torch.randn(B, T, C, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (w, u, k, v)]


def make_state(B, C, dtype=torch.float64, requires_grad=False):
    """A non-zero state as the recurrence would leave it: bb >= 1 (its largest term is e^0), pp any exponent."""
    aa = torch.randn(B, C, dtype=torch.float64)
    bb = 1 + torch.rand(B, C, dtype=torch.float64)
    pp = torch.randn(B, C, dtype=torch.float64)
    return tuple(s.to(dtype).requires_grad_(requires_grad) for s in (aa, bb, pp))


def textbook(w, u, k, v, num0, den0):
    """Spec 2.2 with explicit sums in float64, from a carried true numerator/denominator (num0, den0) [B, C]:
    out_t = (num0 e^{tw} + Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (den0 e^{tw} + Σ_{i<t} e^{(t-1-i)w + k_i}
    + e^{u+k_t}). Returns (out, numerator, denominator) after the last token."""
    B, T, C = k.shape
    w, u, k, v = (x.detach().double() for x in (w, u, k, v))
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T + 1):
        num, den = num0 * torch.exp(t * w), den0 * torch.exp(t * w)
        for i in range(t):
            e = torch.exp((t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        if t < T:
            bonus = torch.exp(u + k[:, t])
            out[:, t] = (num + bonus * v[:, t]) / (den + bonus)
    return out, num, den


SPEC_CASES = [(2, 1, 6), (2, 20, 6), (1, 45, 3)]


@pytest.mark.parametrize("B,T,C", SPEC_CASES, ids=[f"B{b}-T{t}-C{c}" for b, t, c in SPEC_CASES])
def test_naive_matches_textbook_formula(B, T, C):
    w, u, k, v = make_inputs(B, T, C)
    aa0, bb0, pp0 = make_state(B, C)
    out, (aa, bb, pp) = wkv4(w, u, k, v, (aa0, bb0, pp0), backend="naive")
    ref, num, den = textbook(w, u, k, v, aa0 * pp0.exp(), bb0 * pp0.exp())
    assert_close("o", ref, out, 1e-12)
    assert_close("numerator aa e^pp", num, aa * pp.exp(), 1e-12)
    assert_close("denominator bb e^pp", den, bb * pp.exp(), 1e-12)
    # From the empty state, the first token's output is exactly its own value.
    out0, _ = wkv4(w, u, k, v, backend="naive")
    zero = torch.zeros(B, C, dtype=torch.float64)
    assert_close("o from empty state", textbook(w, u, k, v, zero, zero)[0], out0, 1e-12)
    assert torch.equal(out0[:, 0], v[:, 0])


CASES = [
    # (B, T, C, chunk): T = 1, T below one chunk, T a multiple, T not a multiple of the chunk
    (1, 1, 4, 16),
    (2, 15, 8, 16),
    (2, 48, 8, 16),
    (2, 100, 8, 32),
    (1, 130, 5, 64),
    (2, 40, 3, 64),
]


@pytest.mark.parametrize("B,T,C,chunk", CASES, ids=[f"B{b}-T{t}-C{c}-L{l}" for b, t, c, l in CASES])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("backend,tol", [("chunk", 1e-10), ("recurrent", 1e-12)], ids=["chunk", "recurrent"])
def test_backend_matches_naive_fp64(backend, tol, B, T, C, chunk, with_state):
    # Values, final state and the gradients of w, u, k, v and h0; recurrent is the C loop (ops/csrc/wkv4_cpu.c) and
    # its hand-written backward, chunk the parallel form with autograd.
    xs = make_inputs(B, T, C, requires_grad=True)
    state = make_state(B, C, requires_grad=True) if with_state else None
    kwargs = dict(backend=backend, chunk_size=chunk if backend == "chunk" else None)
    ref = grads_of(lambda *a: wkv4(*a, backend="naive"), xs, state)
    got = grads_of(lambda *a: wkv4(*a, **kwargs), xs, state)
    assert_all_close(ref, got, tol, NAMES, STATE_NAMES)


def test_recurrent_backward_fp32_matches_fp64_and_saves_inputs_only():
    from tests.test_training_form import saved_storage_bytes

    xs = make_inputs(2, 90, 16, requires_grad=True)
    state = make_state(2, 16, requires_grad=True)
    ref = grads_of(lambda *a: wkv4(*a, backend="naive"), xs, state)
    low = [x.detach().float().requires_grad_() for x in xs]
    low_state = tuple(s.detach().float().requires_grad_() for s in state)
    got = grads_of(lambda *a: wkv4(*a, backend="recurrent"), low, low_state)
    assert_all_close(ref, got, 2e-5, NAMES, STATE_NAMES)
    # from the empty state (pp = -1e38: every e^{pp - p} must be exactly 0, not a tiny float)
    ref = grads_of(lambda *a: wkv4(*a, backend="naive"), xs, None)
    got = grads_of(lambda *a: wkv4(*a, backend="recurrent"), low, None)
    assert_all_close(ref, got, 2e-5, NAMES, STATE_NAMES)
    # autograd keeps k, v, w, u and the initial state: no per-token intermediates (the chunk form keeps dozens)
    saved = saved_storage_bytes(lambda: wkv4(*low, low_state, backend="recurrent")[0].sum(), [])
    inputs = 4 * (2 * 2 * 90 * 16 + 2 * 16 + 3 * 2 * 16)  # k, v, w, u, aa0, bb0, pp0 in float32
    assert saved < 1.05 * inputs, (saved, inputs)
    chunk = saved_storage_bytes(lambda: wkv4(*low, low_state, backend="chunk")[0].sum(), [])
    assert saved < chunk / 4, (saved, chunk)


def test_recurrent_results_do_not_depend_on_the_thread_count():
    xs = make_inputs(4, 33, 8, dtype=torch.float32, requires_grad=True)
    state = make_state(4, 8, dtype=torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(grads_of(lambda *a: wkv4(*a, backend="recurrent"), xs, state))
    finally:
        torch.set_num_threads(threads)
    assert_all_close(runs[0], runs[1], 0.0, NAMES, STATE_NAMES)


def test_auto_backend_matches_naive():
    w, u, k, v = make_inputs(2, 40, 6)
    state = make_state(2, 6)
    for T in (1, 40):  # auto: naive for one token, the C recurrence (or chunk where it cannot build) otherwise
        out, st = wkv4(w, u, k[:, :T], v[:, :T], state)
        ref, ref_st = wkv4(w, u, k[:, :T], v[:, :T], state, backend="naive")
        assert_close(f"o-T{T}", ref, out, 1e-10)
        for name, a, b in zip(("aa", "bb", "pp"), ref_st, st):
            assert_close(f"{name}-T{T}", a, b, 1e-10)


def test_fp32_matches_fp64_naive():
    w, u, k, v = make_inputs(2, 200, 8)
    state = make_state(2, 8)
    ref, ref_st = wkv4(w, u, k, v, state, backend="naive")
    low = [x.float() for x in (w, u, k, v)]
    runs = {"naive": dict(backend="naive"), "recurrent": dict(backend="recurrent")} | {
        f"chunk-L{c}": dict(backend="chunk", chunk_size=c) for c in (16, 32, 64)}
    for name, kwargs in runs.items():
        out, st = wkv4(*low, tuple(s.float() for s in state), **kwargs)
        assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in st)
        assert_close(f"o-{name}", ref, out, 1e-5)
        for sname, a, b in zip(("aa", "bb", "pp"), ref_st, st):
            assert_close(f"{sname}-{name}", a, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    w, u, k, v = make_inputs(1, 70, 8)
    ref, _ = wkv4(w, u, k, v, backend="naive")
    for backend in ("naive", "chunk", "recurrent"):
        # w and u stay float32, as the layers keep time_decay / time_first.
        out, st = wkv4(w.float(), u.float(), k.to(dtype), v.to(dtype), backend=backend)
        assert out.dtype == dtype and all(s.dtype == torch.float32 for s in st)
        assert_close(f"o-{backend}", ref, out, 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_with_strong_decay_is_stable(dtype):
    # Per-step decays e^{-30 e^x} and keys of scale 10: a cumulative-product scan would underflow to 0/0 at once.
    xs = make_inputs(1, 4096, 8, k_scale=10.0, decay_scale=30.0, requires_grad=dtype == torch.float64)
    state = make_state(1, 8, requires_grad=dtype == torch.float64)
    if dtype == torch.float64:  # values, state and gradients at full precision
        ref = grads_of(lambda *a: wkv4(*a, backend="naive"), xs, state)
        for backend in ("chunk", "recurrent"):
            kw = dict(backend=backend, chunk_size=64 if backend == "chunk" else None)
            got = grads_of(lambda *a, kw=kw: wkv4(*a, **kw), xs, state)
            assert all(torch.isfinite(t).all() for t in (got[0], *got[1], *got[2]))
            assert_all_close(ref, got, 1e-10, NAMES, STATE_NAMES)
        return
    ref, ref_st = wkv4(*xs, state, backend="naive")
    low = [x.float() for x in xs]
    for backend in ("naive", "chunk", "recurrent"):
        out, st = wkv4(*low, tuple(s.float() for s in state), backend=backend)
        assert torch.isfinite(out).all() and all(torch.isfinite(s).all() for s in st)
        assert_close(f"o-{backend}", ref, out, 1e-5)
        for name, a, b in zip(("aa", "bb", "pp"), ref_st, st):
            assert_close(f"{name}-{backend}", a, b, 1e-5)


@pytest.mark.parametrize("backend", ["naive", "chunk", "recurrent", "auto"])
def test_empty_sequence_returns_the_initial_state(backend):
    w, u, k, v = make_inputs(2, 0, 4)
    state = make_state(2, 4)
    out, st = wkv4(w, u, k, v, state, backend=backend)
    assert out.shape == (2, 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(st, state))


def test_no_state_is_the_empty_state():
    w, u, k, v = make_inputs(2, 30, 4)
    empty = (
        torch.zeros(2, 4, dtype=torch.float64),
        torch.zeros(2, 4, dtype=torch.float64),
        torch.full((2, 4), PP_INIT, dtype=torch.float64),
    )
    for backend in ("naive", "chunk", "recurrent"):
        o1, s1 = wkv4(w, u, k, v, backend=backend)
        o2, s2 = wkv4(w, u, k, v, empty, backend=backend)
        assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(s1, s2))
        assert all(torch.isfinite(s).all() for s in s1)


def test_bad_inputs_raise_clear_errors():
    w, u, k, v = make_inputs(1, 4, 6)
    state = make_state(1, 6)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        wkv4(w, u, k.tolist(), v)
    with pytest.raises(ValueError, match=r"k must be \[B, T, C\]"):
        wkv4(w, u, k[0], v[0])
    with pytest.raises(TypeError, match="float"):
        wkv4(w, u, k.long(), v.long())
    with pytest.raises(ValueError, match="shape of k"):
        wkv4(w, u, k, v[:, :2])
    with pytest.raises(TypeError, match="dtype of k"):
        wkv4(w, u, k, v.float())
    with pytest.raises(ValueError, match=r"w must be \[C\] = \[6\]"):
        wkv4(w[:3], u, k, v)
    with pytest.raises(ValueError, match=r"u must be \[C\] = \[6\]"):
        wkv4(w, u[None], k, v)
    with pytest.raises(TypeError, match="u must have k's dtype"):
        wkv4(w, u.half(), k, v)
    with pytest.raises(ValueError, match="w must be on cpu"):
        wkv4(w.to("meta"), u, k, v)
    with pytest.raises(ValueError, match="<= 0"):
        wkv4(-w, u, k, v)
    with pytest.raises(ValueError, match="finite"):
        wkv4(w.clone().fill_(float("nan")), u, k, v)
    with pytest.raises(ValueError, match=r"state must be a tuple \(aa, bb, pp\)"):
        wkv4(w, u, k, v, state[:2])
    with pytest.raises(ValueError, match=r"three \[1, 6\] tensors; bb is \(2, 6\)"):
        wkv4(w, u, k, v, (state[0], torch.cat([state[1]] * 2), state[2]))
    with pytest.raises(TypeError, match="state pp must be float32"):
        wkv4(w, u, k, v, (*state[:2], state[2].half()))
    with pytest.raises(ValueError, match="backend must be one of"):
        wkv4(w, u, k, v, backend="fast")
    with pytest.raises(ValueError, match="no GPU kernel for wkv4"):  # the C loop is CPU-only
        _common.resolve_backend("wkv4", "recurrent", torch.device("cuda"), 4, grad=False, triton=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        wkv4(w, u, k, v, backend="chunk", chunk_size=-1)
