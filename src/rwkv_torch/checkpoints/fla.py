"""fla's ``RWKV7ForCausalLM`` and ``RWKV6ForCausalLM`` names and layouts <-> ours, both ways (spec section 9).

Both convert through the official names (``official.to_official_state_dict`` / ``from_official_state_dict``).

RWKV-7 (fla utils/convert_from_rwkv7.py): a rename (``OFFICIAL_TO_FLA``); the LoRA matrices become ``nn.Linear``
weights (transposed), the biases ``w0/a0/v0`` and ``k_k, k_a, ffn.x_k`` are ``(C,)``, ``x_r ... x_g`` stay
``(1, 1, C)``; block 0's unused ``v0/v1/v2`` are dropped.

RWKV-6: most keys are a rename (``OFFICIAL_TO_FLA6``; vectors stored ``(1, 1, C)`` officially are ``(C,)`` in fla,
the decay LoRA is ``nn.Linear``-shaped, i.e. transposed). The data-dependent token-shift LoRA is regrouped: fla
keeps the five mixes in the order (r, w, k, v, g) where the official files use (w, k, v, r, g):

* ``time_maa_{r,w,k,v,g}`` ``(1, 1, C)`` each -> ``attn.x_bias [5, C]``;
* ``time_maa_w1 [C, 5D]`` (column blocks w, k, v, r, g) -> ``attn.x_proj.0.linear.weight [5D, C]`` (blocks
  reordered, transposed);
* ``time_maa_w2 [5, D, C]`` (slabs w, k, v, r, g) -> ``attn.x_proj.2.weight [C, 5D]`` (slabs reordered,
  concatenated, transposed; fla reads it as ``[C, 5, D]``).
"""

import torch

from ..model import RWKV
from .keymap import block_part, invert_map, key_listing, map_key, remap_keys
from .official import as_rwkv, check_tensors, from_official_state_dict, to_official_state_dict


def _fla_lora(letter: str, bias: bool) -> dict:
    out = {f"blocks.{{}}.att.{letter}1": f"model.layers.{{}}.attn.{letter}_lora.lora.0.weight",
           f"blocks.{{}}.att.{letter}2": f"model.layers.{{}}.attn.{letter}_lora.lora.2.weight"}
    if bias:
        out[f"blocks.{{}}.att.{letter}0"] = f"model.layers.{{}}.attn.{letter}_lora.lora.2.bias"
    return out


OFFICIAL_TO_FLA = {
    "emb.weight": "model.embeddings.weight",
    "blocks.0.ln0.weight": "model.layers.0.pre_norm.weight",
    "blocks.0.ln0.bias": "model.layers.0.pre_norm.bias",
    "blocks.0.att.v0": None,
    "blocks.0.att.v1": None,
    "blocks.0.att.v2": None,
    "blocks.{}.ln1.weight": "model.layers.{}.attn_norm.weight",
    "blocks.{}.ln1.bias": "model.layers.{}.attn_norm.bias",
    "blocks.{}.ln2.weight": "model.layers.{}.ffn_norm.weight",
    "blocks.{}.ln2.bias": "model.layers.{}.ffn_norm.bias",
    **{f"blocks.{{}}.att.x_{c}": f"model.layers.{{}}.attn.x_{c}" for c in "rwkvag"},
    **_fla_lora("w", bias=True),
    **_fla_lora("a", bias=True),
    **_fla_lora("v", bias=True),
    **_fla_lora("g", bias=False),
    "blocks.{}.att.k_k": "model.layers.{}.attn.k_k",
    "blocks.{}.att.k_a": "model.layers.{}.attn.k_a",
    "blocks.{}.att.r_k": "model.layers.{}.attn.r_k",
    "blocks.{}.att.receptance.weight": "model.layers.{}.attn.r_proj.weight",
    "blocks.{}.att.key.weight": "model.layers.{}.attn.k_proj.weight",
    "blocks.{}.att.value.weight": "model.layers.{}.attn.v_proj.weight",
    "blocks.{}.att.output.weight": "model.layers.{}.attn.o_proj.weight",
    "blocks.{}.att.ln_x.weight": "model.layers.{}.attn.g_norm.weight",
    "blocks.{}.att.ln_x.bias": "model.layers.{}.attn.g_norm.bias",
    "blocks.{}.ffn.x_k": "model.layers.{}.ffn.x_k",
    "blocks.{}.ffn.key.weight": "model.layers.{}.ffn.key.weight",
    "blocks.{}.ffn.value.weight": "model.layers.{}.ffn.value.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
FLA_TO_OFFICIAL = invert_map(OFFICIAL_TO_FLA)

_FLA_TRANSPOSED = {f"att.{c}{i}" for c in "wavg" for i in (1, 2)}  # bare [in, out] LoRA -> Linear [out, in]
_FLA_SQUEEZED = {"att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k"}  # (1, 1, C) -> (C,); x_* stay

_OFFICIAL_MIX_ORDER = "wkvrg"  # time_maa_w1 blocks / time_maa_w2 slabs in official files
_FLA6_MIX_ORDER = "rwkvg"  # fla's x_bias rows and x_proj blocks
_TO_FLA6_ORDER = [_OFFICIAL_MIX_ORDER.index(c) for c in _FLA6_MIX_ORDER]
_TO_OFFICIAL_ORDER = [_FLA6_MIX_ORDER.index(c) for c in _OFFICIAL_MIX_ORDER]

_L = "model.layers.{}."
OFFICIAL_TO_FLA6 = {
    "emb.weight": "model.embeddings.weight",
    "blocks.0.ln0.weight": "model.layers.0.pre_norm.weight",
    "blocks.0.ln0.bias": "model.layers.0.pre_norm.bias",
    "blocks.{}.ln1.weight": _L + "attn_norm.weight",
    "blocks.{}.ln1.bias": _L + "attn_norm.bias",
    "blocks.{}.ln2.weight": _L + "ffn_norm.weight",
    "blocks.{}.ln2.bias": _L + "ffn_norm.bias",
    "blocks.{}.att.time_maa_x": _L + "attn.x_proj.0.mu",
    "blocks.{}.att.time_decay": _L + "attn.w_proj.linear.lora.2.bias",
    "blocks.{}.att.time_decay_w1": _L + "attn.w_proj.linear.lora.0.weight",
    "blocks.{}.att.time_decay_w2": _L + "attn.w_proj.linear.lora.2.weight",
    "blocks.{}.att.time_faaaa": _L + "attn.bonus",
    "blocks.{}.att.receptance.weight": _L + "attn.r_proj.linear.weight",
    "blocks.{}.att.key.weight": _L + "attn.k_proj.linear.weight",
    "blocks.{}.att.value.weight": _L + "attn.v_proj.linear.weight",
    "blocks.{}.att.gate.weight": _L + "attn.g_proj.linear.weight",
    "blocks.{}.att.output.weight": _L + "attn.o_proj.weight",
    "blocks.{}.att.ln_x.weight": _L + "attn.g_norm.weight",
    "blocks.{}.att.ln_x.bias": _L + "attn.g_norm.bias",
    "blocks.{}.ffn.time_maa_k": _L + "ffn.key.mu",
    "blocks.{}.ffn.key.weight": _L + "ffn.key.linear.weight",
    "blocks.{}.ffn.time_maa_r": _L + "ffn.receptance.mu",
    "blocks.{}.ffn.receptance.weight": _L + "ffn.receptance.linear.weight",
    "blocks.{}.ffn.value.weight": _L + "ffn.value.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
FLA6_TO_OFFICIAL = invert_map(OFFICIAL_TO_FLA6)

_FLA6_TRANSPOSED = {"att.time_decay_w1", "att.time_decay_w2"}
_FLA6_SQUEEZED = {"att.time_maa_x", "att.time_decay", "ffn.time_maa_k", "ffn.time_maa_r"}
_FLA6_REGROUPED = {f"att.time_maa_{c}" for c in _FLA6_MIX_ORDER} | {"att.time_maa_w1", "att.time_maa_w2"}
_FLA6_REGROUPED_KEYS = ("attn.x_bias", "attn.x_proj.0.linear.weight", "attn.x_proj.2.weight")


def _official_to_fla(sd: dict) -> dict:
    out = {}
    for key, t in sd.items():
        name = map_key(key, OFFICIAL_TO_FLA)
        if name is None:
            continue
        part = block_part(key)
        if part in _FLA_TRANSPOSED:
            t = t.t()
        elif part in _FLA_SQUEEZED:
            t = t.reshape(-1)
        out[name] = t
    return out


def _fla_to_official(sd: dict, source: str) -> dict:
    renamed, unknown = remap_keys(sd, FLA_TO_OFFICIAL)
    if unknown:
        raise ValueError(f"{source}: unknown fla RWKV-7 keys {key_listing(unknown)}")
    out = {}
    for name, t in renamed.items():
        part = block_part(name)
        if part in _FLA_TRANSPOSED:
            t = t.t()
        elif part in _FLA_SQUEEZED:
            t = t.view(1, 1, -1)
        out[name] = t
    return out


def _official_to_fla6(sd: dict) -> dict:
    """An official RWKV-6 state dict (``to_official_state_dict``) -> fla names and layouts."""
    out, layers = {}, {}
    for key, t in sd.items():
        part = block_part(key)
        if part in _FLA6_REGROUPED:
            layers.setdefault(int(key.split(".")[1]), {})[part] = t
            continue
        name = map_key(key, OFFICIAL_TO_FLA6)
        out[name] = t.t() if part in _FLA6_TRANSPOSED else t.reshape(-1) if part in _FLA6_SQUEEZED else t
    for i, p in layers.items():
        w1, w2 = p["att.time_maa_w1"], p["att.time_maa_w2"]  # [C, 5D], [5, D, C]
        C, D = w1.shape[0], w1.shape[1] // 5
        pre = _L.format(i)
        out[pre + "attn.x_bias"] = torch.stack([p[f"att.time_maa_{c}"].reshape(C) for c in _FLA6_MIX_ORDER])
        out[pre + "attn.x_proj.0.linear.weight"] = (
            w1.view(C, 5, D)[:, _TO_FLA6_ORDER].reshape(C, 5 * D).t().contiguous())
        out[pre + "attn.x_proj.2.weight"] = w2[_TO_FLA6_ORDER].reshape(5 * D, C).t().contiguous()
    return out


def _fla6_to_official(sd: dict, source: str) -> dict:
    """The inverse of ``_official_to_fla6``; unknown keys are an error naming them."""
    renamable, layers = {}, {}
    for key, t in sd.items():
        rest = key.split(".", 3)[3] if key.startswith("model.layers.") and key.count(".") >= 3 else None
        if rest in _FLA6_REGROUPED_KEYS:
            layers.setdefault(int(key.split(".")[2]), {})[rest] = t
        else:
            renamable[key] = t
    renamed, unknown = remap_keys(renamable, FLA6_TO_OFFICIAL)
    if unknown:
        raise ValueError(f"{source}: unknown fla RWKV-6 keys {key_listing(unknown)}")
    out = {}
    for name, t in renamed.items():
        part = block_part(name)
        out[name] = t.t() if part in _FLA6_TRANSPOSED else t.view(1, 1, -1) if part in _FLA6_SQUEEZED else t
    for i, p in layers.items():
        missing = [k for k in _FLA6_REGROUPED_KEYS if k not in p]
        if missing:
            raise ValueError(f"{source}: layer {i} lacks {', '.join(missing)}")
        bias, w1, w2 = (p[k] for k in _FLA6_REGROUPED_KEYS)  # [5, C], [5D, C], [C, 5D]
        C, D = bias.shape[1], w1.shape[0] // 5
        pre = f"blocks.{i}.att."
        for j, c in enumerate(_FLA6_MIX_ORDER):
            out[pre + f"time_maa_{c}"] = bias[j].view(1, 1, C)
        out[pre + "time_maa_w1"] = w1.t().reshape(C, 5, D)[:, _TO_OFFICIAL_ORDER].reshape(C, 5 * D).contiguous()
        out[pre + "time_maa_w2"] = w2.t().reshape(5, D, C)[_TO_OFFICIAL_ORDER].contiguous()
    return out


def _is_fla6(sd: dict) -> bool:
    return any(k.endswith("attn.x_proj.0.mu") for k in sd)


def to_fla_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """An RWKV-7 model's weights under fla's ``RWKV7ForCausalLM`` names and layouts (spec section 9); for an
    RWKV-6 model, ``RWKV6ForCausalLM``'s (see the module docstring).

    LoRA matrices become ``nn.Linear`` weights ``[out, in]`` (``w1 [C, D]`` -> ``w_lora.lora.0.weight [D, C]``),
    the biases ``w0/a0/v0`` and ``k_k, k_a, ffn.x_k`` are ``(C,)``, ``x_r ... x_g`` stay ``(1, 1, C)``.
    """
    model = as_rwkv(model)
    if model.config.version == 6:  # RWKV6ForCausalLM
        return _official_to_fla6(to_official_state_dict(model))
    if model.config.version != 7:
        raise ValueError(f"fla conversion is for RWKV-6 and RWKV-7 models, this one is RWKV-{model.config.version}")
    return _official_to_fla(to_official_state_dict(model))


def from_fla_state_dict(sd: dict, *, source: str = "fla state dict") -> RWKV:
    """Build an RWKV-7 (or RWKV-6) model from an fla ``RWKV7ForCausalLM`` (``RWKV6ForCausalLM``) state dict, the
    inverse of ``to_fla_state_dict``; the version is read from the keys."""
    check_tensors(sd, source)
    if _is_fla6(sd):
        return from_official_state_dict(_fla6_to_official(sd, source), source=source)
    return from_official_state_dict(_fla_to_official(sd, source), source=source)
