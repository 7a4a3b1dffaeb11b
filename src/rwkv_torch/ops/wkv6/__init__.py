"""WKV-6: the recurrence of RWKV-6 (spec section 3.2), also used by RWKV-5. Derivation and RWKV-5 notes in README.md."""

import torch

from .._common import (
    check_float,
    check_log_decay,
    check_same,
    check_seq_and_state,
    compute_dtype,
    needs_grad,
    resolve_backend,
)
from ..packing import pack_to_batch, packed_offsets, unpack_from_batch
from .chunk import DEFAULT_CHUNK_SIZE, wkv6_chunk
from .naive import wkv6_naive, wkv6_step
from .recurrent import wkv6_recurrent

__all__ = ["wkv6", "wkv6_unchecked", "wkv6_naive", "wkv6_chunk", "wkv6_recurrent", "wkv6_step", "DEFAULT_CHUNK_SIZE"]


def _check_bonus(u, r: torch.Tensor) -> None:
    """u is [H, N] in r's dtype or float32 (checkpoints keep time_faaaa in fp32), on r's device."""
    H, N = r.shape[2:]
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u (bonus) must be a torch.Tensor [H, N], got {type(u).__name__}")
    if u.shape != (H, N):
        raise ValueError(f"u (bonus) must be [H, N] = [{H}, {N}], got {tuple(u.shape)}")
    if u.dtype not in (r.dtype, torch.float32):
        raise TypeError(f"u (bonus) must have r's dtype ({r.dtype}) or float32, got {u.dtype}")
    if u.device != r.device:
        raise ValueError(f"u (bonus) must be on {r.device} like r, got {u.device}")


def wkv6(r, w, k, v, u, state=None, *, cu_seqlens=None, backend: str = "auto", chunk_size: int | None = None):
    """RWKV-5/6 WKV over a sequence, from an initial state.

    Per head, with the official pip package's state layout ``S [N_k, N_v]`` (row = key index)::

        y_t = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ),     S_t = diag(exp(w_t)) S_{t-1} + k_t v_tᵀ

    The output uses the state before token t plus the bonus ``u`` for the current token.

    Args:
        r, w, k, v: ``[B, T, H, N]``, one floating dtype (fp32/bf16/fp16/fp64), one device. ``w`` is the log decay
            (finite, <= 0; RWKV-6 passes ``-exp(d_t)``, RWKV-5 the same static value at every t). No ``1/sqrt(N)``
            scale is applied.
        u: the bonus ``[H, N]`` (``time_faaaa``, used linearly), in r's dtype or float32.
        state: ``[B, H, N, N]`` (``[S, H, N, N]`` with ``cu_seqlens``), float32 (or float64), or None for zeros.
        cu_seqlens: int ``[S+1]`` offsets of S sequences packed into one row (B must be 1), or the same as
            ``ops.packing.PackedOffsets`` (read back already: no device-to-host read here); the state restarts at
            every boundary and one final state per sequence is returned.
        backend: ``"naive"`` (the spec loop), ``"chunk"`` (the parallel form, autograd backward), ``"recurrent"``
            (the fused recurrence with its reverse-time backward: Triton on CUDA, ``pip install rwkv-torch[gpu]``;
            C on CPU, built on first use: ``ops/wkv6/recurrent_cpu.py``) or ``"auto"`` (recurrent on CUDA when Triton
            is installed and on CPU for T > 1; otherwise chunk for T > 1, naive for one token). Any other name is a
            ValueError.
        chunk_size: chunk length of the chunk backend (default ``DEFAULT_CHUNK_SIZE``); for the recurrent backend,
            the interval of the state checkpoints kept for the backward (default 32, C and Triton).

    Returns:
        ``(out [B, T, H, N] in the input dtype, final_state [B or S, H, N, N])``; the state is float32,
        or float64 for float64 inputs.

    Example:
        >>> r, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
        >>> out, s = wkv6(r, -torch.rand(1, 8, 2, 4), k, v, torch.randn(2, 4))
        >>> out.shape, s.shape
        (torch.Size([1, 8, 2, 4]), torch.Size([1, 2, 4, 4]))
    """
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a torch.Tensor, got {type(r).__name__}")
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N] (4-D), got shape {tuple(r.shape)}")
    check_float("r", r)
    check_same("r", r, w=w, k=k, v=v)
    check_log_decay(w)
    _check_bonus(u, r)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    cu_seqlens = check_seq_and_state(r, cu_seqlens, state, "N_k, N_v")  # read back once, then passed on
    return wkv6_unchecked(r, w, k, v, u, state, cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size)


def wkv6_unchecked(r, w, k, v, u, state=None, *, cu_seqlens=None, backend: str = "auto",
                   chunk_size: int | None = None):
    """``wkv6`` without its value checks: the layers' entry, whose inputs are valid by construction (the model
    checks its own inputs once, at its edge). Same arguments and results as ``wkv6``."""
    cd = compute_dtype(r.dtype)
    if cu_seqlens is not None:
        cu_seqlens = packed_offsets(cu_seqlens)  # a tensor is read back here, once (PackedOffsets: never)
    be = resolve_backend("wkv6", backend, r.device, r.shape[1], needs_grad(r, w, k, v, u, state))
    if be in ("c", "triton"):
        out, final = wkv6_recurrent(be, r, w, k, v, u, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
        return out.to(r.dtype), final.to(cd)
    if be == "chunk":  # packed or not: the chunked form takes the packed row as it is
        out, final = wkv6_chunk(r, w, k, v, u, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                                cu_seqlens=cu_seqlens)
        return out.to(r.dtype), final.to(cd)
    if cu_seqlens is not None:
        cs = cu_seqlens.offsets
        # The spec loop over a batch: zero padding at the end of a sequence (w = 0, k = 0) leaves its state unchanged.
        out, final = wkv6_naive(*pack_to_batch(cs, r, w, k, v), u, state)
        return unpack_from_batch(cs, out).to(r.dtype), final.to(cd)
    out, final = wkv6_naive(r, w, k, v, u, state)
    return out.to(r.dtype), final.to(cd)
