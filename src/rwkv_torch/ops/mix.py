"""The token-shift lerps of a time-mix: ``x + xx * mu_i`` for several mixing vectors at once, with a hand-written
backward.

Autograd of the one-op form (``torch.addcmul(x, xx, stack(mus))`` then ``unbind``) stacks the six output gradients
into one ``[6, B, T, C]`` tensor and reduces it through two broadcasting multiplies, ~30 ms per RWKV-7 layer at the
game-AI training shape on one core (``benchmarks/bench_train.py --profile``); here each output's gradient is used
where it arrives: ``dx = Σ g_i``, ``dxx = Σ g_i mu_i``, ``dmu_i = Σ_{b,t} g_i xx``, a few passes over ``[B, T, C]``.
Nothing is saved beyond ``xx`` and the vectors.
"""

import torch
import torch.nn.functional as F


class _Lerps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xx, *mus):
        ctx.save_for_backward(xx, *mus)
        return tuple(torch.addcmul(x, xx, mu) for mu in mus)

    @staticmethod
    def backward(ctx, *grads):
        xx, *mus = ctx.saved_tensors
        dx = dxx = None
        dmus = []
        for g, mu in zip(grads, mus):
            if g is None:
                dmus.append(None)
                continue
            dx = g.clone() if dx is None else dx.add_(g)
            dxx = g * mu if dxx is None else dxx.addcmul_(g, mu)
            dmus.append((g * xx).sum(tuple(range(g.dim() - 1))).view(mu.shape) if ctx.needs_input_grad[2 + len(dmus)]
                        else None)
        if dx is None:
            dx, dxx = torch.zeros_like(xx), torch.zeros_like(xx)
        return (dx if ctx.needs_input_grad[0] else None, dxx if ctx.needs_input_grad[1] else None, *dmus)


def lerps(x: torch.Tensor, xx: torch.Tensor, *mus: torch.Tensor) -> tuple:
    """``(x + xx * mu for mu in mus)``: x, xx ``[..., C]`` of one shape; each mu ``[C]``. Differentiable in all."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, xx, *mus)):
        return _Lerps.apply(x, xx, *mus)
    return tuple(torch.addcmul(x, xx, mu) for mu in mus)


class _SquaredReluFFN(torch.autograd.Function):
    """``relu(x Wkᵀ)² Wvᵀ``, saving only x and the pre-activation: the activation is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, w_key, w_value):
        z = x @ w_key.t()
        out = torch.relu(z).square_() @ w_value.t()
        ctx.save_for_backward(x, z, w_key, w_value)
        return out

    @staticmethod
    def backward(ctx, g):
        x, z, w_key, w_value = ctx.saved_tensors
        r = torch.relu(z)
        g2 = g.reshape(-1, g.shape[-1])
        d_wv = g2.t() @ r.square().reshape(-1, r.shape[-1]) if ctx.needs_input_grad[2] else None
        dz = (g @ w_value).mul_(r).mul_(2)  # d relu(z)² / dz = 2 relu(z)
        d_wk = dz.reshape(-1, dz.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        dx = dz @ w_key if ctx.needs_input_grad[0] else None
        return dx, d_wk, d_wv


def squared_relu_ffn(x: torch.Tensor, w_key: torch.Tensor, w_value: torch.Tensor) -> torch.Tensor:
    """RWKV's feed-forward core ``relu(x @ w_keyᵀ)² @ w_valueᵀ`` (x ``[..., C]``, w_key ``[F, C]``, w_value
    ``[C, F]``). With autograd it keeps x and ``x @ w_keyᵀ`` for the backward instead of also the activation and its
    square (5 instead of 13 ``[.., C]``-sized tensors at F = 4C); under autocast it is the plain composition, so
    the projections run in the autocast dtype as any ``nn.Linear``."""
    if torch.is_autocast_enabled(x.device.type) or not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_key, w_value))):
        return F.linear(torch.relu(F.linear(x, w_key)).square(), w_value)
    return _SquaredReluFFN.apply(x, w_key, w_value)
