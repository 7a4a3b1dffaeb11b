"""WKV-4 in chunked parallel form, exact and stable at any T (log-sum-exp with a per-row max), plain PyTorch.

Within a chunk of length L, relative position t, state (aa₀, bb₀, pp₀) entering the chunk::

    E[t, i] = (t-1-i) w + k_i   (i < t)       exponent of token i in the state before token t
    E₀[t]   = pp₀ + t w                       the carried state, decayed t times
    E_u[t]  = u + k_t                         the current token with its bonus
    M_t     = max(E₀[t], E_u[t], max_i E[t, i])
    out_t   = (aa₀ e^{E₀-M} + Σ_i e^{E-M} v_i + e^{E_u-M} v_t) / (bb₀ e^{E₀-M} + Σ_i e^{E-M} + e^{E_u-M})

Every exponent is taken relative to its row max, so nothing overflows or underflows to a 0/0 at any T (no
cumulative products). The state after the chunk is ``pp = max(pp₀ + L w, max_i (L-1-i) w + k_i)`` with aa, bb the
matching sums; this is exactly the naive recurrence's representation (its pp is the same running max). The
per-chunk sums are computed for all chunks at once; only the 3-number state combine runs sequentially.
"""

import torch
import torch.nn.functional as F

from ..wkv7.naive import compute_dtype
from .naive import PP_INIT

DEFAULT_CHUNK_SIZE = 32


def wkv4_chunk(w, u, k, v, state=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """w, u: [C]; k, v: [B, T, C]; state: (aa, bb, pp) each [B, C] or None. Returns (out [B, T, C], state)."""
    B, T, C = k.shape
    cd = compute_dtype(k.dtype)
    L = int(chunk_size)
    pad = (-T) % L
    w, u = w.to(cd), u.to(cd)
    k, v = (F.pad(t.to(cd), (0, 0, 0, pad)) for t in (k, v))
    nc = (T + pad) // L
    k, v = k.view(B, nc, L, C), v.view(B, nc, L, C)
    valid = torch.arange(nc * L, device=k.device).view(nc, L, 1) < T  # padded tokens contribute nothing

    pos = torch.arange(L, device=k.device, dtype=cd)
    neg_inf = torch.tensor(float("-inf"), dtype=cd, device=k.device)
    k_valid = torch.where(valid, k, neg_inf)  # [B, nc, L, C]
    # 1. Each chunk's own contribution to the state after it: exponents (L-1-i) w + k_i.
    e_end = (L - 1 - pos)[:, None] * w + k_valid  # [B, nc, L, C]
    p_end = e_end.amax(dim=2)  # [B, nc, C]
    wt = (e_end - p_end.unsqueeze(2)).exp()
    a_end, b_end = (wt * v).sum(2), wt.sum(2)
    n_last = T - (nc - 1) * L  # a partly padded last chunk ends at n_last - 1, not at L - 1
    # 2. Sequential combine of the 3-number states; the state entering each chunk is kept for step 3.
    if state is None:
        aa, bb, pp = k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), PP_INIT)
    else:
        aa, bb, pp = (s.to(cd) for s in state)
    starts = []
    for c in range(nc):
        starts.append((aa, bb, pp))
        n = L if c < nc - 1 else n_last
        # The chunk's exponents were measured to position L-1; the true end is n-1: subtract (L-n) w.
        pc = p_end[:, c] - (L - n) * w
        p_new = torch.maximum(pp + n * w, pc)
        e_old, e_c = (pp + n * w - p_new).exp(), (pc - p_new).exp()
        aa, bb, pp = e_old * aa + e_c * a_end[:, c], e_old * bb + e_c * b_end[:, c], p_new
    aa0, bb0, pp0 = (torch.stack(s, dim=1) for s in zip(*starts))  # [B, nc, C]

    # 3. Outputs of every chunk in parallel from its entering state.
    rel = pos[:, None] - 1 - pos[None, :]  # t-1-i: [L, L]
    lower = rel >= 0
    E = torch.where(lower[..., None], rel[..., None] * w, neg_inf) + k_valid.unsqueeze(2)  # [B, nc, L(t), L(i), C]
    E0 = pp0.unsqueeze(2) + pos[:, None] * w  # [B, nc, L, C]
    Eu = u + k
    M = torch.maximum(torch.maximum(E0, Eu), E.amax(dim=3)).detach()  # the result does not depend on M
    wE = (E - M.unsqueeze(3)).exp()
    e0, eu = (E0 - M).exp(), (Eu - M).exp()
    num = aa0.unsqueeze(2) * e0 + (wE * v.unsqueeze(2)).sum(3) + eu * v
    den = bb0.unsqueeze(2) * e0 + wE.sum(3) + eu
    out = (num / den).view(B, nc * L, C)[:, :T]
    return out, (aa, bb, pp)
