"""RWKV-4 layers (spec section 2): per-channel WKV with the stable (aa, bb, pp) state, v4 token-shift mix."""

import math

import torch
import torch.nn as nn

from ..config import RWKVConfig
from ..ops import token_shift
from ..ops._common import compute_dtype
from ..ops.mix import plain_form, shift_mix_linear, squared_relu_linear
from ..ops.token_shift import last_token
from ..ops.wkv4 import wkv4_unchecked
from ._init import orthogonal_scaled as _ortho


def v4_mix(x, prev, mu):
    """v4 convention: the weight multiplies the CURRENT token, x mu + prev (1 - mu) (the official expression),
    computed as x + (prev - x)(1 - mu): the lerp of ``ops.mix.shift_mix_linear``, so that the training form and
    wrapped projections (LoRA at B = 0) give the same bits as this form."""
    return torch.addcmul(x, prev - x, 1 - mu)


def uses_training_form(x, *projections) -> bool:
    """Whether to run the lerps and projections through ``ops.mix`` (which keeps x only for the backward): under
    autograd with plain ``nn.Linear`` projections; wrapped projections (LoRA, quantized) and inference run one op at
    a time."""
    return not plain_form(x) and all(type(m) is nn.Linear for m in projections)


def v4_mix_linear(x, shift, mus, projections, cu_seqlens):
    """``v4_mix(x, prev, mu) @ W.T`` for each pair through ``ops.mix.shift_mix_linear``."""
    return shift_mix_linear(x, shift, [1 - mu for mu in mus], [m.weight for m in projections], cu_seqlens=cu_seqlens)


def _wkv4(w, u, k, v, wkv_state, backend, cu_seqlens=None):
    """wkv4 on the stacked state [B or S, 3, C]; with cu_seqlens (B = 1) one call per sequence: the op has no packed
    form, and zero padding is not neutral for its state (the decay and the e^k terms act on every step)."""
    if cu_seqlens is None:
        y, (aa, bb, pp) = wkv4_unchecked(w, u, k, v, wkv_state.unbind(1), backend=backend)
        return y, torch.stack([aa, bb, pp], dim=1)
    cs = cu_seqlens.tolist()  # on CUDA a read-back per layer, as in the wkv6/wkv7 ops
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cs[:-1], cs[1:])):
        if s == e:  # an empty sequence keeps its state
            finals.append(wkv_state[i : i + 1])
            continue
        y, (aa, bb, pp) = wkv4_unchecked(w, u, k[:, s:e], v[:, s:e], wkv_state[i : i + 1].unbind(1), backend=backend)
        outs.append(y)
        finals.append(torch.stack([aa, bb, pp], dim=1))
    return torch.cat(outs, dim=1), torch.cat(finals)


class TimeMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        for name in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x, shift, wkv_state, v_first=None, *, backend="auto", cu_seqlens=None):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, 3, C] fp32 (aa, bb, pp stacked).

        Returns (out [B, T, C], new shift, new wkv_state, v_first unchanged)."""
        if uses_training_form(x, self.key, self.value, self.receptance):
            k, v, r = v4_mix_linear(x, shift, (self.time_mix_k, self.time_mix_v, self.time_mix_r),
                                  (self.key, self.value, self.receptance), cu_seqlens)
            r = torch.sigmoid(r)
        else:
            prev = token_shift(x, shift, cu_seqlens=cu_seqlens)
            k = self.key(v4_mix(x, prev, self.time_mix_k))
            v = self.value(v4_mix(x, prev, self.time_mix_v))
            r = torch.sigmoid(self.receptance(v4_mix(x, prev, self.time_mix_r)))
        cd = compute_dtype(x.dtype)  # the recurrence runs in fp32 (or fp64)
        w = -torch.exp(self.time_decay.to(cd))
        y, wkv_state = _wkv4(w, self.time_first.to(cd), k.to(cd), v.to(cd), wkv_state, backend, cu_seqlens)
        return self.output(r * y.to(r.dtype)), last_token(x, shift, cu_seqlens=cu_seqlens), wkv_state, v_first

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        """The official from-scratch init (spec 2.5)."""
        C, l = self.key.weight.shape[0], self.layer_id
        r0 = l / (num_layers - 1) if num_layers > 1 else 0.0
        r1 = 1.0 - l / num_layers
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        self.time_decay.copy_(-5 + 8 * (n / (C - 1) if C > 1 else n) ** (0.7 + 1.3 * r0))
        self.time_first.copy_(math.log(0.3) + 0.5 * ((n + 1) % 3 - 1))
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_v.copy_(ddd**r1 + 0.3 * r0)
        self.time_mix_r.copy_(ddd ** (0.5 * r1))
        _ortho(self.value.weight, 1.0, generator)
        for lin in (self.key, self.receptance, self.output):
            lin.weight.zero_()


class ChannelMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, F = config.hidden_size, config.ffn_dim
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, F, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F, C, bias=False)

    def forward(self, x, shift, *, cu_seqlens=None):
        last = last_token(x, shift, cu_seqlens=cu_seqlens)
        if uses_training_form(x, self.key, self.receptance, self.value):
            # keeping x and key's output only for the backward, as RWKV-6/7's channel mix (ops/mix.py)
            z, r = v4_mix_linear(x, shift, (self.time_mix_k, self.time_mix_r), (self.key, self.receptance), cu_seqlens)
            return torch.sigmoid(r) * squared_relu_linear(z, self.value.weight), last
        prev = token_shift(x, shift, cu_seqlens=cu_seqlens)
        k = torch.relu(self.key(v4_mix(x, prev, self.time_mix_k))).square()  # square: pow is ~6x slower on CPU
        return torch.sigmoid(self.receptance(v4_mix(x, prev, self.time_mix_r))) * self.value(k), last

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        C = self.receptance.weight.shape[0]
        r1 = 1.0 - self.layer_id / num_layers
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_r.copy_(ddd**r1)
        _ortho(self.key.weight, 1.0, generator)
        self.receptance.weight.zero_()
        self.value.weight.zero_()
