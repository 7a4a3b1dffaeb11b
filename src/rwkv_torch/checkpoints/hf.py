"""RWKV-4 official names <-> Hugging Face transformers' ``RwkvForCausalLM`` names: a pure renaming, same shapes.

``to_hf_state_dict(model)`` / ``from_hf_state_dict(sd)`` convert through the official names
(``official.to_official_state_dict`` / ``from_official_state_dict``).
"""

import torch

from ..model import RWKV
from .keymap import invert_map, key_listing, map_key, remap_keys
from .official import as_rwkv, check_tensors, from_official_state_dict, to_official_state_dict

OFFICIAL_TO_HF = {
    "emb.weight": "rwkv.embeddings.weight",
    "blocks.0.ln0.weight": "rwkv.blocks.0.pre_ln.weight",
    "blocks.0.ln0.bias": "rwkv.blocks.0.pre_ln.bias",
    **{f"blocks.{{}}.{ln}.{p}": f"rwkv.blocks.{{}}.{ln}.{p}" for ln in ("ln1", "ln2") for p in ("weight", "bias")},
    "blocks.{}.att.time_decay": "rwkv.blocks.{}.attention.time_decay",
    "blocks.{}.att.time_first": "rwkv.blocks.{}.attention.time_first",
    **{f"blocks.{{}}.{ours}.time_mix_{c}": f"rwkv.blocks.{{}}.{theirs}.time_mix_{name}"
       for ours, theirs, letters in (("att", "attention", "kvr"), ("ffn", "feed_forward", "kr"))
       for c, name in (("k", "key"), ("v", "value"), ("r", "receptance")) if c in letters},
    **{f"blocks.{{}}.att.{n}.weight": f"rwkv.blocks.{{}}.attention.{n}.weight"
       for n in ("key", "value", "receptance", "output")},
    **{f"blocks.{{}}.ffn.{n}.weight": f"rwkv.blocks.{{}}.feed_forward.{n}.weight"
       for n in ("key", "value", "receptance")},
    "ln_out.weight": "rwkv.ln_out.weight",
    "ln_out.bias": "rwkv.ln_out.bias",
    "head.weight": "head.weight",
}
HF_TO_OFFICIAL = invert_map(OFFICIAL_TO_HF)


def to_hf_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """An RWKV-4 model's weights under ``transformers``' ``RwkvForCausalLM`` names (same shapes as official).

    Load them into a ``RwkvConfig(..., rescale_every=0)`` model: transformers otherwise rescales the weights at
    inference (a fp16 overflow workaround), which changes the numbers."""
    model = as_rwkv(model)
    if model.config.version != 4:
        raise ValueError(f"transformers' RWKV names are for RWKV-4 models, this one is RWKV-{model.config.version}")
    return {map_key(k, OFFICIAL_TO_HF): t for k, t in to_official_state_dict(model).items()}


def from_hf_state_dict(sd: dict, *, source: str = "transformers state dict") -> RWKV:
    """An RWKV-4 model from a transformers ``RwkvForCausalLM`` state dict (the inverse of to_hf_state_dict)."""
    check_tensors(sd, source)
    out, unknown = remap_keys(sd, HF_TO_OFFICIAL)
    if unknown:
        raise ValueError(f"{source}: unknown transformers RWKV-4 keys {key_listing(unknown)}")
    return from_official_state_dict(out, source=source)
