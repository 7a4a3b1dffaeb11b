"""The RWKV model: input (token embedding or continuous projection), ln0, blocks, ln_out, head.

Two exact forms: ``forward`` runs the parallel (chunked) form over a sequence; ``step`` advances one token or frame
in O(1) time and memory. Both take and return the typed ``RWKVState``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import RWKVConfig
from .layers import cpu_step, fused, rwkv4, rwkv6, rwkv7
from .state import RWKVState, state_meta, zero_state

_LAYERS = {4: rwkv4, 5: rwkv6, 6: rwkv6, 7: rwkv7}  # RWKV-5 shares the RWKV-6 module (version switch inside)
# On CPU the parallel form runs long sequences in pieces of this many tokens, the state carried between them
# (exact): every op's working set then stays in cache. Measured (benchmarks/bench_cpu.py, 2 cores): prefill of
# 1024 tokens ~1.2x faster than in one piece, training fwd+bwd at T=4096 ~1.3x; 128-token pieces are slower again.
CPU_SEGMENT_LEN = 512


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

    def forward(self, x, shift_att, shift_ffn, wkv, v_first, *, backend="auto"):
        """x: [B, T, C]; the layer's state in, the new one out: (x, shift_att, shift_ffn, wkv, v_first)."""
        att, shift_att, wkv, v_first = self.att(self.ln1(x), shift_att, wkv, v_first, backend=backend)
        x = x + self.drop(att)
        ffn, shift_ffn = self.ffn(self.ln2(x), shift_ffn)
        return x + self.drop(ffn), shift_att, shift_ffn, wkv, v_first

    def step_weights(self) -> tuple:
        return (self.ln1.weight, self.ln1.bias, self.ln1.eps, self.ln2.weight, self.ln2.bias, self.ln2.eps,
                self.att.step_weights(), self.ffn.step_weights())


def _block_step(layers, x, shift_att, shift_ffn, wkv, v_first, weights, inplace: bool, pointwise: bool = False):
    """One token through a block without autograd, eval semantics (``Block.step_weights()`` as ``weights``).
    x: [B, C] -> (x, new shift_att, new shift_ffn, new wkv, v_first); ``inplace`` overwrites the three states."""
    ln1_w, ln1_b, ln1_eps, ln2_w, ln2_b, ln2_eps, att_w, ffn_w = weights
    C = x.shape[-1]
    xa = torch.layer_norm(x, (C,), ln1_w, ln1_b, ln1_eps)
    x, wkv, v_first = layers.time_mix_step(xa, shift_att, wkv, v_first, x, att_w, inplace=inplace, pointwise=pointwise)
    xf = torch.layer_norm(x, (C,), ln2_w, ln2_b, ln2_eps)
    x = layers.channel_mix_step(xf, shift_ffn, x, ffn_w)
    if inplace:
        xa, xf = shift_att.copy_(xa), shift_ffn.copy_(xf)
    return x, xa, xf, wkv, v_first


class RWKV(nn.Module):
    """RWKV backbone or language model; see ``rwkv_torch.build``.

    ``gradient_checkpointing`` (default False): when True, every forward that records a graph runs each block
    under ``torch.utils.checkpoint`` (non-reentrant): activations inside a block are recomputed in the backward
    pass instead of kept, for about one extra forward of compute. Set it with ``set_gradient_checkpointing``.
    """

    def __init__(self, config: RWKVConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
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

    def set_gradient_checkpointing(self, enabled: bool = True) -> "RWKV":
        """Recompute each block's activations in the backward pass instead of storing them; returns the model."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.gradient_checkpointing = enabled
        return self

    def clear_step_cache(self) -> None:
        """Drop the weights stacked for the fused ``step`` (rebuilt on the next step). They are rebuilt by
        themselves whenever a parameter changes, except through ``param.data``: call this after such updates."""
        self.__dict__.pop("_step_cache", None)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() ...: the stacked copies would keep the old tensors alive.
        self.clear_step_cache()
        return super()._apply(fn, *args, **kwargs)

    def _step_plan(self) -> list:
        """Per block ``Block.step_weights()``, cached until a parameter changes (``fused.ParamWatch``)."""
        cache = self.__dict__.get("_step_cache")
        if cache is None:
            cache = self.__dict__["_step_cache"] = [fused.ParamWatch(self), None, None]
        watch, fingerprint, plan = cache
        now = watch.fingerprint()
        if now != fingerprint:
            with torch.no_grad():
                plan = [block.step_weights() for block in self.blocks]
            cache[1:] = now, plan
        return plan

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

    def _check_input(self, x: torch.Tensor, time_axis: bool) -> None:
        c = self.config
        if self.is_token_model:
            shape = "[B, T]" if time_axis else "[B]"
            if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"token ids must be an integer tensor {shape}, got {x.dtype}")
            if x.dim() != (2 if time_axis else 1):
                raise ValueError(f"token ids must be {shape}, got shape {tuple(x.shape)}")
            if x.numel() and torch.compiler.is_compiling():  # the same rule inside a compiled graph, no break
                torch._assert_async((x >= 0).all() & (x < c.vocab_size).all(), "token ids out of range")
            elif x.numel():
                lo, hi = (int(t) for t in torch.aminmax(x))
                if lo < 0 or hi >= c.vocab_size:
                    raise ValueError(f"token ids must be in [0, {c.vocab_size}), got min {lo} max {hi}")
        else:
            shape = "[B, T, embed_dim]" if time_axis else "[B, embed_dim]"
            if not x.is_floating_point():
                raise TypeError(f"frames must be a floating tensor {shape}, got {x.dtype}")
            if x.dim() != (3 if time_axis else 2) or x.shape[-1] != c.embed_dim:
                raise ValueError(f"frames must be {shape} with embed_dim={c.embed_dim}, got shape {tuple(x.shape)}")
            if torch.compiler.is_compiling():
                torch._assert_async(torch.isfinite(x).all(), "frames contain NaN or inf")
            elif not torch.isfinite(x).all():
                raise ValueError("frames contain NaN or inf; they would poison the recurrent state")
        if time_axis and x.shape[1] == 0:
            raise ValueError("the sequence is empty (T = 0)")

    def _embed(self, x: torch.Tensor, time_axis: bool) -> torch.Tensor:
        self._check_input(x, time_axis)
        return self._embed_unchecked(x)

    def _embed_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_token_model:
            h = F.embedding(x.long(), self.emb.weight)
        else:
            h = F.linear(x.to(self.input_proj.weight.dtype), self.input_proj.weight, self.input_proj.bias)
        return F.layer_norm(h, (self.config.hidden_size,), self.ln0.weight, self.ln0.bias, self.ln0.eps)

    def _run(self, h, state, backend):
        """Blocks and head over h [B, T, C]; the new per-layer state is written into ``state`` (a fresh object)."""
        return self._head(self._blocks(h, state, backend))

    def _blocks(self, h, state, backend):
        v_first = None
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for l, block in enumerate(self.blocks):
            args = (h, state.shift_att[l], state.shift_ffn[l], state.wkv[l], v_first)
            if use_checkpoint:
                # The state goes in as tensors, not as the state object, so that the recomputation in the
                # backward pass sees this layer's input state, not the one written below.
                out = checkpoint(block, *args, backend=backend, use_reentrant=False)
            else:
                out = block(*args, backend=backend)
            h, state.shift_att[l], state.shift_ffn[l], state.wkv[l], v_first = out
        return h

    def _head(self, h):
        h = F.layer_norm(h, (self.config.hidden_size,), self.ln_out.weight, self.ln_out.bias, self.ln_out.eps)
        if self.head is None:
            return h
        if h.dim() == 2:  # one position per row (step, or the last position of forward)
            return fused.linear(h, self.head.weight, self.head.bias)
        return F.linear(h, self.head.weight, self.head.bias)

    def forward(self, x, state: RWKVState | None = None, *, return_sequence: bool | None = None,
                return_state: bool = False, backend: str = "auto"):
        """Parallel form over a sequence (on CPU in pieces of ``CPU_SEGMENT_LEN`` tokens, the state carried).

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
        if return_sequence is None:
            return_sequence = self.is_token_model
        pieces = h.split(CPU_SEGMENT_LEN, dim=1) if h.device.type == "cpu" else (h,)
        outs = []
        for piece in pieces:
            piece = self._blocks(piece, state, backend)
            outs.append(piece if return_sequence else piece[:, -1:])
        h = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        out = self._head(h if return_sequence else h[:, -1])  # the head only where it is asked for
        return (out, state) if return_state else out

    def step(self, x_t, state: RWKVState | None = None):
        """One token ``[B]`` or frame ``[B, embed_dim]`` -> ``(out [B, out], new state)``; O(1) time and memory.

        The given state is not modified. Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``), autocast
        and active dropout, the step runs a fused path (LoRA and token-shift weights stacked once and cached, see
        ``clear_step_cache``); otherwise the differentiable path of ``forward``. Both compute the same function.
        """
        h = self._embed(x_t, time_axis=False)  # [B, C]
        if state is None:
            state = self.init_state(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            self._check_state(state, h.shape[0])
        if self._fast_step_applies(h):
            return self._fast_step(h, state, inplace=False)
        state = RWKVState(list(state.shift_att), list(state.shift_ffn), list(state.wkv), dict(state.meta))
        return self._run(h.unsqueeze(1), state, "step")[:, 0], state

    def step_(self, x_t, state: RWKVState) -> torch.Tensor:
        """``step`` that overwrites ``state``'s tensors with the new state and returns only ``out [B, out]``.

        Saves allocating a new state per token; ``Stream`` uses it. Anything aliasing the state's tensors sees the
        update (take ``state.clone()`` to keep a copy).
        """
        h = self._embed(x_t, time_axis=False)
        self._check_state(state, h.shape[0])
        cd = torch.float64 if h.dtype == torch.float64 else torch.float32
        if self._fast_step_applies(h) and all(
            s.dtype == cd and s.is_contiguous() and a.dtype == f.dtype == h.dtype
            for s, a, f in zip(state.wkv, state.shift_att, state.shift_ffn)
        ):
            return self._fast_step(h, state, inplace=True)[0]
        out, new = self.step(x_t, state)
        with torch.no_grad():
            for old, t in zip(state.tensors().values(), new.tensors().values()):
                old.copy_(t)
        return out

    def _fast_step_applies(self, h) -> bool:
        if torch.is_grad_enabled() or (self.training and self.config.dropout > 0):
            return False
        return hasattr(_LAYERS[self.config.version], "time_mix_step") and not _autocast_enabled(h.device.type)

    def _fast_step(self, h, state: RWKVState, *, inplace: bool):
        plan = self._step_plan()
        done = cpu_step.blocks_step(self, plan, h, state, inplace=inplace) if cpu_step.applies(self, h, state) else None
        if done is not None:  # fp32 RWKV-7 on CPU: every block in one C call
            h, (shift_att, shift_ffn, wkv) = done
            return self._head(h), (state if inplace else RWKVState(shift_att, shift_ffn, wkv, dict(state.meta)))
        layers = _LAYERS[self.config.version]
        shift_att, shift_ffn, wkv = [], [], []
        v_first = None
        for l, weights in enumerate(plan):
            h, sa, sf, s, v_first = _block_step(
                layers, h, state.shift_att[l], state.shift_ffn[l], state.wkv[l], v_first, weights, inplace
            )
            shift_att.append(sa)
            shift_ffn.append(sf)
            wkv.append(s)
        return self._head(h), (state if inplace else RWKVState(shift_att, shift_ffn, wkv, dict(state.meta)))

    def compile_step(self, batch_size: int = 1) -> "CompiledStep":
        """``step`` for a fixed ``batch_size``, compiled ahead of time by TorchInductor (AOTInductor: torch >= 2.6
        and a C++ compiler; tens of seconds). The weights are a snapshot taken now. See ``CompiledStep``."""
        return CompiledStep(self, batch_size)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _FrozenStep(nn.Module):
    """The fused step over a snapshot of ``model``'s weights as one graph: (x_t, *flat state) -> (out, *flat state),
    the state flattened per layer as (shift_att, shift_ffn, wkv)."""

    def __init__(self, model: RWKV):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.plan = [_detached(w) for w in model._step_plan()]

    def forward(self, x_t, *flat):
        m = self.model
        layers = _LAYERS[m.config.version]
        h, v_first, new = m._embed_unchecked(x_t), None, []
        for l, weights in enumerate(self.plan):
            h, sa, sf, s, v_first = _block_step(layers, h, *flat[3 * l : 3 * l + 3], v_first, weights, False, True)
            new += [sa, sf, s]
        return m._head(h), *new


def _detached(weights):
    if isinstance(weights, torch.Tensor):
        return weights.detach()
    return tuple(_detached(w) for w in weights) if isinstance(weights, tuple) else weights


class CompiledStep:
    """``RWKV.step`` compiled ahead of time for one batch size (``RWKV.compile_step``).

    ``step(x_t, state) -> (out, new state)`` and ``step_(x_t, state) -> out`` behave as the model's (same inputs,
    checks and results up to fp32 rounding), with a fraction of the per-token overhead; ``init_state()`` and
    ``is_token_model`` make it usable by ``Stream``. It holds a snapshot of the weights: compile again after
    changing the model.
    """

    def __init__(self, model: RWKV, batch_size: int = 1):
        import tempfile
        from pathlib import Path

        inductor = getattr(torch, "_inductor", None)
        if not hasattr(inductor, "aoti_compile_and_package"):
            raise RuntimeError(f"compile_step needs torch >= 2.6 (AOTInductor); this is torch {torch.__version__}")
        if not hasattr(_LAYERS[model.config.version], "time_mix_step"):
            raise ValueError(f"RWKV-{model.config.version} has no fused step to compile")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.config, self.batch_size = model, model.config, batch_size
        c, p = model.config, next(model.parameters())
        x = (torch.zeros(batch_size, dtype=torch.long) if model.is_token_model
             else torch.zeros(batch_size, c.embed_dim, dtype=p.dtype))
        state = model.init_state(batch_size, device=p.device)
        with torch.no_grad():
            program = torch.export.export(_FrozenStep(model).eval(), (x.to(p.device), *state.tensors().values()),
                                          strict=False)
            self._dir = tempfile.TemporaryDirectory(prefix="rwkv-step-")
            package = inductor.aoti_compile_and_package(program, package_path=str(Path(self._dir.name) / "step.pt2"))
        self._run = inductor.aoti_load_package(package)
        self._state_dtypes = [t.dtype for t in state.tensors().values()]

    @property
    def is_token_model(self) -> bool:
        return self.model.is_token_model

    def init_state(self, batch_size: int | None = None) -> RWKVState:
        return self.model.init_state(batch_size or self.batch_size)

    def step(self, x_t, state: RWKVState | None = None):
        """Like ``RWKV.step`` (batch size fixed at compile time)."""
        self.model._check_input(x_t, time_axis=False)
        if x_t.shape[0] != self.batch_size:
            raise ValueError(f"compiled for batch size {self.batch_size}, input has batch size {x_t.shape[0]}")
        state = self.init_state() if state is None else state
        self.model._check_state(state, self.batch_size)
        if not self.model.is_token_model:
            x_t = x_t.to(self.model.input_proj.weight.dtype)
        # The compiled code assumes the example's (contiguous) strides and does not check them.
        flat = (t.to(dt).contiguous() for t, dt in zip(state.tensors().values(), self._state_dtypes))
        out, *flat = self._run(x_t.contiguous(), *flat)
        return out, RWKVState(flat[0::3], flat[1::3], flat[2::3], dict(state.meta))

    def step_(self, x_t, state: RWKVState) -> torch.Tensor:
        """Like ``RWKV.step_``: the new state is copied into ``state``'s tensors."""
        out, new = self.step(x_t, state)
        for old, t in zip(state.tensors().values(), new.tensors().values()):
            old.copy_(t)
        return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
