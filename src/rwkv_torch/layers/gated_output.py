"""The time mix's output stage as one autograd function (the training form of RWKV-5, 6 and 7): the WKV output
normalised per head (``ln_x``, a group norm), RWKV-7's bonus ``(Σ_head r k r_k) v`` added, times the gate, through
the output projection (spec 3.2, 4.4).

Autograd of the spec form keeps the group norm's input and output, the gated product's two factors and the
projection's input; this keeps the WKV output and the gate only (and RWKV-7's r, k, v, which its other ops keep
anyway). ``ln_x``'s statistics, the bonus, ``z * g`` and the projection's input are recomputed in the backward, on CPU
in one C pass (``time_mix_cpu.gated_output_backward``). The forward runs the spec form's kernels, so both forms give the
same bits.
"""

import torch

from ..ops import time_mix_cpu
from ..ops.mix import c_pass, channel_sum, flat


class _GatedOutput(torch.autograd.Function):
    """(y, r, k, v, g, r_k, ln_x weight and bias, output weight) -> output((ln_x(y) + bonus * v) * g): spec 4.4; r, k,
    v and r_k None for RWKV-5/6 (no bonus, spec 3.2)."""

    @staticmethod
    def forward(ctx, y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head, eps):
        z, bonus = _gated_pre(y, r, k, v, r_k, ln_w, ln_b, n_head, eps)
        out = z.mul_(g) @ w_out.t()
        ctx.save_for_backward(y, r, k, v, g, r_k, ln_w, ln_b, w_out, bonus)
        ctx.n_head, ctx.eps = n_head, eps
        return out

    @staticmethod
    def backward(ctx, d_out):
        y, r, k, v, g, r_k, ln_w, ln_b, w_out, bonus = ctx.saved_tensors
        need = ctx.needs_input_grad
        has_bonus = r is not None
        if c_pass(y, [d_out, r, k, v, g, r_k, ln_w, ln_b, w_out]):  # the elementwise part in C
            dy, dr, dk, dv, dg, zg, dr_k, dln_w, dln_b = time_mix_cpu.gated_output_backward(
                d_out @ w_out, y, r, k, v, g, r_k, ln_w, ln_b, ctx.n_head, ctx.eps)
            dw_out = flat(d_out).t() @ flat(zg) if need[8] else None
            grads = (dy, dr, dk, dv, dg, dr_k.view(r_k.shape) if has_bonus else None, dln_w, dln_b)
            return (*(t if n else None for t, n in zip(grads, need)), dw_out, None, None)
        B, T, C = y.shape
        H, N = ctx.n_head, C // ctx.n_head
        z, _, yn, mean, rstd = _gated_pre(y, r, k, v, r_k, ln_w, ln_b, H, ctx.eps, stats=True)
        dw_out = flat(d_out).t() @ flat(z * g) if need[8] else None
        dzg = d_out @ w_out
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
        return dy, dr, dk, dv, dg, dr_k, dln_w, dln_b, dw_out, None, None


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


def gated_output(y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head: int, eps: float):
    """``((group_norm(y) * ln_w + ln_b) + (Σ_head r k r_k) v) * g @ w_outᵀ``: y, r, k, v, g ``[B, T, C]``,
    r_k ``[H, N]``, ln_w/ln_b ``[C]``, w_out ``[C, C]``. RWKV-5/6 have no bonus term: r, k, v and r_k None."""
    return _GatedOutput.apply(y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head, eps)
