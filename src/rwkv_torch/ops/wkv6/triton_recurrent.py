"""WKV-6 Triton kernels: recurrent forward (with state checkpoints for training) and reverse-time backward.

First version, correctness before speed, the same scheme as ``wkv7/triton_recurrent.py``: one program per (sequence,
head, block of value columns) holds its ``[N_k, BV]`` slice of the state ``S [N_k, N_v]`` (row = key, the op's layout)
in registers and loops over time. Value columns never interact, so the split is exact. Per token::

    y = rᵀ (S + diag(u) k vᵀ);   S = diag(e^w) S + k vᵀ        # y uses the state BEFORE token t, plus the bonus

Backward per token, walking time in reverse with ``dS = ∂L/∂S_t`` (S_{t-1} re-computed from the checkpoints)::

    dv = dSᵀ k + (Σ r u k) dy;        dk = dS v + u ⊙ r (v·dy);       dw = e^w ⊙ Σ_v dS ⊙ S_{t-1}
    dr = (S_{t-1} + u k vᵀ) dy;       du = Σ_t r ⊙ k (v·dy)
    dS ← diag(e^w) dS + r dyᵀ

Every factor above is e^w <= 1: stepping forward and the backward recursion are stable for any decay, however strong
(RWKV-6's log decay -e^d is unbounded below). Key-indexed gradients are partial sums over this program's value
columns, added on the host. State math is float32, or float64 for float64 inputs.

Triton is imported here only; ``ops.wkv6.wkv6(..., backend="recurrent")`` on CUDA imports this module on first use.
"""

import torch
import triton
import triton.language as tl

from .._common import CHECKPOINT_EVERY, compute_dtype
from .._triton import BWD_NUM_WARPS, check_checkpoint_interval, sequence_layout, state_blocks


@triton.jit
def wkv6_fwd_kernel_recurrent(
    r, w, k, v,  # [total, H, N] contiguous, input dtype
    u,  # [H, N]
    h0,  # [S, H, N, N] accumulation dtype (read if USE_H0)
    o,  # [total, H, N] output dtype
    ht,  # [S, H, N, N] accumulation dtype
    hc,  # [n_chunks, H, N, N] checkpoints (written if SAVE)
    seq_offsets, chunk_offsets,  # [S + 1]
    H: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    USE_H0: tl.constexpr, SAVE: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seq_offsets + i_n).to(tl.int64)
    eos = tl.load(seq_offsets + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    acc = ht.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < N
    m_v = o_v < N
    m_s = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * N + o_v[None, :]  # [BK, BV] offsets inside one [N, N] state
    b_u = tl.load(u + i_h * N + o_k, mask=m_k, other=0).to(acc)
    if USE_H0:
        S = tl.load(h0 + (i_n * H + i_h).to(tl.int64) * N * N + p_s, mask=m_s, other=0).to(acc)
    else:
        S = tl.zeros([BK, BV], dtype=acc)

    for t in range(bos, eos):
        if SAVE:  # noqa: SIM102 (SAVE is a compile-time switch; the inner test is per token)
            if (t - bos) % CHUNK == 0:  # the state entering every chunk
                i_c = c0 + (t - bos) // CHUNK
                tl.store(hc + (i_c * H + i_h) * N * N + p_s, S, mask=m_s)
        base = (t * H + i_h) * N
        b_r = tl.load(r + base + o_k, mask=m_k, other=0).to(acc)
        b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
        b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
        b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
        kv = b_k[:, None] * b_v[None, :]
        y = tl.sum((S + b_u[:, None] * kv) * b_r[:, None], 0)  # [BV]
        tl.store(o + base + o_v, y.to(o.dtype.element_ty), mask=m_v)
        S = S * tl.exp(b_w)[:, None] + kv
    tl.store(ht + (i_n * H + i_h).to(tl.int64) * N * N + p_s, S, mask=m_s)


@triton.jit
def wkv6_bwd_kernel_recurrent(
    r, w, k, v,  # [total, H, N] input dtype
    u,  # [H, N]
    hc,  # [n_chunks, H, N, N] checkpoints from the forward
    do,  # [total, H, N]
    dht,  # [S, H, N, N] (read if USE_DHT)
    dh0,  # [S, H, N, N] accumulation dtype
    dv,  # [total, H, N] input dtype: complete (value columns are private to a program)
    dr, dw, dk, du,  # [NV, total, H, N] accumulation dtype: partial sums over this program's value columns
    scratch,  # [S * H * NV, CHUNK, BK, BV] accumulation dtype: the states of one chunk
    seq_offsets, chunk_offsets,  # [S + 1]
    total,
    H: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    USE_DHT: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV = tl.num_programs(0)
    bos = tl.load(seq_offsets + i_n).to(tl.int64)
    eos = tl.load(seq_offsets + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    acc = dh0.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < N
    m_v = o_v < N
    m_s = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * N + o_v[None, :]
    p_scr = ((i_n * H + i_h) * NV + i_v).to(tl.int64) * CHUNK * BK * BV
    o_scr = o_k[:, None] * BV + tl.arange(0, BV)[None, :]  # the full tile: scratch is [.., BK, BV]
    b_u = tl.load(u + i_h * N + o_k, mask=m_k, other=0).to(acc)
    if USE_DHT:
        dS = tl.load(dht + (i_n * H + i_h).to(tl.int64) * N * N + p_s, mask=m_s, other=0).to(acc)
    else:
        dS = tl.zeros([BK, BV], dtype=acc)

    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_rev in range(0, n_chunks):
        i_c = n_chunks - 1 - i_rev
        t0 = bos + i_c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, eos)
        # 1. Re-run the chunk from its checkpoint, keeping S_{t-1} of every token.
        S = tl.load(hc + ((c0 + i_c) * H + i_h) * N * N + p_s, mask=m_s, other=0).to(acc)
        for t in range(t0, t1):
            tl.store(scratch + p_scr + (t - t0) * BK * BV + o_scr, S)
            base = (t * H + i_h) * N
            b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
            b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
            b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
            S = S * tl.exp(b_w)[:, None] + b_k[:, None] * b_v[None, :]
        tl.debug_barrier()
        # 2. Walk the chunk backwards.
        for i_t in range(0, t1 - t0):
            t = t1 - 1 - i_t
            S_prev = tl.load(scratch + p_scr + (t - t0) * BK * BV + o_scr)
            base = (t * H + i_h) * N
            b_r = tl.load(r + base + o_k, mask=m_k, other=0).to(acc)
            b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
            b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
            b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
            b_do = tl.load(do + base + o_v, mask=m_v, other=0).to(acc)
            e_w = tl.exp(b_w)
            v_do = tl.sum(b_v * b_do, 0)  # scalar over this block of value columns
            ruk = tl.sum(b_r * b_u * b_k, 0)
            b_dv = tl.sum(dS * b_k[:, None], 0) + ruk * b_do
            p_part = ((i_v * total + t) * H + i_h) * N + o_k
            tl.store(dk + p_part, tl.sum(dS * b_v[None, :], 1) + b_u * b_r * v_do, mask=m_k)
            tl.store(dw + p_part, tl.sum(dS * S_prev, 1) * e_w, mask=m_k)
            tl.store(dr + p_part, tl.sum(S_prev * b_do[None, :], 1) + b_u * b_k * v_do, mask=m_k)
            tl.store(du + p_part, b_r * b_k * v_do, mask=m_k)
            tl.store(dv + base + o_v, b_dv.to(dv.dtype.element_ty), mask=m_v)
            dS = dS * e_w[:, None] + b_r[:, None] * b_do[None, :]
        tl.debug_barrier()
    tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * N * N + p_s, dS, mask=m_s)


def wkv6_fwd(r, w, k, v, u, h0, cu_seqlens=None, chunk_size=CHECKPOINT_EVERY, save_checkpoints=False):
    """r, w, k, v: [B, T, H, N] contiguous; u: [H, N] contiguous; h0: [S, H, N, N] accumulation dtype or None.

    Returns (o [B, T, H, N], ht [S, H, N, N], hc checkpoints or None, seq_offsets, chunk_offsets)."""
    B, T, H, N = r.shape
    acc = compute_dtype(r.dtype)
    seq, ck, S, n_ck = sequence_layout(B, T, r.device, cu_seqlens, chunk_size)
    BK, BV, NV = state_blocks(N)
    o = torch.empty_like(r)
    ht = r.new_empty(S, H, N, N, dtype=acc)
    hc = r.new_empty(n_ck, H, N, N, dtype=acc) if save_checkpoints else ht  # (ht: an unused placeholder)
    wkv6_fwd_kernel_recurrent[(NV, H, S)](
        r, w, k, v, u, h0 if h0 is not None else ht, o, ht, hc, seq, ck,
        H=H, N=N, BK=BK, BV=BV, CHUNK=chunk_size, USE_H0=h0 is not None, SAVE=save_checkpoints,
    )
    return o, ht, (hc if save_checkpoints else None), seq, ck


def wkv6_bwd(r, w, k, v, u, hc, do, dht, seq, ck, chunk_size):
    """Gradients (dr, dw, dk, dv in the input dtype, du in u's dtype, dh0 [S, H, N, N] in the accumulation dtype)."""
    B, T, H, N = r.shape
    acc = compute_dtype(r.dtype)
    S = seq.numel() - 1
    total = B * T
    BK, BV, NV = state_blocks(N)
    dv = torch.empty_like(v)
    dh0 = r.new_empty(S, H, N, N, dtype=acc)
    parts = [r.new_empty(NV, total, H, N, dtype=acc) for _ in range(4)]
    scratch = r.new_empty(S * H * NV, chunk_size, BK, BV, dtype=acc)
    wkv6_bwd_kernel_recurrent[(NV, H, S)](
        r, w, k, v, u, hc, do, dht if dht is not None else dh0, dh0, dv, *parts, scratch, seq, ck, total,
        H=H, N=N, BK=BK, BV=BV, CHUNK=chunk_size, USE_DHT=dht is not None, num_warps=BWD_NUM_WARPS,
    )
    dr, dw, dk = (p.sum(0).view(B, T, H, N).to(r.dtype) for p in parts[:3])
    du = parts[3].sum((0, 1)).to(u.dtype)
    return dr, dw, dk, dv, du, dh0


class WKV6Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, u, h0, cu_seqlens, chunk_size):
        o, ht, hc, seq, ck = wkv6_fwd(r, w, k, v, u, h0, cu_seqlens, chunk_size, save_checkpoints=True)
        ctx.save_for_backward(r, w, k, v, u, hc, seq, ck)
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, u, hc, seq, ck = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous().to(hc.dtype)
        dr, dw, dk, dv, du, dh0 = wkv6_bwd(r, w, k, v, u, hc, do.contiguous(), dht, seq, ck, ctx.chunk_size)
        return dr, dw, dk, dv, du, (dh0 if ctx.has_h0 else None), None, None


def wkv6_triton(r, w, k, v, u, state=None, *, cu_seqlens=None, chunk_size=CHECKPOINT_EVERY):
    """r, w, k, v: [B, T, H, N] on one device (CUDA, or CPU under TRITON_INTERPRET=1); u: [H, N];
    state [B or S, H, N_k, N_v].

    Returns (out [B, T, H, N] in the input dtype, final state [B or S, H, N, N] float32, float64 for float64 inputs).
    Differentiable in every input and the state; the backward re-runs the forward from states stored every
    ``chunk_size`` tokens. Without gradients this is also the decode path (no checkpoints are stored)."""
    chunk_size = check_checkpoint_interval(chunk_size)
    acc = compute_dtype(r.dtype)
    xs = [t.contiguous() for t in (r, w, k, v, u)]
    h0 = None if state is None else state.to(acc).contiguous()
    tensors = [*xs] + ([state] if state is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return WKV6Triton.apply(*xs, h0, cu_seqlens, chunk_size)
    o, ht, *_ = wkv6_fwd(*xs, h0, cu_seqlens, chunk_size)
    return o, ht
