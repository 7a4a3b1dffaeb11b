"""Super Smash Bros. Melee from Slippi replays: parsing (peppi-py, the ``melee`` extra), game-state features,
controller targets, and a streaming policy.

``parse`` (one ``.slp`` -> numpy columns), ``features`` (the feature table), ``targets`` (controller heads),
``replays`` (episodes, the folder loader and its cache), ``policy`` (a trained run -> one frame at a time),
``live`` (the same features from a libmelee ``GameState``), ``umi`` (replays as UMI frames, UMI frames to the same
rows), ``bot`` (a run as a UMI bot for the Computer Melee Championship).
"""

from .features import FRAME_WIDTH, ID_CLASSES
from .live import gamestate_features
from .replays import DEFAULT_ACTION_DELAY, cache_dir, load_dataset, load_replay, load_replays
from .sources import DATA_SOURCES
from .targets import BUTTONS, STICKS
from .umi import replay_to_umi, umi_rows

__all__ = ["BUTTONS", "DATA_SOURCES", "DEFAULT_ACTION_DELAY", "FRAME_WIDTH", "ID_CLASSES", "STICKS", "Controller",
           "Policy", "cache_dir", "gamestate_features", "load_dataset", "load_replay", "load_replays", "replay_to_umi",
           "umi_rows"]


def __getattr__(name):  # the policy needs the training package (torch); parsing and features do not
    if name in ("Policy", "Controller"):
        from . import policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
