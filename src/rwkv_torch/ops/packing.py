"""Variable-length packing (``cu_seqlens``): S sequences stored back to back along T of one row (B = 1).

The ops take ``cu_seqlens`` as an int ``[S+1]`` tensor of offsets (0 first, T last, non-decreasing) or as
``PackedOffsets``, the same offsets read back to the host once. A tensor costs one device-to-host read in each op
that needs the offsets as numbers (the fused recurrences' layout, the chunked form's packing); the model reads its
``cu_seqlens`` once at its edge and hands every layer and op the ``PackedOffsets``, so a packed forward of any depth
reads back once.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PackedOffsets:
    """``cu_seqlens`` with its host copy: ``tensor`` (the int ``[S+1]`` offsets on the data's device) and ``offsets``
    (the same values as a tuple of ints). Build it with ``packed_offsets``; it passes through the layers unchanged
    where a ``cu_seqlens`` tensor would, and ``tolist()`` answers from the host copy (no read-back)."""

    tensor: torch.Tensor
    offsets: tuple[int, ...]

    def tolist(self) -> list[int]:
        return list(self.offsets)

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1


def packed_offsets(cu_seqlens, device=None) -> PackedOffsets:
    """``cu_seqlens`` (a tensor: read back once here; or ``PackedOffsets``, returned as is unless ``device`` moves it)
    as ``PackedOffsets``, its tensor int64 on ``device`` (default: where it is)."""
    if isinstance(cu_seqlens, PackedOffsets):
        if device is None or cu_seqlens.tensor.device == torch.device(device):
            return cu_seqlens
        return PackedOffsets(cu_seqlens.tensor.to(device), cu_seqlens.offsets)
    offsets = tuple(cu_seqlens.tolist())
    return PackedOffsets(cu_seqlens.to(device=device or cu_seqlens.device, dtype=torch.long), offsets)


def offsets_list(cu_seqlens) -> list[int]:
    """The offsets as ints: from the host copy of ``PackedOffsets`` (or a list of ints), else read back from the
    tensor."""
    if isinstance(cu_seqlens, PackedOffsets):
        return list(cu_seqlens.offsets)
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def offsets_tensor(cu_seqlens) -> torch.Tensor:
    """The offsets as a tensor (no read-back): the tensor itself, or the one ``PackedOffsets`` holds."""
    return cu_seqlens.tensor if isinstance(cu_seqlens, PackedOffsets) else cu_seqlens


def check_cu_seqlens(cu_seqlens, batch: int, total: int) -> PackedOffsets:
    """Validate cu_seqlens ([S+1], 0 first, B*T last, non-decreasing, B == 1); return it as ``PackedOffsets`` (a
    tensor is read back once here, ``PackedOffsets`` not at all)."""
    t = offsets_tensor(cu_seqlens)
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32 or int64 tensor [S+1]")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(t.shape)}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={batch}")
    packed = packed_offsets(cu_seqlens)
    cs = packed.offsets
    if len(cs) != t.numel():
        raise ValueError(f"PackedOffsets holds {len(cs)} offsets for a tensor of {t.numel()}")
    if cs[0] != 0 or cs[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {cs[0]} ... {cs[-1]}")
    if any(x > y for x, y in zip(cs[:-1], cs[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return packed


def pack_to_batch(cs: list[int], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[1, T, ...] packed rows -> [S, T_max, ...] zero-padded at the end of each sequence."""
    lens = [y - x for x, y in zip(cs[:-1], cs[1:])]
    t_max = max(max(lens), 1)
    out = []
    for t in tensors:
        buf = t.new_zeros((len(lens), t_max) + tuple(t.shape[2:]))
        for i, (s, n) in enumerate(zip(cs[:-1], lens)):
            buf[i, :n] = t[0, s : s + n]
        out.append(buf)
    return out


def unpack_from_batch(cs: list[int], padded: torch.Tensor) -> torch.Tensor:
    """[S, T_max, ...] -> [1, T, ...] keeping each sequence's first len rows."""
    parts = [padded[i, : y - x] for i, (x, y) in enumerate(zip(cs[:-1], cs[1:]))]
    return torch.cat(parts, dim=0).unsqueeze(0)


@dataclass(frozen=True, eq=False)
class ChunkLayout:
    """The packed row laid out for a chunked form: every sequence starts a new chunk of ``L`` tokens (its last chunk
    zero-padded), so no chunk spans a boundary and the state restarts exactly at each sequence's first chunk.

    ``dest`` [T]: each packed token's position in the chunk-aligned row of ``n_chunks * L`` tokens; ``steps``: for
    j = 0, 1, ..., the chunk ids of the j-th chunk of every sequence that has one, and those sequences' ids (both
    int64 on the data's device); ``num_sequences``: S. Built from host ints: no device-to-host read."""

    L: int
    n_chunks: int
    num_sequences: int
    dest: torch.Tensor
    steps: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def chunk_layout(cs, L: int, device) -> ChunkLayout:
    """The ``ChunkLayout`` of the offsets ``cs`` (ints) for chunks of ``L`` tokens."""
    lens = [y - x for x, y in zip(cs[:-1], cs[1:])]
    n_ck = [-(-n // L) for n in lens]
    first = [0]
    for n in n_ck:
        first.append(first[-1] + n)
    # token t of sequence i (packed at cs[i] + t) goes to first[i] * L + t
    shift = torch.tensor([f * L - c for f, c in zip(first, cs)][:-1], dtype=torch.long)
    dest = torch.arange(cs[-1]) + torch.repeat_interleave(shift, torch.tensor(lens, dtype=torch.long))
    steps = []
    for j in range(max(n_ck, default=0)):
        seqs = [i for i, n in enumerate(n_ck) if n > j]
        steps.append((torch.tensor([first[i] + j for i in seqs], device=device, dtype=torch.long),
                      torch.tensor(seqs, device=device, dtype=torch.long)))
    return ChunkLayout(L, first[-1], len(lens), dest.to(device), tuple(steps))


def to_chunk_rows(layout: ChunkLayout, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[1, T, ...] packed rows -> [1, n_chunks * L, ...] chunk-aligned rows, zeros between the sequences."""
    return [t.new_zeros((1, layout.n_chunks * layout.L) + tuple(t.shape[2:])).index_copy(1, layout.dest, t)
            for t in tensors]


def from_chunk_rows(layout: ChunkLayout, rows: torch.Tensor) -> torch.Tensor:
    """[1, n_chunks * L, ...] -> [1, T, ...]: the real tokens back in their packed order."""
    return rows.index_select(1, layout.dest)


def chunk_scan(layout: ChunkLayout, h0: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential part of a chunked form over a ``ChunkLayout``: every sequence's chunks in order from its own
    initial state ``h0[s]`` (``h0`` [S, ...]), the sequences side by side. ``step(chunk_ids, h) -> (out, h')``
    advances the states ``h`` [n, ...] of n sequences by one chunk each. Returns (the outputs by chunk id
    [n_chunks, ...], the final states [S, ...]; an empty sequence keeps its ``h0`` row)."""
    h, ids, outs = h0, [], []
    for chunk_ids, seqs in layout.steps:
        every = seqs.numel() == layout.num_sequences
        out, h_new = step(chunk_ids, h if every else h.index_select(0, seqs))
        h = h_new if every else h.index_copy(0, seqs, h_new)
        ids.append(chunk_ids)
        outs.append(out)
    if not outs:
        return h0.new_zeros((0,)), h
    out = torch.cat(outs)
    return out.new_zeros((layout.n_chunks,) + tuple(out.shape[1:])).index_copy(0, torch.cat(ids), out), h
