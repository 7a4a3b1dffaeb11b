"""Token-shift mixing and RWKV's squared-ReLU activation, with hand-written backwards that keep few tensors.

``shift_mix_linear``: the lerps ``x + (x_prev - x) * mu_i`` of a time mix, each fed straight into its projection.
Autograd of the plain form keeps every lerp output (the input of its linear) plus ``xx``: seven ``[B, T, C]`` tensors
per RWKV-7 layer. Here only ``x`` (and the carried shift row) is kept; the backward rebuilds ``xx`` and each lerp (one
``addcmul`` each) where its weight gradient needs it, and uses each output's gradient where it arrives:
``dx = Σ dxm_i``, ``dxx = Σ dxm_i mu_i``, ``dmu_i = Σ_{b,t} dxm_i xx``. On CPU those three reductions are one C pass
over the ``dxm_i`` (``mix_cpu.mix_backward``; about ten torch passes per lerp otherwise, the fallback where the C
kernels cannot be built).

``squared_relu_linear``: ``relu(z)² Wᵀ`` keeping z only; on CPU the activation is one C pass forward and one
backward (``mix_cpu.squared_relu``: the square recomputed and z's gradient made in the same pass).
"""

import torch
import torch.nn.functional as F

from . import cpu_lib
from .mix_cpu import data_mix_backward, mix_backward, squared_relu, squared_relu_backward
from .packing import offsets_tensor
from .token_shift import token_shift, token_shift_backward


def plain_form(x: torch.Tensor) -> bool:
    """Whether to run the plain composition of ops instead of a hand-written backward: without autograd, under
    autocast (whose dtype the backward would not follow) and while tracing (ONNX export sees standard ops)."""
    return not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or torch.jit.is_tracing()


def flat(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` as ``[rows, C]``: the operand layout of a weight gradient."""
    return t.reshape(-1, t.shape[-1])


def channel_sum(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum over every axis but the channels, viewed as ``shape``: the gradient of a per-channel parameter."""
    return flat(t).sum(0).view(shape)


class _ShiftMixLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, cu_seqlens, which, *tensors):
        n = len(tensors) - len(which)  # distinct mixing vectors (autograd takes each tensor once), then the weights
        mus, weights = [tensors[i] for i in which], tensors[n:]
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
        outs = tuple(torch.addcmul(x, xx, mu) @ w.t() for mu, w in zip(mus, weights))
        ctx.save_for_backward(x, shift, cu_seqlens, *tensors)
        ctx.which, ctx.n = which, n
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, shift, cu, *tensors = ctx.saved_tensors
        which, n = ctx.which, ctx.n
        weights = tensors[n:]
        need = ctx.needs_input_grad
        xx = token_shift(x, shift, cu_seqlens=cu) - x
        dws = [None] * len(weights)
        used, dxms = [], []  # the lerps whose output has a gradient, and their input gradients
        for i, (g, m, w) in enumerate(zip(grads, which, weights)):
            if g is None:
                continue
            if need[4 + n + i]:
                dws[i] = flat(g).t() @ flat(torch.addcmul(x, xx, tensors[m]))
            used.append(m)
            dxms.append(g @ w)
        if not dxms:
            return (None,) * (4 + n + len(weights))
        dx, dxx, dmus = lerps_backward(x, xx, tensors[:n], used, dxms, need[4:4 + n])
        d_shift = None
        if need[0] or need[1]:
            dx, d_shift = through_token_shift(dx, dxx, cu)
        return (dx if need[0] else None, d_shift if need[1] else None, None, None, *dmus, *dws)


def lerps_backward(x: torch.Tensor, xx: torch.Tensor, mus, used, dxms, need_mu) -> tuple:
    """The lerps ``x + xx * mus[m]`` backwards from their input gradients ``dxms`` (one per lerp, ``used[i]`` the
    index of its mixing vector in ``mus``): ``(dx - dxx, dxx, dmus)``, with ``dmus[m]`` summed over the lerps sharing
    ``mus[m]`` (None where ``need_mu[m]`` is False or no lerp used it). On CPU one C pass over the ``dxm``
    (``mix_cpu.mix_backward``), else torch ops."""
    dmus = [None] * len(mus)
    used_mus = [mus[m] for m in used]
    if c_pass(x, [*dxms, *used_mus]):  # dx - dxx, dxx and every dmu from one read of each dxm (csrc/mix_cpu.c)
        dx, dxx, dmu_rows = mix_backward(dxms, used_mus, xx)
        for m, dmu in zip(used, dmu_rows):
            if need_mu[m]:
                dmu = dmu.view(mus[m].shape)
                dmus[m] = dmu if dmus[m] is None else dmus[m] + dmu
        return dx, dxx, dmus
    dx = dxx = None
    for m, mu, dxm in zip(used, used_mus, dxms):
        if need_mu[m]:
            dmu = channel_sum(dxm * xx, mu.shape)
            dmus[m] = dmu if dmus[m] is None else dmus[m].add_(dmu)
        dx = dxm if dx is None else dx.add_(dxm)
        dxx = dxm * mu if dxx is None else dxx.addcmul_(dxm, mu)
    return dx.sub_(dxx), dxx, dmus


def through_token_shift(dx: torch.Tensor, dxx: torch.Tensor, cu_seqlens) -> tuple:
    """The gradients of x and of the shift row from ``dx`` (x's direct gradient, with the ``- x`` of
    ``xx = x_prev - x`` already taken out) and ``dxx``, whose ``x_prev`` part is shifted back (``dx`` is updated in
    place)."""
    dx_prev, d_shift = token_shift_backward(dxx, cu_seqlens=cu_seqlens)
    return dx.add_(dx_prev), d_shift


def c_pass(x: torch.Tensor, others=()) -> bool:
    """Whether an elementwise pass of the training forms runs in C (``csrc/mix_cpu.c`` here, ``csrc/time_mix_cpu.c``
    for the time mix's training form, ``time_mix_cpu.py``): x and the ``others`` float32/float64 CPU tensors of one
    dtype (None entries skipped), with the C kernels built (``cpu_lib.available``)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and all(t is None or t.dtype == x.dtype for t in others) and cpu_lib.available())


def shift_mix_linear(x: torch.Tensor, shift: torch.Tensor | None, mus, weights, *,
                     cu_seqlens: torch.Tensor | None = None) -> tuple:
    """``(x + (token_shift(x, shift) - x) * mu) @ w.T`` for each pair of ``mus`` (``[C]``) and ``weights``
    (``[O_i, C]``, an ``nn.Linear`` weight; pass ``p.t()`` for a ``[C, O]`` matrix). x ``[B, T, C]``, shift and
    ``cu_seqlens`` as in ``token_shift``. Differentiable in x, shift, every mu and weight; with autograd it keeps x
    and shift only (the lerps are rebuilt in the backward); see ``plain_form`` for when it is the plain composition."""
    mus, weights = tuple(mus), tuple(weights)
    if len(mus) != len(weights):
        raise ValueError(f"one weight per mixing vector: got {len(mus)} and {len(weights)}")
    if plain_form(x) or not any(t is not None and t.requires_grad for t in (x, shift, *mus, *weights)):
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
        return tuple(torch.addcmul(x, xx, mu) @ w.t() for mu, w in zip(mus, weights))
    distinct = list({id(mu): mu for mu in mus}.values())  # a vector may feed several projections
    which = tuple(next(j for j, d in enumerate(distinct) if d is mu) for mu in mus)
    cu = None if cu_seqlens is None else offsets_tensor(cu_seqlens)  # saved for the backward: the tensor
    return _ShiftMixLinear.apply(x, shift, cu, which, *distinct, *weights)


class _SquaredReluLinear(torch.autograd.Function):
    """``relu(z)² Wᵀ``, saving only z: the activation is recomputed in the backward (on CPU one C pass each way,
    ``mix_cpu.squared_relu``; torch ops otherwise, with the same bits)."""

    @staticmethod
    def forward(ctx, z, weight):
        ctx.save_for_backward(z, weight)
        return _squared_relu(z) @ weight.t()

    @staticmethod
    def backward(ctx, g):
        z, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz = None
        if not need[0]:
            s = _squared_relu(z)
        elif c_pass(z, [g, weight]):  # d relu(z)² / dz = 2 relu(z), applied in place, the square made in that pass
            dz = g @ weight
            s = squared_relu_backward(z.contiguous(), dz)
        else:
            r = torch.relu(z)
            s = r * r
            dz = (g @ weight).mul_(r).mul_(2)
        dw = flat(g).t() @ flat(s) if need[1] else None
        return dz, dw


def _squared_relu(z: torch.Tensor) -> torch.Tensor:
    if c_pass(z):
        return squared_relu(z.contiguous())
    r = torch.relu(z)
    return r.mul_(r)  # mul, not square: pow is several times slower on CPU


def squared_relu_linear(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The second half of RWKV's feed-forward, ``relu(z)² @ weightᵀ`` (z ``[..., F]``, weight ``[C, F]``). With
    autograd it keeps z only (not also the activation and its square); under autocast (``plain_form``) it is the
    plain composition, so the projection runs in the autocast dtype as any ``nn.Linear``."""
    if plain_form(z) or not any(t.requires_grad for t in (z, weight)):
        r = torch.relu(z)
        return F.linear(r * r, weight)
    return _SquaredReluLinear.apply(z, weight)


class _DataLerpLinear(torch.autograd.Function):
    """RWKV-6's data-dependent lerps, each fed into its projection: ``out_j = (x + xx (mu_j + m_j)) @ W_jᵀ`` with
    ``m = einsum(z, w2)`` (the mixing LoRA's second half). Keeps x, the shift row and z (which the LoRA's tanh keeps
    anyway); m, the lerps and xx are recomputed in the backward, whose elementwise part is one C pass on CPU
    (``mix_cpu.data_mix_backward``) when every output has a gradient."""

    @staticmethod
    def forward(ctx, x, shift, cu_seqlens, z, w2, n, *tensors):
        outs = _data_lerps(x, shift, cu_seqlens, z, w2, tensors[:n], tensors[n:])
        ctx.save_for_backward(x, shift, cu_seqlens, z, w2, *tensors)
        ctx.n = n
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, shift, cu, z, w2, *tensors = ctx.saved_tensors
        n, need = ctx.n, ctx.needs_input_grad
        mus, weights = tensors[:n], tensors[n:]
        xx = token_shift(x, shift, cu_seqlens=cu) - x
        mix = _lora_mix(z, w2).contiguous()  # [J, B, T, C], each row made mu_j + m_j (then the lerp) below
        dmus, dws = [None] * n, [None] * n
        if all(g is not None for g in grads) and c_pass(x, [*grads, *mus, *weights, z, w2]):
            # csrc/mix_cpu.c: one pass from the d_j = g_j W_j and the offsets to dm_j = d_j xx and the lerps
            d = x.new_empty(mix.shape)
            for j, (g, w) in enumerate(zip(grads, weights)):
                torch.matmul(g, w, out=d[j])
            dx, dxx, dmu, dm, lerps = data_mix_backward(d, mix, mus, x, xx)
            for j, (g, mu) in enumerate(zip(grads, mus)):
                dws[j] = flat(g).t() @ flat(lerps[j]) if need[6 + n + j] else None
                dmus[j] = dmu[j].view(mu.shape) if need[6 + j] else None
        else:
            dm = torch.zeros_like(mix)
            dx = dxx = None
            for j, (g, mu, w) in enumerate(zip(grads, mus, weights)):
                if g is None:
                    continue
                mj = mix[j].add_(mu)
                if need[6 + n + j]:
                    dws[j] = flat(g).t() @ flat(torch.addcmul(x, xx, mj))
                dl = g @ w
                torch.mul(dl, xx, out=dm[j])
                if need[6 + j]:
                    dmus[j] = channel_sum(dm[j], mu.shape)
                dx = dl.clone() if dx is None else dx.add_(dl)
                dxx = dl.mul_(mj) if dxx is None else dxx.add_(dl.mul_(mj))
            if dx is None:
                return (None,) * (6 + 2 * n)
            dx = dx.sub_(dxx)
        dz = torch.einsum("jbtc,jdc->btjd", dm, w2) if need[3] else None
        dw2 = torch.einsum("btjd,jbtc->jdc", z, dm) if need[4] else None
        dx, d_shift = through_token_shift(dx, dxx, cu)
        return (dx if need[0] else None, d_shift if need[1] else None, None, dz, dw2, None, *dmus, *dws)


def _lora_mix(z: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The mixing LoRA's per-lerp offsets: z ``[B, T, J, D]``, w2 ``[J, D, C]`` -> ``[J, B, T, C]``."""
    return torch.einsum("btjd,jdc->jbtc", z, w2)


def _data_lerps(x, shift, cu_seqlens, z, w2, mus, weights) -> tuple:
    """The plain composition of ``data_lerp_linear`` (its forward, and the form without autograd)."""
    xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
    m = _lora_mix(z, w2)
    return tuple(torch.addcmul(x, xx, mu + m[j]) @ w.t() for j, (mu, w) in enumerate(zip(mus, weights)))


def data_lerp_linear(x: torch.Tensor, shift: torch.Tensor | None, z: torch.Tensor, w2: torch.Tensor, mus, weights, *,
                     cu_seqlens: torch.Tensor | None = None) -> tuple:
    """RWKV-6's token-shift lerps with data-dependent weights, each into its projection (spec 3.2):
    ``(x + xx (mu_j + m_j)) @ W_jᵀ`` for j = 0..J-1, with ``xx = token_shift(x, shift) - x`` and ``m = einsum("btjd,
    jdc->jbtc", z, w2)``. x ``[B, T, C]``, z ``[B, T, J, D]``, w2 ``[J, D, C]``, mus J ``[C]`` vectors, weights J
    ``[O_j, C]`` matrices. With autograd it keeps x, the shift row and z only (``plain_form``: the plain composition
    of ops, which computes the same bits)."""
    mus, weights = tuple(mus), tuple(weights)
    if not len(mus) == len(weights) == z.shape[2] == w2.shape[0]:
        raise ValueError(f"one mixing vector and one weight per LoRA row: got {len(mus)}, {len(weights)}, z "
                         f"{tuple(z.shape)} and w2 {tuple(w2.shape)}")
    tensors = (x, shift, z, w2, *mus, *weights)
    if plain_form(x) or not any(t is not None and t.requires_grad for t in tensors):
        return _data_lerps(x, shift, cu_seqlens, z, w2, mus, weights)
    cu = None if cu_seqlens is None else offsets_tensor(cu_seqlens)  # saved for the backward: the tensor
    return _DataLerpLinear.apply(x, shift, cu, z, w2, len(mus), *mus, *weights)
