"""Token shift: x_prev[t] = x[t-1], with the carried last row of the previous call at t = 0, and with ``cu_seqlens``
(S sequences packed along T, B = 1) restarting at every sequence's first token from that sequence's own row.
``cu_seqlens`` is a tensor or ``PackedOffsets``; nothing here reads it back."""

import torch

from .packing import offsets_tensor


def token_shift(x: torch.Tensor, shift_state: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, T, C]; shift_state: [B, C] (the previous call's last row; [S, C] with ``cu_seqlens``) or None for zeros;
    cu_seqlens: int [S+1] offsets (0 first, T last, non-decreasing) of S sequences packed in one row (B = 1), on x's
    device. Returns x_prev [B, T, C]: the first token of each sequence gets its own shift_state row, never the
    previous sequence's last token. No device-to-host read."""
    if cu_seqlens is None:
        first = x.new_zeros(x.shape[0], 1, x.shape[2]) if shift_state is None else shift_state.unsqueeze(1).to(x.dtype)
        return torch.cat([first, x[:, :-1]], dim=1)
    T, C = x.shape[1], x.shape[2]
    cu = offsets_tensor(cu_seqlens).long()
    first = x.new_zeros(cu.numel() - 1, C) if shift_state is None else shift_state.to(x.dtype)  # [S, C]
    # An empty sequence has no first token: its write goes to a spare row T, dropped below, so that no two writes
    # land on one real row (which one wins would be undefined).
    starts = torch.where(cu[1:] > cu[:-1], cu[:-1], T)  # [S]
    prev = torch.cat([x.new_zeros(1, 1, C), x[:, :-1], x.new_zeros(1, 1, C)], dim=1)  # [1, T + 1, C]
    # In place on the fresh cat output (cat's backward does not need it): saves a copy of [T, C].
    return prev.index_copy_(1, starts, first.unsqueeze(0))[:, :T]


def last_token(x: torch.Tensor, shift_state: torch.Tensor | None = None, *,
               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The shift state after x: its last row [B, C]; with ``cu_seqlens`` the last row of each sequence [S, C], an
    empty sequence keeping its ``shift_state`` row (zeros if None). No device-to-host read."""
    if cu_seqlens is None:
        return x[:, -1]
    cu = offsets_tensor(cu_seqlens).long()
    last = x[0].index_select(0, (cu[1:] - 1).clamp(min=0))  # [S, C]
    old = torch.zeros_like(last) if shift_state is None else shift_state.to(x.dtype)
    return torch.where((cu[1:] > cu[:-1]).unsqueeze(1), last, old)


def token_shift_backward(d_prev: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> tuple:
    """The gradient of ``token_shift`` for ``d_prev`` (the gradient of its output, [B, T, C]): ``(d x [B, T, C],
    d shift_state [B or S, C])``; every sequence's first row goes to its shift row (zeros for an empty sequence)."""
    if cu_seqlens is None:
        return torch.cat([d_prev[:, 1:], d_prev.new_zeros(d_prev.shape[0], 1, d_prev.shape[2])], dim=1), d_prev[:, 0]
    T, C = d_prev.shape[1], d_prev.shape[2]
    cu = offsets_tensor(cu_seqlens).long()
    starts = torch.where(cu[1:] > cu[:-1], cu[:-1], T)  # an empty sequence reads the spare zero row T
    padded = torch.cat([d_prev, d_prev.new_zeros(1, 1, C)], dim=1)  # [1, T + 1, C]
    d_shift = padded[0].index_select(0, starts)
    return padded.index_fill_(1, starts, 0)[:, 1:], d_shift
