"""WKV-4 in chunked parallel form, exact and stable at any T, plain PyTorch with autograd backward.

Per channel, within a chunk of length L with relative positions t, i and the state (aa₀, bb₀, pp₀) entering it::

    E[t, i] = (t-1-i) w + k_i   (i < t)       exponent of token i in the state before token t
    E₀[t]   = pp₀ + t w                       the carried state, decayed t times
    E_u[t]  = u + k_t                         the current token with its bonus
    M_t     = max(E₀[t], E_u[t], max_i E[t, i])
    out_t   = (aa₀ e^{E₀-M} + Σ_i e^{E-M} v_i + e^{E_u-M} v_t) / (bb₀ e^{E₀-M} + Σ_i e^{E-M} + e^{E_u-M})

Every exponential is taken relative to its own row's maximum (log-sum-exp style), so nothing overflows, and the
largest term of every denominator is exactly 1 (or bb₀ >= 1): no 0/0 at any T and any decay. There are no cumulative
products (a cumsum-and-divide scan underflows to 0/0 after a few dozen steps of strong decay). Chunks are carried as
the same (aa, bb, pp) triple as the naive recurrence: a chunk with n real tokens is, on its own, the state
``p = max_i (n-1-i) w + k_i`` with aa, bb the matching sums, and it is merged with the decayed incoming state by the
same max-and-rescale rule; so pp is the running maximum exponent, exactly as in the naive loop.

Memory is a few ``[B, T, L, C]`` tensors for the pair exponents, hence the small default chunk.
"""

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from .naive import empty_state

# The pairwise part costs O(T L C) time and memory and the sequential part O(T / L) small steps; 16 keeps memory at
# 16 x the input size while the loop stays short.
DEFAULT_CHUNK_SIZE = 16


def wkv4_chunk(w, u, k, v, state=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """w, u: [C]; k, v: [B, T, C]; state: (aa, bb, pp) each [B, C] or None. Returns (out [B, T, C], state)."""
    B, T, C = k.shape
    cd = compute_dtype(k.dtype)
    L = int(chunk_size)
    w, u = w.to(cd), u.to(cd)
    aa, bb, pp = empty_state(B, C, cd, k.device) if state is None else (s.to(cd) for s in state)
    if T == 0:
        return k.new_zeros(B, 0, C, dtype=cd), (aa, bb, pp)

    # 1. Pad T to a multiple of L and split into chunks; n_real counts each chunk's real (unpadded) tokens.
    pad = (-T) % L
    nc = (T + pad) // L
    k, v = (F.pad(t.to(cd), (0, 0, 0, pad)).reshape(B, nc, L, C) for t in (k, v))  # [B, nc, L, C]
    pos = torch.arange(L, device=k.device, dtype=cd)  # [L]
    n_real = (T - L * torch.arange(nc, device=k.device)).clamp(max=L).to(cd)  # [nc]
    is_real = (pos < n_real[:, None]).unsqueeze(-1)  # [nc, L, 1]
    neg_inf = k.new_tensor(float("-inf"))

    # 2. Each chunk on its own, as a state at its last real token: exponents (n-1-i) w + k_i (padding: e^-inf).
    e_end = torch.where(is_real, (n_real[:, None] - 1 - pos).unsqueeze(-1) * w + k, neg_inf)  # [B, nc, L, C]
    p_c = e_end.amax(dim=2)  # [B, nc, C]
    weight = (e_end - p_c.unsqueeze(2)).exp()
    a_c, b_c = (weight * v).sum(2), weight.sum(2)  # [B, nc, C]

    # 3. The only sequential part: merge the incoming state, decayed n times, with each chunk's own state.
    #    The state entering every chunk is kept for step 4.
    entering = []
    for c in range(nc):
        entering.append((aa, bb, pp))
        decayed = pp + n_real[c] * w
        p = torch.maximum(decayed, p_c[:, c])
        e_old, e_new = (decayed - p).exp(), (p_c[:, c] - p).exp()
        aa, bb, pp = e_old * aa + e_new * a_c[:, c], e_old * bb + e_new * b_c[:, c], p
    aa0, bb0, pp0 = (torch.stack(s, dim=1).unsqueeze(2) for s in zip(*entering))  # [B, nc, 1, C]

    # 4. Every chunk's outputs in parallel from its entering state, each row relative to its own maximum M_t.
    rel = pos[:, None] - 1 - pos[None, :]  # t-1-i: [L, L]
    E = torch.where((rel >= 0).unsqueeze(-1), rel.unsqueeze(-1) * w, neg_inf) + k.unsqueeze(2)  # [B, nc, L, L, C]
    E0 = pp0 + pos[:, None] * w  # [B, nc, L, C]
    Eu = u + k  # [B, nc, L, C]
    # M cancels between numerator and denominator, so detaching it changes no value and no gradient.
    M = torch.maximum(torch.maximum(E0, Eu), E.amax(dim=3)).detach()
    eE = (E - M.unsqueeze(3)).exp()
    e0, eu = (E0 - M).exp(), (Eu - M).exp()
    num = aa0 * e0 + (eE * v.unsqueeze(2)).sum(3) + eu * v
    den = bb0 * e0 + eE.sum(3) + eu
    out = (num / den).reshape(B, nc * L, C)[:, :T]
    return out, (aa, bb, pp)
