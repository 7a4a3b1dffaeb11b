"""RWKV-5 (x052) layers (x052 notes in ops/wkv6/README.md), official init: the WKV-6 op (state ``[B, H, N_k, N_v]``)
with a static per-head-channel decay and the v4-style token-shift mix ``x * μ + x_prev * (1 - μ)``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RWKVConfig
from ..ops import token_shift
from ..ops._common import compute_dtype
from ..ops.token_shift import last_token
from ..ops.wkv6 import wkv6_unchecked
from . import rwkv4
from .rwkv4 import uses_training_form, v4_mix, v4_mix_linear  # the v4/v5 mix: the weight multiplies the current token
from .rwkv6 import add_projections, init_projections, layer_ratios, project_output


class TimeMix(nn.Module):
    """RWKV-5 time mixing; names follow the official checkpoints."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        add_projections(self, C, H)

    def forward(self, x, shift, wkv_state, v_first=None, *, backend="auto", cu_seqlens=None):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, H, N_k, N_v] fp32.

        Returns (out [B, T, C], new shift, new wkv_state, v_first unchanged)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        mus = (self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g)
        projections = (self.key, self.value, self.receptance, self.gate)
        if uses_training_form(x, *projections):  # the lerps rebuilt in the backward (ops/mix.py), as in RWKV-4
            k, v, r, g = v4_mix_linear(x, shift, mus, projections, cu_seqlens)
        else:
            prev = token_shift(x, shift, cu_seqlens=cu_seqlens)
            k, v, r, g = (proj(v4_mix(x, prev, mu)) for mu, proj in zip(mus, projections))
        log_decay = (-torch.exp(self.time_decay.to(compute_dtype(x.dtype)))).view(1, 1, C).expand(B, T, C)
        g = F.silu(g)
        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        y, wkv_state = wkv6_unchecked(heads(r), heads(log_decay.to(r.dtype)), heads(k), heads(v),
                                      self.time_faaaa.to(r.dtype), wkv_state, backend=backend, cu_seqlens=cu_seqlens)
        out = project_output(self, y.reshape(B, T, C), g)
        return out, last_token(x, shift, cu_seqlens=cu_seqlens), wkv_state, v_first

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        """The official from-scratch init (the x052 code)."""
        C = self.receptance.weight.shape[0]
        r0, r1 = layer_ratios(self.layer_id, num_layers)
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        span = n / (C - 1) if C > 1 else n
        decay = -6 + 5 * span ** (0.7 + 1.3 * r0)
        self.time_faaaa.copy_((r0 * (1 - span) + 0.1 * ((n + 1) % 3 - 1)).view_as(self.time_faaaa))
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_v.copy_(ddd**r1 + 0.3 * r0)
        self.time_mix_r.copy_(ddd ** (0.5 * r1))
        self.time_mix_g.copy_(ddd ** (0.5 * r1))
        self.time_decay.copy_(decay.view_as(self.time_decay))
        init_projections(self, num_layers, generator)


class ChannelMix(rwkv4.ChannelMix):
    """RWKV-5 feed-forward: RWKV-4's (relu² key, sigmoid receptance gate, the v4-style mix), with the x052 init."""

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        C = self.receptance.weight.shape[0]
        _, r1 = layer_ratios(self.layer_id, num_layers)
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_r.copy_(ddd**r1)
        nn.init.orthogonal_(self.key.weight, gain=1.0, generator=generator)
        self.receptance.weight.zero_()
        self.value.weight.zero_()
