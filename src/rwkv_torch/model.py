"""The RWKV model: input (token embedding or continuous projection), ln0, blocks, ln_out, head.

Two exact forms: ``forward`` runs the parallel (chunked) form over a sequence; ``step`` advances one token or frame
in O(1) time and memory. Both take and return the typed ``RWKVState``. The block math has two forms only: the spec
form (``Block.forward``, any T, which is also the step at T = 1 everywhere the C step does not apply) and the C step
(``decode/``: fp32 RWKV-7 on CPU without autograd).

Input values (finite frames, token ids in range) are checked once, here at the model's edge (``check_inputs``, on by
default): on CUDA without a device-to-host read (``torch._assert_async``). Layers call the unchecked op cores.
"""

import bisect

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import decode
from .config import RWKVConfig, config_for
from .layers import rwkv4, rwkv5, rwkv6, rwkv7
from .ops.packing import PackedOffsets, check_cu_seqlens, packed_offsets
from .state import RWKVState, state_meta, zero_state

_LAYERS = {4: rwkv4, 5: rwkv5, 6: rwkv6, 7: rwkv7}
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

    def forward(self, x, shift_att, shift_ffn, wkv, v_first, *, backend="auto", cu_seqlens=None):
        """x: [B, T, C]; the layer's state in, the new one out: (x, shift_att, shift_ffn, wkv, v_first).
        ``cu_seqlens`` (``PackedOffsets``, or an int64 [S+1] tensor on x's device; B = 1): S sequences packed along
        T, the states one row each."""
        att, shift_att, wkv, v_first = self.att(self.ln1(x), shift_att, wkv, v_first, backend=backend,
                                                cu_seqlens=cu_seqlens)
        x = x + self.drop(att)
        ffn, shift_ffn = self.ffn(self.ln2(x), shift_ffn, cu_seqlens=cu_seqlens)
        return x + self.drop(ffn), shift_att, shift_ffn, wkv, v_first


class RWKV(nn.Module):
    """RWKV backbone or language model; see ``rwkv_torch.build``.

    ``gradient_checkpointing`` (default False): when True, every forward that records a graph runs each block
    under ``torch.utils.checkpoint`` (non-reentrant): activations inside a block are recomputed in the backward
    pass instead of kept, for about one extra forward of compute. Set it with ``set_gradient_checkpointing``.

    ``check_inputs`` (default True): ``forward`` and ``step`` check their input's values (frames finite, token ids in
    range) with a clear error. On CPU this reads one value back per call; on CUDA the check is queued on the device
    (``torch._assert_async``) and fails at the next synchronisation. Set it False for CUDA-graph capture or when the
    caller has checked already (``set_input_checks``).
    """

    def __init__(self, config: RWKVConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        self.check_inputs = True
        self._decode_epoch = 0  # bumped by _apply and clear_decode_weights: every DecodeWeights handle rebuilds
        self._decode_weights = decode.DecodeWeights(self)  # the handle of steps given none (see step)
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

    def set_input_checks(self, enabled: bool = True) -> "RWKV":
        """Turn the value checks of ``forward``/``step`` inputs on or off (see ``check_inputs``); returns the model."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.check_inputs = enabled
        return self

    def decode_weights(self) -> decode.DecodeWeights:
        """A new handle on the RWKV-7 decode weights the C step reads, for ``step(..., weights=dw)``: built on first
        use, rebuilt when stale by the rule of ``decode.weights`` (the version counters of the parameters they were
        derived from, parameter or module replacement, ``.to()``/casts of the model). Hold one wherever you step in
        a loop (``Stream``, ``generate`` and ``Policy`` do)."""
        return decode.DecodeWeights(self)

    def clear_decode_weights(self) -> None:
        """Mark every decode-weights handle of this model stale (each rebuilds at its next step). Needed only after
        ``param.data = other_tensor`` or a cast of a submodule alone, the changes the invalidation rule does not
        see."""
        self._decode_epoch += 1
        self._decode_weights.clear()

    clear_step_cache = clear_decode_weights  # the old name

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() ...: parameters change through .data, unseen by versions and identities.
        if "_decode_weights" in self.__dict__:  # not yet set while nn.Module.__init__ runs
            self.clear_decode_weights()
        return super()._apply(fn, *args, **kwargs)

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

    def _check_state(self, state: RWKVState, batch_size: int, packed: bool = False) -> None:
        if not isinstance(state, RWKVState):
            raise TypeError(f"state must be an RWKVState (from init_state), got {type(state).__name__}")
        if state.meta != self.state_meta():
            raise ValueError(f"state belongs to a model with {state.meta}, this model has {self.state_meta()}")
        if state.batch_size != batch_size:
            if packed:
                raise ValueError(f"with cu_seqlens the state needs one row per sequence ({batch_size}), got batch "
                                 f"size {state.batch_size}")
            raise ValueError(f"state is for batch size {state.batch_size}, input has batch size {batch_size}")

    def _check_input(self, x: torch.Tensor, time_axis: bool, values: bool = True) -> None:
        c = self.config
        if self.is_token_model:
            shape = "[B, T]" if time_axis else "[B]"
            if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"token ids must be an integer tensor {shape}, got {x.dtype}")
            if x.dim() != (2 if time_axis else 1):
                raise ValueError(f"token ids must be {shape}, got shape {tuple(x.shape)}")
        else:
            shape = "[B, T, embed_dim]" if time_axis else "[B, embed_dim]"
            if not x.is_floating_point():
                raise TypeError(f"frames must be a floating tensor {shape}, got {x.dtype}")
            if x.dim() != (3 if time_axis else 2) or x.shape[-1] != c.embed_dim:
                raise ValueError(f"frames must be {shape} with embed_dim={c.embed_dim}, got shape {tuple(x.shape)}")
        if time_axis and x.shape[1] == 0:
            raise ValueError("the sequence is empty (T = 0)")
        if values and self.check_inputs and x.numel():
            self._check_values(x)

    def _check_values(self, x: torch.Tensor, h: torch.Tensor | None = None) -> None:
        """Token ids in range / frames finite and (``h``, when given) their input projection after ``ln0`` finite
        (huge frames overflow there, ~1e19 in float32): one read-back on CPU, none on CUDA or inside a compiled
        graph."""
        queued = torch.compiler.is_compiling() or x.device.type != "cpu"
        if self.is_token_model:
            V = self.config.vocab_size
            if queued:
                torch._assert_async((x >= 0).all() & (x < V).all(), "token ids out of range")
                return
            lo, hi = torch.stack(torch.aminmax(x)).tolist()
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must be in [0, {V}), got min {lo} max {hi}")
        else:
            ok = torch.isfinite(x).all()
            if h is not None:
                ok = ok & torch.isfinite(h).all()
            if queued:
                torch._assert_async(ok, "frames contain NaN or inf, or are so large that the input projection "
                                        "overflows")
            elif not ok:  # a second look only to say which
                if not torch.isfinite(x).all():
                    raise ValueError("frames contain NaN or inf; they would poison the recurrent state")
                raise ValueError(f"frames too large: the input projection overflows (input_proj + ln0 in {h.dtype}, "
                                 f"max |frame| {x.abs().max().item():.3g}); they would poison the recurrent state")

    def _embed(self, x: torch.Tensor, time_axis: bool) -> torch.Tensor:
        self._check_input(x, time_axis, values=self.is_token_model)  # ids are checked before the lookup
        if self.is_token_model:
            return self._embed_unchecked(x)
        h = self._ln0(self._project(x))
        if self.check_inputs and x.numel():
            self._check_values(x, h)  # the frames and their normalised projection, in one read-back
        return h

    def _embed_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        return self._ln0(F.embedding(x.long(), self.emb.weight) if self.is_token_model else self._project(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.input_proj.weight.dtype), self.input_proj.weight, self.input_proj.bias)

    def _ln0(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.config.hidden_size,), self.ln0.weight, self.ln0.bias, self.ln0.eps)

    def _blocks(self, h, state, backend, cu_seqlens=None):
        v_first = None
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for l, block in enumerate(self.blocks):
            args = (h, state.shift_att[l], state.shift_ffn[l], state.wkv[l], v_first)
            if use_checkpoint:
                # The state goes in as tensors, not as the state object, so that the recomputation in the
                # backward pass sees this layer's input state, not the one written below.
                out = checkpoint(block, *args, backend=backend, cu_seqlens=cu_seqlens, use_reentrant=False)
            else:
                out = block(*args, backend=backend, cu_seqlens=cu_seqlens)
            h, state.shift_att[l], state.shift_ffn[l], state.wkv[l], v_first = out
        return h

    def _packed_blocks(self, h, state, packed: PackedOffsets, backend):
        """h [1, T, C], the sequences at offsets ``packed`` (read back already, its tensor on h's device), through the
        blocks, which pass it on to every op as their ``cu_seqlens`` (no further read-back); ``state`` (one row per
        sequence) is updated. On CPU in pieces of ``CPU_SEGMENT_LEN`` tokens as ``forward``: each piece runs the rows
        of the sequences it touches, and a sequence cut by a piece edge carries its state across."""
        T = h.shape[1]
        if h.device.type != "cpu" or T <= CPU_SEGMENT_LEN:
            return self._blocks(h, state, backend, packed)
        cs = packed.offsets
        outs = []
        for p0 in range(0, T, CPU_SEGMENT_LEN):
            p1 = min(p0 + CPU_SEGMENT_LEN, T)
            a, b = bisect.bisect_right(cs, p0) - 1, bisect.bisect_left(cs, p1)  # sequences a .. b-1 touch [p0, p1)
            offsets = (0, *(c - p0 for c in cs[a + 1 : b]), p1 - p0)
            local = PackedOffsets(torch.tensor(offsets, device=h.device), offsets)
            part = state.select(slice(a, b))
            outs.append(self._blocks(h[:, p0:p1], part, backend, local))
            for rows, new in ((state.shift_att, part.shift_att), (state.shift_ffn, part.shift_ffn),
                              (state.wkv, part.wkv)):
                for l, t in enumerate(new):
                    rows[l] = torch.cat([rows[l][:a], t, rows[l][b:]])
        return torch.cat(outs, dim=1)

    def _head(self, h):
        h = F.layer_norm(h, (self.config.hidden_size,), self.ln_out.weight, self.ln_out.bias, self.ln_out.eps)
        if self.head is None:
            return h
        if not isinstance(self.head, nn.Linear):  # a quantized head (rwkv_torch.quantize.QuantLinear)
            return self.head(h)
        if h.dim() == 2 and not torch.compiler.is_compiling():
            # A step's rows as weight @ hᵀ: over the big LM head's contiguous rows this is 2-7% faster than h @ weightᵀ
            # for one row and 1.2-2.8x for 2-32 rows (a batched decode step; 65,536 x 256/768, one thread).
            bias = self.head.bias
            out = torch.mm(self.head.weight, h.t()) if bias is None else torch.addmm(bias[:, None], self.head.weight,
                                                                                      h.t())
            return out.t() if h.shape[0] == 1 else out.t().contiguous()
        return F.linear(h, self.head.weight, self.head.bias)

    def forward(self, x, state: RWKVState | None = None, *, return_sequence: bool | None = None,
                return_state: bool = False, backend: str = "auto",
                cu_seqlens: torch.Tensor | PackedOffsets | None = None):
        """Parallel form over a sequence (on CPU in pieces of ``CPU_SEGMENT_LEN`` tokens, the state carried).

        Args:
            x: token ids ``[B, T]`` (token model) or frames ``[B, T, embed_dim]`` (continuous backbone).
            state: an ``RWKVState`` to continue from, or None for a fresh sequence.
            return_sequence: all positions ``[B, T, out]`` or only the last ``[B, out]``; None means the model's
                default (token models: all positions; continuous backbones: last position).
            return_state: also return the state after the last position.
            backend: WKV backend (``"auto"``, ``"naive"``, ``"chunk"``, ``"recurrent"``; see ``ops.wkv7``).
            cu_seqlens: packed training without padding. An int32/int64 tensor ``[S+1]`` of offsets (0 first, T
                last, strictly increasing: empty sequences are an error) of S sequences stored back to back in
                ``x`` of batch 1 (``[1, T]`` / ``[1, T, embed_dim]``). Each sequence runs exactly as if alone, from
                its own state row: token shift and wkv state restart at every offset. ``state`` (given or returned)
                then has one row per sequence (batch S); ``return_sequence=False`` gives each sequence's last
                position, ``[S, out]``; all positions stay ``[1, T, out]``. One read-back of ``cu_seqlens`` per call,
                here, whatever the depth (``ops.packing.PackedOffsets``, already read back: none).

        Returns:
            ``out`` or ``(out, state)``; ``out`` has ``config.output_size`` features.

        Example (two sequences of 3 and 5 frames):
            >>> m = build(embed_dim=4, hidden_size=32, num_layers=1, head_size=16)
            >>> y, s = m(torch.randn(1, 8, 4), cu_seqlens=torch.tensor([0, 3, 8]), return_state=True)
            >>> y.shape, s.batch_size
            (torch.Size([2, 32]), 2)
        """
        h = self._embed(x, time_axis=True)
        packed = None if cu_seqlens is None else _check_packing(cu_seqlens, x.shape[0], x.shape[1])
        rows = x.shape[0] if packed is None else packed.num_sequences
        if state is None:
            state = self.init_state(rows, device=h.device, dtype=h.dtype)
        else:
            self._check_state(state, rows, packed=packed is not None)
            state = state.fork()
        if return_sequence is None:
            return_sequence = self.is_token_model
        if packed is not None:
            packed = packed_offsets(packed, device=h.device)
            h = self._packed_blocks(h, state, packed, backend)
            last = packed.tensor[1:] - 1
            out = self._head(h if return_sequence else h[0].index_select(0, last))  # [1, T, C] or [S, C]
            return (out, state) if return_state else out
        pieces = h.split(CPU_SEGMENT_LEN, dim=1) if h.device.type == "cpu" else (h,)
        outs = []
        for piece in pieces:
            piece = self._blocks(piece, state, backend)
            outs.append(piece if return_sequence else piece[:, -1:])
        h = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        out = self._head(h if return_sequence else h[:, -1])  # the head only where it is asked for
        return (out, state) if return_state else out

    def step(self, x_t, state: RWKVState | None = None, *, weights: decode.DecodeWeights | None = None):
        """One token ``[B]`` or frame ``[B, embed_dim]`` -> ``(out [B, out], new state)``; O(1) time and memory.

        The given state is not modified. fp32 (or ``quantize``d) RWKV-7 on CPU without autograd, autocast or active
        dropout runs the C step (``decode/``; many rows: the batched engine, GEMMs over the rows) over ``weights``, a
        handle from ``decode_weights()``; without one it uses the model's own handle (same rule, same cost). Callers
        that step in a loop should hold one (``dw = model.decode_weights()``, then ``model.step(x, s, weights=dw)``):
        its rebuilds (``dw.rebuilds``) are then this caller's alone. Everything else runs the spec form at T = 1
        (``forward``'s blocks over one position). Both compute the same function.
        """
        h = self._embed(x_t, time_axis=False)  # [B, C]
        if state is None:
            state = self.init_state(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            self._check_state(state, h.shape[0])
        if self._c_step_applies(h, state):
            done = decode.blocks_step(self._weights(weights), self.config, h, state, inplace=False)
            if done is not None:
                h, (shift_att, shift_ffn, wkv) = done
                return self._head(h), RWKVState(shift_att, shift_ffn, wkv, dict(state.meta))
        return self._spec_step(h, state)

    def step_(self, x_t, state: RWKVState, *, weights: decode.DecodeWeights | None = None) -> torch.Tensor:
        """``step`` that overwrites ``state``'s tensors with the new state and returns only ``out [B, out]``.

        Saves allocating a new state per token on the C step; ``Stream`` uses it. Anything aliasing the state's
        tensors sees the update (take ``state.clone()`` to keep a copy). ``weights`` as for ``step``.
        """
        h = self._embed(x_t, time_axis=False)
        self._check_state(state, h.shape[0])
        if self._c_step_applies(h, state) and all(
            a.dtype == f.dtype == h.dtype for a, f in zip(state.shift_att, state.shift_ffn)
        ):
            done = decode.blocks_step(self._weights(weights), self.config, h, state, inplace=True)
            if done is not None:
                return self._head(done[0])
        out, new = self._spec_step(h, state)
        with torch.no_grad():
            for old, t in zip(state.flat(), new.flat()):
                old.copy_(t)
        return out

    def _weights(self, weights: decode.DecodeWeights | None) -> decode.DecodeWeights:
        if weights is None:
            weights = self._decode_weights
        elif not isinstance(weights, decode.DecodeWeights) or weights.model is not self:
            raise ValueError("weights= must be a decode-weights handle of this model (model.decode_weights())")
        return weights.current()

    def _spec_step(self, h, state: RWKVState):
        """h [B, C] (after ln0) through the blocks' forward at T = 1 and the head: (out, a new state)."""
        new = state.fork()
        return self._head(self._blocks(h.unsqueeze(1), new, "auto")[:, 0]), new

    def _c_step_applies(self, h, state) -> bool:
        if torch.is_grad_enabled() or (self.training and self.config.dropout > 0):
            return False
        return not _autocast_enabled(h.device.type) and decode.applies(self, h, state)

    def compile_step(self, batch_size: int = 1) -> decode.CompiledStep:
        """``step`` for a fixed ``batch_size``, compiled ahead of time by TorchInductor (AOTInductor: torch >= 2.6
        and a C++ compiler; tens of seconds). The weights are a snapshot taken now. See ``decode.CompiledStep``."""
        return decode.CompiledStep(self, batch_size)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_packing(cu_seqlens, batch: int, total: int) -> PackedOffsets:
    """cu_seqlens valid for ``forward`` (the op rules, and no empty sequence: it would have no last position), as
    ``PackedOffsets``: the one read-back of a packed forward."""
    packed = check_cu_seqlens(cu_seqlens, batch, total)
    cs = packed.offsets
    for i, (s, e) in enumerate(zip(cs[:-1], cs[1:])):
        if s == e:
            raise ValueError(f"cu_seqlens holds an empty sequence (sequence {i}: offsets {i} and {i + 1} are both "
                             f"{s}); drop empty sequences before packing")
    return packed


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def build(*, seed: int | None = None, **options) -> RWKV:
    """Build an RWKV model with the official from-scratch initialisation.

    Options are ``RWKVConfig`` fields (Edifice's names): ``embed_dim`` (continuous frames ``[B, T, embed_dim]``;
    the call returns the last position ``[B, hidden_size]``) or ``vocab_size`` (token model with LM head),
    ``hidden_size=256, num_layers=6, head_size=64, dropout=0.1, window_size=60, version=7``, ``output_dim``, LoRA
    ranks. ``seed`` makes the initial weights independent of the global RNG (same seed, same tensors).
    """
    config = config_for(**options)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return RWKV(config, generator=gen)
