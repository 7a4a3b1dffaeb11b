"""What the WKV-6 and WKV-7 Triton recurrences share: sequence/checkpoint layout, block sizes, launch settings.

Imports Triton; only the ``triton_recurrent`` modules import this file, and only when a Triton kernel is asked for.
"""

import torch
import triton

from .packing import offsets_list, offsets_tensor

BLOCK_V = 32  # value rows (WKV-7) or columns (WKV-6) per program: B*H*N/BLOCK_V programs
# 8 warps: the backward holds three state tiles; with 4 warps it spills registers at N = 64 (sm_90 cubin, ptxas)
BWD_NUM_WARPS = 8


def sequence_layout(B: int, T: int, device, cu_seqlens, chunk: int):
    """The sequences (rows of B, or the cu_seqlens packing) as int64 offsets: (first token of each [S+1],
    first checkpoint of each [S+1], S, number of checkpoints). ``cu_seqlens``: a tensor (read back here) or
    ``PackedOffsets`` (no read-back)."""
    if cu_seqlens is None:
        n_ck = triton.cdiv(T, chunk)
        steps = torch.arange(B + 1, device=device, dtype=torch.int64)
        return steps * T, steps * n_ck, B, B * n_ck
    cs = offsets_list(cu_seqlens)
    ck = [0]
    for x, y in zip(cs[:-1], cs[1:]):
        ck.append(ck[-1] + triton.cdiv(y - x, chunk))
    seq = offsets_tensor(cu_seqlens).to(device=device, dtype=torch.int64)
    return seq, torch.tensor(ck, device=device, dtype=torch.int64), len(cs) - 1, ck[-1]


def state_blocks(N: int, block: int = BLOCK_V) -> tuple[int, int, int]:
    """(BK, BV, NV): the padded head size, the value-block size and the number of value blocks per head."""
    BK = triton.next_power_of_2(N)
    BV = min(BK, block)
    return BK, BV, triton.cdiv(N, BV)


def check_checkpoint_interval(chunk_size) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size (the checkpoint interval) must be a positive int, got {chunk_size!r}")
    return int(chunk_size)
