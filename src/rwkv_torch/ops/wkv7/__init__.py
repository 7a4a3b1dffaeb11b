"""WKV-7: the generalised delta-rule recurrence of RWKV-7 (spec section 4.4). Derivation in README.md."""

import torch

from .._common import (
    check_float,
    check_log_decay,
    check_same,
    check_seq_and_state,
    needs_grad,
    pack_to_batch,
    resolve_backend,
    unpack_from_batch,
)
from .chunk import DEFAULT_CHUNK_SIZE, wkv7_chunk
from .naive import compute_dtype, wkv7_naive, wkv7_step

__all__ = ["wkv7", "wkv7_naive", "wkv7_chunk", "wkv7_step", "DEFAULT_CHUNK_SIZE"]


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
        cu_seqlens: int ``[S+1]`` offsets of S sequences packed into one row (B must be 1); the state restarts
            at every boundary and one final state per sequence is returned.
        backend: ``"auto"`` (triton on CUDA when installed; on CPU without autograd and T > 1 the fused CPU kernel;
            otherwise chunk for T > 1, else step), ``"naive"`` (the spec loop), ``"chunk"``, ``"step"``,
            ``"triton"`` (GPU kernels, ``pip install rwkv-torch[gpu]``), ``"cpu"`` (the fused C recurrence,
            forward only, built on first use: ``ops/cpu_kernel.py``).
        chunk_size: chunk length of the chunk backend (default ``DEFAULT_CHUNK_SIZE``); for triton, the interval of
            the state checkpoints kept for the backward (default 32).
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
    B, T, H, N = r.shape
    cd = compute_dtype(r.dtype)
    cs = check_seq_and_state(r, cu_seqlens, state, "N_v, N_k")
    grad = needs_grad(r, w, k, v, a, b, state)
    be = resolve_backend("wkv7", backend, r.device, T, grad)
    if be == "triton":
        return _run_triton(r, w, k, v, a, b, state, cu_seqlens, chunk_size, grad)

    if cs is not None:
        # Zero padding at the end of a sequence (w = 0, k = b = 0) leaves its state unchanged.
        packed = pack_to_batch(cs, r, w, k, v, a, b)
        out, final = _run(be, *packed, state, chunk_size, w_min)
        return unpack_from_batch(cs, out).to(r.dtype), final
    out, final = _run(be, r, w, k, v, a, b, state, chunk_size, w_min)
    return out.to(r.dtype), final.to(cd)


def _run_triton(r, w, k, v, a, b, state, cu_seqlens, chunk_size, grad):
    # Kernels live in their own files so that Triton is imported only when asked for.
    if cu_seqlens is None and not grad:
        from .triton_step import wkv7_step_triton

        return wkv7_step_triton(r, w, k, v, a, b, state)
    from .triton_chunk import CHECKPOINT_EVERY, wkv7_triton

    return wkv7_triton(r, w, k, v, a, b, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size or CHECKPOINT_EVERY)


def _run(be, r, w, k, v, a, b, state, chunk_size, w_min=None):
    if be == "naive":
        return wkv7_naive(r, w, k, v, a, b, state)
    if be == "cpu":
        from ..cpu_kernel import wkv7_cpu

        return wkv7_cpu(r, w, k, v, a, b, state)
    if be == "chunk":
        return wkv7_chunk(r, w, k, v, a, b, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, w_min=w_min)
    # "step": the recurrence token by token (the decode path; for T == 1 one call).
    return wkv7_naive(r, w, k, v, a, b, state)
