"""rwkv-torch: the RWKV family of recurrent sequence models in PyTorch.

>>> import rwkv_torch as rt, torch
>>> m = rt.build(embed_dim=20, hidden_size=64, num_layers=2, head_size=16)
>>> m(torch.randn(2, 30, 20)).shape
torch.Size([2, 64])
"""

from . import ops
from .checkpoints import load, save
from .config import RWKVConfig, config_for, count_params, output_size, param_count, recommended_defaults
from .model import RWKV, build
from .quantize import quantize, weight_format
from .state import RWKVState
from .stream import Stream

__all__ = [
    "RWKV", "RWKVConfig", "RWKVState", "Stream", "build", "config_for", "count_params", "param_count", "output_size",
    "recommended_defaults", "ops", "load", "save", "quantize", "weight_format",
]
__version__ = "0.1.0"
