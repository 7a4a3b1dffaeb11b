"""The RWKV-7 time mix's elementwise groups as autograd functions with hand-written backwards (the training form).

``TimeMix.forward`` in ``rwkv7.py`` is the spec form: one op per term, autograd keeping every intermediate (about 28
``[B, T, C]`` tensors per layer). For training with plain weights it runs this form instead, which computes the same
values (tested against the spec form in float64: outputs, states and every gradient) and keeps only:

* ``wkv_inputs`` (here): the key projection, ``a`` and the norm of ``k * k_k`` per head, plus its own outputs ``w``
  and ``-kk``, which the WKV op keeps anyway (one storage for both);
* ``gated_output`` (``gated_output.py``, shared with RWKV-5/6): the WKV output and the gate.

The lerps feeding the projections keep ``x`` only (``ops.mix.shift_mix_linear``). Each backward is a few passes over
``[B, T, C]`` with in-place updates where a value is not needed again.
"""

import math

import torch

from ..ops import time_mix_cpu
from ..ops.mix import c_pass, channel_sum

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
            dk0, dw_raw, da_raw, dk_k, dk_a = time_mix_cpu.wkv_inputs_backward(
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
