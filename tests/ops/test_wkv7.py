"""WKV-7: every backend against the naive spec, the spec against an independent recurrence, varlen, checks."""

import pytest
import torch
import torch.nn.functional as F

from rwkv_torch.ops import wkv7
from rwkv_torch.ops.wkv7 import wkv7_chunk
from tests.utils import assert_all_close, assert_close, assert_varlen_matches, cu_seqlens_of, each_sequence, grads_of

NAMES = ("r", "w", "k", "v", "a", "b", "h0")  # the inputs, then the initial state


def make_inputs(B, T, H, N, dtype=torch.float64, decay_min=-0.6065, requires_grad=False, with_state=True,
                device="cpu", n_states=None):
    """RWKV-7-shaped inputs: w in [decay_min, 0), a = -kk, b = kk * a_rate with kk unit-norm per head, and a random
    non-zero initial state [n_states or B, H, N, N] (float32, or float64 for float64 inputs)."""
    r, k, v = (torch.randn(B, T, H, N, dtype=torch.float64) for _ in range(3))
    w = decay_min * torch.rand(B, T, H, N, dtype=torch.float64)
    kk = F.normalize(torch.randn(B, T, H, N, dtype=torch.float64), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, dtype=torch.float64)
    xs = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (r, w, k, v, a, b)]
    h0 = torch.randn(n_states or B, H, N, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    h0 = h0.to(device).requires_grad_(requires_grad) if with_state else None
    return xs, h0


def reference(r, w, k, v, a, b, h0):
    """An independent float64 recurrence in the official demo's matrix form (spec 4.4):
    S = S * decay + S @ a b^T + v k^T, y = S @ r, with S [V, K]."""
    B, T, H, N = r.shape
    S = h0.double().clone() if h0 is not None else torch.zeros(B, H, N, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        col = {n: x[:, t].double().unsqueeze(-1) for n, x in zip("rwkvab", (r, w, k, v, a, b))}  # [B, H, N, 1]
        row = {n: c.transpose(-1, -2) for n, c in col.items()}  # [B, H, 1, N]
        S = S * row["w"].exp() + S @ col["a"] @ row["b"] + col["v"] @ row["k"]
        ys.append((S @ col["r"]).squeeze(-1))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("B,T,H,N", [(2, 1, 2, 8), (1, 37, 3, 16), (2, 100, 1, 4)], ids=lambda x: str(x))
def test_naive_matches_independent_recurrence(B, T, H, N):
    xs, h0 = make_inputs(B, T, H, N)
    out, ht = wkv7(*xs, h0, backend="naive")
    ref_o, ref_h = reference(*xs, h0)
    assert_close("o", ref_o, out, 1e-12)
    assert_close("ht", ref_h, ht, 1e-12)


CASES = [
    # (B, T, H, N, chunk)
    (1, 1, 1, 8, 16),
    (2, 5, 2, 8, 16),
    (2, 63, 3, 16, 16),
    (1, 100, 2, 8, 32),
    (2, 64, 1, 32, 32),
    (1, 130, 2, 16, 64),
    (2, 40, 2, 4, 64),
]


@pytest.mark.parametrize("B,T,H,N,chunk", CASES, ids=[f"B{b}-T{t}-H{h}-N{n}-L{c}" for b, t, h, n, c in CASES])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
def test_chunk_matches_naive_fp64(B, T, H, N, chunk, with_state):
    xs, h0 = make_inputs(B, T, H, N, requires_grad=True, with_state=with_state)
    ref = grads_of(lambda *a: wkv7(*a, backend="naive"), xs, h0)
    got = grads_of(lambda *a: wkv7(*a, backend="chunk", chunk_size=chunk), xs, h0)
    assert_all_close(ref, got, 1e-10, NAMES)


def test_chunk_fp32_matches_fp64():
    xs, h0 = make_inputs(2, 200, 2, 16)
    ref_o, ref_h = wkv7(*xs, h0, backend="naive")
    xs32 = [x.float() for x in xs]
    for chunk in (16, 32, 64):
        out, ht = wkv7(*xs32, h0.float(), backend="chunk", chunk_size=chunk)
        assert out.dtype == torch.float32 and ht.dtype == torch.float32
        assert_close(f"o-L{chunk}", ref_o, out, 1e-5)
        assert_close(f"ht-L{chunk}", ref_h, ht, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_strong_decay_uses_exact_pairs(dtype):
    # Decays far below the RWKV-7 clamp make a chunk's total log decay exceed the factorised form's headroom.
    xs, h0 = make_inputs(1, 150, 2, 8, decay_min=-30.0)
    ref_o, ref_h = wkv7(*xs, h0, backend="naive")
    out, ht = wkv7(*[x.to(dtype) for x in xs], h0.to(dtype), backend="chunk", chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(ht).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close("o", ref_o, out, tol)
    assert_close("ht", ref_h, ht, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    xs, h0 = make_inputs(1, 70, 2, 16)
    ref_o, ref_h = wkv7(*xs, h0, backend="naive")
    low = [x.to(dtype) for x in xs]
    for backend in ("naive", "chunk"):
        out, ht = wkv7(*low, h0.float(), backend=backend)
        assert out.dtype == dtype and ht.dtype == torch.float32
        assert_close(f"o-{backend}", ref_o, out, 3e-2)
        assert_close(f"ht-{backend}", ref_h, ht, 3e-2)


def test_chunk_gradcheck_tiny():
    xs, h0 = make_inputs(1, 6, 1, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: wkv7_chunk(*a[:6], a[6], chunk_size=4), (*xs, h0))


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_varlen_equals_separate_calls(backend):
    # Outputs and states per sequence; gradients reach every input and each sequence's own initial state exactly as
    # in the separate calls.
    lens = [5, 1, 40, 17]
    cu = cu_seqlens_of(lens)
    xs, h0 = make_inputs(1, sum(lens), 2, 8, requires_grad=True, n_states=len(lens))
    packed = lambda *a: wkv7(*a, cu_seqlens=cu, backend=backend, chunk_size=16)  # noqa: E731
    assert_varlen_matches(packed, each_sequence(wkv7, cu, 6, backend="naive"), xs, h0, cu, 1e-10, grad_names=NAMES)


def test_no_state_equals_zero_state():
    xs, _ = make_inputs(2, 20, 2, 8)
    o1, h1 = wkv7(*xs)
    o2, h2 = wkv7(*xs, torch.zeros(2, 2, 8, 8, dtype=torch.float64))
    assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_bad_inputs_raise_clear_errors():
    xs, h0 = make_inputs(1, 4, 2, 8)
    r, w, k, v, a, b = xs
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        wkv7(r[0], w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="shape of r"):
        wkv7(r, w[:, :3], k, v, a, b)
    with pytest.raises(TypeError, match="dtype of r"):
        wkv7(r, w, k.float(), v, a, b)
    with pytest.raises(TypeError, match="float"):
        wkv7(*(x.long() for x in xs))
    with pytest.raises(ValueError, match="<= 0"):
        wkv7(r, -w, k, v, a, b)
    with pytest.raises(ValueError, match="finite"):
        wkv7(r, w.clone().fill_(float("-inf")), k, v, a, b)
    with pytest.raises(ValueError, match=r"state must be \[1, 2, 8, 8\]"):
        wkv7(*xs, torch.zeros(2, 2, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        wkv7(*xs, torch.zeros(1, 2, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="backend"):
        wkv7(*xs, backend="cuda")
    with pytest.raises(ValueError, match="end at T=4"):
        wkv7(*xs, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        wkv7(*(torch.cat([x, x]) for x in xs), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="int32 or int64"):
        wkv7(*xs, cu_seqlens=torch.tensor([0.0, 4.0]))
