"""RWKV-4 layers (spec section 2): per-channel WKV with the stable (aa, bb, pp) state, v4 token-shift mix."""

import math

import torch
import torch.nn as nn

from ..config import RWKVConfig
from ..ops import token_shift, wkv4
from . import fused


def _mix(x, prev, mu):
    # v4 convention: the weight multiplies the CURRENT token.
    return x * mu + prev * (1 - mu)


def _ortho(weight, scale, generator):
    rows, cols = weight.shape
    nn.init.orthogonal_(weight, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0), generator=generator)


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

    def forward(self, x, shift, wkv_state, v_first=None, *, backend="auto"):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, 3, C] fp32 (aa, bb, pp stacked).

        Returns (out [B, T, C], new shift, new wkv_state, v_first unchanged)."""
        prev = token_shift(x, shift)
        k = self.key(_mix(x, prev, self.time_mix_k))
        v = self.value(_mix(x, prev, self.time_mix_v))
        r = torch.sigmoid(self.receptance(_mix(x, prev, self.time_mix_r)))
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32  # the recurrence runs in fp32 (or fp64)
        w = -torch.exp(self.time_decay.to(cd))
        y, (aa, bb, pp) = wkv4(w, self.time_first.to(cd), k.to(cd), v.to(cd), wkv_state.unbind(1), backend=backend)
        return self.output(r * y.to(r.dtype)), x[:, -1], torch.stack([aa, bb, pp], dim=1), v_first

    def step_weights(self) -> tuple:
        """What ``time_mix_step`` reads (built by ``RWKV`` once per parameter change, under no_grad)."""
        mus = torch.stack([self.time_mix_k, self.time_mix_v, self.time_mix_r]).unsqueeze(1)
        return (mus, self.time_decay, self.time_first, self.key.weight, self.value.weight, self.receptance.weight,
                self.output.weight)

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

    def forward(self, x, shift):
        prev = token_shift(x, shift)
        k = torch.relu(self.key(_mix(x, prev, self.time_mix_k))).square()  # square: pow is ~6x slower on CPU
        return torch.sigmoid(self.receptance(_mix(x, prev, self.time_mix_r))) * self.value(k), x[:, -1]

    def step_weights(self) -> tuple:
        return self.time_mix_k, self.time_mix_r, self.key.weight, self.receptance.weight, self.value.weight

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


def time_mix_step(x, shift, wkv_state, v_first, residual, weights: tuple, *, inplace: bool = False,
                  pointwise: bool = False):
    """One token of ``TimeMix`` without autograd (the fused decode path of ``RWKV.step``).

    x: [B, C] (ln1 output); shift: [B, C]; wkv_state: [B, 3, C] (aa, bb, pp); residual: [B, C]; weights:
    ``TimeMix.step_weights()``. Returns (residual + out [B, C], new wkv_state, v_first unchanged).
    ``pointwise`` is accepted for a uniform signature (this update is elementwise anyway).
    """
    mus, time_decay, time_first, w_k, w_v, w_r, w_o = weights
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xk, xv, xr = torch.addcmul(shift, x - shift, mus).unbind(0)  # x * mu + x_prev * (1 - mu)
    k, v = fused.linear(xk, w_k).to(cd), fused.linear(xv, w_v).to(cd)
    r = torch.sigmoid(fused.linear(xr, w_r))
    w, u = -torch.exp(time_decay.to(cd)), time_first.to(cd)
    aa, bb, pp = wkv_state.to(cd).unbind(1)
    # The stable WKV-4 recurrence (ops/wkv4/naive.py): output, then the state update.
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = (pp - p).exp_(), (ww - p).exp_()
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + w
    p = torch.maximum(ww, k)
    e1, e2 = (ww - p).exp_(), (k - p).exp_()
    new = torch.stack([e1 * aa + e2 * v, e1 * bb + e2, p], dim=1)
    if inplace:
        new = wkv_state.copy_(new)
    return fused.addmm(residual, r * y.to(r.dtype), w_o), new, v_first


def channel_mix_step(x, shift, residual, weights: tuple):
    """One token of ``ChannelMix`` without autograd: x, shift, residual [B, C]. Returns residual + out [B, C]."""
    mu_k, mu_r, w_key, w_rec, w_value = weights
    xx = x - shift
    k = fused.linear(torch.addcmul(shift, xx, mu_k), w_key).relu_().square_()
    r = torch.sigmoid(fused.linear(torch.addcmul(shift, xx, mu_r), w_rec))
    return torch.addcmul(residual, r, fused.linear(k, w_value))
