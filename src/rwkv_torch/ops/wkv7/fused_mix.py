"""RWKV-7's token-shift lerps, each fed into its projection, keeping x only: the first piece of the time mix's
training form (``layers/rwkv7.py``), for any projection and under autocast.

``out_i = P_i(x + (x_prev - x) * mu_i)`` for projections ``P_i`` that are weights (a plain ``nn.Linear``'s, or a
LoRA factor of the layer: multiplied here, as ``ops.mix.shift_mix_linear``) or modules (LoRA-wrapped or quantized
linear layers: called). Autograd of the plain form keeps every lerp (the input of its projection) plus ``xx``; this
keeps ``x`` and the shift row, and the backward rebuilds each lerp (one ``addcmul``) where it is needed: for a weight's
gradient, or to call a module again for its own backward (``gated_output.projection_vjp``; for a LoRA layer that costs
one more product with its frozen base weight, the price of not keeping its input). The reductions
``dx = Σ dxm_i``, ``dxx = Σ dxm_i mu_i``, ``dmu_i = Σ_{b,t} dxm_i xx`` are one C pass on CPU
(``mix_cpu.mix_backward``).

Under autocast the lerps are made in x's dtype (float32, as in the spec form) and a weight's product runs in the
autocast dtype, as ``nn.Linear`` under autocast would (the backward too: bf16 products, gradients cast back), so the
values are the spec form's.
"""

import torch

from ..gated_output import autocast_dtype, module_params, projection_vjp
from ..mix import flat, lerps_backward, through_token_shift
from ..token_shift import token_shift


def _times(xm: torch.Tensor, w: torch.Tensor, autocast) -> torch.Tensor:
    """``xm @ wᵀ``, in the autocast dtype under autocast."""
    if autocast is None:
        return xm @ w.t()
    return xm.to(autocast) @ w.to(autocast).t()


class _ShiftMixProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, cu_seqlens, which, modules, slices, autocast, n, *tensors):
        mus, rest = tensors[:n], tensors[n:]
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
        outs = []
        for m, mod, (a, _) in zip(which, modules, slices):
            xm = torch.addcmul(x, xx, mus[m])
            outs.append(_times(xm, rest[a], autocast) if mod is None else mod(xm))
        weights = [rest[a] if mod is None else None for mod, (a, _) in zip(modules, slices)]
        ctx.save_for_backward(x, shift, *mus, *[t for t in weights if t is not None])
        ctx.which, ctx.modules, ctx.slices, ctx.autocast, ctx.n = which, modules, slices, autocast, n
        ctx.cu_seqlens = cu_seqlens  # a tensor or PackedOffsets (not a saved tensor: it is never modified)
        ctx.n_rest = len(rest)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, shift, *saved = ctx.saved_tensors
        cu = ctx.cu_seqlens
        which, modules, slices, ac, n = ctx.which, ctx.modules, ctx.slices, ctx.autocast, ctx.n
        mus, weights = saved[:n], iter(saved[n:])
        need = ctx.needs_input_grad
        off = 8 + n  # the first projection tensor among apply's arguments
        xx = token_shift(x, shift, cu_seqlens=cu) - x
        drest = [None] * ctx.n_rest
        used, dxms = [], []  # the lerps whose output has a gradient, and their input gradients
        for g, m, mod, (a, b) in zip(grads, which, modules, slices):
            w = next(weights) if mod is None else None
            if g is None:
                continue
            if mod is None:
                if need[off + a]:
                    xm = torch.addcmul(x, xx, mus[m])
                    drest[a] = (flat(g).t() @ flat(xm if ac is None else xm.to(ac))).to(w.dtype)
                dxm = g @ w if ac is None else (g.to(ac) @ w.to(ac)).to(x.dtype)
            else:
                dxm, dps = projection_vjp(mod, torch.addcmul(x, xx, mus[m]), g, ac, need[off + a:off + b])
                drest[a:b] = dps
            used.append(m)
            dxms.append(dxm)
        if not dxms:
            return (None,) * (8 + n + ctx.n_rest)
        dx, dxx, dmus = lerps_backward(x, xx, mus, used, dxms, need[8:8 + n])
        d_shift = None
        if need[0] or need[1]:
            dx, d_shift = through_token_shift(dx, dxx, cu)
        return (dx if need[0] else None, d_shift if need[1] else None, None, None, None, None, None, None, *dmus,
                *drest)


def shift_mix_project(x: torch.Tensor, shift: torch.Tensor | None, mus, projections, *,
                      cu_seqlens: torch.Tensor | None = None) -> tuple:
    """``P_i(x + (token_shift(x, shift) - x) * mu_i)`` for each pair of ``mus`` (``[C]``) and ``projections``: a
    weight ``[O_i, C]`` (``t @ wᵀ``; pass ``p.t()`` for a ``[C, O]`` matrix) or a module (any linear layer, called;
    it must compute the same values when called again, as for activation checkpointing). x ``[B, T, C]``, shift and
    ``cu_seqlens`` as in ``token_shift``. Differentiable in x, shift, every mu, weight and module parameter; with
    autograd it keeps x and shift only. Without autograd (or while tracing) it is the plain composition of ops."""
    mus, projections = tuple(mus), tuple(projections)
    if len(mus) != len(projections):
        raise ValueError(f"one projection per mixing vector: got {len(mus)} and {len(projections)}")
    ac = autocast_dtype(x)
    modules = tuple(None if isinstance(p, torch.Tensor) else p for p in projections)
    rest, slices = [], []
    for p, mod in zip(projections, modules):
        ts = (p,) if mod is None else module_params(mod)
        slices.append((len(rest), len(rest) + len(ts)))
        rest.extend(ts)
    if (not torch.is_grad_enabled() or torch.jit.is_tracing()
            or not any(t is not None and t.requires_grad for t in (x, shift, *mus, *rest))):
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
        return tuple(_times(torch.addcmul(x, xx, mu), p, ac) if mod is None else mod(torch.addcmul(x, xx, mu))
                     for mu, p, mod in zip(mus, projections, modules))
    distinct = list({id(mu): mu for mu in mus}.values())  # a vector may feed several projections
    which = tuple(next(j for j, d in enumerate(distinct) if d is mu) for mu in mus)
    return _ShiftMixProject.apply(x, shift, cu_seqlens, which, modules, tuple(slices), ac, len(distinct),
                                  *distinct, *rest)
