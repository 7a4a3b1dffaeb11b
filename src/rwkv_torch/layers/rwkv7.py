"""RWKV-7 "Goose" (x070) layers: TimeMix and ChannelMix exactly as spec section 4, and the official init (4.8)."""


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RWKVConfig
from ..ops import token_shift
from ..ops._common import compute_dtype
from ..ops.gated_output import gated_output
from ..ops.mix import shift_mix_linear, squared_relu_linear
from ..ops.token_shift import last_token
from ..ops.wkv7 import wkv7_unchecked
from ..ops.wkv7.fused_inputs import DECAY_SCALE, wkv_inputs
from ..ops.wkv7.fused_mix import shift_mix_project
from ._init import orthogonal_scaled as _ortho

# DECAY_SCALE = exp(-0.5): the soft clamp w = -softplus(-w_raw) - 0.5 gives log decay -e^{-0.5} * sigmoid(w_raw).
# A lower bound on the log decay -DECAY_SCALE * sigmoid(.), with room for rounding to bf16/fp16.
W_MIN = -1.01 * DECAY_SCALE


def _projection(m: nn.Module):
    """A projection as the training form's ops take it: a plain bias-free ``nn.Linear`` as its weight (multiplied
    directly), any other linear module as itself (called)."""
    return m.weight if type(m) is nn.Linear and m.bias is None else m


class TimeMix(nn.Module):
    """RWKV-7 attention-like mixer. Parameter names and shapes follow the official checkpoints (spec 4.1).

    Two forms, the same values: ``forward_spec``, one op per term as the spec writes it (about 28 ``[B, T, C]``
    tensors kept per layer under autograd), and ``forward_train``, the training form: the lerps into their projections
    (``ops.wkv7.fused_mix``), the WKV inputs (``ops.wkv7.fused_inputs``) and the output stage (``ops.gated_output``) as
    autograd functions with hand-written backwards, keeping about 0.6x the spec form's activations (tested against
    it in float64: outputs, states and every gradient). ``forward`` is the training form whenever autograd records
    (fp32, fp64, bf16 autocast; plain, LoRA-wrapped or quantized projections alike) and the spec form otherwise
    (inference, tracing for export).

    The projections (``receptance``, ``key``, ``value``, ``output``) may be any linear modules: a plain bias-free
    ``nn.Linear`` is multiplied through its weight, anything else (``train.finetune.LoRALinear``,
    ``quantize.QuantLinear``) is called, and called again in the backward for its own gradients (one more product
    with its frozen weight, instead of keeping its input)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.w1 = nn.Parameter(torch.zeros(C, config.decay_lora_dim))
        self.w2 = nn.Parameter(torch.zeros(config.decay_lora_dim, C))
        self.a1 = nn.Parameter(torch.zeros(C, config.a_lora_dim))
        self.a2 = nn.Parameter(torch.zeros(config.a_lora_dim, C))
        if layer_id > 0:  # layer 0 defines v_first; its v0/v1/v2 would be unused
            self.v0 = nn.Parameter(torch.zeros(C))
            self.v1 = nn.Parameter(torch.zeros(C, config.v_lora_dim))
            self.v2 = nn.Parameter(torch.zeros(config.v_lora_dim, C))
        self.g1 = nn.Parameter(torch.zeros(C, config.gate_lora_dim))
        self.g2 = nn.Parameter(torch.zeros(config.gate_lora_dim, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, shift, wkv_state, v_first, *, backend="auto", cu_seqlens=None):
        """x: [B, T, C] (ln1 output); shift: [B, C]; wkv_state: [B, H, N, N] fp32; v_first: [B, T, C] or None.

        Returns (out [B, T, C], new shift [B, C], new wkv_state, v_first).
        """
        form = self.forward_train if torch.is_grad_enabled() and not torch.jit.is_tracing() else self.forward_spec
        return form(x, shift, wkv_state, v_first, backend=backend, cu_seqlens=cu_seqlens)

    def forward_spec(self, x, shift, wkv_state, v_first, *, backend="auto", cu_seqlens=None):
        """The spec form (one op per term, spec 4.2-4.4): the reference of the training form, and the form without
        autograd. Same arguments and results as ``forward``."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift, cu_seqlens=cu_seqlens) - x
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, mu) for mu in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                       self.x_a, self.x_g))

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w_raw = F.linear(torch.tanh(xw @ self.w1), self.w2.t(), self.w0)  # w0 + tanh(xw @ w1) @ w2
        # = -exp(-softplus(-w_raw) - 0.5), in the dtype of the wkv state: fp32 (fp64 for fp64 models)
        log_decay = -DECAY_SCALE * torch.sigmoid(w_raw.to(compute_dtype(x.dtype)))
        if self.layer_id == 0:
            v_first = v
        else:  # v + (v_first - v) * sigmoid(v0 + (xv @ v1) @ v2)
            v = torch.lerp(v, v_first, torch.sigmoid(F.linear(xv @ self.v1, self.v2.t(), self.v0)).to(v.dtype))
        a = torch.sigmoid(F.linear(xa @ self.a1, self.a2.t(), self.a0))  # sigmoid(a0 + (xa @ a1) @ a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12).view(B, T, C)
        k = k * torch.addcmul(1 - self.k_a, a, self.k_a)  # k * (1 + (a - 1) * k_a)

        dt = r.dtype  # under autocast the elementwise terms may come out in another dtype than r
        heads = lambda t: t.to(dt).view(B, T, H, N)  # noqa: E731
        # w_min: the soft clamp bounds the log decay, so the op picks its numerics without reading w back.
        y, wkv_state = wkv7_unchecked(
            heads(r), heads(log_decay), heads(k), heads(v), heads(-kk), heads(kk * a), wkv_state, backend=backend,
            w_min=W_MIN, cu_seqlens=cu_seqlens,
        )
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, H, N)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True)  # [B, T, H, 1]
        y = torch.addcmul(y, bonus.to(y.dtype), heads(v).to(y.dtype)).view(B, T, C)
        return self.output(y * g), last_token(x, shift, cu_seqlens=cu_seqlens), wkv_state, v_first

    def forward_train(self, x, shift, wkv_state, v_first, *, backend="auto", cu_seqlens=None):
        """The training form of ``forward`` (see the class): same arguments, same results."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        mus = [self.x_r, self.x_k, self.x_v, self.x_w, self.x_a, self.x_g]
        projections = [_projection(self.receptance), _projection(self.key), _projection(self.value), self.w1.t(),
                       self.a1.t(), self.g1.t()]
        if self.layer_id > 0:
            mus.append(self.x_v)
            projections.append(self.v1.t())
        r, k0, v, xw1, xa1, xg1, *xv1 = shift_mix_project(x, shift, mus, projections, cu_seqlens=cu_seqlens)
        w_raw = F.linear(torch.tanh(xw1), self.w2.t(), self.w0)
        a_raw = F.linear(xa1, self.a2.t(), self.a0)
        g = torch.sigmoid(xg1) @ self.g2
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first.to(v.dtype), torch.sigmoid(F.linear(xv1[0], self.v2.t(), self.v0)).to(v.dtype))
        w, k, minus_kk, b = wkv_inputs(k0, w_raw, a_raw, self.k_k, self.k_a, H)  # in k0's dtype
        heads = lambda t: t.to(r.dtype).view(B, T, H, N)  # noqa: E731  (no casts unless projections' dtypes differ)
        y, wkv_state = wkv7_unchecked(heads(r), heads(w), heads(k), heads(v), heads(minus_kk), heads(b), wkv_state,
                                      backend=backend, w_min=W_MIN, cu_seqlens=cu_seqlens)
        ln = self.ln_x
        out = gated_output(y.reshape(B, T, C), r, k, v, g, self.r_k, ln.weight, ln.bias, _projection(self.output), H,
                           ln.eps)
        return out, last_token(x, shift, cu_seqlens=cu_seqlens), wkv_state, v_first

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        """The official from-scratch init (spec 4.8)."""
        C, N, l = self.x_r.numel(), self.head_size, self.layer_id
        r0 = l / (num_layers - 1) if num_layers > 1 else 0.0
        r1 = 1.0 - l / num_layers
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5 if C > 1 else torch.zeros(C, dtype=torch.float64)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C, dtype=torch.float64)
        zigzag = z * z.abs()
        www = -6 + 6 * (n / (C - 1) if C > 1 else n) ** (1 + r0**0.3)

        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1 - ddd ** (p * r1))
        self.w0.copy_(www + 0.5 + 2.5 * zigzag)
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.k_k.copy_(0.71 - 0.1 * linear)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        lora_pairs = [(self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)]
        if l > 0:
            self.v0.copy_(0.73 - 0.4 * linear)
            lora_pairs.insert(2, (self.v1, self.v2))
        for first, second in lora_pairs:
            first.zero_()
            _ortho(second, 0.1, generator)
        _ortho(self.receptance.weight, 1.0, generator)
        _ortho(self.key.weight, 0.1, generator)
        _ortho(self.value.weight, 1.0, generator)
        self.output.weight.zero_()
        self.ln_x.weight.copy_(((1 + l) / num_layers) ** 0.7 * torch.ones(C))
        self.ln_x.bias.zero_()


class ChannelMix(nn.Module):
    """RWKV-7 feed-forward: relu² with a token-shift lerp, no receptance gate (spec 4.5)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, config.ffn_dim, bias=False)
        self.value = nn.Linear(config.ffn_dim, C, bias=False)

    def forward(self, x, shift, *, cu_seqlens=None):
        """x: [B, T, C] (ln2 output); shift: [B, C]. Returns (out [B, T, C], new shift [B, C])."""
        last = last_token(x, shift, cu_seqlens=cu_seqlens)
        if type(self.key) is nn.Linear and type(self.value) is nn.Linear:
            # value(relu(key(x + (x_prev - x) * x_k))²), keeping only x and key's output for the backward
            (z,) = shift_mix_linear(x, shift, [self.x_k], [self.key.weight], cu_seqlens=cu_seqlens)
            return squared_relu_linear(z, self.value.weight), last
        xk = torch.addcmul(x, token_shift(x, shift, cu_seqlens=cu_seqlens) - x, self.x_k)  # quantized or LoRA layers
        z = self.key(xk)
        r = torch.relu(z)
        return self.value(r * r), last

    @torch.no_grad()
    def reset_parameters(self, num_layers: int, generator: torch.Generator | None = None):
        C = self.x_k.numel()
        r1 = 1.0 - self.layer_id / num_layers
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.x_k.copy_(1 - ddd ** (r1**4))
        _ortho(self.key.weight, 1.0, generator)
        self.value.weight.zero_()


