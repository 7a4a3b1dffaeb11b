"""Model files: the native format (safetensors weights + a JSON config in one directory).

``save(model, dir)`` writes ``dir/model.safetensors`` and ``dir/config.json``; ``load(dir)`` rebuilds the model.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RWKVConfig
from .model import RWKV

FORMAT = "rwkv-torch"
FORMAT_VERSION = 1


def save(model: RWKV, directory) -> Path:
    """Write ``model`` to ``directory`` (created if needed); returns the directory path."""
    if not isinstance(model, RWKV):
        raise TypeError(f"save expects an rwkv_torch.RWKV model, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    tmp.replace(d / "model.safetensors")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load(path, *, dtype: torch.dtype | None = None, device="cpu") -> RWKV:
    """Load a model saved by ``save`` (a directory with ``config.json`` and ``model.safetensors``)."""
    d = Path(path)
    cfg_path, weights = d / "config.json", d / "model.safetensors"
    if not d.is_dir() or not cfg_path.exists() or not weights.exists():
        raise ValueError(f"{d}: expected a directory with config.json and model.safetensors (written by rt.save)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format version {meta['format_version']} is newer than {FORMAT_VERSION}")
    config = RWKVConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights}: cannot read the weights ({e})") from e
    model = RWKV(config)
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights}: missing keys {missing[:5]}, unknown keys {unknown[:5]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval()
