"""The fused WKV-7 recurrence (``backend="recurrent"``): the C kernel on CPU, the Triton kernels on CUDA.

Both run the spec loop of ``naive.py`` with the state held in fast memory and share one backward algorithm: the
forward keeps the state every few tokens, the backward walks back in time recomputing each span from its
checkpoint. C with OpenMP over (batch, head) pairs (``ops/csrc/wkv_cpu.c``, ``recurrent_cpu.py``), Triton on CUDA
(``triton_recurrent.py``, imported only here and only when asked for).
"""

from .._common import CHECKPOINT_EVERY
from ..packing import offsets_list, pack_to_batch, unpack_from_batch
from .recurrent_cpu import wkv7_c


def wkv7_recurrent(kernel: str, r, w, k, v, a, b, state, *, cu_seqlens=None, chunk_size=None, grad: bool = False):
    """``kernel``: ``"c"`` or ``"triton"`` (``_common.resolve_backend``). r..b: [B, T, H, N]; state
    [B or S, H, N_v, N_k] or None; ``cu_seqlens``: a tensor or ``PackedOffsets``. Returns (out [B, T, H, N], final
    state)."""
    if kernel == "triton":
        if cu_seqlens is None and not grad:
            from .triton_recurrent import wkv7_decode_triton

            return wkv7_decode_triton(r, w, k, v, a, b, state)
        from .triton_recurrent import wkv7_triton

        return wkv7_triton(r, w, k, v, a, b, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size or CHECKPOINT_EVERY)
    every = chunk_size or CHECKPOINT_EVERY
    if cu_seqlens is None:
        return wkv7_c(r, w, k, v, a, b, state, every=every)
    # Zero padding at the end of a sequence (w = 0, k = b = 0) leaves its state unchanged.
    cs = offsets_list(cu_seqlens)
    out, final = wkv7_c(*pack_to_batch(cs, r, w, k, v, a, b), state, every=every)
    return unpack_from_batch(cs, out), final
