"""The recurrent state of an RWKV model: a small typed object passed in and returned, never kept on the model."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RWKVConfig

STATE_FORMAT = "rwkv-torch-state"
STATE_FORMAT_VERSION = 1


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the file's mode set as the process's other outputs get it (``0o666``
    less the umask, as ``open(path, "w")``): ``save_file`` itself creates it owner-only (``0o600``)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@dataclass
class RWKVState:
    """Per layer l: ``shift_att[l] [B, C]`` (last ln1 output), ``shift_ffn[l] [B, C]`` (last ln2 output) and
    ``wkv[l]``: ``[B, H, N, N]`` float32 for v5-v7 (v7 layout ``[N_v, N_k]``, v5/v6 ``[N_k, N_v]``), or
    ``[B, 3, C]`` float32 for v4 (the stacked aa, bb, pp).
    ``meta`` identifies the model shape the state belongs to (version, hidden_size, num_layers, head_size)."""

    shift_att: list[torch.Tensor]
    shift_ffn: list[torch.Tensor]
    wkv: list[torch.Tensor]
    meta: dict

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.wkv)

    def _map(self, fn, wkv_fn=None) -> "RWKVState":
        wkv_fn = wkv_fn or fn
        return RWKVState(
            [fn(t) for t in self.shift_att], [fn(t) for t in self.shift_ffn], [wkv_fn(t) for t in self.wkv],
            dict(self.meta),
        )

    def select(self, batch_idx) -> "RWKVState":
        """Rows of the batch: an int, a slice, a list or an index tensor (an int keeps a batch dim of 1)."""
        if isinstance(batch_idx, int):
            batch_idx = [batch_idx]
        return self._map(lambda t: t[batch_idx])

    @classmethod
    def cat(cls, states: list["RWKVState"]) -> "RWKVState":
        """The rows of several states of one model shape, stacked into one batch in order (inverse of select)."""
        if not states or any(s.meta != states[0].meta for s in states):
            raise ValueError(f"cat needs one or more states of one model shape, got {[s.meta for s in states]}")
        return cls(*([torch.cat(ts) for ts in zip(*(getattr(s, f) for s in states))]
                     for f in ("shift_att", "shift_ffn", "wkv")), dict(states[0].meta))

    def detach(self) -> "RWKVState":
        return self._map(lambda t: t.detach())

    def clone(self) -> "RWKVState":
        return self._map(lambda t: t.clone())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RWKVState":
        """Move to a device; ``dtype`` applies to the shift states only (the wkv state stays float32/64)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    def flat(self) -> list[torch.Tensor]:
        """The state tensors in the documented flat order: per layer shift_att, shift_ffn, wkv (ONNX graph inputs,
        compiled steps)."""
        return [t for l in range(self.num_layers) for t in (self.shift_att[l], self.shift_ffn[l], self.wkv[l])]

    @classmethod
    def from_flat(cls, flat, meta: dict) -> "RWKVState":
        """The inverse of ``flat``."""
        flat = list(flat)
        return cls(flat[0::3], flat[1::3], flat[2::3], dict(meta))

    def fork(self) -> "RWKVState":
        """A new state object holding the same tensors (the per-layer lists copied, the tensors shared): a forward
        then writes its new tensors into the fork and leaves this one as it was."""
        return RWKVState(list(self.shift_att), list(self.shift_ffn), list(self.wkv), dict(self.meta))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l in range(self.num_layers):
            out[f"{l}.shift_att"], out[f"{l}.shift_ffn"], out[f"{l}.wkv"] = (
                self.shift_att[l], self.shift_ffn[l], self.wkv[l]
            )
        return out

    def save(self, path) -> None:
        """Write a versioned safetensors file (format name and version, model shape in the metadata)."""
        meta = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION), "model": json.dumps(self.meta)}
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}, path, meta)

    @classmethod
    def load(cls, path, device=None) -> "RWKVState":
        """Read a file written by ``save``; raises ValueError for another format or a newer version."""
        from safetensors import safe_open

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if not p.is_file():
            raise ValueError(f"{path} is a directory, not a state file (written by RWKVState.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # empty, truncated or not safetensors (SafetensorError names no file)
            raise ValueError(f"{path}: not a readable state file (empty, truncated or not safetensors: {e})") from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an rwkv-torch state file (format {meta.get('format')!r})")
        version = int(meta.get("format_version", "0"))
        if version > STATE_FORMAT_VERSION:
            raise ValueError(f"{path}: state format version {version} is newer than supported {STATE_FORMAT_VERSION}")
        try:
            tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
            model_meta = json.loads(meta["model"])
            L = model_meta["num_layers"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: state file without a valid model shape in its metadata ({e})") from None
        except Exception as e:  # safetensors' errors name no file
            raise ValueError(f"{path}: cannot read the state tensors (truncated or corrupt?): {e}") from None
        try:
            return cls(
                [tensors[f"{l}.shift_att"] for l in range(L)],
                [tensors[f"{l}.shift_ffn"] for l in range(L)],
                [tensors[f"{l}.wkv"] for l in range(L)],
                model_meta,
            )
        except KeyError as e:
            raise ValueError(f"{path}: state file is missing tensor {e}") from None


def state_meta(config: RWKVConfig) -> dict:
    """What identifies the model shape a state belongs to."""
    c = config
    return dict(version=c.version, hidden_size=c.hidden_size, num_layers=c.num_layers, head_size=c.head_size)


def zero_state(config: RWKVConfig, batch_size: int, *, device=None, dtype: torch.dtype = torch.float32) -> RWKVState:
    """The state of a fresh sequence: shift states zero in ``dtype``; wkv zero in float32 (float64 for float64),
    except RWKV-4's running max exponent pp, which starts at -1e38."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    c = config
    C, H, N, L = c.hidden_size, c.num_heads, c.head_size, c.num_layers
    wkv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shifts = [torch.zeros(batch_size, C, device=device, dtype=dtype) for _ in range(2 * L)]
    if c.version == 4:
        wkv = []
        for _ in range(L):
            s = torch.zeros(batch_size, 3, C, device=device, dtype=wkv_dtype)
            s[:, 2] = -1e38
            wkv.append(s)
    else:
        wkv = [torch.zeros(batch_size, H, N, N, device=device, dtype=wkv_dtype) for _ in range(L)]
    return RWKVState(shifts[:L], shifts[L:], wkv, state_meta(c))
