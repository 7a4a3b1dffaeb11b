"""The fused WKV-6 recurrence (``backend="recurrent"``): the C kernel on CPU, the Triton kernels on CUDA.

Both keep the state every few tokens in the forward and walk back in time in the backward, recomputing each span
from its checkpoint: C (``ops/csrc/wkv_cpu.c``) and Triton (``triton_recurrent.py``, imported only when asked for).
"""

from .._common import CHECKPOINT_EVERY
from ..packing import offsets_list, pack_to_batch, unpack_from_batch
from .recurrent_cpu import wkv6_c


def wkv6_recurrent(kernel: str, r, w, k, v, u, state, *, cu_seqlens=None, chunk_size=None):
    """``kernel``: ``"c"`` or ``"triton"``. r, w, k, v: [B, T, H, N]; u: [H, N]; state [B or S, H, N_k, N_v] or None;
    ``cu_seqlens``: a tensor or ``PackedOffsets``. Returns (out [B, T, H, N], final state)."""
    if kernel == "triton":
        from .triton_recurrent import wkv6_triton

        return wkv6_triton(r, w, k, v, u, state, cu_seqlens=cu_seqlens, chunk_size=chunk_size or CHECKPOINT_EVERY)
    every = chunk_size or CHECKPOINT_EVERY
    if cu_seqlens is None:
        return wkv6_c(r, w, k, v, u, state, every=every)
    # Zero padding at the end of a sequence (w = 0, k = 0) leaves its state unchanged.
    cs = offsets_list(cu_seqlens)
    out, final = wkv6_c(*pack_to_batch(cs, r, w, k, v), u, state, every=every)
    return unpack_from_batch(cs, out), final
