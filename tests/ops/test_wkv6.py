"""WKV-6 (RWKV-5/6): backends against the naive spec, the spec against an independent loop, varlen, checks."""

import pytest
import torch

from rwkv_torch.ops import wkv6
from tests.utils import assert_close

NAMES = ("r", "w", "k", "v", "u", "h0")


def make_inputs(B, T, H, N, dtype=torch.float64, decay_max=3.0, requires_grad=False):
    """w = -exp(d) with d up to log(decay_max): log decays in (-decay_max, 0)."""
    r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64) for _ in range(3))
    w = -decay_max * torch.rand(B, T, H, N, dtype=torch.float64)
    u = torch.randn(H, N, dtype=torch.float64)
    xs = [t.to(dtype).requires_grad_(requires_grad) for t in (r, w, k, v, u)]
    h0 = torch.randn(B, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return xs, h0.requires_grad_(requires_grad)


def reference(r, w, k, v, u, h0):
    """Independent float64 loop, elementwise over key c and value j (spec 3.2, pip att_one_v6_0)."""
    B, T, H, N = r.shape
    S = h0.double().clone()
    out = torch.zeros(B, T, H, N, dtype=torch.float64)
    for t in range(T):
        for c in range(N):
            kv = k[:, t, :, c, None].double() * v[:, t].double()  # [B, H, N_v]
            out[:, t] += r[:, t, :, c, None].double() * (u[:, c, None].double() * kv + S[:, :, c])
            S[:, :, c] = S[:, :, c] * w[:, t, :, c, None].double().exp() + kv
    return out, S


def grads_of(fn, xs, h0, seed=1):
    out, ht = fn(*xs, h0)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(ht.dtype)
    ((out * do).sum() + (ht * dht).sum()).backward()
    gs = [x.grad.clone() for x in (*xs, h0)]
    for x in (*xs, h0):
        x.grad = None
    return out.detach(), ht.detach(), gs


@pytest.mark.parametrize("B,T,H,N", [(2, 1, 2, 4), (1, 23, 3, 8)], ids=lambda x: str(x))
def test_naive_matches_independent_loop(B, T, H, N):
    xs, h0 = make_inputs(B, T, H, N)
    out, ht = wkv6(*xs, h0, backend="naive")
    ref_o, ref_h = reference(*xs, h0)
    assert_close("o", ref_o, out, 1e-12)
    assert_close("ht", ref_h, ht, 1e-12)


CASES = [(1, 1, 1, 8, 16), (2, 5, 2, 8, 16), (2, 63, 3, 16, 16), (1, 100, 2, 8, 32), (1, 130, 2, 16, 64)]


@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=[f"B{b}-T{t}-H{h}-N{n}-L{c}" for b, t, h, n, c in CASES])
def test_chunk_matches_naive_fp64(B, T, H, N, chunk):
    xs, h0 = make_inputs(B, T, H, N, requires_grad=True)
    ref_o, ref_h, ref_g = grads_of(lambda *a: wkv6(*a, backend="naive"), xs, h0)
    out, ht, gs = grads_of(lambda *a: wkv6(*a, backend="chunk", chunk_size=chunk), xs, h0)
    assert_close("o", ref_o, out, 1e-10)
    assert_close("ht", ref_h, ht, 1e-10)
    for name, rg, g in zip(NAMES, ref_g, gs):
        assert_close(f"d{name}", rg, g, 1e-10)


def test_step_backend_and_fp32():
    xs, h0 = make_inputs(2, 9, 2, 8)
    ref_o, ref_h = wkv6(*xs, h0, backend="naive")
    out, ht = wkv6(*xs, h0, backend="step")
    assert_close("step o", ref_o, out, 1e-12)
    out, ht = wkv6(*[x.float() for x in xs], h0.float(), backend="chunk")
    assert out.dtype == torch.float32 and ht.dtype == torch.float32
    assert_close("fp32 o", ref_o, out, 1e-5)
    assert_close("fp32 ht", ref_h, ht, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_with_strong_decay_is_stable(dtype):
    xs, h0 = make_inputs(1, 4096, 1, 4, decay_max=20.0)
    ref_o, ref_h = wkv6(*xs, h0, backend="naive")
    out, ht = wkv6(*[x.to(dtype) for x in xs], h0.to(dtype), backend="chunk", chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(ht).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close("o", ref_o, out, tol)
    assert_close("ht", ref_h, ht, tol)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_equals_separate_calls(backend):
    lens = [7, 1, 33]
    cu = torch.tensor([0, 7, 8, 41])
    xs, _ = make_inputs(1, sum(lens), 2, 8)
    h0 = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    out, ht = wkv6(*xs, h0, cu_seqlens=cu, backend=backend, chunk_size=16)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, h_i = wkv6(*[x[:, s:e] for x in xs[:4]], xs[4], h0[i : i + 1], backend="naive")
        assert_close(f"o[{i}]", o_i, out[:, s:e], 1e-10)
        assert_close(f"ht[{i}]", h_i, ht[i : i + 1], 1e-10)


def test_bad_inputs_raise_clear_errors():
    (r, w, k, v, u), h0 = make_inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        wkv6(r[0], w[0], k[0], v[0], u)
    with pytest.raises(ValueError, match="u \\(bonus\\) must be"):
        wkv6(r, w, k, v, u[0])
    with pytest.raises(ValueError, match="<= 0"):
        wkv6(r, -w, k, v, u)
    with pytest.raises(ValueError, match="state must be"):
        wkv6(r, w, k, v, u, h0[:, :1])
    with pytest.raises(ValueError, match="backend"):
        wkv6(r, w, k, v, u, backend="fast")
