"""WKV-6: the RWKV-5/6 recurrence (spec section 3.2). Derivation and RWKV-5 notes in README.md."""

import torch

from .._common import (
    BACKENDS,
    check_float,
    check_log_decay,
    check_same,
    check_seq_and_state,
    pack_to_batch,
    unpack_from_batch,
)
from ..wkv7.naive import compute_dtype
from .chunk import DEFAULT_CHUNK_SIZE, wkv6_chunk
from .naive import wkv6_naive, wkv6_step

__all__ = ["wkv6", "wkv6_naive", "wkv6_chunk", "wkv6_step", "DEFAULT_CHUNK_SIZE"]


def _resolve_backend(backend: str, T: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise ValueError("backend='triton' is not available yet for wkv6; use 'chunk', 'naive' or 'step'")
    if backend != "auto":
        return backend
    return "chunk" if T > 1 else "step"


def wkv6(r, w, k, v, u, state=None, *, cu_seqlens=None, backend: str = "auto", chunk_size: int | None = None):
    """RWKV-5/6 WKV over a sequence, from an initial state.

    Per head, state ``S [N_k, N_v]`` (row = key index)::

        y_t = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ),     S_t = diag(exp(w_t)) S_{t-1} + k_t v_tᵀ

    Args:
        r, w, k, v: ``[B, T, H, N]``, one floating dtype and device. ``w`` is the log decay (finite, <= 0;
            RWKV-6 passes ``-exp(d_t)``, RWKV-5 the same static value at every t). No ``1/sqrt(N)`` scale.
        u: the bonus ``[H, N]`` (``time_faaaa``), any floating dtype.
        state: ``[B, H, N, N]`` (``[S, H, N, N]`` with ``cu_seqlens``), float32 (or float64), or None for zeros.
        cu_seqlens: int ``[S+1]`` offsets of S sequences packed into one row (B must be 1).
        backend: ``"auto"`` (chunk for T > 1, else step), ``"naive"``, ``"chunk"``, ``"step"``.
        chunk_size: chunk length of the chunk backend (default ``DEFAULT_CHUNK_SIZE``).

    Returns:
        ``(out [B, T, H, N] in the input dtype, final_state [B or S, H, N, N])`` (float32, float64 for float64).
    """
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a torch.Tensor, got {type(r).__name__}")
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N] (4-D), got shape {tuple(r.shape)}")
    check_float("r", r)
    check_same("r", r, w=w, k=k, v=v)
    check_log_decay(w)
    B, T, H, N = r.shape
    if not isinstance(u, torch.Tensor) or u.shape != (H, N):
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u (bonus) must be [H, N] = [{H}, {N}], got {got}")
    check_float("u", u)
    if u.device != r.device:
        raise ValueError(f"u must be on {r.device}, got {u.device}")
    cs = check_seq_and_state(r, cu_seqlens, state, "N_k, N_v")
    be = _resolve_backend(backend, T)
    if cs is not None:
        packed = pack_to_batch(cs, r, w, k, v)
        out, final = _run(be, *packed, u, state, chunk_size)
        return unpack_from_batch(cs, out).to(r.dtype), final
    out, final = _run(be, r, w, k, v, u, state, chunk_size)
    return out.to(r.dtype), final.to(compute_dtype(r.dtype))


def _run(be, r, w, k, v, u, state, chunk_size):
    if be == "chunk":
        return wkv6_chunk(r, w, k, v, u, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
    return wkv6_naive(r, w, k, v, u, state)  # "naive" and "step": the recurrence token by token
