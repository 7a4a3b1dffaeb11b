"""Super Smash Bros. Melee from Slippi replays: parsing (peppi-py, the ``melee`` extra), game-state features,
controller targets, and a streaming policy.

``parse`` (one ``.slp`` -> numpy columns), ``features`` (the feature table), ``targets`` (controller heads),
``replays`` (episodes, the folder loader and its cache), ``policy`` (a trained run -> one frame at a time),
``live`` (the same features from a libmelee ``GameState``).
"""

from .features import FRAME_WIDTH, ID_CLASSES
from .live import gamestate_features
from .replays import DATA_SOURCES, DEFAULT_ACTION_DELAY, cache_dir, load_dataset, load_replay, load_replays
from .targets import BUTTONS, STICKS

__all__ = ["BUTTONS", "DATA_SOURCES", "DEFAULT_ACTION_DELAY", "FRAME_WIDTH", "ID_CLASSES", "STICKS", "Controller",
           "Policy", "cache_dir", "gamestate_features", "load_dataset", "load_replay", "load_replays"]


def __getattr__(name):  # the policy needs the training package (torch); parsing and features do not
    if name in ("Policy", "Controller"):
        from . import policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
