"""The executable specification of WKV-7: a plain loop over time (spec section 4.4).

State layout is the official one, ``S [B, H, N_v, N_k]`` (row = value index). Per token::

    sa  = S a_t                                   # uses the state BEFORE decay
    S   = S * exp(w_t)[None, :] + sa b_tᵀ + v_t k_tᵀ
    y_t = S r_t                                   # the state AFTER token t

Computes in float64 when given float64, otherwise in float32 (bf16/fp16 inputs are upcast).
"""

import torch

from .._common import compute_dtype


def wkv7_step(r, w, k, v, a, b, state):
    """One token. r..b: [B, H, N]; state: [B, H, N, N] in the compute dtype. Returns (y [B, H, N], new state)."""
    sa = torch.einsum("bhvk,bhk->bhv", state, a)
    state = state * w.exp().unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = torch.einsum("bhvk,bhk->bhv", state, r)
    return y, state


def wkv7_naive(r, w, k, v, a, b, state=None):
    """r, w, k, v, a, b: [B, T, H, N]; state: [B, H, N, N] or None. Returns (out [B, T, H, N], state)."""
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    r, w, k, v, a, b = (t.to(cd) for t in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(cd)
    ys = []
    for t in range(T):
        y, S = wkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], S)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return out, S
