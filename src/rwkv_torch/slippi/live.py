"""The features of a live game: a libmelee ``GameState`` (the ``melee`` package, Dolphin or a console) to the same row
that ``load_replay`` gives for that frame of a replay.

``gamestate_features(gamestate, port)`` -> ``(frame [FRAME_WIDTH] float32, {ids name: int array})``, ready for
``Policy.act``. The game state is turned into the parsed columns of ``parse.Player`` (one frame long) and goes
through the one feature code, ``features.game_features``, that replays use: a column means the same thing on both
paths. libmelee is only read duck-typed (attributes and ``.value`` of its enums), so this module imports nothing
from it.

libmelee differences handled here: sticks are 0..1 there (0.5 neutral), -1..1 in replays; ``facing`` is a bool;
``stage`` is libmelee's internal stage id (only the six legal stages), mapped back to the replay's stage id;
projectile owners are 1-based ports (0 or -1: none). What a game sends outside the id tables (``UnknownAnimation``
-1, ``UNKNOWN_CHARACTER``, an unknown projectile type, a stage other than the six) becomes the table's unknown id
(``features.known_ids``), so ``Policy.act`` takes every row this module gives. One difference is not undone: for some
action states libmelee re-indexes ``action_frame`` from 1, so the action-state age can read one frame (1/60 of the
column) higher live.
"""

import numpy as np

from .features import game_features
from .parse import Player
from .targets import BUTTON_BITS as _REPLAY_BUTTON_BITS

# libmelee's Stage enum values (internal stage ids) -> the replay's (external) stage ids.
STAGE_FROM_LIBMELEE = {0x12: 3, 0x06: 8, 0x08: 2, 0x18: 31, 0x19: 32, 0x1A: 28}
# libmelee Button enum names (BUTTON_A, ..., BUTTON_D_UP) -> the replay's physical button bits (targets.BUTTON_BITS).
BUTTON_BITS = {f"BUTTON_{name}": bit for name, bit in _REPLAY_BUTTON_BITS.items()}


def _value(x) -> int:
    return int(getattr(x, "value", x))


def _columns(p) -> dict:
    """One libmelee ``PlayerState`` as the parsed columns of one frame (``parse.COLUMNS`` names)."""
    cs = p.controller_state
    bits = sum(b for name, b in BUTTON_BITS.items() if any(getattr(k, "name", k) == name and v
                                                           for k, v in cs.button.items()))
    col = dict(x=p.position.x, y=p.position.y, facing=1.0 if p.facing else -1.0, percent=p.percent,
               stocks=p.stock, shield=p.shield_strength, jumps=p.jumps_left, airborne=0 if p.on_ground else 1,
               hitlag=p.hitlag_left, state_age=p.action_frame, misc_as=p.hitstun_frames_left,
               hurtbox=1 if p.invulnerable else 0, vx_air=p.speed_air_x_self, vy=p.speed_y_self,
               vx_ground=p.speed_ground_x_self, kb_x=p.speed_x_attack, kb_y=p.speed_y_attack,
               action=_value(p.action), character=_value(p.character), stick_x=2 * cs.main_stick[0] - 1,
               stick_y=2 * cs.main_stick[1] - 1, cstick_x=2 * cs.c_stick[0] - 1, cstick_y=2 * cs.c_stick[1] - 1,
               trigger=max(cs.l_shoulder, cs.r_shoulder), buttons=bits)
    return {k: np.asarray([v], dtype=np.float64) for k, v in col.items()}


def _player(port: int, p) -> Player:
    return Player(port, _value(p.character), False, _columns(p),
                  None if getattr(p, "nana", None) is None else _columns(p.nana))


def _items(gamestate) -> list:
    projs = list(getattr(gamestate, "projectiles", []) or [])
    owner = [int(q.owner) - 1 if int(q.owner) > 0 else -1 for q in projs]  # 0-based port, -1 none (as replays)
    return [dict(type=np.asarray([_value(q.type) for q in projs], dtype=np.int64),
                 x=np.asarray([q.position.x for q in projs], dtype=np.float64),
                 y=np.asarray([q.position.y for q in projs], dtype=np.float64),
                 vx=np.asarray([q.speed.x for q in projs], dtype=np.float64),
                 vy=np.asarray([q.speed.y for q in projs], dtype=np.float64),
                 owner=np.asarray(owner, dtype=np.int64))]


def gamestate_features(gamestate, port: int) -> tuple[np.ndarray, dict]:
    """``(frame [FRAME_WIDTH] float32, {name: ids})`` of the player on ``port`` (1-4) against the other player.

    Raises ValueError when ``port`` is not in the game or the game is not 1v1 (the features are self vs opponent).
    """
    players = dict(gamestate.players)
    if port not in players:
        raise ValueError(f"no player on port {port}; the game state has ports {sorted(players)}")
    if len(players) != 2:
        raise ValueError(f"{len(players)} players in the game state; the features are 1v1 (self, opponent)")
    opp = next(q for q in players if q != port)
    stage = STAGE_FROM_LIBMELEE.get(_value(gamestate.stage), -1)  # another stage: features.UNKNOWN_ID
    frames, ids = game_features(_player(port, players[port]), _player(opp, players[opp]), stage, _items(gamestate))
    return frames[0], {k: v[0] for k, v in ids.items()}
