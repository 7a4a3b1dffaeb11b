"""Token shift: x_prev[t] = x[t-1], with the carried last row of the previous call at t = 0."""

import torch


def token_shift(x: torch.Tensor, shift_state: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, T, C]; shift_state: [B, C] (the previous call's last row) or None for zeros. Returns x_prev [B, T, C]."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if shift_state is None else shift_state.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)
