"""WKV-7 Triton kernel for decoding: one token (or a few) per call, forward only, no autograd.

Same recurrence and layout as ``triton_chunk.py`` (state ``S [N_v, N_k]``, row = value)::

    sa = S a;   S = S diag(e^w) + sa bᵀ + v kᵀ;   y = S r

Decoding runs at batch 1..few, so the work is split into small blocks of value rows (``BLOCK_V = 16``: 16 programs
per head at N = 64) to spread one token over many SMs. Nothing is stored for a backward. The new state may be written
over the old one (``out_state=state``): every program reads its own tile before writing it, and tiles are disjoint,
so an in-place update is safe; this keeps the addresses fixed for CUDA-graph replay.

Triton is imported here only; ``ops.wkv7.wkv7(..., backend="triton")`` imports this module on first use.
"""

import torch
import triton
import triton.language as tl

from .naive import compute_dtype

BLOCK_V = 16


@triton.jit
def wkv7_fwd_kernel_step(
    r, w, k, v, a, b,  # [B, T, H, N] contiguous, input dtype
    h0,  # [B, H, N, N] accumulation dtype (read if USE_H0)
    o,  # [B, T, H, N] output dtype
    ht,  # [B, H, N, N] accumulation dtype; may be h0 itself
    T,
    H: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
):
    i_v, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = ht.dtype.element_ty
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < N
    m_v = o_v < N
    m_s = m_v[:, None] & m_k[None, :]
    p_s = (i_b * H + i_h).to(tl.int64) * N * N + o_v[:, None] * N + o_k[None, :]
    if USE_H0:  # noqa: SIM108 (the constexpr branch reads clearer as a statement in a kernel)
        S = tl.load(h0 + p_s, mask=m_s, other=0).to(acc)
    else:
        S = tl.zeros([BV, BK], dtype=acc)
    for t in range(0, T):
        base = ((i_b.to(tl.int64) * T + t) * H + i_h) * N
        b_r = tl.load(r + base + o_k, mask=m_k, other=0).to(acc)
        b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
        b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
        b_a = tl.load(a + base + o_k, mask=m_k, other=0).to(acc)
        b_b = tl.load(b + base + o_k, mask=m_k, other=0).to(acc)
        b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
        sa = tl.sum(S * b_a[None, :], 1)
        S = S * tl.exp(b_w)[None, :] + sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
        tl.store(o + base + o_v, tl.sum(S * b_r[None, :], 1).to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + p_s, S, mask=m_s)


def wkv7_step_triton(r, w, k, v, a, b, state=None, *, out_state=None):
    """r..b: [B, T, H, N] (T small; usually 1); state: [B, H, N_v, N_k] or None for zeros.

    Returns (out [B, T, H, N] in the input dtype, new state [B, H, N, N]) without building an autograd graph.
    ``out_state`` (contiguous, accumulation dtype: float32, float64 for float64 inputs) receives the new state and may
    be ``state`` itself for an in-place update."""
    B, T, H, N = r.shape
    acc = compute_dtype(r.dtype)
    r, w, k, v, a, b = (t.contiguous() for t in (r, w, k, v, a, b))
    h0 = None if state is None else state.to(acc).contiguous()
    if out_state is None:
        out_state = r.new_empty(B, H, N, N, dtype=acc)
    elif out_state.shape != (B, H, N, N) or out_state.dtype != acc or not out_state.is_contiguous():
        raise ValueError(f"out_state must be a contiguous {acc} tensor [{B}, {H}, {N}, {N}]")
    BK = triton.next_power_of_2(N)
    BV = min(BK, BLOCK_V)
    o = torch.empty_like(r)
    wkv7_fwd_kernel_step[(triton.cdiv(N, BV), H, B)](
        r, w, k, v, a, b, h0 if h0 is not None else out_state, o, out_state, T,
        H=H, N=N, BK=BK, BV=BV, USE_H0=h0 is not None,
    )
    return o, out_state
