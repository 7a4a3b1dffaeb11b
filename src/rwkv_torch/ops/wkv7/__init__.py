"""WKV-7: the generalised delta-rule recurrence of RWKV-7 (spec section 4.4). Derivation in README.md."""

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
from .chunk import DEFAULT_CHUNK_SIZE, wkv7_chunk
from .naive import wkv7_naive, wkv7_step
from .recurrent import wkv7_recurrent

__all__ = ["wkv7", "wkv7_unchecked", "wkv7_naive", "wkv7_chunk", "wkv7_recurrent", "wkv7_step", "DEFAULT_CHUNK_SIZE"]


def wkv7(r, w, k, v, a, b, state=None, *, cu_seqlens=None, backend: str = "auto", chunk_size: int | None = None,
         w_min: float | None = None):
    """RWKV-7 WKV over a sequence, from an initial state.

    Per head, with the official state layout ``S [N_v, N_k]`` (row = value index)::

        S_t = S_{t-1} (diag(exp(w_t)) + a_t b_tᵀ) + v_t k_tᵀ,     y_t = S_t r_t

    Args:
        r, w, k, v, a, b: ``[B, T, H, N]``, one floating dtype (fp32/bf16/fp16/fp64), one device.
            ``w`` is the log decay (finite, <= 0; RWKV-7 passes ``-0.6065306597 * sigmoid(w_raw)``),
            ``a = -kk`` and ``b = kk * a_rate``. No ``1/sqrt(N)`` scale is applied.
        state: ``[B, H, N, N]`` (``[S, H, N, N]`` with ``cu_seqlens``), float32 (or float64), or None for zeros.
        cu_seqlens: int ``[S+1]`` offsets of S sequences packed into one row (B must be 1), or the same as
            ``ops.packing.PackedOffsets`` (read back already: no device-to-host read here); the state restarts at
            every boundary and one final state per sequence is returned.
        backend: ``"naive"`` (the spec loop), ``"chunk"`` (the parallel form, autograd backward), ``"recurrent"``
            (the fused recurrence with its reverse-time backward: Triton on CUDA, ``pip install rwkv-torch[gpu]``;
            C on CPU, built on first use: ``ops/wkv7/recurrent_cpu.py``) or ``"auto"`` (recurrent on CUDA when Triton
            is installed and on CPU for T > 1; otherwise chunk for T > 1, naive for one token). Any other name is a
            ValueError.
        chunk_size: chunk length of the chunk backend (default ``DEFAULT_CHUNK_SIZE``); for the recurrent backend,
            the interval of the state checkpoints kept for the backward (default 32, C and Triton).
        w_min: optional lower bound on ``w`` (checked like the other input rules; RWKV-7 layers pass
            ``-0.6065306597``): lets the chunk backend choose its numerics without reading ``w`` back, so the op
            traces into one ``torch.compile`` graph.

    Returns:
        ``(out [B, T, H, N] in the input dtype, final_state [B or S, H, N, N])``; the state is float32,
        or float64 for float64 inputs.

    Example:
        >>> r, w, k, v, a, b = (torch.randn(1, 8, 2, 4) for _ in range(6))
        >>> out, s = wkv7(r, -torch.rand(1, 8, 2, 4), k, v, a, b)
        >>> out.shape, s.shape
        (torch.Size([1, 8, 2, 4]), torch.Size([1, 2, 4, 4]))
    """
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a torch.Tensor, got {type(r).__name__}")
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N] (4-D), got shape {tuple(r.shape)}")
    check_float("r", r)
    check_same("r", r, w=w, k=k, v=v, a=a, b=b)
    check_log_decay(w, w_min)
    cu_seqlens = check_seq_and_state(r, cu_seqlens, state, "N_v, N_k")  # read back once, then passed on
    return wkv7_unchecked(r, w, k, v, a, b, state, cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size,
                          w_min=w_min)


def wkv7_unchecked(r, w, k, v, a, b, state=None, *, cu_seqlens=None, backend: str = "auto",
                   chunk_size: int | None = None, w_min: float | None = None):
    """``wkv7`` without its value checks: the layers' entry, whose inputs are valid by construction (the model
    checks its own inputs once, at its edge). No device-to-host read when ``w_min`` is given and ``cu_seqlens`` is
    None or ``PackedOffsets``; same arguments and results as ``wkv7``."""
    T = r.shape[1]
    cd = compute_dtype(r.dtype)
    if cu_seqlens is not None:
        cu_seqlens = packed_offsets(cu_seqlens)  # a tensor is read back here, once (PackedOffsets: never)
    grad = needs_grad(r, w, k, v, a, b, state)
    be = resolve_backend("wkv7", backend, r.device, T, grad)
    if be in ("c", "triton"):
        out, final = wkv7_recurrent(be, r, w, k, v, a, b, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                                    grad=grad)
        return out.to(r.dtype), final.to(cd)
    if be == "chunk":  # packed or not: the chunked form takes the packed row as it is
        out, final = wkv7_chunk(r, w, k, v, a, b, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, w_min=w_min,
                                cu_seqlens=cu_seqlens)
        return out.to(r.dtype), final.to(cd)
    if cu_seqlens is not None:
        cs = cu_seqlens.offsets
        # The spec loop over a batch: zero padding at the end of a sequence (w = 0, k = b = 0) leaves its state
        # unchanged.
        out, final = wkv7_naive(*pack_to_batch(cs, r, w, k, v, a, b), state)
        return unpack_from_batch(cs, out).to(r.dtype), final.to(cd)
    out, final = wkv7_naive(r, w, k, v, a, b, state)
    return out.to(r.dtype), final.to(cd)
