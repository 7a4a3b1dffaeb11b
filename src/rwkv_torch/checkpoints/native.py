"""The native format (``dir/model.safetensors`` + ``dir/config.json``) and the public entry points.

* ``save(model, dir)`` writes the native format.
* ``load(path)`` reads an official ``.pth`` file (version and every size read from the tensors) or a native
  directory.
* ``describe(model)`` gives the sizes of a model for display.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import RWKVConfig
from ..model import RWKV
from .keymap import _listing
from .official import _assign, _dominant_dtype, _meta_model, _unwrap, load_official

FORMAT = "rwkv-torch"
FORMAT_VERSION = 1


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
