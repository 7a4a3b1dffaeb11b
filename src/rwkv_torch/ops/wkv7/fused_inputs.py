"""RWKV-7's WKV inputs from the key projection and the decay and in-context-rate LoRAs, as one autograd function
with a hand-written backward: a piece of the time mix's training form (``layers/rwkv7.py``, ``TimeMix.forward``).

Autograd of the spec form keeps every intermediate of ``w``, ``kk``, ``k`` and ``b``; this keeps only the key
projection, ``a`` and the norm of ``k * k_k`` per head, plus its own outputs ``w`` and ``-kk``, which the WKV op
keeps anyway (one storage for both). The backward is one C pass on CPU (``time_mix_cpu.wkv_inputs_backward``) or a few
torch passes with in-place updates where a value is not needed again.

Dtypes: the values are computed in the compute dtype (``compute_dtype``: float32, float64 for float64) and returned
(and kept) in the key projection's dtype, so bf16 inputs (bf16 autocast) give bf16 outputs rounded once from
float32, the WKV op keeps the same storages, and the backward widens what it reads back to float32 (the C pass runs
on float32/float64 only).
"""

import math

import torch

from .. import time_mix_cpu
from .._common import compute_dtype
from ..mix import c_pass, channel_sum

DECAY_SCALE = math.exp(-0.5)  # the log decay is -DECAY_SCALE * sigmoid(w_raw) (spec 4.2, layers/rwkv7.py)
NORM_EPS = 1e-12  # F.normalize's default, as in the spec form


class _WKVInputs(torch.autograd.Function):
    """(k0, w_raw, a_raw, k_k, k_a) -> (w, k, -kk, kk * a): spec 4.2-4.3."""

    @staticmethod
    def forward(ctx, k0, w_raw, a_raw, k_k, k_a, n_head):
        B, T, C = k0.shape
        io, cd = k0.dtype, compute_dtype(k0.dtype)
        kc = k0.to(cd)
        w = torch.sigmoid(w_raw.to(cd)).mul_(-DECAY_SCALE)
        a = torch.sigmoid(a_raw.to(cd))
        kh = (kc * k_k).view(B, T, n_head, C // n_head)
        norm = torch.linalg.vector_norm(kh, dim=-1, keepdim=True)
        kk = kh.div_(norm.clamp_min(NORM_EPS)).view(B, T, C)
        k = kc * torch.addcmul(1 - k_a, a, k_a)  # k0 * (1 + (a - 1) * k_a)
        minus_kk = (-kk).to(io)
        b = kk.mul_(a).to(io)
        w, k, a = w.to(io), k.to(io), a.to(io)
        ctx.save_for_backward(k0, a, norm, w, minus_kk, k_k, k_a)
        ctx.n_head, ctx.dtypes = n_head, (io, w_raw.dtype, a_raw.dtype)
        return w, k, minus_kk, b

    @staticmethod
    def backward(ctx, dw, dk, d_minus_kk, db):
        k0, a, norm, w, minus_kk, k_k, k_a = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, C = k0.shape
        H, cd = ctx.n_head, norm.dtype
        zero = lambda g: torch.zeros_like(k0, dtype=cd) if g is None else g.to(cd)  # noqa: E731
        dw, dk, d_minus_kk, db = map(zero, (dw, dk, d_minus_kk, db))
        k0, a, w, minus_kk = (t.to(cd) for t in (k0, a, w, minus_kk))  # widened copies where they were narrower
        if c_pass(k0, [dw, dk, d_minus_kk, db, a, norm, w, minus_kk, k_k, k_a]):  # in C, one pass
            dk0, dw_raw, da_raw, dk_k, dk_a = time_mix_cpu.wkv_inputs_backward(
                dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, DECAY_SCALE, NORM_EPS)
            dk_k, dk_a = dk_k.view(k_k.shape), dk_a.view(k_a.shape)
        else:
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
        dtypes = (*ctx.dtypes, k_k.dtype, k_a.dtype)
        grads = (dk0, dw_raw, da_raw, dk_k, dk_a)
        return (*(t.to(dt) if n and t is not None else None for t, n, dt in zip(grads, need, dtypes)), None)


def wkv_inputs(k0, w_raw, a_raw, k_k, k_a, n_head: int):
    """The WKV-7 inputs from the key projection and the decay and in-context-rate LoRAs (all ``[B, T, C]``):
    ``w = -e^{-1/2} sigmoid(w_raw)``, ``k = k0 (1 + (sigmoid(a_raw) - 1) k_a)``, and ``-kk``, ``kk * a`` with
    ``kk = normalize(k0 * k_k)`` per head. Returns ``(w, k, -kk, kk * a)`` in k0's dtype, computed in float32 (float64
    for float64)."""
    return _WKVInputs.apply(k0, w_raw, a_raw, k_k, k_a, n_head)
