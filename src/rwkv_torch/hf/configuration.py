"""``RWKVConfig`` for transformers: this package's ``rwkv_torch.config.RWKVConfig`` as a ``PretrainedConfig``.

The fields are ours under their own names, except ``num_layers``, stored as transformers' ``num_hidden_layers``
(``num_layers`` reads it). ``model_type`` is ``"rwkv_torch"``: transformers' own RWKV-4 classes hold ``"rwkv"``.
"""

from transformers import PretrainedConfig

from ..config import RWKVConfig as CoreConfig

MODEL_TYPE = "rwkv_torch"
_CORE_FIELDS = ("version", "hidden_size", "head_size", "vocab_size", "ffn_size", "decay_lora", "a_lora", "v_lora",
                "gate_lora", "mix_lora", "dropout")


class RWKVConfig(PretrainedConfig):
    """An RWKV-4/5/6/7 language model's sizes (``version``, ``hidden_size``, ``num_hidden_layers``, ``head_size``,
    ``vocab_size``, ``ffn_size``, LoRA ranks, ``dropout``) plus transformers' generation fields. ``core()`` gives
    the ``rwkv_torch.config.RWKVConfig`` the model is built from; ``from_core(c)`` the inverse."""

    model_type = MODEL_TYPE
    attribute_map = {"num_layers": "num_hidden_layers"}

    def __init__(self, version: int = 7, hidden_size: int = 256, num_hidden_layers: int = 6, head_size: int = 64,
                 vocab_size: int = 65536, ffn_size: int | None = None, decay_lora: int | None = None,
                 a_lora: int | None = None, v_lora: int | None = None, gate_lora: int | None = None,
                 mix_lora: int | None = None, dropout: float = 0.0, use_cache: bool = True, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, tie_word_embeddings: bool = False, **kwargs):
        self.version, self.hidden_size, self.num_hidden_layers, self.head_size = (version, hidden_size,
                                                                                  num_hidden_layers, head_size)
        self.vocab_size, self.ffn_size, self.dropout, self.use_cache = vocab_size, ffn_size, dropout, use_cache
        self.decay_lora, self.a_lora, self.v_lora, self.gate_lora, self.mix_lora = (decay_lora, a_lora, v_lora,
                                                                                   gate_lora, mix_lora)
        if tie_word_embeddings:
            raise ValueError("RWKVConfig.tie_word_embeddings=True: RWKV models have separate emb and head weights")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, **kwargs)
        self.core()  # validate now, with the core config's messages

    def core(self) -> CoreConfig:
        """The ``rwkv_torch.config.RWKVConfig`` of these sizes."""
        return CoreConfig(num_layers=self.num_hidden_layers, **{f: getattr(self, f) for f in _CORE_FIELDS})

    @classmethod
    def from_core(cls, c: CoreConfig, **kwargs) -> "RWKVConfig":
        """From a token model's ``rwkv_torch.config.RWKVConfig``; ``kwargs`` are transformers fields."""
        if c.vocab_size is None:
            raise ValueError("the transformers classes are for token models (vocab_size); this config is a "
                             f"continuous backbone (embed_dim={c.embed_dim})")
        return cls(num_hidden_layers=c.num_layers, **{f: getattr(c, f) for f in _CORE_FIELDS}, **kwargs)
