"""Shared test helpers."""

import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Root-mean-square of the difference over that of the reference (0 when both are zero)."""
    ref = ref.detach().double()
    out = out.detach().double()
    num = (ref - out).pow(2).mean().sqrt().item()
    den = ref.pow(2).mean().sqrt().item()
    return num / den if den > 0 else num


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float) -> None:
    """Assert relative-RMS error <= rtol and no NaN; the message carries max-abs and rel-RMS error."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    assert not torch.isnan(ref).any(), f"{name}: reference has NaN"
    err = rel_rms(ref, out)
    max_abs = (ref.detach().double() - out.detach().double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol, f"{name}: rel-RMS {err:.3e} > {rtol:.1e} (max abs diff {max_abs:.3e})"
