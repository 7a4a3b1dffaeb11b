"""WKV-6 (RWKV-5/6): every backend against the naive spec, the spec against an independent loop, stability, varlen."""

import pytest
import torch

from rwkv_torch.ops import wkv6
from rwkv_torch.ops.wkv6 import chunk as wkv6_chunk_module
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

NAMES = ("r", "w", "k", "v", "u", "h0")  # the inputs, then the initial state


def make_inputs(B, T, H, N, dtype=torch.float64, decay_max=3.0, requires_grad=False, with_state=True, device="cpu",
                n_states=None):
    """RWKV-6-shaped inputs: log decays w = -exp(d) spread over (-decay_max, 0), a random bonus u [H, N] and a
    non-zero initial state [n_states or B, H, N, N] (float32, or float64 for float64 inputs)."""
    r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64) for _ in range(3))
    w = -decay_max * torch.rand(B, T, H, N, dtype=torch.float64)
    u = torch.randn(H, N, dtype=torch.float64)
    xs = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (r, w, k, v, u)]
    h0 = torch.randn(n_states or B, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return xs, (h0.to(device).requires_grad_(requires_grad) if with_state else None)


def reference(r, w, k, v, u, h0):
    """An independent float64 loop over time and key channel c (spec 3.2):
    y_t[:] = Σ_c r_t[c] (u[c] k_t[c] v_t[:] + S[c, :]),  then  S[c, :] = e^{w_t[c]} S[c, :] + k_t[c] v_t[:]."""
    B, T, H, N = r.shape
    S = h0.detach().double().clone() if h0 is not None else torch.zeros(B, H, N, N, dtype=torch.float64)
    r, w, k, v, u = (x.detach().double() for x in (r, w, k, v, u))
    out = torch.zeros(B, T, H, N, dtype=torch.float64)
    for t in range(T):
        for c in range(N):
            kv = k[:, t, :, c, None] * v[:, t]  # [B, H, N_v]
            out[:, t] += r[:, t, :, c, None] * (u[:, c, None] * kv + S[:, :, c])
            S[:, :, c] = w[:, t, :, c, None].exp() * S[:, :, c] + kv
    return out, S


SPEC_CASES = [(2, 1, 2, 4, 3.0), (1, 23, 3, 8, 3.0), (2, 40, 2, 4, 25.0)]


@pytest.mark.parametrize(
    "B,T,H,N,decay_max", SPEC_CASES, ids=[f"B{b}-T{t}-H{h}-N{n}-w{d:g}" for b, t, h, n, d in SPEC_CASES]
)
def test_naive_matches_independent_loop(B, T, H, N, decay_max):
    xs, h0 = make_inputs(B, T, H, N, decay_max=decay_max)
    out, ht = wkv6(*xs, h0, backend="naive")
    ref_o, ref_h = reference(*xs, h0)
    assert_close("o", ref_o, out, 1e-12)
    assert_close("ht", ref_h, ht, 1e-12)


CASES = [
    # (B, T, H, N, chunk): T = 1, T below one chunk, T a multiple, T not a multiple of the chunk
    (1, 1, 1, 8, 16),
    (2, 5, 2, 8, 16),
    (2, 63, 3, 16, 16),
    (1, 100, 2, 8, 32),
    (2, 64, 1, 8, 32),
    (1, 130, 2, 16, 64),
    (2, 40, 2, 4, 64),
]


@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=[f"B{b}-T{t}-H{h}-N{n}-L{c}" for b, t, h, n, c in CASES])
@pytest.mark.parametrize("pairs", ["factored", "exact"])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
def test_chunk_matches_naive_fp64(B, T, H, N, chunk, pairs, with_state, monkeypatch):
    # Force each way of forming the intra-chunk pair factors (decays here are mild enough for both).
    span = float("inf") if pairs == "factored" else -1.0
    monkeypatch.setitem(wkv6_chunk_module._FACTOR_SPAN, torch.float64, span)
    xs, h0 = make_inputs(B, T, H, N, decay_max=1.0, requires_grad=True, with_state=with_state)
    ref = grads_of(lambda *a: wkv6(*a, backend="naive"), xs, h0)
    got = grads_of(lambda *a: wkv6(*a, backend="chunk", chunk_size=chunk), xs, h0)
    assert_all_close(ref, got, 1e-10, NAMES)


def test_strong_decays_use_shorter_factorised_chunks(monkeypatch):
    # Decays up to 6 per token (3 on average): a 32-token chunk spans ~96 (> the fp32 limit of 60), an 8-token one
    # ~24.
    # The chunk is halved to a length where the factorised form fits, so the elementwise pair tensor is not built.
    def no_exact(*a):
        raise AssertionError("the elementwise pair form was used")

    monkeypatch.setattr(wkv6_chunk_module, "_pair_scores_exact", no_exact)
    xs, h0 = make_inputs(2, 70, 2, 16, dtype=torch.float32, decay_max=6.0, requires_grad=True)
    ref = grads_of(lambda *a: wkv6(*a, backend="naive"), *float64_leaves(xs, h0))
    got = grads_of(lambda *a: wkv6(*a, backend="chunk", chunk_size=32), xs, h0)
    assert_all_close(ref, got, 1e-5, NAMES)


def test_auto_backend_matches_naive():
    xs, h0 = make_inputs(1, 50, 2, 8)
    for T in (1, 50):  # auto on CPU without grad: naive for one token, the C recurrence (or chunk) otherwise
        seq = [x[:, :T] for x in xs[:4]]
        out, ht = wkv6(*seq, xs[4], h0)
        ref_o, ref_h = wkv6(*seq, xs[4], h0, backend="naive")
        assert_close(f"o-T{T}", ref_o, out, 1e-10)
        assert_close(f"ht-T{T}", ref_h, ht, 1e-10)


def test_fp32_matches_fp64_naive():
    xs, h0 = make_inputs(2, 200, 2, 16)
    ref_o, ref_h = wkv6(*xs, h0, backend="naive")
    xs32, h32 = [x.float() for x in xs], h0.float()
    runs = {"naive": dict(backend="naive")} | {f"chunk-L{c}": dict(backend="chunk", chunk_size=c) for c in (16, 32, 64)}
    for name, kwargs in runs.items():
        out, ht = wkv6(*xs32, h32, **kwargs)
        assert out.dtype == torch.float32 and ht.dtype == torch.float32
        assert_close(f"o-{name}", ref_o, out, 1e-5)
        assert_close(f"ht-{name}", ref_h, ht, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    xs, h0 = make_inputs(1, 70, 2, 16)
    ref_o, ref_h = wkv6(*xs, h0, backend="naive")
    low = [x.to(dtype) for x in xs[:4]]
    for backend in ("naive", "chunk"):
        out, ht = wkv6(*low, xs[4].float(), h0.float(), backend=backend)
        assert out.dtype == dtype and ht.dtype == torch.float32
        assert_close(f"o-{backend}", ref_o, out, 3e-2)
        assert_close(f"ht-{backend}", ref_h, ht, 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_with_strong_decay_is_stable(dtype):
    # Log decays down to -20 per token: a 64-chunk's total reaches ~-640, far past any factorisation's headroom.
    xs, h0 = make_inputs(1, 4096, 1, 4, decay_max=20.0, requires_grad=dtype == torch.float64)
    if dtype == torch.float64:  # values, state and gradients at full precision
        ref = grads_of(lambda *a: wkv6(*a, backend="naive"), xs, h0)
        got = grads_of(lambda *a: wkv6(*a, backend="chunk", chunk_size=64), xs, h0)
        assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2]))
        assert_all_close(ref, got, 1e-10, NAMES)
        return
    ref_o, ref_h = wkv6(*[x.double() for x in xs], h0.double(), backend="naive")
    for backend in ("naive", "chunk"):
        out, ht = wkv6(*xs, h0, backend=backend, chunk_size=64)
        assert torch.isfinite(out).all() and torch.isfinite(ht).all()
        assert_close(f"o-{backend}", ref_o, out, 1e-5)
        assert_close(f"ht-{backend}", ref_h, ht, 1e-5)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_equals_separate_calls(backend):
    # Outputs and states per sequence (the empty one must just return its initial state); gradients reach every
    # input and each sequence's own initial state exactly as in the separate calls.
    lens = [7, 0, 1, 33, 16]  # includes an empty sequence, one token, and a chunk-sized one
    cu = cu_seqlens_of(lens)
    xs, h0 = make_inputs(1, sum(lens), 2, 8, requires_grad=True, n_states=len(lens))
    packed = lambda *a: wkv6(*a, cu_seqlens=cu, backend=backend, chunk_size=16)  # noqa: E731
    assert_varlen_matches(packed, each_sequence(wkv6, cu, 4, backend="naive"), xs, h0, cu, 1e-10, grad_names=NAMES)


@pytest.mark.parametrize("backend", ["naive", "chunk", pytest.param("recurrent", marks=needs_c_kernel()), "auto"])
def test_empty_sequence_returns_the_initial_state(backend):
    xs, h0 = make_inputs(2, 0, 2, 4)
    out, ht = wkv6(*xs, h0, backend=backend)
    assert out.shape == (2, 0, 2, 4)
    assert torch.equal(ht, h0)


def test_no_state_equals_zero_state():
    xs, _ = make_inputs(2, 20, 2, 8)
    for backend in ("naive", "chunk"):
        o1, h1 = wkv6(*xs, backend=backend)
        o2, h2 = wkv6(*xs, torch.zeros(2, 2, 8, 8, dtype=torch.float64), backend=backend)
        assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_bad_inputs_raise_clear_errors():
    xs, h0 = make_inputs(1, 4, 2, 8)
    r, w, k, v, u = xs
    with pytest.raises(TypeError, match="r must be a torch.Tensor"):
        wkv6(r.tolist(), w, k, v, u)
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        wkv6(r[0], w[0], k[0], v[0], u)
    with pytest.raises(ValueError, match="shape of r"):
        wkv6(r, w[:, :3], k, v, u)
    with pytest.raises(TypeError, match="dtype of r"):
        wkv6(r, w, k.float(), v, u)
    with pytest.raises(TypeError, match="float"):
        wkv6(*(x.long() for x in xs))
    with pytest.raises(ValueError, match="<= 0"):
        wkv6(r, -w - 1, k, v, u)
    with pytest.raises(ValueError, match="finite"):
        wkv6(r, w.clone().fill_(float("-inf")), k, v, u)
    with pytest.raises(ValueError, match=r"u \(bonus\) must be \[H, N\] = \[2, 8\]"):
        wkv6(r, w, k, v, u[0])
    with pytest.raises(TypeError, match=r"u \(bonus\) must be a torch.Tensor"):
        wkv6(r, w, k, v, 0.5)
    with pytest.raises(TypeError, match=r"u \(bonus\) must have r's dtype"):
        wkv6(r, w, k, v, u.half())
    with pytest.raises(ValueError, match=r"u \(bonus\) must be on cpu"):
        wkv6(r, w, k, v, u.to("meta"))
    with pytest.raises(ValueError, match=r"state must be \[1, 2, 8, 8\]"):
        wkv6(*xs, h0[:, :1])
    with pytest.raises(TypeError, match="float32"):
        wkv6(*xs, h0.half())
    with pytest.raises(ValueError, match="backend must be one of"):
        wkv6(*xs, backend="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        wkv6(*xs, backend="chunk", chunk_size=0)
    with pytest.raises(ValueError, match="end at T=4"):
        wkv6(*xs, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        wkv6(*(torch.cat([x, x]) for x in xs[:4]), u, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"state must be \[2, 2, 8, 8\]"):
        wkv6(*xs, h0, cu_seqlens=torch.tensor([0, 1, 4]))
