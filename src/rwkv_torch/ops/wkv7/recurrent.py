"""The fused WKV-7 recurrence (``backend="recurrent"``): the C kernel on CPU, the Triton kernels on CUDA.

Both run the spec loop of ``naive.py`` with the state held in fast memory and share one backward algorithm: the
forward keeps the state every few tokens, the backward walks back in time recomputing each span from its
checkpoint. C with OpenMP over (batch, head) pairs (``ops/csrc/wkv_cpu.c``, ``ops/cpu_kernel.py``), Triton on CUDA
(``triton_recurrent.py``, imported only here and only when asked for).
"""

from .._common import pack_to_batch, unpack_from_batch


def wkv7_recurrent(kernel: str, r, w, k, v, a, b, state, *, cu_seqlens=None, cs=None, chunk_size=None,
                   grad: bool = False):
    """``kernel``: ``"c"`` or ``"triton"`` (``_common.resolve_backend``). r..b: [B, T, H, N]; state
    [B or S, H, N_v, N_k] or None; ``cs``: cu_seqlens as a list. Returns (out [B, T, H, N], final state)."""
    if kernel == "triton":
        if cu_seqlens is None and not grad:
            from .triton_recurrent import wkv7_decode_triton

            return wkv7_decode_triton(r, w, k, v, a, b, state)
        from .triton_recurrent import CHECKPOINT_EVERY, wkv7_triton

        return wkv7_triton(r, w, k, v, a, b, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size or CHECKPOINT_EVERY)
    from ..cpu_kernel import CHECKPOINT_EVERY, wkv7_c

    every = chunk_size or CHECKPOINT_EVERY
    if cs is None:
        return wkv7_c(r, w, k, v, a, b, state, every=every)
    # Zero padding at the end of a sequence (w = 0, k = b = 0) leaves its state unchanged.
    out, final = wkv7_c(*pack_to_batch(cs, r, w, k, v, a, b), state, every=every)
    return unpack_from_batch(cs, out), final
