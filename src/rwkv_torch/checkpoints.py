"""Model files: official BlinkDL ``.pth`` checkpoints (RWKV-4/5/6/7), fla RWKV-6/7 state dicts and the native format.

* ``load(path)`` reads an official ``.pth`` file (version and every size read from the tensors) or a native directory.
* ``save(model, dir)`` writes the native format: ``dir/model.safetensors`` + ``dir/config.json``.
* ``to_official_state_dict(model)`` / ``save_official(model, path)`` write the official layout, which the ``rwkv``
  pip package and the official training code read.
* ``to_fla_state_dict(model)`` / ``from_fla_state_dict(sd)`` convert RWKV-7 and RWKV-6 to and from fla's names
  (spec section 9).
* ``to_hf_state_dict(model)`` / ``from_hf_state_dict(sd)`` convert RWKV-4 to and from transformers' names.

Every conversion is a declarative key map (``"{}"`` stands for the block index, ``None`` marks a key that is dropped)
with its inverse, and loading accounts for every key: an unknown key, a missing key or a wrong shape raises.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import VERSIONS, RWKVConfig
from .model import RWKV
from .state import RWKVState, state_meta

FORMAT = "rwkv-torch"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------------------------
# Official <-> ours. Our names are the official ones except ln0; official stores some vectors as (1, 1, C).

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
_VECTORS = {
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


def _invert(table: dict) -> dict:
    inverse = {ours: theirs for theirs, ours in table.items() if ours is not None}
    assert len(inverse) == sum(v is not None for v in table.values()), "key map is not one-to-one"
    return inverse


FROM_OFFICIAL = {v: _official_map(v) for v in VERSIONS}
TO_OFFICIAL = {v: _invert(m) for v, m in FROM_OFFICIAL.items()}

# ----------------------------------------------------------------------------------------------------------------
# RWKV-7 official <-> fla (spec section 9; fla utils/convert_from_rwkv7.py).


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
FLA_TO_OFFICIAL = _invert(OFFICIAL_TO_FLA)

_FLA_TRANSPOSED = {f"att.{c}{i}" for c in "wavg" for i in (1, 2)}  # bare [in, out] LoRA -> Linear [out, in]
_FLA_SQUEEZED = {"att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k"}  # (1, 1, C) -> (C,); x_* stay

# ----------------------------------------------------------------------------------------------------------------
# RWKV-4 official <-> Hugging Face transformers (RwkvForCausalLM): a pure renaming, shapes are the same.

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
HF_TO_OFFICIAL = _invert(OFFICIAL_TO_HF)

# ----------------------------------------------------------------------------------------------------------------
# Key mapping helpers.

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


def _block_part(official_key: str) -> str | None:
    """``blocks.3.att.w1`` -> ``att.w1`` (None for keys outside the blocks)."""
    m = _INDEXED.fullmatch(official_key)
    return m[3] if m is not None and m[1] == "blocks" else None


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------------------------------------
# Reading official checkpoints.

_HINTS = {
    "time_state": "a state-tuned checkpoint (att.time_state) is not supported",
    "s_emb": "DeepEmbed checkpoints (ffn.s_emb, s0/s1/s2) are not supported",
    "_strategy": "this file was converted by the rwkv pip package; load the original .pth instead",
    "model.layers.": "this looks like an fla state dict; use rwkv_torch.checkpoints.from_fla_state_dict",
    "rwkv.embeddings": "a Hugging Face RWKV-4 state dict; use rwkv_torch.checkpoints.from_hf_state_dict",
}


def _hint(keys) -> str:
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
        f"blocks.0.att.ln_x.weight (RWKV-5) or blocks.0.att.time_mix_k (RWKV-4); got {_listing(keys, 5)}{_hint(keys)}"
    )


def _shape(sd: dict, key: str, source: str) -> tuple:
    if key not in sd:
        raise ValueError(f"{source}: missing key {key} (needed to read the model sizes){_hint(sd)}")
    return tuple(sd[key].shape)


def _num_layers(sd: dict) -> int:
    indices = {int(m[2]) for k in sd if (m := _INDEXED.fullmatch(k)) and m[1] == "blocks"}
    return max(indices) + 1 if indices else 0


def official_config(sd: dict, version: int | None = None, *, source: str = "state dict") -> RWKVConfig:
    """The RWKVConfig of an official state dict, every size read from tensor shapes.

    Hidden size and vocab from ``emb.weight [V, C]``, layers counted from ``blocks.{i}``, FFN size from
    ``ffn.key.weight [F, C]``, head size from ``att.r_k`` / ``att.time_faaaa [H, N]``, LoRA ranks from the LoRA
    matrices (RWKV-7 ``v_lora`` from block 1, since block 0 has none).
    """
    version = detect_version(sd) if version is None else version
    V, C = _shape(sd, "emb.weight", source)
    L = _num_layers(sd)
    if L == 0:
        raise ValueError(f"{source}: no blocks.{{i}}.* keys; not an RWKV checkpoint")
    sizes = dict(version=version, hidden_size=C, num_layers=L, vocab_size=V,
                 ffn_size=_shape(sd, "blocks.0.ffn.key.weight", source)[0])
    att = "blocks.0.att."
    if version == 7:
        sizes.update(head_size=_shape(sd, att + "r_k", source)[1],
                     decay_lora=_shape(sd, att + "w1", source)[1], a_lora=_shape(sd, att + "a1", source)[1],
                     gate_lora=_shape(sd, att + "g1", source)[1])
        if L > 1:
            sizes["v_lora"] = _shape(sd, "blocks.1.att.v1", source)[1]
    elif version in (5, 6):
        sizes["head_size"] = _shape(sd, att + "time_faaaa", source)[-1]
        if version == 6:
            sizes.update(mix_lora=_shape(sd, att + "time_maa_w2", source)[1],
                         decay_lora=_shape(sd, att + "time_decay_w1", source)[1])
        else:
            _check_v5_2(sd, source)
    try:
        return RWKVConfig(**sizes)
    except ValueError as e:
        raise ValueError(f"{source}: the tensor shapes give an invalid model: {e}") from None


def _check_v5_2(sd: dict, source: str) -> None:
    decay = _shape(sd, "blocks.0.att.time_decay", source)
    if len(decay) != 2 or decay[1] == 1 or "blocks.0.att.gate.weight" not in sd:
        raise ValueError(
            f"{source}: an RWKV-5.0/5.1 checkpoint (att.time_decay {decay}, gate "
            f"{'present' if 'blocks.0.att.gate.weight' in sd else 'absent'}); only RWKV-5.2 (time_decay [H, N] "
            "and a gate) is supported"
        )


def _check_tensors(sd, source: str) -> None:
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: not an RWKV checkpoint: expected a dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{source}: not an RWKV checkpoint: {k!r} is {what}, expected a floating-point tensor")


def _fit(t: torch.Tensor, expected: torch.Size, source: str, official: str) -> torch.Tensor:
    """``t`` viewed as ``expected``: official (1, 1, C) vectors become [C]; any other mismatch raises."""
    if t.shape == expected:
        return t
    if t.dim() == 3 and t.shape[:2] == (1, 1) and t.shape[2:] == expected:
        return t.view(expected)
    raise ValueError(f"{source}: {official} has shape {tuple(t.shape)}, expected {tuple(expected)} "
                     f"(sizes read from the file's other tensors)")


def _dominant_dtype(tensors) -> torch.dtype:
    counts = Counter()
    for t in tensors:
        counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0]


def _meta_model(config: RWKVConfig) -> RWKV:
    with torch.device("meta"):  # no allocation, no init: every parameter is replaced by a loaded tensor
        return RWKV(config)


def _assign(model: RWKV, tensors: dict) -> RWKV:
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(dtype=_dominant_dtype(tensors.values()))


def from_official_state_dict(sd: dict, *, source: str = "state dict") -> RWKV:
    """Build a model from an official RWKV-4/5/6/7 state dict (official names and shapes, e.g. a ``.pth``).

    Every key must be mapped or explicitly dropped and every parameter present with its official shape; the
    tensors are used as they are (no copy when no reshape is needed). Raises ValueError naming the problem.
    """
    _check_tensors(sd, source)
    config = official_config(sd, source=source)
    table = FROM_OFFICIAL[config.version]
    ours, unknown = {}, []
    for key, t in sd.items():
        try:
            name = map_key(key, table)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            ours[name] = t
    model = _meta_model(config)
    expected = model.state_dict()
    to_official = TO_OFFICIAL[config.version]
    missing = [map_key(k, to_official) for k in expected if k not in ours]
    unknown += [map_key(k, to_official) for k in ours if k not in expected]  # e.g. blocks.5.* in a 4-layer file
    if unknown or missing:
        problems = [f"unknown keys {_listing(unknown)}"] if unknown else []
        problems += [f"missing keys {_listing(missing)}"] if missing else []
        raise ValueError(f"{source}: RWKV-{config.version} checkpoint (hidden {config.hidden_size}, "
                         f"{config.num_layers} layers) with {' and '.join(problems)}{_hint(unknown)}")
    fitted = {k: _fit(ours[k], v.shape, source, map_key(k, to_official)) for k, v in expected.items()}
    return _assign(model, fitted).eval()


def _torch_load(path: Path):
    """``torch.load`` with ``weights_only=True`` (memory-mapped when the file allows it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_official(path) -> RWKV:
    """Read an official BlinkDL ``.pth`` checkpoint (RWKV-4/5.2/6/7); see ``from_official_state_dict``."""
    path = Path(path)
    try:
        sd = _torch_load(path)
    except Exception as e:  # truncated zip, not a torch file, or objects weights_only refuses to unpickle
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint (truncated, corrupt or not a .pth file): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return from_official_state_dict(sd, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Writing official checkpoints.


def _unwrap(model) -> RWKV:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, RWKV):
        raise TypeError(f"expected an rwkv_torch.RWKV model, got {type(model).__name__}")
    return model


def to_official_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """Our parameters under their official names and shapes (vectors ``(1, 1, C)``), for writing ``.pth`` files.

    RWKV-7 block 0 also gets zero ``att.v0 (1,1,C)``, ``v1 [C, D_v]``, ``v2 [D_v, C]``: unused, but present in
    every official file (the official training code loads strictly). Tensors share memory with the model.
    """
    model = _unwrap(model)
    c = model.config
    if not model.is_token_model:
        raise ValueError("official checkpoints are token models; this model has continuous input (embed_dim="
                         f"{c.embed_dim}); use rwkv_torch.save instead")
    table = TO_OFFICIAL[c.version]
    out = {}
    for key, t in model.state_dict().items():
        name = map_key(key, table)
        out[name] = t.view(1, 1, -1) if _block_part(name) in _VECTORS[c.version] else t
    if c.version == 7:
        like = out["emb.weight"]
        C, D = c.hidden_size, c.v_lora_dim
        out["blocks.0.att.v0"] = like.new_zeros(1, 1, C)
        out["blocks.0.att.v1"] = like.new_zeros(C, D)
        out["blocks.0.att.v2"] = like.new_zeros(D, C)
    return out


def save_official(model: RWKV, path) -> Path:
    """Write ``model`` as an official ``.pth`` file (readable by the ``rwkv`` pip package); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in to_official_state_dict(model).items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# fla (RWKV-7).


def _official_to_fla(sd: dict) -> dict:
    out = {}
    for key, t in sd.items():
        name = map_key(key, OFFICIAL_TO_FLA)
        if name is None:
            continue
        part = _block_part(key)
        if part in _FLA_TRANSPOSED:
            t = t.t()
        elif part in _FLA_SQUEEZED:
            t = t.reshape(-1)
        out[name] = t
    return out


def _fla_to_official(sd: dict, source: str) -> dict:
    out, unknown = {}, []
    for key, t in sd.items():
        try:
            name = map_key(key, FLA_TO_OFFICIAL)
        except KeyError:
            unknown.append(key)
            continue
        part = _block_part(name)
        if part in _FLA_TRANSPOSED:
            t = t.t()
        elif part in _FLA_SQUEEZED:
            t = t.view(1, 1, -1)
        out[name] = t
    if unknown:
        raise ValueError(f"{source}: unknown fla RWKV-7 keys {_listing(unknown)}")
    return out


def to_fla_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """An RWKV-7 model's weights under fla's ``RWKV7ForCausalLM`` names and layouts (spec section 9); for an
    RWKV-6 model, ``RWKV6ForCausalLM``'s (``checkpoints_fla6``).

    LoRA matrices become ``nn.Linear`` weights ``[out, in]`` (``w1 [C, D]`` -> ``w_lora.lora.0.weight [D, C]``),
    the biases ``w0/a0/v0`` and ``k_k, k_a, ffn.x_k`` are ``(C,)``, ``x_r ... x_g`` stay ``(1, 1, C)``.
    """
    model = _unwrap(model)
    if model.config.version == 6:  # RWKV6ForCausalLM: see checkpoints_fla6
        from . import checkpoints_fla6

        return checkpoints_fla6.official_to_fla(to_official_state_dict(model))
    if model.config.version != 7:
        raise ValueError(f"fla conversion is for RWKV-6 and RWKV-7 models, this one is RWKV-{model.config.version}")
    return _official_to_fla(to_official_state_dict(model))


def from_fla_state_dict(sd: dict, *, source: str = "fla state dict") -> RWKV:
    """Build an RWKV-7 (or RWKV-6) model from an fla ``RWKV7ForCausalLM`` (``RWKV6ForCausalLM``) state dict, the
    inverse of ``to_fla_state_dict``; the version is read from the keys."""
    from . import checkpoints_fla6  # it imports this module's key helpers

    _check_tensors(sd, source)
    if checkpoints_fla6.is_fla6(sd):
        return from_official_state_dict(checkpoints_fla6.fla_to_official(sd, source), source=source)
    return from_official_state_dict(_fla_to_official(sd, source), source=source)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers (RWKV-4).


def to_hf_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """An RWKV-4 model's weights under ``transformers``' ``RwkvForCausalLM`` names (same shapes as official).

    Load them into a ``RwkvConfig(..., rescale_every=0)`` model: transformers otherwise rescales the weights at
    inference (a fp16 overflow workaround), which changes the numbers."""
    model = _unwrap(model)
    if model.config.version != 4:
        raise ValueError(f"transformers' RWKV names are for RWKV-4 models, this one is RWKV-{model.config.version}")
    return {map_key(k, OFFICIAL_TO_HF): t for k, t in to_official_state_dict(model).items()}


def from_hf_state_dict(sd: dict, *, source: str = "transformers state dict") -> RWKV:
    """An RWKV-4 model from a transformers ``RwkvForCausalLM`` state dict (the inverse of to_hf_state_dict)."""
    _check_tensors(sd, source)
    out, unknown = {}, []
    for key, t in sd.items():
        try:
            out[map_key(key, HF_TO_OFFICIAL)] = t
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown transformers RWKV-4 keys {_listing(unknown)}")
    return from_official_state_dict(out, source=source)


# ----------------------------------------------------------------------------------------------------------------
# State: ours <-> the rwkv pip package's list (batch 1).


def state_to_official(state: RWKVState) -> list[torch.Tensor]:
    """A batch-1 RWKVState as the ``rwkv`` pip package's state list (spec section 6).

    Per layer: RWKV-5/6/7 ``[att_x_prev [C], kv [H, N, N], ffn_x_prev [C]]`` (kv already in the pip layout: v7
    ``[N_v, N_k]``, v5/v6 ``[N_k, N_v]``); RWKV-4 ``[att_xx [C], aa [C], bb [C], pp [C], ffn_xx [C]]``.
    """
    if state.batch_size != 1:
        raise ValueError(f"the pip state list holds one sequence; this state has batch size {state.batch_size}")
    out = []
    for l in range(state.num_layers):
        att, ffn, wkv = state.shift_att[l][0], state.shift_ffn[l][0], state.wkv[l][0]
        out += [att, *wkv.unbind(0), ffn] if state.meta["version"] == 4 else [att, wkv, ffn]
    return out


def state_from_official(states: list, config: RWKVConfig) -> RWKVState:
    """The inverse of ``state_to_official``: a pip state list -> a batch-1 RWKVState for ``config``."""
    per = 5 if config.version == 4 else 3
    if len(states) != per * config.num_layers:
        raise ValueError(f"expected {per} tensors per layer x {config.num_layers} layers = "
                         f"{per * config.num_layers}, got {len(states)}")
    att, ffn, wkv = [], [], []
    for l in range(config.num_layers):
        s = states[l * per:(l + 1) * per]
        att.append(s[0][None])
        ffn.append(s[-1][None])
        wkv.append((torch.stack(s[1:4]) if per == 5 else s[1])[None].float())
    return RWKVState(att, ffn, wkv, state_meta(config))


# ----------------------------------------------------------------------------------------------------------------
# The native format and the public entry points.


def save(model: RWKV, directory) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as ``model.safetensors`` + ``config.json``.

    ``config.json`` holds the format name and version and ``RWKVConfig.to_dict()``. Returns the directory.
    """
    model = _unwrap(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    tmp.replace(d / "model.safetensors")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def _load_native(d: Path) -> RWKV:
    cfg_path, weights = d / "config.json", d / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise ValueError(f"{d}: expected a directory with config.json and model.safetensors (written by rt.save)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format') if isinstance(meta, dict) else None!r} "
                         f"is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format version {meta['format_version']} is newer than {FORMAT_VERSION}")
    config = RWKVConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights}: cannot read the weights (truncated or corrupt?): {e}") from e
    model = _meta_model(config)
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights}: missing keys [{_listing(missing)}], unknown keys [{_listing(unknown)}]")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    return _assign(model, tensors)


def _resolve(path) -> Path:
    p = Path(path)
    if not p.exists() and Path(f"{p}.pth").is_file():  # the rwkv pip package's convention: name without .pth
        p = Path(f"{p}.pth")
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    return p


def load(path, *, dtype: torch.dtype | None = None, device="cpu") -> RWKV:
    """Load a model in eval mode: an official ``.pth`` (RWKV-4/5.2/6/7; the ``.pth`` may be left off) or a
    directory written by ``save``.

    ``dtype=None`` keeps the file's (dominant) floating dtype; ``device`` is where the parameters go.
    Raises ValueError for a file that is not an RWKV checkpoint, has unknown/missing keys or wrong shapes, or
    cannot be read; FileNotFoundError when ``path`` does not exist.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    p = _resolve(path)
    model = _load_native(p) if p.is_dir() else load_official(p)
    return model.to(device=device, dtype=dtype).eval()


def describe(model: RWKV) -> dict:
    """Sizes of ``model`` for display: version, hidden, layers, heads, head size, vocab/embed_dim, ffn, LoRA
    ranks, parameter count and dtype."""
    model = _unwrap(model)
    c = model.config
    info = {"version": c.version, "hidden_size": c.hidden_size, "num_layers": c.num_layers}
    if c.version != 4:
        info.update(num_heads=c.num_heads, head_size=c.head_size)
    info.update({"vocab_size": c.vocab_size} if c.vocab_size is not None else {"embed_dim": c.embed_dim})
    if c.output_dim is not None:
        info["output_dim"] = c.output_dim
    info["ffn_size"] = c.ffn_dim
    if c.version == 7:
        info.update(decay_lora=c.decay_lora_dim, a_lora=c.a_lora_dim, gate_lora=c.gate_lora_dim)
        if c.num_layers > 1:
            info["v_lora"] = c.v_lora_dim
    elif c.version == 6:
        info.update(mix_lora=c.mix_lora_dim, decay_lora=c.decay_lora_dim)
    info["params"] = model.param_count()
    info["dtype"] = str(_dominant_dtype(list(model.parameters()))).replace("torch.", "")
    return info
