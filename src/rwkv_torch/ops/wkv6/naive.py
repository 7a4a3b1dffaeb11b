"""The executable specification of WKV-6 (spec section 3.2): a plain loop over time.

State layout ``S [B, H, N_k, N_v]`` (row = key index, the official pip package's python layout). Per token::

    y_t = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ)        # the state BEFORE token t, plus the bonus
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_tᵀ

Computes in float64 when given float64, otherwise in float32 (bf16/fp16 inputs are upcast).
"""

import torch

from .._common import compute_dtype


def wkv6_step(r, w, k, v, u, state):
    """One token. r, w, k, v: [B, H, N]; u: [H, N]; state: [B, H, N_k, N_v] in the compute dtype.

    Returns (y [B, H, N], new state)."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, K, V]
    y = torch.einsum("bhk,bhkv->bhv", r, state + u.unsqueeze(-1) * kv)
    return y, state * w.exp().unsqueeze(-1) + kv


def wkv6_naive(r, w, k, v, u, state=None):
    """r, w, k, v: [B, T, H, N]; u: [H, N]; state: [B, H, N_k, N_v] or None. Returns (out [B, T, H, N], state)."""
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    r, w, k, v, u = (t.to(cd) for t in (r, w, k, v, u))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(cd)
    ys = []
    for t in range(T):
        y, S = wkv6_step(r[:, t], w[:, t], k[:, t], v[:, t], u, S)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return out, S
