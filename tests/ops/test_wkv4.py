"""WKV-4: backends against the naive stable recurrence, the recurrence against the textbook formula, stability."""

import math

import pytest
import torch

from rwkv_torch.ops import wkv4
from tests.utils import assert_close


def make_inputs(B, T, C, dtype=torch.float64, requires_grad=False, k_scale=2.0):
    w = -torch.exp(torch.randn(C, dtype=torch.float64))
    u = torch.randn(C, dtype=torch.float64)
    k = k_scale * torch.randn(B, T, C, dtype=torch.float64)
    v = torch.randn(B, T, C, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (w, u, k, v)]


def textbook(w, u, k, v, num0, den0):
    """spec 2.2 with explicit sums (float64): the carried state is the true numerator/denominator (num0, den0)."""
    B, T, C = k.shape
    w, u, k, v = w.double(), u.double(), k.double(), v.double()
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = num0 * torch.exp(t * w) + torch.exp(u + k[:, t]) * v[:, t]
        den = den0 * torch.exp(t * w) + torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp((t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        out[:, t] = num / den
    return out


def test_naive_matches_textbook_from_a_nonzero_state():
    w, u, k, v = make_inputs(2, 20, 6)
    aa, bb, pp = torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64) + 0.1, \
        torch.randn(2, 6, dtype=torch.float64)
    out, _ = wkv4(w, u, k, v, (aa, bb, pp), backend="naive")
    assert_close("o", textbook(w, u, k, v, aa * pp.exp(), bb * pp.exp()), out, 1e-12)
    out0, _ = wkv4(w, u, k, v, backend="naive")
    zero = torch.zeros(2, 6, dtype=torch.float64)
    assert_close("o from empty state", textbook(w, u, k, v, zero, zero), out0, 1e-12)


@pytest.mark.parametrize("B,T,C,chunk", [(1, 1, 4, 16), (2, 15, 8, 16), (2, 100, 8, 32), (1, 130, 5, 64)],
                         ids=lambda x: str(x))
def test_chunk_matches_naive_fp64_with_grads(B, T, C, chunk):
    w, u, k, v = make_inputs(B, T, C, requires_grad=True)
    st = [torch.randn(B, C, dtype=torch.float64), torch.rand(B, C, dtype=torch.float64) + 0.1,
          torch.randn(B, C, dtype=torch.float64)]
    st = [s.requires_grad_(True) for s in st]
    leaves = [w, u, k, v, *st]
    results = []
    for backend in ("naive", "chunk"):
        out, (aa, bb, pp) = wkv4(w, u, k, v, tuple(st), backend=backend, chunk_size=chunk)
        g = torch.Generator().manual_seed(0)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        # Compare the state through its meaning (aa e^pp, bb e^pp) and its parts.
        loss = loss + (aa * pp.exp()).sum() + (bb * pp.exp()).sum()
        grads = torch.autograd.grad(loss, leaves)
        results.append((out.detach(), aa.detach(), bb.detach(), pp.detach(), grads))
    (o1, a1, b1, p1, g1), (o2, a2, b2, p2, g2) = results
    assert_close("o", o1, o2, 1e-10)
    for name, x, y in (("aa", a1, a2), ("bb", b1, b2), ("pp", p1, p2)):
        assert_close(name, x, y, 1e-10)
    for name, x, y in zip(("w", "u", "k", "v", "aa0", "bb0", "pp0"), g1, g2):
        assert_close(f"d{name}", x, y, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_stays_finite_and_exact(dtype):
    w, u, k, v = make_inputs(1, 4096, 8, k_scale=10.0)
    w = w * 30  # strong decays: e^{-30 e^x} per step
    ref, _ = wkv4(w, u, k, v, backend="naive")
    out, (aa, bb, pp) = wkv4(*(t.to(dtype) for t in (w, u, k, v)), backend="chunk")
    assert torch.isfinite(out).all() and torch.isfinite(aa).all() and torch.isfinite(pp).all()
    assert_close("o", ref, out, 1e-10 if dtype == torch.float64 else 1e-5)


def test_empty_state_default_and_fp32():
    w, u, k, v = make_inputs(2, 30, 4)
    out, (aa, bb, pp) = wkv4(w, u, k, v, backend="chunk")
    ref, _ = wkv4(w, u, k, v, (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64),
                               torch.full((2, 4), -1e38, dtype=torch.float64)), backend="naive")
    assert_close("o", ref, out, 1e-10)
    o32, st32 = wkv4(*(t.float() for t in (w, u, k, v)))
    assert o32.dtype == torch.float32 and all(s.dtype == torch.float32 for s in st32)
    assert_close("fp32", ref, o32, 1e-5)
    assert math.isfinite(pp.min().item())


def test_bad_inputs_raise_clear_errors():
    w, u, k, v = make_inputs(1, 4, 6)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        wkv4(w, u, k[0], v[0])
    with pytest.raises(ValueError, match=r"w must be \[C\]"):
        wkv4(w[:3], u, k, v)
    with pytest.raises(ValueError, match="<= 0"):
        wkv4(-w, u, k, v)
    with pytest.raises(ValueError, match="state must be a tuple"):
        wkv4(w, u, k, v, (torch.zeros(1, 6),))
    with pytest.raises(ValueError, match="v must match k"):
        wkv4(w, u, k, v[:, :2])
