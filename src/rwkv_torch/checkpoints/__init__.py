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

Modules, each importing only those before it: ``keymap`` (name maps, ``map_key``, version detection) <- ``official``
(official ``.pth`` <-> model, the pip state list) <- ``fla``, ``hf`` (other layouts, through the official names)
and ``native`` (safetensors + config.json, ``load``/``save``/``describe``).
"""

from .fla import FLA_TO_OFFICIAL, OFFICIAL_TO_FLA, from_fla_state_dict, to_fla_state_dict
from .hf import HF_TO_OFFICIAL, OFFICIAL_TO_HF, from_hf_state_dict, to_hf_state_dict
from .keymap import FROM_OFFICIAL, TO_OFFICIAL, detect_version, map_key
from .native import FORMAT, FORMAT_VERSION, describe, load, save
from .official import (
    from_official_state_dict,
    load_official,
    official_config,
    save_official,
    state_from_official,
    state_to_official,
    to_official_state_dict,
)

__all__ = [
    "FLA_TO_OFFICIAL", "FORMAT", "FORMAT_VERSION", "FROM_OFFICIAL", "HF_TO_OFFICIAL", "OFFICIAL_TO_FLA",
    "OFFICIAL_TO_HF", "TO_OFFICIAL", "describe", "detect_version", "from_fla_state_dict", "from_hf_state_dict",
    "from_official_state_dict", "load", "load_official", "map_key", "official_config", "save", "save_official",
    "state_from_official", "state_to_official", "to_fla_state_dict", "to_hf_state_dict", "to_official_state_dict",
]
