"""WKV-4: the per-channel RWKV-4 recurrence with the stable (aa, bb, pp) state (spec section 2.2)."""

import torch

from .._common import BACKENDS, check_float, check_log_decay
from ..wkv7.naive import compute_dtype
from .chunk import DEFAULT_CHUNK_SIZE, wkv4_chunk
from .naive import PP_INIT, wkv4_naive, wkv4_step

__all__ = ["wkv4", "wkv4_naive", "wkv4_chunk", "wkv4_step", "PP_INIT", "DEFAULT_CHUNK_SIZE"]


def wkv4(w, u, k, v, state=None, *, backend: str = "auto", chunk_size: int | None = None):
    """RWKV-4 WKV over a sequence, per channel, from an initial state.

    ``out_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})``
    (plus the carried state), computed stably.

    Args:
        w: the per-channel log decay ``[C]`` (finite, <= 0; RWKV-4 passes ``-exp(time_decay)``).
        u: the bonus ``[C]`` (``time_first``), added in the exponent.
        k, v: ``[B, T, C]``, one floating dtype and device.
        state: ``(aa, bb, pp)`` each ``[B, C]`` float32 (or float64), or None for an empty state
            (``aa = bb = 0``, ``pp = -1e38``).
        backend: ``"auto"`` (chunk for T > 1, else step), ``"naive"``, ``"chunk"``, ``"step"``.

    Returns:
        ``(out [B, T, C] in k's dtype, (aa, bb, pp))``, the state float32 (float64 for float64 inputs).
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"k must be [B, T, C] (3-D), got {got}")
    check_float("k", k)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v must match k: shape {tuple(k.shape)}, dtype {k.dtype}")
    B, T, C = k.shape
    for name, t in (("w", w), ("u", u)):
        if not isinstance(t, torch.Tensor) or t.shape != (C,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [C] = [{C}], got {got}")
        check_float(name, t)
    check_log_decay(w)
    if state is not None:
        if len(state) != 3 or any(not isinstance(s, torch.Tensor) or s.shape != (B, C) for s in state):
            raise ValueError(f"state must be a tuple (aa, bb, pp) of three [{B}, {C}] tensors")
        if any(s.dtype not in (torch.float32, torch.float64) for s in state):
            raise TypeError("state tensors must be float32 (or float64)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise ValueError("backend='triton' is not available for wkv4; use 'chunk', 'naive' or 'step'")
    be = backend if backend != "auto" else ("chunk" if T > 1 else "step")
    if be == "chunk":
        out, st = wkv4_chunk(w, u, k, v, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
    else:
        out, st = wkv4_naive(w, u, k, v, state)
    cd = compute_dtype(k.dtype)
    return out.to(k.dtype), tuple(s.to(cd) for s in st)
