"""The time mix's output stage as one autograd function (the training form of RWKV-5, 6 and 7): the WKV output
normalised per head (``ln_x``, a group norm), RWKV-7's bonus ``(Σ_head r k r_k) v`` added, times the gate, through
the output projection (spec 3.2, 4.4).

Autograd of the spec form keeps the group norm's input and output, the gated product's two factors and the
projection's input; this keeps the WKV output and the gate only (and RWKV-7's r, k, v, which its other ops keep
anyway). ``ln_x``'s statistics, the bonus, ``z * g`` and the projection's input are recomputed in the backward, on CPU
in one C pass (``time_mix_cpu.gated_output_backward``). The forward runs the spec form's kernels, so both forms give the
same bits.

The projection is a weight ``[C_out, C]`` (a plain ``nn.Linear``'s, multiplied here) or any module (a LoRA-wrapped or
quantized linear layer: called in the forward, and called again in the backward on the recomputed input for its
gradients, ``projection_vjp``). Dtypes: the elementwise part runs in the compute dtype (float32 for bf16 inputs,
``compute_dtype``); under autocast the projection runs in the autocast dtype as ``nn.Linear`` would, and the
gradients come back in each input's dtype.
"""

import torch

from . import time_mix_cpu
from ._common import compute_dtype
from .mix import c_pass, channel_sum, flat


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype while autocast is on for t's device, else None."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def projection_vjp(module, inp: torch.Tensor, grad: torch.Tensor, autocast, need) -> tuple:
    """``module``'s backward at ``inp`` for the output gradient ``grad``, by calling it again (under the forward's
    ``autocast`` dtype, None for off): ``(d inp, grads of module.parameters() where need[i], else None)``."""
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    want = [p for p, n in zip(params, need) if n]
    with torch.enable_grad(), torch.autocast(inp.device.type, dtype=autocast or torch.bfloat16,
                                             enabled=autocast is not None):
        inp = inp.detach().requires_grad_()
        out = module(inp)
    d_inp, *dps = torch.autograd.grad(out, [inp, *want], grad)
    it = iter(dps)
    return d_inp, tuple(next(it) if n else None for n in need[:len(params)])


def module_params(module) -> tuple:
    return tuple(module.parameters()) if isinstance(module, torch.nn.Module) else ()


class _GatedOutput(torch.autograd.Function):
    """(y, r, k, v, g, r_k, ln_x weight and bias, output weight or module) -> output((ln_x(y) + bonus * v) * g):
    spec 4.4; r, k, v and r_k None for RWKV-5/6 (no bonus, spec 3.2). A module's parameters follow as inputs."""

    @staticmethod
    def forward(ctx, y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head, eps, module, autocast, *params):
        cd = compute_dtype(y.dtype)
        wide = [None if t is None else t.to(cd) for t in (y, r, k, v, g)]
        z, bonus = _gated_pre(*wide[:4], r_k, ln_w, ln_b, n_head, eps)
        zg = z.mul_(wide[4])
        if module is None:
            pd = autocast or w_out.dtype
            out = zg.to(pd) @ w_out.to(pd).t()
        else:  # under autocast its input stays in the compute dtype (the module casts), as in the spec form
            out = module(zg if autocast else zg.to(y.dtype))
        ctx.save_for_backward(y, r, k, v, g, r_k, ln_w, ln_b, w_out, bonus)
        ctx.n_head, ctx.eps, ctx.module, ctx.autocast = n_head, eps, module, autocast
        return out

    @staticmethod
    def backward(ctx, d_out):
        y, r, k, v, g, r_k, ln_w, ln_b, w_out, bonus = ctx.saved_tensors
        need, module, ac = ctx.needs_input_grad, ctx.module, ctx.autocast
        has_bonus = r is not None
        cd = compute_dtype(y.dtype)
        dtypes = [None if t is None else t.dtype for t in (y, r, k, v, g)]
        y, r, k, v, g = (None if t is None else t.to(cd) for t in (y, r, k, v, g))
        H, eps = ctx.n_head, ctx.eps
        dparams = ()
        if module is not None:
            zg = _gated_pre(y, r, k, v, r_k, ln_w, ln_b, H, eps)[0].mul_(g)
            dzg, dparams = projection_vjp(module, zg if ac else zg.to(dtypes[0]), d_out, ac, need[13:])
            dzg = dzg.to(cd)
        else:
            pd = ac or w_out.dtype
            dzg = (d_out.to(pd) @ w_out.to(pd)).to(cd)

        def weight_grad(zg):
            if module is not None or not need[8]:
                return None
            pd = ac or w_out.dtype
            return (flat(d_out.to(pd)).t() @ flat(zg.to(pd))).to(w_out.dtype)

        if c_pass(y, [dzg, r, k, v, g, r_k, ln_w, ln_b]):  # the elementwise part in C
            dy, dr, dk, dv, dg, zg, dr_k, dln_w, dln_b = time_mix_cpu.gated_output_backward(
                dzg, y, r, k, v, g, r_k, ln_w, ln_b, H, eps)
            dw_out = weight_grad(zg)
            dr_k = dr_k.view(r_k.shape) if has_bonus else None
        else:
            B, T, C = y.shape
            N = C // H
            z, _, yn, mean, rstd = _gated_pre(y, r, k, v, r_k, ln_w, ln_b, H, eps, stats=True)
            dw_out = weight_grad(z * g)
            dg = dzg * z if need[4] else None
            dz = dzg.mul_(g)
            dr = dk = dv = dr_k = None
            if has_bonus:
                dz4, v4 = dz.view(B, T, H, N), v.view(B, T, H, N)
                d_bonus = (dz4 * v4).sum(-1, keepdim=True)  # [B, T, H, 1]
                dv = (dz4 * bonus).view(B, T, C)
                rk = (r * k).view(B, T, H, N)
                dr_k = (rk * d_bonus).sum((0, 1)).view(r_k.shape) if need[5] else None
                db4 = (d_bonus * r_k).view(B, T, H, N)
                dr = (db4 * k.view(B, T, H, N)).view(B, T, C)
                dk = (db4 * r.view(B, T, H, N)).view(B, T, C)
            dln_w = channel_sum(dz * yn.view(B, T, C), ln_w.shape) if need[6] else None
            dln_b = channel_sum(dz, ln_b.shape) if need[7] else None
            dy = None
            if need[0]:
                dyn = (dz * ln_w).view(B, T, H, N)
                dy = torch.ops.aten.native_layer_norm_backward(dyn, y.view(B, T, H, N), [N], mean, rstd, None, None,
                                                               [True, False, False])[0].view(B, T, C)
        grads = [None if t is None or not n else t.to(dt) for t, n, dt in zip((dy, dr, dk, dv, dg), need, dtypes)]
        vecs = [None if t is None or not n else t.to(p.dtype) for t, n, p in
                zip((dr_k, dln_w, dln_b), need[5:8], (r_k, ln_w, ln_b))]
        return (*grads, *vecs, dw_out, None, None, None, None, *dparams)


def _gated_pre(y, r, k, v, r_k, ln_w, ln_b, n_head, eps, stats=False):
    """ln_x(y) + bonus * v, bonus = Σ_head r * k * r_k (none when r is None); returns (z, bonus), or with ``stats``
    (z, bonus, yn, mean, rstd). ln_x is a group norm with one group per head. The forward runs aten's group norm, the
    kernel of the spec form's ``nn.GroupNorm``, so both forms give the same bits; the backward's recompute runs it as a
    layer norm over each head's N channels plus the affine (the same values to rounding, 2-3x faster on CPU for these
    shapes), whose statistics feed aten's layer-norm backward."""
    B, T, C = y.shape
    N = C // n_head
    bonus = None if r is None else (r * k).view(B, T, n_head, N).mul_(r_k).sum(-1, keepdim=True)
    if not stats:
        z = torch.ops.aten.native_group_norm(y.reshape(B * T, C), ln_w, ln_b, B * T, C, 1, n_head, eps)[0]
    else:
        yn, mean, rstd = torch.ops.aten.native_layer_norm(y.view(B, T, n_head, N), [N], None, None, eps)
        z = torch.addcmul(ln_b, yn.view(B, T, C), ln_w)
    if bonus is not None:
        z = z.view(B, T, n_head, N).addcmul_(bonus, v.view(B, T, n_head, N))
    z = z.view(B, T, C)
    return (z, bonus, yn, mean, rstd) if stats else (z, bonus)


def gated_output(y, r, k, v, g, r_k, ln_w, ln_b, out, n_head: int, eps: float):
    """``output((group_norm(y) * ln_w + ln_b) + (Σ_head r k r_k) v) * g)``: y, r, k, v, g ``[B, T, C]``, r_k
    ``[H, N]``, ln_w/ln_b ``[C]``; ``out`` the projection: a weight ``[C_out, C]`` (``x @ outᵀ``) or a module (any
    linear layer: LoRA-wrapped, quantized). RWKV-5/6 have no bonus term: r, k, v and r_k None."""
    module, w_out = (None, out) if isinstance(out, torch.Tensor) else (out, None)
    return _GatedOutput.apply(y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head, eps, module, autocast_dtype(y),
                              *module_params(module))
