"""Helpers of the fused one-token ``step``: stacking weights, and noticing when parameters change."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def stack_padded(mats: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Stack matrices whose size along ``dim`` (0 or 1) differs, zero-padded to the largest: ``[len(mats), ...]``.

    Zero rows/columns add nothing to a product, so one ``bmm`` does the work of several ``mm``."""
    size = max(m.shape[dim] for m in mats)
    out = mats[0].new_zeros(len(mats), *(size if d == dim else s for d, s in enumerate(mats[0].shape)))
    for i, m in enumerate(mats):
        out[i].narrow(dim, 0, m.shape[dim]).copy_(m)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for x [B, in] and weight [out, in]. One row is computed as ``weight @ xᵀ``: MKL's
    matrix-vector product over contiguous weight rows is 2-7% faster than ``x @ weightᵀ`` (the big head most)."""
    if x.shape[0] != 1:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


def addmm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight)`` in one op, with ``linear``'s one-row layout."""
    if x.shape[0] != 1:
        return torch.addmm(residual, x, weight.t())
    return torch.addmm(residual.t(), weight, x.t()).t()


class ParamWatch:
    """A cheap fingerprint of every parameter of a module tree: (version counter, storage address) each.

    Every in-place update made through a parameter bumps its version (optimizer steps, ``load_state_dict``,
    ``copy_``/``add_`` under no_grad); ``.to()``, ``.data = ...`` and ``load_state_dict(assign=True)`` change its
    storage. Parameters are read through their modules' parameter dicts, so replaced ones are seen. Updates made
    through ``param.data`` bypass the version counter and are not seen.
    """

    def __init__(self, module: nn.Module):
        self._slots = [(m._parameters, name) for m in module.modules() for name in m._parameters]

    def fingerprint(self) -> list:
        return [(p._version, p.data_ptr()) for p in [d[name] for d, name in self._slots] if p is not None]
