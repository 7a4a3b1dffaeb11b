"""The RWKV model: input (token embedding or continuous projection), ln0, blocks, ln_out, head.

Two exact forms: ``forward`` runs the parallel (chunked) form over a sequence; ``step`` advances one token or frame
in O(1) time and memory. Both take and return the typed ``RWKVState``.
"""

import torch
import torch.nn as nn

from .config import RWKVConfig
from .layers import rwkv4, rwkv6, rwkv7
from .state import RWKVState, state_meta, zero_state

_LAYERS = {4: rwkv4, 5: rwkv6, 6: rwkv6, 7: rwkv7}  # RWKV-5 shares the RWKV-6 module (version switch inside)


class Block(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        layers = _LAYERS[config.version]
        C = config.hidden_size
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = layers.TimeMix(config, layer_id)
        self.ffn = layers.ChannelMix(config, layer_id)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x, state: RWKVState, l: int, v_first, *, backend="auto"):
        att, state.shift_att[l], state.wkv[l], v_first = self.att(
            self.ln1(x), state.shift_att[l], state.wkv[l], v_first, backend=backend
        )
        x = x + self.drop(att)
        ffn, state.shift_ffn[l] = self.ffn(self.ln2(x), state.shift_ffn[l])
        return x + self.drop(ffn), v_first


class RWKV(nn.Module):
    """RWKV backbone or language model; see ``rwkv_torch.build``."""

    def __init__(self, config: RWKVConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = c = config
        C = c.hidden_size
        if c.vocab_size is not None:
            self.emb = nn.Embedding(c.vocab_size, C)
        else:
            self.input_proj = nn.Linear(c.embed_dim, C)
        self.ln0 = nn.LayerNorm(C)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.ln_out = nn.LayerNorm(C)
        if c.vocab_size is not None:
            self.head = nn.Linear(C, c.vocab_size, bias=False)
        elif c.output_dim is not None:
            self.head = nn.Linear(C, c.output_dim)
        else:
            self.head = None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The official from-scratch initialisation (spec 4.8); deterministic for a given generator/seed."""
        c = self.config
        for block in self.blocks:
            block.att.reset_parameters(c.num_layers, generator)
            block.ffn.reset_parameters(c.num_layers, generator)
            for ln in (block.ln1, block.ln2):
                ln.reset_parameters()
        for ln in (self.ln0, self.ln_out):
            ln.reset_parameters()
        if c.vocab_size is not None:
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4, generator=generator)
        else:
            # ln0 follows at once, so the projection needs an O(1) output scale, not the embedding's 1e-4.
            nn.init.orthogonal_(self.input_proj.weight, gain=1.0, generator=generator)
            self.input_proj.bias.zero_()
        if self.head is not None:
            rows, cols = self.head.weight.shape
            gain = 0.5 * ((rows / cols) ** 0.5 if rows > cols else 1.0)
            nn.init.orthogonal_(self.head.weight, gain=gain, generator=generator)
            if self.head.bias is not None:
                self.head.bias.zero_()

    @property
    def is_token_model(self) -> bool:
        return self.config.vocab_size is not None

    def state_meta(self) -> dict:
        return state_meta(self.config)

    def init_state(self, batch_size: int = 1, *, device=None, dtype: torch.dtype | None = None) -> RWKVState:
        """A zero state for ``batch_size`` sequences (shift states in ``dtype``, the wkv state in float32)."""
        p = next(self.parameters())
        return zero_state(self.config, batch_size, device=device if device is not None else p.device,
                          dtype=dtype or p.dtype)

    init_cache = init_state

    def _check_state(self, state: RWKVState, batch_size: int) -> None:
        if not isinstance(state, RWKVState):
            raise TypeError(f"state must be an RWKVState (from init_state), got {type(state).__name__}")
        if state.meta != self.state_meta():
            raise ValueError(f"state belongs to a model with {state.meta}, this model has {self.state_meta()}")
        if state.batch_size != batch_size:
            raise ValueError(f"state is for batch size {state.batch_size}, input has batch size {batch_size}")

    def _embed(self, x: torch.Tensor, time_axis: bool) -> torch.Tensor:
        c = self.config
        shape = "[B, T]" if time_axis else "[B]"
        if self.is_token_model:
            if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"token ids must be an integer tensor {shape}, got {x.dtype}")
            if x.dim() != (2 if time_axis else 1):
                raise ValueError(f"token ids must be {shape}, got shape {tuple(x.shape)}")
            if x.numel() and (x.min() < 0 or x.max() >= c.vocab_size):
                raise ValueError(
                    f"token ids must be in [0, {c.vocab_size}), got min {x.min().item()} max {x.max().item()}"
                )
            h = self.emb(x.long())
        else:
            shape = "[B, T, embed_dim]" if time_axis else "[B, embed_dim]"
            if not x.is_floating_point():
                raise TypeError(f"frames must be a floating tensor {shape}, got {x.dtype}")
            if x.dim() != (3 if time_axis else 2) or x.shape[-1] != c.embed_dim:
                raise ValueError(f"frames must be {shape} with embed_dim={c.embed_dim}, got shape {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError("frames contain NaN or inf; they would poison the recurrent state")
            h = self.input_proj(x.to(self.input_proj.weight.dtype))
        if time_axis and h.shape[1] == 0:
            raise ValueError("the sequence is empty (T = 0)")
        return self.ln0(h)

    def _run(self, h, state, backend):
        v_first = None
        for l, block in enumerate(self.blocks):
            h, v_first = block(h, state, l, v_first, backend=backend)
        h = self.ln_out(h)
        return self.head(h) if self.head is not None else h

    def forward(self, x, state: RWKVState | None = None, *, return_sequence: bool | None = None,
                return_state: bool = False, backend: str = "auto"):
        """Parallel form over a sequence.

        Args:
            x: token ids ``[B, T]`` (token model) or frames ``[B, T, embed_dim]`` (continuous backbone).
            state: an ``RWKVState`` to continue from, or None for a fresh sequence.
            return_sequence: all positions ``[B, T, out]`` or only the last ``[B, out]``; None means the model's
                default (token models: all positions; continuous backbones: last position).
            return_state: also return the state after the last position.
            backend: WKV backend (``"auto"``, ``"chunk"``, ``"naive"``, ``"step"``).

        Returns:
            ``out`` or ``(out, state)``; ``out`` has ``config.output_size`` features.
        """
        h = self._embed(x, time_axis=True)
        if state is None:
            state = self.init_state(x.shape[0], device=h.device, dtype=h.dtype)
        else:
            self._check_state(state, x.shape[0])
            state = RWKVState(list(state.shift_att), list(state.shift_ffn), list(state.wkv), dict(state.meta))
        out = self._run(h, state, backend)
        if return_sequence is None:
            return_sequence = self.is_token_model
        if not return_sequence:
            out = out[:, -1]
        return (out, state) if return_state else out

    def step(self, x_t, state: RWKVState | None = None):
        """One token ``[B]`` or frame ``[B, embed_dim]`` -> ``(out [B, out], new state)``; O(1) time and memory."""
        h = self._embed(x_t, time_axis=False).unsqueeze(1)
        if state is None:
            state = self.init_state(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            self._check_state(state, h.shape[0])
            state = RWKVState(list(state.shift_att), list(state.shift_ffn), list(state.wkv), dict(state.meta))
        return self._run(h, state, "step")[:, 0], state

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
