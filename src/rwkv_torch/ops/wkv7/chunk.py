"""WKV-7 in chunked parallel (WY / UT-transform) form, plain PyTorch with autograd backward (spec section 5.2).

Internally the state is fla's ``h = Sᵀ [K, V]``; the public layout ``[V, K]`` is restored at the end.
Per chunk of length L (positions i, j), with Γ the inclusive cumulative log decay and Γ⁻ = Γ - w::

    A_qk[i,j] = Σ_c r_i k_j e^{Γ_i-Γ_j}  (j<=i)     A_qb[i,j] = Σ_c r_i b_j e^{Γ_i-Γ_j}  (j<=i)
    A_ak[i,j] = Σ_c a_i k_j e^{Γ⁻_i-Γ_j} (j<i)      A_ab[i,j] = Σ_c a_i b_j e^{Γ⁻_i-Γ_j} (j<i)
    W = (I - A_ab)⁻¹ (a ⊙ e^{Γ⁻}),  U = (I - A_ab)⁻¹ A_ak V,   S = U + W h₀   (the per-token "sa")
    O   = (r ⊙ e^{Γ}) h₀ + A_qk V + A_qb S
    h_L = e^{Γ_L} ⊙ h₀ + (k ⊙ e^{Γ_L-Γ})ᵀ V + (b ⊙ e^{Γ_L-Γ})ᵀ S

Everything that does not depend on h₀ is computed for all chunks at once; the loop over chunks then costs two
matrix products each: ``O_c = P_c h + Q_c`` and ``h = M_c h + R_c``.

Numerics: the pair factors e^{Γ_i-Γ_j} are formed either by factorising around the middle of the chunk
(matrix products; legal while a chunk's total log decay stays within the dtype's exponent headroom, which the
RWKV-7 soft clamp w >= -0.6065 guarantees for L <= 64; one float64 exponential, the other factors derived from it
by products) or, for stronger decays, elementwise per pair (exact for any w <= 0, more memory). The choice is made
per call from the data.
"""

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from ..packing import chunk_layout, chunk_scan, from_chunk_rows, offsets_list, to_chunk_rows

DEFAULT_CHUNK_SIZE = 64  # measured: benchmarks/bench_ops.py (RESULTS.md)
# Largest total |log decay| of one chunk for the factorised form: every valid factor then stays within e^{±span}.
_FACTOR_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _chunk_factors_factored(r, w, k, a, b, G, G_last):
    # Reference point: the middle of each chunk, so no factor exceeds e^{span}. One exponential (of Γ - Γ_ref, in
    # float64); every other factor is a product or reciprocal of it in the compute dtype (~1 ulp each).
    L = r.shape[-2]
    ref = G[..., L // 2 : L // 2 + 1, :]
    e_q = (G - ref).exp().to(r.dtype)  # e^{Γ - Γ_ref}
    e_k = e_q.reciprocal()  # e^{Γ_ref - Γ}
    e_a = e_q / w.exp()  # e^{Γ⁻ - Γ_ref}
    e_ref = ref.exp().to(r.dtype)
    e_end = (G_last - ref).exp().to(r.dtype)
    rq, aq, kq, bq = r * e_q, a * e_a, k * e_k, b * e_k
    A_qk = rq @ kq.transpose(-1, -2)
    A_qb = rq @ bq.transpose(-1, -2)
    A_ak = aq @ kq.transpose(-1, -2)
    A_ab = aq @ bq.transpose(-1, -2)
    # r e^{Γ}, a e^{Γ⁻}, k e^{Γ_L - Γ}, b e^{Γ_L - Γ}, e^{Γ_L}
    return (A_qk, A_qb, A_ak, A_ab), (rq * e_ref, aq * e_ref, kq * e_end, bq * e_end, (e_end * e_ref).squeeze(-2))


def _pair_matrices_exact(r, k, a, b, G, Gm):
    L = r.shape[-2]
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    # [.., L, L, K]: e^{Γ_i - Γ_j} with the upper triangle masked before exp, so nothing overflows.
    d_q = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~incl[:, :, None], float("-inf")).exp().to(r.dtype)
    d_a = (Gm.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~incl[:, :, None], float("-inf")).exp().to(r.dtype)
    A_qk = torch.einsum("...ic,...ijc,...jc->...ij", r, d_q, k)
    A_qb = torch.einsum("...ic,...ijc,...jc->...ij", r, d_q, b)
    A_ak = torch.einsum("...ic,...ijc,...jc->...ij", a, d_a, k)
    A_ab = torch.einsum("...ic,...ijc,...jc->...ij", a, d_a, b)
    return A_qk, A_qb, A_ak, A_ab


def wkv7_chunk(r, w, k, v, a, b, state=None, chunk_size: int = DEFAULT_CHUNK_SIZE, w_min: float | None = None,
               cu_seqlens=None):
    """r, w, k, v, a, b: [B, T, H, N]; state: [B, H, N_v, N_k] (``[S, ...]`` with ``cu_seqlens``) or None. Returns
    (out [B, T, H, N], state).

    ``w_min``: a lower bound on ``w`` that the caller guarantees (RWKV-7 layers: ``-exp(-0.5)``); the pair form is
    then chosen from it without reading ``w`` back (no device sync, no graph break under ``torch.compile``).
    ``cu_seqlens`` (a tensor or ``PackedOffsets``, B = 1): the packed row runs as it is, every sequence starting a
    new chunk (``packing.ChunkLayout``) and its state restarting there: no padding of the sequences into a batch."""
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    L = int(chunk_size)
    layout = None
    if cu_seqlens is not None:
        layout = chunk_layout(offsets_list(cu_seqlens), L, r.device)
        h0 = r.new_zeros(layout.num_sequences, H, N, N, dtype=cd) if state is None else state.to(cd)
        if layout.n_chunks == 0:
            return r.new_zeros(B, T, H, N, dtype=cd), h0
        r, w, k, v, a, b = to_chunk_rows(layout, *(t.to(cd) for t in (r, w, k, v, a, b)))
        T = r.shape[1]
    pad = (-T) % L
    nc = (T + pad) // L
    # Padding with w = 0 and k = b = 0 leaves the state unchanged through the tail.
    # [B, H, nc, L, N], contiguous once here rather than inside every product below.
    r, w, k, v, a, b = (
        F.pad(t.to(cd), (0, 0, 0, 0, 0, pad)).view(B, nc, L, H, N).permute(0, 3, 1, 2, 4).contiguous()
        for t in (r, w, k, v, a, b)
    )

    # Γ (inclusive) and Γ⁻ (exclusive) in float64: differences of long fp32 sums would lose digits in exponents.
    G = w.double().cumsum(-2)
    G_last = G[..., -1:, :]  # [B, H, nc, 1, N]
    # The largest |Γ| of any chunk: from the caller's bound when given, else read from the data.
    span = -float(w_min) * L if w_min is not None else (-G_last).amax().item() if G_last.numel() else 0.0
    if span <= _FACTOR_SPAN[cd]:
        (A_qk, A_qb, A_ak, A_ab), (r_G, a_Gm, kg, bg, decay_all) = _chunk_factors_factored(r, w, k, a, b, G, G_last)
    else:
        Gm = G - w.double()
        A_qk, A_qb, A_ak, A_ab = _pair_matrices_exact(r, k, a, b, G, Gm)
        decay_to_end = (G_last - G).exp().to(cd)  # [B, H, nc, L, K], <= 1
        r_G, a_Gm = r * G.exp().to(cd), a * Gm.exp().to(cd)
        kg, bg, decay_all = k * decay_to_end, b * decay_to_end, G_last.squeeze(-2).exp().to(cd)
    A_qk, A_qb, A_ak, A_ab = A_qk.tril(), A_qb.tril(), A_ak.tril(-1), A_ab.tril(-1)

    # UT transform: one unit-lower-triangular solve for both right-hand sides.
    eye = torch.eye(L, dtype=cd, device=r.device)
    rhs = torch.cat([a_Gm, A_ak @ v], dim=-1)
    WU = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :N], WU[..., N:]  # [B, H, nc, L, K], [B, H, nc, L, V]

    P = r_G + A_qb @ W  # O_c = P h + Q
    Q = A_qk @ v + A_qb @ U
    M = torch.diag_embed(decay_all) + bg.transpose(-1, -2) @ W  # h' = M h + R
    R = kg.transpose(-1, -2) @ v + bg.transpose(-1, -2) @ U

    if layout is not None:
        return _varlen_scan(layout, P, Q, M, R, h0)
    h = r.new_zeros(B, H, N, N) if state is None else state.to(cd).transpose(-1, -2)
    outs = []
    for c in range(nc):
        outs.append(P[:, :, c] @ h + Q[:, :, c])
        h = M[:, :, c] @ h + R[:, :, c]
    out = torch.stack(outs, dim=2)  # [B, H, nc, L, V]
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return out, h.transpose(-1, -2)


def _varlen_scan(layout, P, Q, M, R, h0):
    """The loop over chunks on a ``ChunkLayout`` ([1, H, n_chunks, ...] terms): each sequence from its own state."""
    P, Q, M, R = (t[0].transpose(0, 1) for t in (P, Q, M, R))  # [n_chunks, H, ...]

    def step(ids, h):
        return P[ids] @ h + Q[ids], M[ids] @ h + R[ids]

    out, h = chunk_scan(layout, h0.transpose(-1, -2), step)  # out [n_chunks, H, L, V]
    nc, H, L, N = out.shape
    return from_chunk_rows(layout, out.transpose(1, 2).reshape(1, nc * L, H, N)), h.transpose(-1, -2)
