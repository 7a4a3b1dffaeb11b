"""``RWKVForCausalLM``: this package's ``RWKV`` token model (``rwkv_torch.model``) as a transformers
``PreTrainedModel`` with ``GenerationMixin``; no second implementation of the model.

The generation cache is the recurrent state: ``RWKVCache`` holds an ``RWKVState`` and the count of tokens it has
seen, so ``generate`` prefills the prompt once and then steps one token at a time (the C step of ``model.step`` where
it applies). ``attention_mask`` is exact for any padding: a position with mask 0 leaves the state unchanged (the
rows' unmasked tokens run packed, one state row each, through ``cu_seqlens``); its hidden states are zeros.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import CPU_SEGMENT_LEN, RWKV
from ..ops.packing import PackedOffsets
from ..state import RWKVState
from .configuration import RWKVConfig

# transformers 5 names the cache `cache`; 4.x `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RWKVCache:
    """The generation cache of an RWKV model: ``state`` (an ``RWKVState``, one row per sequence) and ``seen``
    (tokens consumed, padding included). Updated in place by the model's forward, as transformers' caches are."""

    is_compileable = False
    is_linear = (True,)

    def __init__(self, state: RWKVState | None = None, seen: int = 0):
        self.state, self.seen = state, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep the rows ``beam_idx``."""
        if self.state is not None:
            self.state = self.state.select(beam_idx.to(self.state.wkv[0].device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size, device=self.state.wkv[0].device).repeat_interleave(repeats)
            self.state = self.state.select(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def __len__(self) -> int:
        return 0 if self.state is None else self.state.num_layers


class RWKVPreTrainedModel(PreTrainedModel):
    config_class = RWKVConfig
    base_model_prefix = "rwkv"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _is_stateful = True

    def _init_weights(self, module):
        pass  # RWKV.__init__ applies the official initialisation; loaded weights replace it


class RWKVForCausalLM(RWKVPreTrainedModel, GenerationMixin):
    """An RWKV-4/5/6/7 language model. ``self.rwkv`` is the ``rwkv_torch.model.RWKV`` it wraps (``from_rwkv`` wraps
    an existing one, sharing its parameters).

    ``forward(input_ids | inputs_embeds, attention_mask, cache, labels, use_cache, output_hidden_states)``:
    ``inputs_embeds`` are token embeddings before ``ln0`` (what ``get_input_embeddings()`` returns for ids);
    ``labels`` give the shifted cross-entropy (-100 ignored); ``hidden_states`` are the input of block 0 (after
    ``ln0``) and each block's output, ``num_layers + 1`` tensors. ``past_key_values`` is accepted for ``cache``.
    """

    def __init__(self, config: RWKVConfig, rwkv: RWKV | None = None):
        super().__init__(config)
        self.rwkv = rwkv if rwkv is not None else RWKV(config.core())
        self._dw = None  # the decode-weights handle of the generation steps (built on the first step)
        self.post_init()

    @classmethod
    def from_rwkv(cls, model: RWKV, **config_kwargs) -> "RWKVForCausalLM":
        """Wrap an ``rwkv_torch`` token model (its parameters shared, not copied)."""
        return cls(RWKVConfig.from_core(model.config, **config_kwargs), rwkv=model)

    def get_input_embeddings(self):
        return self.rwkv.emb

    def set_input_embeddings(self, value):
        self.rwkv.emb = value

    def get_output_embeddings(self):
        return self.rwkv.head

    def set_output_embeddings(self, value):
        self.rwkv.head = value

    def _decode_handle(self):
        if self._dw is None or self._dw.model is not self.rwkv:
            self._dw = self.rwkv.decode_weights()
        return self._dw

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None, labels=None,
                use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0, past_key_values=None,
                **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        state = cache.state if isinstance(cache, RWKVCache) else cache
        if state is not None and not isinstance(state, RWKVState):
            raise TypeError(f"cache must be an RWKVCache or RWKVState, got {type(state).__name__}")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        m = self.rwkv
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -T:].to(x.device).bool()
            if bool(mask.all()):
                mask = None

        hidden = None
        if (input_ids is not None and T == 1 and mask is None and not output_hidden_states and labels is None
                and not torch.is_grad_enabled() and not _adapted(m)):
            logits, state = m.step(input_ids[:, 0], state, weights=self._decode_handle())
            logits = logits[:, None]
        else:
            h = m._embed(input_ids, time_axis=True) if input_ids is not None else m._ln0(inputs_embeds)
            if state is None:
                state = m.init_state(B, device=h.device, dtype=h.dtype)
            else:
                m._check_state(state, B)
                state = state.fork()
            h, hidden = self._run(h, state, mask, output_hidden_states)
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                h = h[:, logits_to_keep]
            logits = m._head(h)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        new_cache = None
        if use_cache:
            new_cache = cache if isinstance(cache, RWKVCache) else RWKVCache()
            new_cache.state, new_cache.seen = state, new_cache.seen + T
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden, **{_CACHE_FIELD: new_cache})
        return out if return_dict is not False else out.to_tuple()

    def _run(self, h, state: RWKVState, mask, collect: bool):
        """h [B, T, C] through the blocks from ``state`` (updated); ``mask`` [B, T] bool or None (all real).
        Returns (h, hidden states or None)."""
        m = self.rwkv
        caught = [[] for _ in m.blocks]
        hooks = [b.register_forward_hook(lambda mod, args, out, i=i: caught[i].append(out[0]))
                 for i, b in enumerate(m.blocks)] if collect else []
        try:
            if mask is None:
                first = h
                pieces = h.split(CPU_SEGMENT_LEN, dim=1) if h.device.type == "cpu" else (h,)
                h = torch.cat([m._blocks(p, state, "auto") for p in pieces], dim=1)
                unpack = None
            else:
                first, h, unpack = h, *self._run_packed(h, state, mask)
        finally:
            for hk in hooks:
                hk.remove()
        if not collect:
            return h, None
        hidden = [torch.cat(c, dim=1) for c in caught]
        if unpack is not None:
            hidden = [unpack(t) for t in hidden]
        return h, (first, *hidden)

    def _run_packed(self, h, state: RWKVState, mask):
        """The unmasked tokens of each row packed into one sequence per row (``cu_seqlens``), run from that row's
        state; rows with no token keep theirs. Returns (h [B, T, C] with zeros where masked, unpack)."""
        m = self.rwkv
        lengths = mask.sum(1)
        rows = torch.nonzero(lengths).flatten()
        lens = lengths[rows].tolist()
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)

        def unpack(packed):
            full = packed.new_zeros(*mask.shape, packed.shape[-1])
            full[mask] = packed[0]
            return full

        if not lens:
            return torch.zeros_like(h), unpack
        packed = PackedOffsets(torch.tensor(offsets, device=h.device), tuple(offsets))
        part = state.select(rows)
        out = m._packed_blocks(h[mask].unsqueeze(0), part, packed, "auto")
        for mine, new in ((state.shift_att, part.shift_att), (state.shift_ffn, part.shift_ffn),
                          (state.wkv, part.wkv)):
            for l, t in enumerate(new):
                mine[l] = mine[l].index_copy(0, rows, t.to(mine[l].dtype))
        return unpack(out), unpack

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, use_cache=True,
                                      past_key_values=None, **kwargs):
        """Only the tokens the cache has not seen: the whole prompt once (prefill), then one token per step."""
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if isinstance(cache, RWKVCache) else 0
        inputs = {"attention_mask": attention_mask, _CACHE_FIELD: cache, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:] if seen else input_ids
        for k in ("output_hidden_states", "logits_to_keep"):
            if k in kwargs:
                inputs[k] = kwargs[k]
        return inputs


def _adapted(model: RWKV) -> bool:
    """Whether adapter wrappers (peft's, holding the projection as ``base_layer``) replace some projections: the
    one-token step then runs the spec form, which calls the wrappers (the C step reads plain weights)."""
    return any(hasattr(mod, "base_layer") for mod in model.blocks.modules())


def register() -> None:
    """Make ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` know ``model_type="rwkv_torch"``
    (idempotent)."""
    from transformers import AutoTokenizer

    from .tokenization import RWKVTokenizer

    AutoConfig.register(RWKVConfig.model_type, RWKVConfig, exist_ok=True)
    AutoModelForCausalLM.register(RWKVConfig, RWKVForCausalLM, exist_ok=True)
    AutoTokenizer.register(RWKVConfig, tokenizer_class=RWKVTokenizer, exist_ok=True)
