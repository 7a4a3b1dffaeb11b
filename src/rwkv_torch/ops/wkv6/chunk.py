"""WKV-6 in chunked parallel form: gated linear attention with a bonus (spec section 5.1), plain PyTorch, autograd
backward.

State ``h [K, V]`` (the op's layout, row = key). Per chunk of length L, positions i, j, with Γ the inclusive cumulative
log decay inside the chunk and Γ⁻ = Γ - w (exclusive)::

    A_ij = Σ_c r_i k_j e^{Γ⁻_i - Γ_j}   (j < i: the decays of tokens j+1 .. i-1)
    A_ii = Σ_c r_i u k_i                (the bonus of the current token)
    o_i  = (r_i ⊙ e^{Γ⁻_i})ᵀ h₀ + Σ_{j<=i} A_ij v_j
    h_L  = e^{Γ_{L-1}} ⊙ h₀ + Σ_j (k_j ⊙ e^{Γ_{L-1} - Γ_j}) v_jᵀ

Everything that does not depend on h₀ is computed for all chunks at once; the loop over chunks is one scale-and-add
per chunk (``h = D_c ⊙ h + R_c``), after which every chunk's output is one batched product ``o_c = P_c h_c + Q_c``.

Numerics: every exponent above is <= 0. RWKV-6's log decay ``-exp(d)`` is unbounded below, so the pair factors
e^{Γ⁻_i - Γ_j} are formed by factorising around the middle of the chunk (two matrices, one product) only when the
chunk's total |log decay| fits the dtype's exponent range; otherwise the chunk length is halved (down to
``MIN_FACTOR_CHUNK``) until it fits, and only then the pairs are formed elementwise with the upper triangle masked
before exp, which is exact for any w <= 0 at L x more memory. The choice is made per call from the data.
"""

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from ..packing import chunk_layout, chunk_scan, from_chunk_rows, offsets_list, to_chunk_rows

DEFAULT_CHUNK_SIZE = 32
MIN_FACTOR_CHUNK = 8  # chunks are halved down to this length while the factorised form does not fit
# Largest total |log decay| of one chunk for the factorised form. Every factor then lies in e^{±span}: far inside the
# dtype's range (fp32 overflows past e^88, fp64 past e^709), with room left for |r|, |k| and the sum over the key dim.
_FACTOR_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _pair_scores_factored(r, k, G, Gm):
    # The reference point is the middle of each chunk: e^{Γ⁻_i - ref} and e^{ref - Γ_j} both stay within e^{±span}.
    L = r.shape[-2]
    ref = G[..., L // 2 : L // 2 + 1, :]
    rq = r * (Gm - ref).exp().to(r.dtype)
    kq = k * (ref - G).exp().to(r.dtype)
    return rq @ kq.transpose(-1, -2)  # [.., L, L]; only the strict lower triangle is meaningful


def _pair_scores_exact(r, k, G, Gm):
    L = r.shape[-2]
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    # [.., L, L, K]: e^{Γ⁻_i - Γ_j}, the positive exponents of the upper triangle masked to -inf before exp.
    diff = Gm.unsqueeze(-2) - G.unsqueeze(-3)
    d = diff.masked_fill(~strict[:, :, None], float("-inf")).exp().to(r.dtype)
    return torch.einsum("...ic,...ijc,...jc->...ij", r, d, k)


def wkv6_chunk(r, w, k, v, u, state=None, chunk_size: int = DEFAULT_CHUNK_SIZE, cu_seqlens=None):
    """r, w, k, v: [B, T, H, N]; u: [H, N]; state: [B, H, N_k, N_v] (``[S, ...]`` with ``cu_seqlens``) or None.
    Returns (out [B, T, H, N], state). ``cu_seqlens`` (a tensor or ``PackedOffsets``, B = 1): the packed row runs as
    it is, every sequence starting a new chunk (``packing.ChunkLayout``) and its state restarting there."""
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    L = int(chunk_size)
    args = (r, w, k, v, u, state)
    layout = None
    if cu_seqlens is not None:
        cu_seqlens = offsets_list(cu_seqlens)  # read back at most once, not again at a shorter chunk length
        layout = chunk_layout(cu_seqlens, L, r.device)
        r, w, k, v = to_chunk_rows(layout, *(t.to(cd) for t in (r, w, k, v)))  # [1, n_chunks * L, H, N]
        T = r.shape[1]
    n_states = B if layout is None else layout.num_sequences
    h = r.new_zeros(n_states, H, N, N, dtype=cd) if state is None else state.to(cd)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=cd), h

    # 1. Pad T to a multiple of L (w = 0 and k = 0 leave the state unchanged) and split into chunks.
    pad = (-T) % L
    nc = (T + pad) // L
    r, w, k, v = (F.pad(t.to(cd), (0, 0, 0, 0, 0, pad)) for t in (r, w, k, v))
    r, w, k, v = (t.reshape(B, nc, L, H, N).permute(0, 3, 1, 2, 4) for t in (r, w, k, v))  # [B, H, nc, L, N]
    u = u.to(cd)[None, :, None, None, :]  # [1, H, 1, 1, N]

    # 2. Cumulative log decays in float64: a chunk of strong decays sums to hundreds, and differences of fp32 sums
    #    would lose ~1e-5 relative in every pair factor.
    G = w.double().cumsum(-2)  # Γ:  [B, H, nc, L, N]
    Gm = G - w.double()  # Γ⁻
    G_last = G[..., -1:, :]  # [B, H, nc, 1, N]

    # 3. Intra-chunk scores: strictly-lower pair terms plus the bonus on the diagonal.
    span = (-G_last).amax().item()
    if span > _FACTOR_SPAN[cd] and L > MIN_FACTOR_CHUNK:
        # Decays too strong for the factorised form at this length: shorter chunks (the same result) before the
        # elementwise pair tensor, which costs L x the memory and ~3x the time in training.
        return wkv6_chunk(*args, chunk_size=max(MIN_FACTOR_CHUNK, L // 2), cu_seqlens=cu_seqlens)
    pair_scores = _pair_scores_factored if span <= _FACTOR_SPAN[cd] else _pair_scores_exact
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    A = torch.where(strict, pair_scores(r, k, G, Gm), r.new_zeros(()))
    A = A + torch.diag_embed((r * u * k).sum(-1))  # [B, H, nc, L, L]

    # 4. Per-chunk terms: o_c = P_c h_c + Q_c and h_{c+1} = D_c ⊙ h_c + R_c.
    P = r * Gm.exp().to(cd)  # [B, H, nc, L, K]
    Q = A @ v  # [B, H, nc, L, V]
    D = G_last.exp().to(cd).transpose(-1, -2)  # [B, H, nc, K, 1]
    R = (k * (G_last - G).exp().to(cd)).transpose(-1, -2) @ v  # [B, H, nc, K, V]

    if layout is not None:
        return _varlen_scan(layout, P, Q, D, R, h)
    # 5. The only sequential part: carry the state across chunks, keeping the state entering each chunk.
    h_in = []
    for c in range(nc):
        h_in.append(h)
        h = D[:, :, c] * h + R[:, :, c]
    out = P @ torch.stack(h_in, dim=2) + Q  # [B, H, nc, L, V]
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return out, h


def _varlen_scan(layout, P, Q, D, R, h0):
    """Step 5 on a ``ChunkLayout`` ([1, H, n_chunks, ...] terms): each sequence from its own state ``h0[s]``."""
    P, Q, D, R = (t[0].transpose(0, 1) for t in (P, Q, D, R))  # [n_chunks, H, ...]

    def step(ids, h):
        return P[ids] @ h + Q[ids], D[ids] * h + R[ids]

    out, h = chunk_scan(layout, h0, step)  # out [n_chunks, H, L, V]
    nc, H, L, N = out.shape
    return from_chunk_rows(layout, out.transpose(1, 2).reshape(1, nc * L, H, N)), h
