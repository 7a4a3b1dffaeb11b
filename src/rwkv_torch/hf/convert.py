"""An ``rwkv_torch`` model (or any checkpoint ``rwkv_torch.load`` reads) -> a transformers directory."""

from pathlib import Path

import torch

from ..checkpoints import load
from ..model import RWKV
from ..tokenizer import TOKENIZER_BY_VOCAB
from .modeling import RWKVForCausalLM
from .tokenization import RWKVTokenizer


def to_hf(model: RWKV) -> RWKVForCausalLM:
    """Wrap a token model (parameters shared); World models get id 0 as bos/eos/pad in their generation config."""
    world = model.config.vocab_size == 65536
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0) if world else {}
    hf = RWKVForCausalLM.from_rwkv(model, **ids)
    for k, v in ids.items():
        setattr(hf.generation_config, k, v)
    return hf


def save_hf(model_or_path, dst, *, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Path:
    """Write ``dst`` (config.json, model.safetensors, generation_config.json and, for vocab 256 / 65536, the
    byte / World tokenizer) for ``AutoModelForCausalLM.from_pretrained`` after ``rwkv_torch.hf.register()``."""
    m = model_or_path if isinstance(model_or_path, RWKV) else load(str(model_or_path), dtype=dtype)
    hf = to_hf(m)
    hf.save_pretrained(str(dst))
    kind = TOKENIZER_BY_VOCAB.get(m.config.vocab_size)
    if tokenizer and kind is not None:
        RWKVTokenizer(kind=kind).save_pretrained(str(dst))
    return Path(dst)
