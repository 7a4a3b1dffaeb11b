"""The executable specification of WKV-4 (spec section 2.2): the numerically stable (aa, bb, pp) recurrence.

Per channel, the true numerator and denominator of the state are ``aa·e^pp`` and ``bb·e^pp``, with ``pp`` the largest
exponent seen so far. Per token (``w`` the log decay <= 0, ``u`` the bonus)::

    ww = u + k_t;  p = max(pp, ww);  out_t = (e^{pp-p} aa + e^{ww-p} v_t) / (e^{pp-p} bb + e^{ww-p})
    ww = pp + w;   p = max(ww, k_t); aa = e^{ww-p} aa + e^{k_t-p} v_t;  bb = e^{ww-p} bb + e^{k_t-p};  pp = p

Computes in float64 when given float64, otherwise in float32 (bf16/fp16 inputs are upcast).
"""

import torch

from .._common import compute_dtype

# pp of an empty state: "minus infinity" that stays finite, so pp - p never gives inf - inf. The official CUDA kernels
# and HF's cpu path use -1e38; the pip package and HF's model-level state use -1e30 (same results: e^{pp-p} is 0).
PP_INIT = -1e38


def empty_state(B: int, C: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """aa = bb = 0, pp = PP_INIT, each [B, C]."""
    zeros = torch.zeros(B, C, dtype=dtype, device=device)
    return zeros, zeros.clone(), torch.full((B, C), PP_INIT, dtype=dtype, device=device)


def wkv4_step(w, u, k, v, aa, bb, pp):
    """One token. w, u: [C]; k, v, aa, bb, pp: [B, C]. Returns (out [B, C], aa, bb, pp)."""
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = (pp - p).exp(), (ww - p).exp()
    out = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + w
    p = torch.maximum(ww, k)
    e1, e2 = (ww - p).exp(), (k - p).exp()
    return out, e1 * aa + e2 * v, e1 * bb + e2, p


def wkv4_naive(w, u, k, v, state=None):
    """w, u: [C]; k, v: [B, T, C]; state: (aa, bb, pp) each [B, C] or None. Returns (out [B, T, C], (aa, bb, pp))."""
    B, T, C = k.shape
    cd = compute_dtype(k.dtype)
    w, u, k, v = (t.to(cd) for t in (w, u, k, v))
    aa, bb, pp = empty_state(B, C, cd, k.device) if state is None else (s.to(cd) for s in state)
    outs = []
    for t in range(T):
        o, aa, bb, pp = wkv4_step(w, u, k[:, t], v[:, t], aa, bb, pp)
        outs.append(o)
    out = torch.stack(outs, dim=1) if outs else k.new_zeros(B, 0, C)
    return out, (aa, bb, pp)
