"""Official BlinkDL ``.pth`` checkpoints (RWKV-4/5.2/6/7) <-> our model, and the ``rwkv`` pip package's state list.

* ``official_config(sd)`` reads every size of the model from the tensor shapes of an official state dict.
* ``from_official_state_dict(sd)`` / ``load_official(path)`` build a model from official names and shapes,
  strictly: an unknown key, a missing key or a wrong shape raises ValueError.
* ``to_official_state_dict(model)`` / ``save_official(model, path)`` write the official layout, which the ``rwkv``
  pip package and the official training code read.
* ``state_to_official(state)`` / ``state_from_official(states, config)`` convert a batch-1 RWKVState to and from
  the pip package's per-layer list.

The other formats (fla, transformers) convert through the official names; the native format reuses the model
building helpers here (``as_rwkv``, ``meta_model``, ``assign_tensors``, ``dominant_dtype``).
"""

from collections import Counter
from pathlib import Path

import torch

from ..config import RWKVConfig
from ..model import RWKV
from ..state import RWKVState, state_meta
from .keymap import (
    FROM_OFFICIAL,
    OFFICIAL_VECTORS,
    TO_OFFICIAL,
    block_part,
    count_layers,
    detect_version,
    hint_for,
    key_listing,
    map_key,
    remap_keys,
)


def check_tensors(sd, source: str) -> None:
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: not an RWKV checkpoint: expected a dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{source}: not an RWKV checkpoint: {k!r} is {what}, expected a floating-point tensor")


def _shape(sd: dict, key: str, source: str) -> tuple:
    if key not in sd:
        raise ValueError(f"{source}: missing key {key} (needed to read the model sizes){hint_for(sd)}")
    return tuple(sd[key].shape)


def official_config(sd: dict, version: int | None = None, *, source: str = "state dict") -> RWKVConfig:
    """The RWKVConfig of an official state dict, every size read from tensor shapes.

    Hidden size and vocab from ``emb.weight [V, C]``, layers counted from ``blocks.{i}``, FFN size from
    ``ffn.key.weight [F, C]``, head size from ``att.r_k`` / ``att.time_faaaa [H, N]``, LoRA ranks from the LoRA
    matrices (RWKV-7 ``v_lora`` from block 1, since block 0 has none).
    """
    version = detect_version(sd) if version is None else version
    V, C = _shape(sd, "emb.weight", source)
    L = count_layers(sd)
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


def _fit(t: torch.Tensor, expected: torch.Size, source: str, official: str) -> torch.Tensor:
    """``t`` viewed as ``expected``: official (1, 1, C) vectors become [C]; any other mismatch raises."""
    if t.shape == expected:
        return t
    if t.dim() == 3 and t.shape[:2] == (1, 1) and t.shape[2:] == expected:
        return t.view(expected)
    raise ValueError(f"{source}: {official} has shape {tuple(t.shape)}, expected {tuple(expected)} "
                     f"(sizes read from the file's other tensors)")


def dominant_dtype(tensors) -> torch.dtype:
    counts = Counter()
    for t in tensors:
        counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0]


def meta_model(config: RWKVConfig) -> RWKV:
    with torch.device("meta"):  # no allocation, no init: every parameter is replaced by a loaded tensor
        return RWKV(config)


def assign_tensors(model: RWKV, tensors: dict) -> RWKV:
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(dtype=dominant_dtype(tensors.values()))


def from_official_state_dict(sd: dict, *, source: str = "state dict") -> RWKV:
    """Build a model from an official RWKV-4/5/6/7 state dict (official names and shapes, e.g. a ``.pth``).

    Every key must be mapped or explicitly dropped and every parameter present with its official shape; the
    tensors are used as they are (no copy when no reshape is needed). Raises ValueError naming the problem.
    """
    check_tensors(sd, source)
    config = official_config(sd, source=source)
    ours, unknown = remap_keys(sd, FROM_OFFICIAL[config.version])
    model = meta_model(config)
    expected = model.state_dict()
    to_official = TO_OFFICIAL[config.version]
    missing = [map_key(k, to_official) for k in expected if k not in ours]
    unknown += [map_key(k, to_official) for k in ours if k not in expected]  # e.g. blocks.5.* in a 4-layer file
    if unknown or missing:
        problems = [f"unknown keys {key_listing(unknown)}"] if unknown else []
        problems += [f"missing keys {key_listing(missing)}"] if missing else []
        raise ValueError(f"{source}: RWKV-{config.version} checkpoint (hidden {config.hidden_size}, "
                         f"{config.num_layers} layers) with {' and '.join(problems)}{hint_for(unknown)}")
    fitted = {k: _fit(ours[k], v.shape, source, map_key(k, to_official)) for k, v in expected.items()}
    return assign_tensors(model, fitted).eval()


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


def as_rwkv(model) -> RWKV:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, RWKV):
        raise TypeError(f"expected an rwkv_torch.RWKV model, got {type(model).__name__}")
    return model


def to_official_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """Our parameters under their official names and shapes (vectors ``(1, 1, C)``), for writing ``.pth`` files.

    RWKV-7 block 0 also gets zero ``att.v0 (1,1,C)``, ``v1 [C, D_v]``, ``v2 [D_v, C]``: unused, but present in
    every official file (the official training code loads strictly). Tensors share memory with the model.
    """
    model = as_rwkv(model)
    c = model.config
    if not model.is_token_model:
        raise ValueError("official checkpoints are token models; this model has continuous input (embed_dim="
                         f"{c.embed_dim}); use rwkv_torch.save instead")
    table = TO_OFFICIAL[c.version]
    out = {}
    for key, t in model.state_dict().items():
        name = map_key(key, table)
        out[name] = t.view(1, 1, -1) if block_part(name) in OFFICIAL_VECTORS[c.version] else t
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
