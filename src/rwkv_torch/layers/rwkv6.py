"""RWKV-6 "Finch" (x060) and RWKV-5 (x052) layers (spec section 3; x052 in ops/wkv6/README.md), official inits.

Both use the WKV-6 op (state ``[B, H, N_k, N_v]``): RWKV-6 with a data-dependent decay and lerp ("maa") token shift,
RWKV-5 with a static per-channel decay and the v4-style mix ``x * μ + x_prev * (1 - μ)``.
"""


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RWKVConfig
from ..ops import token_shift, wkv6
from . import fused


def _ratios(layer_id: int, num_layers: int):
    r0 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
    return r0, 1.0 - layer_id / num_layers


class TimeMix(nn.Module):
    """RWKV-6 (``version=6``) or RWKV-5 (``version=5``) time mixing; names follow the official checkpoints."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.version, self.layer_id, self.n_head, self.head_size = config.version, layer_id, H, N
        if self.version == 6:
            D, Dd = config.mix_lora_dim, config.decay_lora_dim
            for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
                setattr(self, name, nn.Parameter(torch.zeros(C)))
            self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))  # column blocks w, k, v, r, g
            self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
            self.time_decay = nn.Parameter(torch.zeros(C))
            self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
            self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))
        else:
            for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
                setattr(self, name, nn.Parameter(torch.zeros(C)))
            self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def _mix_v6(self, x, xx):
        B, T, C = x.shape
        z = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)  # [B, T, 5, D]
        m = torch.einsum("btjd,jdc->jbtc", z, self.time_maa_w2)  # [5, B, T, C]: w, k, v, r, g
        mus = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        xw, xk, xv, xr, xg = (x + xx * (mu + m[j]) for j, mu in enumerate(mus))
        cd = _state_dtype(x.dtype)
        d = self.time_decay.to(cd) + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).to(cd)
        return xr, xk, xv, xg, -torch.exp(d)  # log decay [B, T, C], fp32 (fp64 for fp64 models)

    def forward(self, x, shift, wkv_state, v_first=None, *, backend="auto"):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, H, N_k, N_v] fp32.

        Returns (out [B, T, C], new shift, new wkv_state, v_first unchanged)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = token_shift(x, shift)
        if self.version == 6:
            xr, xk, xv, xg, log_decay = self._mix_v6(x, prev - x)
        else:
            xk, xv, xr, xg = (x * mu + prev * (1 - mu) for mu in
                              (self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g))
            log_decay = (-torch.exp(self.time_decay.to(_state_dtype(x.dtype)))).view(1, 1, C).expand(B, T, C)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        y, wkv_state = wkv6(heads(r), heads(log_decay.to(r.dtype)), heads(k), heads(v),
                            self.time_faaaa.to(r.dtype), wkv_state, backend=backend)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first

    def step_weights(self) -> tuple:
        """What ``time_mix_step`` reads (built by ``RWKV`` once per parameter change, under no_grad)."""
        if self.version == 6:
            mus = torch.stack([self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g])
            mix = (mus.unsqueeze(1), self.time_maa_x, self.time_maa_w1, self.time_maa_w2, self.time_decay,
                   self.time_decay_w1, self.time_decay_w2)
        else:  # v5: a static decay; the factor exp(-exp(time_decay)) as the generic path rounds it
            mus = torch.stack([self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g]).unsqueeze(1)
            cd = _state_dtype(mus.dtype)
            decay = (-torch.exp(self.time_decay.to(cd))).to(mus.dtype).to(cd).exp().view(-1)
            mix = (mus, None, None, None, decay, None, None)
        return (self.version, *mix, self.time_faaaa, self.receptance.weight, self.key.weight,
                self.value.weight, self.gate.weight, self.output.weight, self.ln_x.weight, self.ln_x.bias,
                self.n_head, self.ln_x.eps)

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        """The official from-scratch init (spec 3.5 for v6; the x052 code for v5)."""
        C = self.receptance.weight.shape[0]
        r0, r1 = _ratios(self.layer_id, num_layers)
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        span = n / (C - 1) if C > 1 else n
        decay = -6 + 5 * span ** (0.7 + 1.3 * r0)
        self.time_faaaa.copy_((r0 * (1 - span) + 0.1 * ((n + 1) % 3 - 1)).view_as(self.time_faaaa))
        if self.version == 6:
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
        else:
            self.time_mix_k.copy_(ddd**r1)
            self.time_mix_v.copy_(ddd**r1 + 0.3 * r0)
            self.time_mix_r.copy_(ddd ** (0.5 * r1))
            self.time_mix_g.copy_(ddd ** (0.5 * r1))
            self.time_decay.copy_(decay.view_as(self.time_decay))
        nn.init.orthogonal_(self.receptance.weight, gain=1.0, generator=generator)
        nn.init.orthogonal_(self.key.weight, gain=0.1, generator=generator)
        nn.init.orthogonal_(self.value.weight, gain=1.0, generator=generator)
        nn.init.orthogonal_(self.gate.weight, gain=0.1, generator=generator)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + self.layer_id) / num_layers) ** 0.7)
        self.ln_x.bias.zero_()


class ChannelMix(nn.Module):
    """RWKV-5/6 feed-forward: relu² key, sigmoid receptance gate (spec 3.3)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, Fd = config.hidden_size, config.ffn_dim
        self.version, self.layer_id = config.version, layer_id
        prefix = "time_maa" if self.version == 6 else "time_mix"
        self._mu_names = (f"{prefix}_k", f"{prefix}_r")
        for name in self._mu_names:
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x, shift):
        prev = token_shift(x, shift)
        mu_k, mu_r = (getattr(self, n) for n in self._mu_names)
        if self.version == 6:
            xk, xr = x + (prev - x) * mu_k, x + (prev - x) * mu_r
        else:
            xk, xr = x * mu_k + prev * (1 - mu_k), x * mu_r + prev * (1 - mu_r)
        k = torch.relu(self.key(xk)).square()  # square: pow is ~6x slower on CPU
        return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1]

    def step_weights(self) -> tuple:
        mu_k, mu_r = (getattr(self, n) for n in self._mu_names)
        return self.version, mu_k, mu_r, self.key.weight, self.receptance.weight, self.value.weight

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        C = self.receptance.weight.shape[0]
        _, r1 = _ratios(self.layer_id, num_layers)
        ddd = torch.arange(C, dtype=torch.float64) / C
        mu = 1 - ddd ** (r1**3) if self.version == 6 else ddd**r1
        for name in self._mu_names:
            getattr(self, name).copy_(mu)
        nn.init.orthogonal_(self.key.weight, gain=1.0, generator=generator)
        self.receptance.weight.zero_()
        self.value.weight.zero_()


def time_mix_step(x, shift, wkv_state, v_first, residual, weights: tuple, *, inplace: bool = False,
                  pointwise: bool = False):
    """One token of ``TimeMix`` without autograd (the fused decode path of ``RWKV.step``; see rwkv7's).

    x: [B, C] (ln1 output); shift: [B, C]; wkv_state: [B, H, N_k, N_v]; residual: [B, C]; weights:
    ``TimeMix.step_weights()``. Returns (residual + out [B, C], new wkv_state, v_first unchanged).
    """
    (version, mus, maa_x, maa_w1, maa_w2, decay, decay_w1, decay_w2, u, w_r, w_k, w_v, w_g, w_o, ln_w, ln_b,
     H, eps) = weights
    B, C = x.shape
    N, BH = C // H, B * H
    cd = _state_dtype(x.dtype)
    if version == 6:
        xx = shift - x
        z = torch.tanh(torch.addcmul(x, xx, maa_x) @ maa_w1).view(B, 5, -1).transpose(0, 1)  # [5, B, D]
        xw, xk, xv, xr, xg = torch.addcmul(x, xx, torch.baddbmm(mus, z, maa_w2)).unbind(0)
        d = decay.to(cd) + (torch.tanh(xw @ decay_w1) @ decay_w2).to(cd)
        decay = torch.exp(-torch.exp(d).to(x.dtype).to(cd))  # rounded through the model dtype like forward
    else:
        xk, xv, xr, xg = torch.addcmul(shift, x - shift, mus).unbind(0)  # x * mu + x_prev * (1 - mu)
        decay = decay.repeat(B)
    r, k, v = fused.linear(xr, w_r), fused.linear(xk, w_k), fused.linear(xv, w_v)
    g = F.silu(fused.linear(xg, w_g))
    r_, k_, v_ = (r, k, v) if cd == x.dtype else (t.to(cd) for t in (r, k, v))

    # WKV-6 per head, S [B*H, N_k, N_v]: y = rᵀ (S + u k vᵀ), S' = diag(decay) S + k vᵀ.
    S = wkv_state.view(BH, N, N) if inplace else wkv_state.reshape(BH, N, N)
    if S.dtype != cd:
        S = S.to(cd)
    y = torch.bmm(r_.view(BH, 1, N), S)  # [BH, 1, V]
    bonus = (r_ * k_).view(B, H, N).mul_(u.to(cd)).sum(dim=-1).view(BH, 1, 1)
    y = torch.addcmul(y, bonus, v_.view(BH, 1, N)).view(B, C)
    if pointwise:
        S = S * decay.view(BH, N, 1) + k_.view(BH, N, 1) * v_.view(BH, 1, N)
    else:
        S = S.mul_(decay.view(BH, N, 1)) if inplace else S * decay.view(BH, N, 1)
        S.baddbmm_(k_.view(BH, N, 1), v_.view(BH, 1, N))
    y = torch.group_norm(y.to(x.dtype), H, ln_w, ln_b, eps)
    return fused.addmm(residual, y.mul_(g), w_o), S.view(B, H, N, N), v_first


def channel_mix_step(x, shift, residual, weights: tuple):
    """One token of ``ChannelMix`` without autograd: x, shift, residual [B, C]. Returns residual + out [B, C]."""
    version, mu_k, mu_r, w_key, w_rec, w_value = weights
    if version == 6:
        xx = shift - x
        xk, xr = torch.addcmul(x, xx, mu_k), torch.addcmul(x, xx, mu_r)
    else:
        xx = x - shift
        xk, xr = torch.addcmul(shift, xx, mu_k), torch.addcmul(shift, xx, mu_r)
    k = fused.linear(xk, w_key).relu_().square_()
    return torch.addcmul(residual, torch.sigmoid(fused.linear(xr, w_rec)), fused.linear(k, w_value))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
