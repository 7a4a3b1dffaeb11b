"""The RWKV-7 time mix's elementwise groups as autograd functions with hand-written backwards (the training form).

``TimeMix.forward`` in ``rwkv7.py`` is the spec form: one op per term, autograd keeping every intermediate (about 28
``[B, T, C]`` tensors per layer). For training with plain weights it runs this form instead, which computes the same
values (tested against the spec form in float64: outputs, states and every gradient) and keeps only:

* ``wkv_inputs``: the key projection, ``a`` and the norm of ``k * k_k`` per head, plus its own outputs ``w`` and
  ``-kk``, which the WKV op keeps anyway (one storage for both);
* ``gated_output``: the WKV output and the gate; ``ln_x``'s statistics, the bonus term, ``z * g`` and the output
  projection's input are recomputed in the backward (one per-head layer norm and three multiplies).

The lerps feeding the projections keep ``x`` only (``ops.mix.shift_mix_linear``). Each backward is a few passes over
``[B, T, C]`` with in-place updates where a value is not needed again.
"""

import math

import torch

from ..ops import cpu_kernel
from ..ops.mix import c_pass, channel_sum, flat

DECAY_SCALE = math.exp(-0.5)  # the log decay is -DECAY_SCALE * sigmoid(w_raw) (rwkv7.py)
NORM_EPS = 1e-12  # F.normalize's default, as in the spec form


class _WKVInputs(torch.autograd.Function):
    """(k0, w_raw, a_raw, k_k, k_a) -> (w, k, -kk, kk * a): spec 4.2-4.3."""

    @staticmethod
    def forward(ctx, k0, w_raw, a_raw, k_k, k_a, n_head):
        B, T, C = k0.shape
        w = torch.sigmoid(w_raw).mul_(-DECAY_SCALE)
        a = torch.sigmoid(a_raw)
        kh = (k0 * k_k).view(B, T, n_head, C // n_head)
        norm = torch.linalg.vector_norm(kh, dim=-1, keepdim=True)
        kk = kh.div_(norm.clamp_min(NORM_EPS)).view(B, T, C)
        k = k0 * torch.addcmul(1 - k_a, a, k_a)  # k0 * (1 + (a - 1) * k_a)
        minus_kk = -kk
        ctx.save_for_backward(k0, a, norm, w, minus_kk, k_k, k_a)
        ctx.n_head = n_head
        return w, k, minus_kk, kk.mul_(a)

    @staticmethod
    def backward(ctx, dw, dk, d_minus_kk, db):
        k0, a, norm, w, minus_kk, k_k, k_a = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, C = k0.shape
        H = ctx.n_head
        zero = lambda g: torch.zeros_like(k0) if g is None else g  # noqa: E731
        dw, dk, d_minus_kk, db = map(zero, (dw, dk, d_minus_kk, db))
        if c_pass(k0, [dw, dk, d_minus_kk, db, a, norm, w, minus_kk, k_k, k_a]):  # in C, one pass
            dk0, dw_raw, da_raw, dk_k, dk_a = cpu_kernel.wkv_inputs_backward(
                dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, DECAY_SCALE, NORM_EPS)
            grads = (dk0, dw_raw, da_raw, dk_k.view(k_k.shape), dk_a.view(k_a.shape))
            return (*(t if n else None for t, n in zip(grads, need)), None)
        kk = minus_kk.neg()
        # w = -s sigmoid(w_raw): dw_raw = dw (-s) sig (1 - sig) = dw w (1 - sig), with sig = -w / s
        dw_raw = (w / DECAY_SCALE).add_(1).mul_(w).mul_(dw) if need[1] else None
        # b = kk a, a_wkv = -kk, k = k0 (1 + (a - 1) k_a)
        dk0 = dk * torch.addcmul(1 - k_a, a, k_a)
        dk_a = channel_sum(dk * k0 * (a - 1), k_a.shape) if need[4] else None
        da_raw = (db * kk).addcmul_(dk, k0 * k_a).mul_(a * (1 - a)) if need[2] else None
        # kk = kh / max(|kh|, eps), kh = k0 k_k per head: dkh = (dkk - [|kh| > eps] kk <dkk, kk>) / max(|kh|, eps)
        dkk = (db * a).sub_(d_minus_kk).view(B, T, H, C // H)
        kk4 = kk.view(B, T, H, C // H)
        proj = (dkk * kk4).sum(-1, keepdim=True).mul_(norm > NORM_EPS)
        dkh = dkk.sub_(kk4 * proj).div_(norm.clamp_min(NORM_EPS)).view(B, T, C)
        dk_k = channel_sum(dkh * k0, k_k.shape) if need[3] else None
        dk0.addcmul_(dkh, k_k)
        return dk0, dw_raw, da_raw, dk_k, dk_a, None


def wkv_inputs(k0, w_raw, a_raw, k_k, k_a, n_head: int):
    """The WKV-7 inputs from the key projection and the decay and in-context-rate LoRAs (all ``[B, T, C]``):
    ``w = -e^{-1/2} sigmoid(w_raw)``, ``k = k0 (1 + (sigmoid(a_raw) - 1) k_a)``, and ``-kk``, ``kk * a`` with
    ``kk = normalize(k0 * k_k)`` per head. Returns ``(w, k, -kk, kk * a)``."""
    return _WKVInputs.apply(k0, w_raw, a_raw, k_k, k_a, n_head)


class _GatedOutput(torch.autograd.Function):
    """(y, r, k, v, g, r_k, ln_x weight and bias, output weight) -> output((ln_x(y) + bonus * v) * g): spec 4.4."""

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
        if c_pass(y, [d_out, r, k, v, g, r_k, ln_w, ln_b, w_out]):  # the elementwise part in C
            dy, dr, dk, dv, dg, zg, dr_k, dln_w, dln_b = cpu_kernel.gated_output_backward(
                d_out @ w_out, y, r, k, v, g, r_k, ln_w, ln_b, ctx.n_head, ctx.eps)
            dw_out = flat(d_out).t() @ flat(zg) if need[8] else None
            grads = (dy, dr, dk, dv, dg, dr_k.view(r_k.shape), dln_w, dln_b)
            return (*(t if n else None for t, n in zip(grads, need)), dw_out, None, None)
        B, T, C = y.shape
        H, N = ctx.n_head, C // ctx.n_head
        z, _, yn, mean, rstd = _gated_pre(y, r, k, v, r_k, ln_w, ln_b, H, ctx.eps, stats=True)
        dw_out = flat(d_out).t() @ flat(z * g) if need[8] else None
        dzg = d_out @ w_out
        dg = dzg * z if need[4] else None
        dz = dzg.mul_(g)
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
    """ln_x(y) + bonus * v, bonus = Σ_head r * k * r_k; returns (z, bonus), or with ``stats`` (z, bonus, yn, mean,
    rstd). ln_x is a group norm with one group per head. The forward runs aten's group norm, the kernel of the spec
    form's ``nn.GroupNorm``, so both forms give the same bits; the backward's recompute runs it as a layer norm over
    each head's N channels plus the affine (the same values to rounding, 2-3x faster on CPU for these shapes), whose
    statistics feed aten's layer-norm backward."""
    B, T, C = y.shape
    N = C // n_head
    bonus = (r * k).view(B, T, n_head, N).mul_(r_k).sum(-1, keepdim=True)
    if not stats:
        z = torch.ops.aten.native_group_norm(y.reshape(B * T, C), ln_w, ln_b, B * T, C, 1, n_head, eps)[0]
        return z.view(B, T, n_head, N).addcmul_(bonus, v.view(B, T, n_head, N)).view(B, T, C), bonus
    yn, mean, rstd = torch.ops.aten.native_layer_norm(y.view(B, T, n_head, N), [N], None, None, eps)
    z = torch.addcmul(ln_b, yn.view(B, T, C), ln_w).view(B, T, n_head, N).addcmul_(bonus, v.view(B, T, n_head, N))
    return z.view(B, T, C), bonus, yn, mean, rstd


def gated_output(y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head: int, eps: float):
    """``((group_norm(y) * ln_w + ln_b) + (Σ_head r k r_k) v) * g @ w_outᵀ``: y, r, k, v, g ``[B, T, C]``,
    r_k ``[H, N]``, ln_w/ln_b ``[C]``, w_out ``[C, C]``."""
    return _GatedOutput.apply(y, r, k, v, g, r_k, ln_w, ln_b, w_out, n_head, eps)
