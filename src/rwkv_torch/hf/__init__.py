"""Hugging Face transformers classes wrapping ``rwkv_torch.model`` (``pip install rwkv-torch[hf]``):
``RWKVConfig``, ``RWKVForCausalLM`` (generate with the recurrent state as the cache, Trainer, PEFT),
``RWKVTokenizer`` (World / byte), ``register()`` for the Auto classes, ``to_hf``/``save_hf`` for conversion."""

from .configuration import MODEL_TYPE, RWKVConfig
from .convert import save_hf, to_hf
from .modeling import RWKVCache, RWKVForCausalLM, RWKVPreTrainedModel, register
from .tokenization import RWKVTokenizer

__all__ = ["MODEL_TYPE", "RWKVCache", "RWKVConfig", "RWKVForCausalLM", "RWKVPreTrainedModel", "RWKVTokenizer",
           "register", "save_hf", "to_hf"]
