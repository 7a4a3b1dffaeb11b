"""The native format (``dir/model.safetensors`` + ``dir/config.json``) and the public entry points.

* ``save(model, dir)`` writes the native format.
* ``load(path)`` reads an official ``.pth`` file (version and every size read from the tensors) or a native
  directory; ``load(path, weights="int8" | "bf16")`` quantizes it (``rwkv_torch.quantize``) unless the directory
  already holds that format, which loads as stored.
* ``describe(model)`` gives the sizes of a model for display.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import RWKVConfig
from ..model import RWKV
from ..quantize import WEIGHT_FORMATS, quantize, quantized_like, weight_format
from ..state import save_safetensors
from .keymap import key_listing
from .official import as_rwkv, assign_tensors, dominant_dtype, load_official, meta_model

FORMAT = "rwkv-torch"
# Version 2 adds "weights" to config.json ("bf16" or "int8": quantized linear layers, int8 with ".scale" tensors);
# fp32 models are still written as version 1, which every reader of this format loads.
FORMAT_VERSION = 2


def save(model: RWKV, directory) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as ``model.safetensors`` + ``config.json``.

    ``config.json`` holds the format name and version, ``RWKVConfig.to_dict()`` and, for a quantized model, its
    weight format (``"weights": "int8" | "bf16"``): the file then loads as stored, without re-quantizing. Returns the
    directory.
    """
    model = as_rwkv(model)
    weights = weight_format(model)
    version = 1 if weights == "fp32" else FORMAT_VERSION
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_safetensors(tensors, tmp, {"format": FORMAT, "format_version": str(version)})
    tmp.replace(d / "model.safetensors")
    meta = {"format": FORMAT, "format_version": version, "config": model.config.to_dict()}
    if weights != "fp32":
        meta["weights"] = weights
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
    weights_format = meta.get("weights", "fp32")
    if weights_format not in WEIGHT_FORMATS:
        raise ValueError(f"{cfg_path}: weights {weights_format!r} is not one of {WEIGHT_FORMATS}")
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights}: cannot read the weights (truncated or corrupt?): {e}") from e
    model = quantized_like(meta_model(config), weights_format)
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        hint = "" if weights_format != "fp32" or not any(k.endswith(".scale") for k in unknown) else (
            ' (int8 scales in a file whose config.json does not say "weights": "int8")')
        raise ValueError(f"{weights}: missing keys [{key_listing(missing)}], unknown keys "
                         f"[{key_listing(unknown)}]{hint}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}"
                             f"{'' if weights_format == 'fp32' else f' ({weights_format} weights)'}")
    if weights_format == "fp32":
        return assign_tensors(model, tensors)
    for k, v in tensors.items():
        want = expected[k].dtype
        if v.dtype != want and not (v.is_floating_point() and want == torch.float32):
            raise ValueError(f"{weights}: {k} is {v.dtype}, a {weights_format} model stores it as {want}")
    model.load_state_dict({k: v if v.dtype == expected[k].dtype else v.float() for k, v in tensors.items()},
                          strict=True, assign=True)
    return model


def _resolve(path) -> Path:
    p = Path(path)
    if not p.exists() and Path(f"{p}.pth").is_file():  # the rwkv pip package's convention: name without .pth
        p = Path(f"{p}.pth")
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    return p


def load(path, *, dtype: torch.dtype | None = None, device="cpu", weights: str | None = None) -> RWKV:
    """Load a model in eval mode: an official ``.pth`` (RWKV-4/5.2/6/7; the ``.pth`` may be left off) or a
    directory written by ``save``.

    ``dtype=None`` keeps the file's (dominant) floating dtype; ``device`` is where the parameters go.
    ``weights="int8" | "bf16"`` quantizes the large linear layers (``rwkv_torch.quantize``; the rest fp32, so
    ``dtype`` must then be None or float32); a directory saved in that format loads as stored. ``weights=None`` keeps
    the file's format; ``"fp32"`` asks for an unquantized model.
    Raises ValueError for a file that is not an RWKV checkpoint, has unknown/missing keys or wrong shapes, or
    cannot be read; FileNotFoundError when ``path`` does not exist.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS} or None, got {weights!r}")
    p = _resolve(path)
    model = _load_native(p) if p.is_dir() else load_official(p)
    stored = weight_format(model)
    if (weights not in (None, "fp32") or stored != "fp32") and dtype not in (None, torch.float32):
        raise ValueError(f"dtype {dtype} applies to fp32 weights only; {path} with weights "
                         f"{weights or stored} keeps the rest of the model in float32")
    if weights == "fp32" and stored != "fp32":
        raise ValueError(f"{path} holds {stored} weights; load the fp32 original instead (dequantizing cannot undo "
                         "the rounding)")
    if weights is not None and weights != stored:
        model = quantize(model, weights)
        # The rest of the model still views the (memory-mapped) file: copy it so that the mapping, and the fp32
        # weights' pages in it, can go.
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    if weight_format(model) != "fp32":
        return model.to(device=device).eval()
    return model.to(device=device, dtype=dtype).eval()


def describe(model: RWKV) -> dict:
    """Sizes of ``model`` for display: version, hidden, layers, heads, head size, vocab/embed_dim, ffn, LoRA
    ranks, parameter count and dtype."""
    model = as_rwkv(model)
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
    info["dtype"] = str(dominant_dtype(list(model.parameters()))).replace("torch.", "")
    if weight_format(model) != "fp32":
        info["weights"] = weight_format(model)
    return info
