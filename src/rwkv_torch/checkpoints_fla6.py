"""RWKV-6 official names <-> fla's ``RWKV6ForCausalLM`` names and layouts (spec section 9; used by checkpoints.py).

Most keys are a rename (``RENAMES``; vectors stored ``(1, 1, C)`` officially are ``(C,)`` in fla, the decay LoRA
is ``nn.Linear``-shaped, i.e. transposed). The data-dependent token-shift LoRA is regrouped: fla keeps the five
mixes in the order (r, w, k, v, g) where the official files use (w, k, v, r, g):

* ``time_maa_{r,w,k,v,g}`` ``(1, 1, C)`` each -> ``attn.x_bias [5, C]``;
* ``time_maa_w1 [C, 5D]`` (column blocks w, k, v, r, g) -> ``attn.x_proj.0.linear.weight [5D, C]`` (blocks
  reordered, transposed);
* ``time_maa_w2 [5, D, C]`` (slabs w, k, v, r, g) -> ``attn.x_proj.2.weight [C, 5D]`` (slabs reordered,
  concatenated, transposed; fla reads it as ``[C, 5, D]``).
"""

import torch

from .checkpoints import _block_part, _listing, map_key

OFFICIAL_ORDER = "wkvrg"  # time_maa_w1 blocks / time_maa_w2 slabs in official files
FLA_ORDER = "rwkvg"  # fla's x_bias rows and x_proj blocks
_TO_FLA = [OFFICIAL_ORDER.index(c) for c in FLA_ORDER]
_TO_OFFICIAL = [FLA_ORDER.index(c) for c in OFFICIAL_ORDER]

_L = "model.layers.{}."
RENAMES = {
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
_TRANSPOSED = {"att.time_decay_w1", "att.time_decay_w2"}
_SQUEEZED = {"att.time_maa_x", "att.time_decay", "ffn.time_maa_k", "ffn.time_maa_r"}
_REGROUPED = {f"att.time_maa_{c}" for c in FLA_ORDER} | {"att.time_maa_w1", "att.time_maa_w2"}
_FLA_REGROUPED = ("attn.x_bias", "attn.x_proj.0.linear.weight", "attn.x_proj.2.weight")


def official_to_fla(sd: dict) -> dict:
    """An official RWKV-6 state dict (``checkpoints.to_official_state_dict``) -> fla names and layouts."""
    out, layers = {}, {}
    for key, t in sd.items():
        part = _block_part(key)
        if part in _REGROUPED:
            layers.setdefault(int(key.split(".")[1]), {})[part] = t
            continue
        name = map_key(key, RENAMES)
        out[name] = t.t() if part in _TRANSPOSED else t.reshape(-1) if part in _SQUEEZED else t
    for i, p in layers.items():
        w1, w2 = p["att.time_maa_w1"], p["att.time_maa_w2"]  # [C, 5D], [5, D, C]
        C, D = w1.shape[0], w1.shape[1] // 5
        pre = _L.format(i)
        out[pre + "attn.x_bias"] = torch.stack([p[f"att.time_maa_{c}"].reshape(C) for c in FLA_ORDER])
        out[pre + "attn.x_proj.0.linear.weight"] = w1.view(C, 5, D)[:, _TO_FLA].reshape(C, 5 * D).t().contiguous()
        out[pre + "attn.x_proj.2.weight"] = w2[_TO_FLA].reshape(5 * D, C).t().contiguous()
    return out


def fla_to_official(sd: dict, source: str) -> dict:
    """The inverse of ``official_to_fla``; unknown keys are an error naming them."""
    inverse = {v: k for k, v in RENAMES.items()}
    out, unknown, layers = {}, [], {}
    for key, t in sd.items():
        rest = key.split(".", 3)[3] if key.startswith("model.layers.") and key.count(".") >= 3 else None
        if rest in _FLA_REGROUPED:
            layers.setdefault(int(key.split(".")[2]), {})[rest] = t
            continue
        try:
            name = map_key(key, inverse)
        except KeyError:
            unknown.append(key)
            continue
        part = _block_part(name)
        out[name] = t.t() if part in _TRANSPOSED else t.view(1, 1, -1) if part in _SQUEEZED else t
    if unknown:
        raise ValueError(f"{source}: unknown fla RWKV-6 keys {_listing(unknown)}")
    for i, p in layers.items():
        missing = [k for k in _FLA_REGROUPED if k not in p]
        if missing:
            raise ValueError(f"{source}: layer {i} lacks {', '.join(missing)}")
        bias, w1, w2 = (p[k] for k in _FLA_REGROUPED)  # [5, C], [5D, C], [C, 5D]
        C, D = bias.shape[1], w1.shape[0] // 5
        pre = f"blocks.{i}.att."
        for j, c in enumerate(FLA_ORDER):
            out[pre + f"time_maa_{c}"] = bias[j].view(1, 1, C)
        out[pre + "time_maa_w1"] = w1.t().reshape(C, 5, D)[:, _TO_OFFICIAL].reshape(C, 5 * D).contiguous()
        out[pre + "time_maa_w2"] = w2.t().reshape(5, D, C)[_TO_OFFICIAL].contiguous()
    return out


def is_fla6(sd: dict) -> bool:
    return any(k.endswith("attn.x_proj.0.mu") for k in sd)
