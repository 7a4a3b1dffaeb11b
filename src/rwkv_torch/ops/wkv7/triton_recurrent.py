"""WKV-7 Triton kernels: the recurrence, forward with state checkpoints and reverse-time backward (training), and
a forward-only decode kernel for a few tokens per call.

First version, correctness before speed: one program per (sequence, head, block of value rows) holds its
``[BV, N_k]`` slice of the state ``S [N_v, N_k]`` in registers and loops over time. Value rows never interact
(spec 4.4: ``S[i, :]`` is updated from ``S[i, :]``, ``v[i]`` and the key-indexed vectors only), so the split over
value blocks is exact and needs no communication.

Forward, per token (official layout, row i = value, column j = key)::

    sa = S a;   S = S diag(e^w) + sa bᵀ + v kᵀ;   y = S r

and every ``chunk_size`` tokens the state entering the chunk is stored (``hc``), O(T / chunk_size) memory.

Backward walks the chunks in reverse. For each chunk it re-runs the forward from the checkpoint and writes the states
``S_{t-1}`` of that chunk to a per-program scratch buffer, then walks the chunk backwards with ``dS = ∂L/∂S_t``::

    dS   += dy rᵀ;              dr = Sᵀ_t dy
    dv    = dS k;               dk = dSᵀ v
    dsa   = dS b;               db = dSᵀ sa
    dw    = e^w ⊙ Σ_i dS ⊙ S_{t-1};   da = S_{t-1}ᵀ dsa
    dS   ← dS diag(e^w) + dsa aᵀ     (= ∂L/∂S_{t-1})

Key-indexed gradients (dr, dw, dk, da, db) are sums over value rows; each value block writes its partial sum and the
host adds them (exact, no atomics). All state math is in the accumulation dtype: float32, or float64 for float64
inputs (the interpreter tests use that to check the backward to ~1e-12).

The decode path (``wkv7_decode_triton``: the same forward kernel, no checkpoints, no offsets) runs at batch 1..few,
so it splits the work into small blocks of value rows (``STEP_BLOCK_V = 16``: 16 programs per head at N = 64) to
spread one token over many SMs; nothing is stored for a backward. The new state may be written over the old one
(``out_state=state``): every program reads its own tile before writing it, and tiles are disjoint, so an in-place
update is safe; this keeps the addresses fixed for CUDA-graph replay.

Triton is imported here only; ``ops.wkv7.wkv7(..., backend="recurrent")`` on CUDA imports this module on first use.
"""

import torch
import triton
import triton.language as tl

from .._common import CHECKPOINT_EVERY, compute_dtype
from .._triton import BWD_NUM_WARPS, check_checkpoint_interval, sequence_layout, state_blocks

STEP_BLOCK_V = 16  # the decode kernel: small value blocks spread one token over many SMs


@triton.jit
def wkv7_fwd_kernel_recurrent(
    r, w, k, v, a, b,  # [total, H, N] contiguous, input dtype
    h0,  # [S, H, N, N] accumulation dtype (read if USE_H0)
    o,  # [total, H, N] output dtype
    ht,  # [S, H, N, N] accumulation dtype
    hc,  # [n_chunks, H, N, N] checkpoints (written if SAVE)
    seq_offsets,  # [S + 1] first token of every sequence, then the total (read if VARLEN)
    chunk_offsets,  # [S + 1] first checkpoint of every sequence (read if VARLEN and SAVE)
    T,  # tokens per row when not VARLEN (rows of [B, T])
    H: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    USE_H0: tl.constexpr, SAVE: tl.constexpr, VARLEN: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if VARLEN:
        bos = tl.load(seq_offsets + i_n).to(tl.int64)
        eos = tl.load(seq_offsets + i_n + 1).to(tl.int64)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:  # rows of equal length: no offsets to read (the decode path)
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        c0 = i_n.to(tl.int64) * tl.cdiv(T, CHUNK)
    acc = ht.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < N
    m_v = o_v < N
    m_s = m_v[:, None] & m_k[None, :]
    p_s = o_v[:, None] * N + o_k[None, :]  # [BV, BK] offsets inside one [N, N] state
    if USE_H0:
        S = tl.load(h0 + (i_n * H + i_h).to(tl.int64) * N * N + p_s, mask=m_s, other=0).to(acc)
    else:
        S = tl.zeros([BV, BK], dtype=acc)

    for t in range(bos, eos):
        if SAVE:  # noqa: SIM102 (SAVE is a compile-time switch; the inner test is per token)
            if (t - bos) % CHUNK == 0:  # the state entering every chunk
                i_c = c0 + (t - bos) // CHUNK
                tl.store(hc + (i_c * H + i_h) * N * N + p_s, S, mask=m_s)
        base = (t * H + i_h) * N
        b_r = tl.load(r + base + o_k, mask=m_k, other=0).to(acc)
        b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
        b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
        b_a = tl.load(a + base + o_k, mask=m_k, other=0).to(acc)
        b_b = tl.load(b + base + o_k, mask=m_k, other=0).to(acc)
        b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
        sa = tl.sum(S * b_a[None, :], 1)  # [BV], from the state before decay
        S = S * tl.exp(b_w)[None, :] + sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
        y = tl.sum(S * b_r[None, :], 1)
        tl.store(o + base + o_v, y.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + (i_n * H + i_h).to(tl.int64) * N * N + p_s, S, mask=m_s)


@triton.jit
def wkv7_bwd_kernel_recurrent(
    r, w, k, v, a, b,  # [total, H, N] input dtype
    hc,  # [n_chunks, H, N, N] checkpoints from the forward
    do,  # [total, H, N]
    dht,  # [S, H, N, N] (read if USE_DHT)
    dh0,  # [S, H, N, N] accumulation dtype
    dv,  # [total, H, N] input dtype: complete (value rows are private to a program)
    dr, dw, dk, da, db,  # [NV, total, H, N] accumulation dtype: partial sums over this program's value rows
    scratch,  # [S * H * NV, CHUNK, BV, BK] accumulation dtype: the states of one chunk
    seq_offsets, chunk_offsets,  # [S + 1]
    total,  # number of tokens (stride of the partial-sum buffers)
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
    m_s = m_v[:, None] & m_k[None, :]
    p_s = o_v[:, None] * N + o_k[None, :]
    p_scr = ((i_n * H + i_h) * NV + i_v).to(tl.int64) * CHUNK * BV * BK
    o_scr = tl.arange(0, BV)[:, None] * BK + o_k[None, :]  # the full tile: scratch is [.., BV, BK]
    if USE_DHT:
        dS = tl.load(dht + (i_n * H + i_h).to(tl.int64) * N * N + p_s, mask=m_s, other=0).to(acc)
    else:
        dS = tl.zeros([BV, BK], dtype=acc)

    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_rev in range(0, n_chunks):
        i_c = n_chunks - 1 - i_rev
        t0 = bos + i_c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, eos)
        # 1. Re-run the chunk from its checkpoint, keeping S_{t-1} of every token.
        S = tl.load(hc + ((c0 + i_c) * H + i_h) * N * N + p_s, mask=m_s, other=0).to(acc)
        for t in range(t0, t1):
            tl.store(scratch + p_scr + (t - t0) * BV * BK + o_scr, S)
            base = (t * H + i_h) * N
            b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
            b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
            b_a = tl.load(a + base + o_k, mask=m_k, other=0).to(acc)
            b_b = tl.load(b + base + o_k, mask=m_k, other=0).to(acc)
            b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
            sa = tl.sum(S * b_a[None, :], 1)
            S = S * tl.exp(b_w)[None, :] + sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
        tl.debug_barrier()
        # 2. Walk the chunk backwards.
        for i_t in range(0, t1 - t0):
            t = t1 - 1 - i_t
            S_prev = tl.load(scratch + p_scr + (t - t0) * BV * BK + o_scr)
            base = (t * H + i_h) * N
            b_r = tl.load(r + base + o_k, mask=m_k, other=0).to(acc)
            b_w = tl.load(w + base + o_k, mask=m_k, other=0).to(acc)
            b_k = tl.load(k + base + o_k, mask=m_k, other=0).to(acc)
            b_a = tl.load(a + base + o_k, mask=m_k, other=0).to(acc)
            b_b = tl.load(b + base + o_k, mask=m_k, other=0).to(acc)
            b_v = tl.load(v + base + o_v, mask=m_v, other=0).to(acc)
            b_do = tl.load(do + base + o_v, mask=m_v, other=0).to(acc)
            e_w = tl.exp(b_w)
            sa = tl.sum(S_prev * b_a[None, :], 1)  # [BV]
            S_t = S_prev * e_w[None, :] + sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
            dS += b_do[:, None] * b_r[None, :]
            b_dv = tl.sum(dS * b_k[None, :], 1)
            dsa = tl.sum(dS * b_b[None, :], 1)
            p_part = ((i_v * total + t) * H + i_h) * N + o_k
            tl.store(dr + p_part, tl.sum(S_t * b_do[:, None], 0), mask=m_k)
            tl.store(dk + p_part, tl.sum(dS * b_v[:, None], 0), mask=m_k)
            tl.store(db + p_part, tl.sum(dS * sa[:, None], 0), mask=m_k)
            tl.store(dw + p_part, tl.sum(dS * S_prev, 0) * e_w, mask=m_k)
            tl.store(da + p_part, tl.sum(S_prev * dsa[:, None], 0), mask=m_k)
            tl.store(dv + base + o_v, b_dv.to(dv.dtype.element_ty), mask=m_v)
            dS = dS * e_w[None, :] + dsa[:, None] * b_a[None, :]
        tl.debug_barrier()
    tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * N * N + p_s, dS, mask=m_s)


def wkv7_decode_triton(r, w, k, v, a, b, state=None, *, out_state=None):
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
    BK, BV, NV = state_blocks(N, STEP_BLOCK_V)
    o = torch.empty_like(r)
    # The training kernel without checkpoints or offsets; each program reads its own state tile before it writes it
    # and tiles are disjoint, so out_state may be h0 itself.
    wkv7_fwd_kernel_recurrent[(NV, H, B)](
        r, w, k, v, a, b, h0 if h0 is not None else out_state, o, out_state, out_state, out_state, out_state, T,
        H=H, N=N, BK=BK, BV=BV, CHUNK=1, USE_H0=h0 is not None, SAVE=False, VARLEN=False,
    )
    return o, out_state


def wkv7_fwd(r, w, k, v, a, b, h0, cu_seqlens=None, chunk_size=CHECKPOINT_EVERY, save_checkpoints=False):
    """r..b: [B, T, H, N] contiguous; h0: [S, H, N, N] in the accumulation dtype or None.

    Returns (o [B, T, H, N], ht [S, H, N, N], hc checkpoints or None, seq_offsets, chunk_offsets)."""
    B, T, H, N = r.shape
    acc = compute_dtype(r.dtype)
    seq, ck, S, n_ck = sequence_layout(B, T, r.device, cu_seqlens, chunk_size)
    BK, BV, NV = state_blocks(N)
    o = torch.empty_like(r)
    ht = r.new_empty(S, H, N, N, dtype=acc)
    hc = r.new_empty(n_ck, H, N, N, dtype=acc) if save_checkpoints else ht  # (ht: an unused placeholder)
    wkv7_fwd_kernel_recurrent[(NV, H, S)](
        r, w, k, v, a, b, h0 if h0 is not None else ht, o, ht, hc, seq, ck, T,
        H=H, N=N, BK=BK, BV=BV, CHUNK=chunk_size, USE_H0=h0 is not None, SAVE=save_checkpoints,
        VARLEN=cu_seqlens is not None,
    )
    return o, ht, (hc if save_checkpoints else None), seq, ck


def wkv7_bwd(r, w, k, v, a, b, hc, do, dht, seq, ck, chunk_size):
    """Gradients (dr, dw, dk, dv, da, db in the input dtype, dh0 [S, H, N, N] in the accumulation dtype)."""
    B, T, H, N = r.shape
    acc = compute_dtype(r.dtype)
    S = seq.numel() - 1
    total = B * T
    BK, BV, NV = state_blocks(N)
    dv = torch.empty_like(v)
    dh0 = r.new_empty(S, H, N, N, dtype=acc)
    parts = [r.new_empty(NV, total, H, N, dtype=acc) for _ in range(5)]
    scratch = r.new_empty(S * H * NV, chunk_size, BV, BK, dtype=acc)
    wkv7_bwd_kernel_recurrent[(NV, H, S)](
        r, w, k, v, a, b, hc, do, dht if dht is not None else dh0, dh0, dv, *parts, scratch, seq, ck, total,
        H=H, N=N, BK=BK, BV=BV, CHUNK=chunk_size, USE_DHT=dht is not None, num_warps=BWD_NUM_WARPS,
    )
    dr, dw, dk, da, db = (p.sum(0).view(B, T, H, N).to(r.dtype) for p in parts)
    return dr, dw, dk, dv, da, db, dh0


class WKV7Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, h0, cu_seqlens, chunk_size):
        o, ht, hc, seq, ck = wkv7_fwd(r, w, k, v, a, b, h0, cu_seqlens, chunk_size, save_checkpoints=True)
        ctx.save_for_backward(r, w, k, v, a, b, hc, seq, ck)
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, hc, seq, ck = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous().to(hc.dtype)
        dr, dw, dk, dv, da, db, dh0 = wkv7_bwd(r, w, k, v, a, b, hc, do.contiguous(), dht, seq, ck, ctx.chunk_size)
        return dr, dw, dk, dv, da, db, (dh0 if ctx.has_h0 else None), None, None


def wkv7_triton(r, w, k, v, a, b, state=None, *, cu_seqlens=None, chunk_size=CHECKPOINT_EVERY):
    """r..b: [B, T, H, N] on one device (CUDA, or CPU under TRITON_INTERPRET=1); state [B or S, H, N_v, N_k].

    Returns (out [B, T, H, N] in the input dtype, final state [B or S, H, N, N] float32, float64 for float64 inputs).
    Differentiable in every input and the state; the backward re-runs the forward from states stored every
    ``chunk_size`` tokens."""
    chunk_size = check_checkpoint_interval(chunk_size)
    acc = compute_dtype(r.dtype)
    xs = [t.contiguous() for t in (r, w, k, v, a, b)]
    h0 = None if state is None else state.to(acc).contiguous()
    tensors = [*xs] + ([state] if state is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return WKV7Triton.apply(*xs, h0, cu_seqlens, chunk_size)
    o, ht, *_ = wkv7_fwd(*xs, h0, cu_seqlens, chunk_size)
    return o, ht
