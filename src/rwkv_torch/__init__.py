"""rwkv-torch: the RWKV family of recurrent sequence models in PyTorch.

>>> import rwkv_torch as rt, torch
>>> m = rt.build(embed_dim=20, hidden_size=64, num_layers=2, head_size=16)
>>> m(torch.randn(2, 30, 20)).shape
torch.Size([2, 64])
"""

import dataclasses

import torch

from . import ops
from .checkpoints import load, save
from .config import RWKVConfig, count_params, recommended_defaults
from .model import RWKV
from .state import RWKVState
from .stream import Stream

__all__ = [
    "RWKV", "RWKVConfig", "RWKVState", "Stream", "build", "config_for", "param_count", "output_size",
    "recommended_defaults", "ops", "load", "save",
]
__version__ = "0.1.0"

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RWKVConfig)}


def config_for(**options) -> RWKVConfig:
    """The RWKVConfig that ``build(**options)`` would use: ``recommended_defaults()`` overridden by ``options``.

    Token models (``vocab_size`` given) default to ``dropout=0``.
    """
    unknown = sorted(set(options) - _CONFIG_FIELDS - {"seed"})
    if unknown:
        raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(_CONFIG_FIELDS)}")
    opts = recommended_defaults()
    if options.get("vocab_size") is not None:
        opts["dropout"] = 0.0
    opts.update({k: v for k, v in options.items() if k != "seed"})
    return RWKVConfig(**opts)


def build(*, seed: int | None = None, **options) -> RWKV:
    """Build an RWKV model with the official from-scratch initialisation.

    Options are ``RWKVConfig`` fields (Edifice's names): ``embed_dim`` (continuous frames ``[B, T, embed_dim]``;
    the call returns the last position ``[B, hidden_size]``) or ``vocab_size`` (token model with LM head),
    ``hidden_size=256, num_layers=6, head_size=64, dropout=0.1, window_size=60, version=7``, ``output_dim``, LoRA
    ranks. ``seed`` makes the initial weights independent of the global RNG (same seed, same tensors).
    """
    config = config_for(**options)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return RWKV(config, generator=gen)


def param_count(**options) -> int:
    """The exact parameter count of ``build(**options)``, computed from the sizes without building."""
    return count_params(config_for(**options))


def output_size(**options) -> int:
    """Features per position returned by ``build(**options)``."""
    return config_for(**options).output_size
