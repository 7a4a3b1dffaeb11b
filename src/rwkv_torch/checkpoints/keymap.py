"""Key names: our names <-> the official ones, the key-map machinery every format uses, and version detection.

A key map is a dict from one format's names to another's: ``"{}"`` stands for the block index, ``None`` marks a key
that is dropped; ``invert_map`` gives the inverse and checks it is one-to-one. ``map_key`` applies a map to one key,
``remap_keys`` to a whole state dict, collecting the keys the map does not know (loading accounts for every key).
``detect_version`` reads the RWKV version of an official state dict from its key names alone.

Our names are the official ones except ln0; official stores some vectors as (1, 1, C).
"""

import re

from ..config import VERSIONS

_COMMON = {
    "emb.weight": "emb.weight",
    "blocks.0.ln0.weight": "ln0.weight",
    "blocks.0.ln0.bias": "ln0.bias",
    "blocks.{}.ln1.weight": "blocks.{}.ln1.weight",
    "blocks.{}.ln1.bias": "blocks.{}.ln1.bias",
    "blocks.{}.ln2.weight": "blocks.{}.ln2.weight",
    "blocks.{}.ln2.bias": "blocks.{}.ln2.bias",
    "ln_out.weight": "ln_out.weight",
    "ln_out.bias": "ln_out.bias",
    "head.weight": "head.weight",
}

_ATT_LINEARS = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight")

# Per-block parameters (relative to ``blocks.{i}.``) that keep their official name, per version.
_BLOCK_PARAMS = {
    7: ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.w1", "att.w2",
        "att.a0", "att.a1", "att.a2", "att.v0", "att.v1", "att.v2", "att.g1", "att.g2", "att.k_k", "att.k_a",
        "att.r_k", *_ATT_LINEARS, "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k", "ffn.key.weight",
        "ffn.value.weight"),
    6: ("att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v", "att.time_maa_r", "att.time_maa_g",
        "att.time_maa_w1", "att.time_maa_w2", "att.time_decay", "att.time_decay_w1", "att.time_decay_w2",
        "att.time_faaaa", *_ATT_LINEARS, "att.gate.weight", "att.ln_x.weight", "att.ln_x.bias",
        "ffn.time_maa_k", "ffn.time_maa_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"),
    5: ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g", "att.time_decay", "att.time_faaaa",
        *_ATT_LINEARS, "att.gate.weight", "att.ln_x.weight", "att.ln_x.bias",
        "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"),
    4: ("att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", *_ATT_LINEARS,
        "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"),
}

# Per-block vectors that official files store as (1, 1, C) and we store as [C].
OFFICIAL_VECTORS = {
    7: {"att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.a0", "att.v0", "att.k_k",
        "att.k_a", "ffn.x_k"},
    6: {"att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v", "att.time_maa_r", "att.time_maa_g",
        "att.time_decay", "ffn.time_maa_k", "ffn.time_maa_r"},
    5: {"att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g", "ffn.time_mix_k", "ffn.time_mix_r"},
    4: {"att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"},
}

# Official keys we drop on load: RWKV-7 block 0 defines v_first, so its value-residual LoRA is never used.
_DROPPED = {7: ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}


def _official_map(version: int) -> dict:
    table = dict(_COMMON)
    table.update({f"blocks.{{}}.{name}": f"blocks.{{}}.{name}" for name in _BLOCK_PARAMS[version]})
    table.update(dict.fromkeys(_DROPPED.get(version, ()), None))
    return table


def invert_map(table: dict) -> dict:
    inverse = {ours: theirs for theirs, ours in table.items() if ours is not None}
    assert len(inverse) == sum(v is not None for v in table.values()), "key map is not one-to-one"
    return inverse


FROM_OFFICIAL = {v: _official_map(v) for v in VERSIONS}
TO_OFFICIAL = {v: invert_map(m) for v, m in FROM_OFFICIAL.items()}

_INDEXED = re.compile(r"(.+?)\.(\d+)\.(.+)")  # "<prefix>.<index>.<rest>", e.g. blocks.3.att.w1


def map_key(key: str, table: dict) -> str | None:
    """The name ``key`` maps to under ``table`` (``None``: dropped); raises KeyError if it is not in the map.

    Exact entries win; otherwise the first ``.<index>.`` of ``key`` is matched as the ``{}`` slot.
    """
    if key in table:
        return table[key]
    m = _INDEXED.fullmatch(key)
    if m is not None:
        template = f"{m[1]}.{{}}.{m[3]}"
        if template in table:
            target = table[template]
            return None if target is None else target.format(m[2])
    raise KeyError(key)


def remap_keys(sd: dict, table: dict) -> tuple[dict, list]:
    """``sd`` under ``table``'s names (dropped keys left out, order kept) and the keys ``table`` does not know."""
    out, unknown = {}, []
    for key, t in sd.items():
        try:
            name = map_key(key, table)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            out[name] = t
    return out, unknown


def block_part(official_key: str) -> str | None:
    """``blocks.3.att.w1`` -> ``att.w1`` (None for keys outside the blocks)."""
    m = _INDEXED.fullmatch(official_key)
    return m[3] if m is not None and m[1] == "blocks" else None


def count_layers(sd: dict) -> int:
    indices = {int(m[2]) for k in sd if (m := _INDEXED.fullmatch(k)) and m[1] == "blocks"}
    return max(indices) + 1 if indices else 0


def key_listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


_HINTS = {
    "time_state": "a state-tuned checkpoint (att.time_state) is not supported",
    "s_emb": "DeepEmbed checkpoints (ffn.s_emb, s0/s1/s2) are not supported",
    "_strategy": "this file was converted by the rwkv pip package; load the original .pth instead",
    "model.layers.": "this looks like an fla state dict; use rwkv_torch.checkpoints.from_fla_state_dict",
    "rwkv.embeddings": "a Hugging Face RWKV-4 state dict; use rwkv_torch.checkpoints.from_hf_state_dict",
}


def hint_for(keys) -> str:
    hints = {h for k in keys for pat, h in _HINTS.items() if pat in k}
    return ("; " + "; ".join(sorted(hints))) if hints else ""


def detect_version(keys) -> int:
    """The RWKV version (4, 5, 6 or 7) of an official state dict, from its key names.

    RWKV-7: ``att.r_k`` / ``att.x_r``; RWKV-6: ``time_maa``; RWKV-5: ``ln_x`` without ``time_maa``;
    RWKV-4: ``time_mix_k`` and none of the above. Raises ValueError when no key identifies a version.
    """
    keys = list(keys)

    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    if has(lambda k: k.endswith((".att.r_k", ".att.x_r"))):
        return 7
    if has(lambda k: "time_maa" in k):
        return 6
    if has(lambda k: ".ln_x." in k):
        return 5
    if has(lambda k: k.endswith("time_mix_k")):
        return 4
    raise ValueError(
        "not an RWKV checkpoint: expected keys such as blocks.0.att.r_k (RWKV-7), blocks.0.att.time_maa_x (RWKV-6), "
        f"blocks.0.att.ln_x.weight (RWKV-5) or blocks.0.att.time_mix_k (RWKV-4); got {key_listing(keys, 5)}"
        f"{hint_for(keys)}"
    )
