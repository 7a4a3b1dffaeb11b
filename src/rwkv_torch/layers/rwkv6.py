"""RWKV-6 "Finch" (x060) layers (spec section 3), official init: the WKV-6 op (state ``[B, H, N_k, N_v]``) with a
data-dependent decay and the lerp ("maa") token shift with its LoRA."""


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RWKVConfig
from ..ops import token_shift
from ..ops._common import compute_dtype
from ..ops.gated_output import gated_output
from ..ops.mix import data_lerp_linear, plain_form, shift_mix_linear, squared_relu_linear
from ..ops.token_shift import last_token
from ..ops.wkv6 import wkv6_unchecked


def layer_ratios(layer_id: int, num_layers: int):
    r0 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
    return r0, 1.0 - layer_id / num_layers


def add_projections(m: nn.Module, C: int, H: int) -> None:
    """The RWKV-5/6 time-mix projections (receptance, key, value, gate, output) and the per-head ln_x."""
    m.receptance = nn.Linear(C, C, bias=False)
    m.key = nn.Linear(C, C, bias=False)
    m.value = nn.Linear(C, C, bias=False)
    m.gate = nn.Linear(C, C, bias=False)
    m.output = nn.Linear(C, C, bias=False)
    m.ln_x = nn.GroupNorm(H, C, eps=64e-5)


def project_output(m: nn.Module, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The RWKV-5/6 time mix's last step, ``output(ln_x(y) * g)`` with ``ln_x`` per head (y, g ``[B, T, C]``): under
    autograd with a plain GroupNorm and output Linear in y's dtype, the training form (``gated_output``: keeps y and g
    only, the rest recomputed in the backward; the same bits), else the modules."""
    B, T, C = y.shape
    ln, out = m.ln_x, m.output
    if (not plain_form(y) and type(ln) is nn.GroupNorm and type(out) is nn.Linear and out.bias is None
            and y.dtype in (torch.float32, torch.float64)
            and out.weight.dtype == ln.weight.dtype == g.dtype == y.dtype):
        return gated_output(y, None, None, None, g, None, ln.weight, ln.bias, out.weight, m.n_head, ln.eps)
    return out(ln(y.reshape(B * T, C)).view(B, T, C) * g)


@torch.no_grad()
def init_projections(m: nn.Module, num_layers: int, generator: torch.Generator | None) -> None:
    """The official init of ``add_projections``' modules (the same in x052 and x060)."""
    nn.init.orthogonal_(m.receptance.weight, gain=1.0, generator=generator)
    nn.init.orthogonal_(m.key.weight, gain=0.1, generator=generator)
    nn.init.orthogonal_(m.value.weight, gain=1.0, generator=generator)
    nn.init.orthogonal_(m.gate.weight, gain=0.1, generator=generator)
    m.output.weight.zero_()
    m.ln_x.weight.fill_(((1 + m.layer_id) / num_layers) ** 0.7)
    m.ln_x.bias.zero_()


class TimeMix(nn.Module):
    """RWKV-6 time mixing; names follow the official checkpoints."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        D, Dd = config.mix_lora_dim, config.decay_lora_dim
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))  # column blocks w, k, v, r, g
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        add_projections(self, C, H)

    def _mixes(self):
        return (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)

    def _mix(self, x, xx):
        B, T, C = x.shape
        z = torch.tanh(torch.addcmul(x, xx, self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)  # [B, T, 5, D]
        m = torch.einsum("btjd,jdc->jbtc", z, self.time_maa_w2)  # [5, B, T, C]: w, k, v, r, g
        # x + xx (mu + m_j) as one addcmul: the same bits as the training form (ops.mix.data_lerp_linear)
        xw, xk, xv, xr, xg = (torch.addcmul(x, xx, mu + m[j]) for j, mu in enumerate(self._mixes()))
        return xr, xk, xv, xg, self._log_decay(xw @ self.time_decay_w1, x.dtype)

    def _log_decay(self, xw1, dtype):
        """-exp(time_decay + tanh(xw @ w1) @ w2): the log decay [B, T, C], fp32 (fp64 for fp64 models)."""
        cd = compute_dtype(dtype)
        return -torch.exp(self.time_decay.to(cd) + (torch.tanh(xw1) @ self.time_decay_w2).to(cd))

    def _training_form(self, x) -> bool:
        """Under autograd with plain fp32/fp64 projections in x's dtype: the lerps through ``ops.mix`` (which keep x
        and the LoRA's tanh only for the backward) instead of one op at a time. Same bits either way."""
        lins = (self.receptance, self.key, self.value, self.gate)
        return (not plain_form(x) and all(type(m) is nn.Linear for m in lins)
                and all(m.weight.dtype == x.dtype for m in lins) and self.time_maa_w1.dtype == x.dtype)

    def forward(self, x, shift, wkv_state, v_first=None, *, backend="auto", cu_seqlens=None):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, H, N_k, N_v] fp32.

        Returns (out [B, T, C], new shift, new wkv_state, v_first unchanged)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        if self._training_form(x):
            (xw1,) = shift_mix_linear(x, shift, [self.time_maa_x], [self.time_maa_w1.t()], cu_seqlens=cu_seqlens)
            z = torch.tanh(xw1).view(B, T, 5, -1)
            weights = [self.time_decay_w1.t(), self.key.weight, self.value.weight, self.receptance.weight,
                       self.gate.weight]
            wd, k, v, r, g = data_lerp_linear(x, shift, z, self.time_maa_w2, self._mixes(), weights,
                                              cu_seqlens=cu_seqlens)
            log_decay = self._log_decay(wd, x.dtype)
        else:
            xr, xk, xv, xg, log_decay = self._mix(x, token_shift(x, shift, cu_seqlens=cu_seqlens) - x)
            r, k, v, g = self.receptance(xr), self.key(xk), self.value(xv), self.gate(xg)
        g = F.silu(g)
        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        y, wkv_state = wkv6_unchecked(heads(r), heads(log_decay.to(r.dtype)), heads(k), heads(v),
                                      self.time_faaaa.to(r.dtype), wkv_state, backend=backend, cu_seqlens=cu_seqlens)
        out = project_output(self, y.reshape(B, T, C), g)
        return out, last_token(x, shift, cu_seqlens=cu_seqlens), wkv_state, v_first

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        """The official from-scratch init (spec 3.5)."""
        C = self.receptance.weight.shape[0]
        r0, r1 = layer_ratios(self.layer_id, num_layers)
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        span = n / (C - 1) if C > 1 else n
        decay = -6 + 5 * span ** (0.7 + 1.3 * r0)
        self.time_faaaa.copy_((r0 * (1 - span) + 0.1 * ((n + 1) % 3 - 1)).view_as(self.time_faaaa))
        for name in ("time_maa_x", "time_maa_w", "time_maa_k"):
            getattr(self, name).copy_(1 - ddd**r1)
        self.time_maa_v.copy_(1 - (ddd**r1 + 0.3 * r0))
        self.time_maa_r.copy_(1 - ddd ** (0.5 * r1))
        self.time_maa_g.copy_(1 - ddd ** (0.5 * r1))
        self.time_maa_w1.zero_()
        self.time_maa_w2.uniform_(-0.01, 0.01, generator=generator)
        self.time_decay.copy_(decay)
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01, generator=generator)
        init_projections(self, num_layers, generator)


class ChannelMix(nn.Module):
    """RWKV-6 feed-forward: relu² key, sigmoid receptance gate, lerp token shift (spec 3.3)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, Fd = config.hidden_size, config.ffn_dim
        self.layer_id = layer_id
        self.time_maa_k = nn.Parameter(torch.zeros(C))
        self.time_maa_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x, shift, *, cu_seqlens=None):
        last = last_token(x, shift, cu_seqlens=cu_seqlens)
        if all(type(m) is nn.Linear for m in (self.key, self.receptance, self.value)):
            # the same terms through the ops that keep only x and key's output for the backward (ops/mix.py)
            z, r = shift_mix_linear(x, shift, [self.time_maa_k, self.time_maa_r],
                                    [self.key.weight, self.receptance.weight], cu_seqlens=cu_seqlens)
            return torch.sigmoid(r) * squared_relu_linear(z, self.value.weight), last
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x  # wrapped projections (LoRA, quantized)
        xk, xr = torch.addcmul(x, xx, self.time_maa_k), torch.addcmul(x, xx, self.time_maa_r)
        k = torch.relu(self.key(xk))
        return torch.sigmoid(self.receptance(xr)) * self.value(k * k), last  # k * k: pow is ~6x slower on CPU

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        C = self.receptance.weight.shape[0]
        _, r1 = layer_ratios(self.layer_id, num_layers)
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.time_maa_k.copy_(1 - ddd ** (r1**3))
        self.time_maa_r.copy_(1 - ddd ** (r1**3))
        nn.init.orthogonal_(self.key.weight, gain=1.0, generator=generator)
        self.receptance.weight.zero_()
        self.value.weight.zero_()
