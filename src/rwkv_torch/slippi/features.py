"""Game-state features of one frame, from the point of view of one player, laid out after ExPhil's encoder as far
as replays allow.

Float columns (``frames``, ``[T, 113]``), in this order:

| block | columns | per column (scale) |
|---|---|---|
| self, self's Nana, opponent, opponent's Nana | 4 x 19 | see ``PLAYER_FEATURES`` below |
| previous controller (self's input this frame) | 13 | 8 buttons (0/1), main x/y, C x/y (-1..1), shoulder (0..1) |
| items / projectiles, 4 nearest to self | 4 x 6 | present, x, y (/100), vx, vy (/3), owned by self (0/1) |

``PLAYER_FEATURES`` (one player block, 19 columns): x, y (/100, stage units); self velocity x air, y, x ground and
knockback x, y (/3, units per frame; zeros before replay 3.5); facing (+1 right, -1 left); percent (floored, as UMI
carries it, /100); stocks (/4); shield (/60, full = 1); jumps left (/6); airborne (0/1); hitlag frames left (/10; zeros
before 3.8); in hitstun (0/1: a damage action state, 0x4B-0x5B) and hitstun frames left (/30, ``misc_as`` while in
hitstun, clipped to 150); action-state age (/60, clipped to 0..5); invulnerable (hurtbox state != 0); present (1; 0 for
an absent Nana: then the whole block is zeros). Frame counts (hitlag, hitstun, age) are whole frames, as libmelee reads
them, so ``slippi.live`` gives the same row from a live ``GameState``.

Integer ids (embedded by the model with learned tables, ``ids_<name>``):

| name | shape | classes | what |
|---|---|---|---|
| ``ids_action`` | ``[T, 4]`` | 512 | action state of self, self's Nana, opponent, opponent's Nana (0 when absent) |
| ``ids_character`` | ``[T, 2]`` | 33 | in-game (internal) character of self and opponent |
| ``ids_stage`` | ``[T]`` | 64 | stage id |
| ``ids_item`` | ``[T, 4]`` | 256 | item type + 1 of the 4 item slots (0 = empty) |

Every feature source (replays, ``slippi.live``, any other) passes its ids through ``known_ids``: a value outside a
table (libmelee's ``UnknownAnimation`` -1, ``UNKNOWN_CHARACTER`` 255, a stage or item type this table does not
hold, NaN) becomes that table's ``UNKNOWN_ID``, its last row: action 511 and stage 63 (above every Melee action
state and every versus stage), character 32 (Sandbag, never in a 1v1 game), item 255 (item types stop below 254).
So a policy never sees an id outside its tables. Replays only ever hold ids inside the tables or above them, which
mapped to the last row before ``known_ids`` too: the tables and ``FEATURE_VERSION`` are unchanged.

Differences from ExPhil (``embed_dim: 287``): the replay has no platform geometry or projectile owner history, so
those columns are absent; ExPhil's one-hot action states are the ``ids_action`` embedding here.
"""

import numpy as np

PLAYER_FEATURES = ("x", "y", "vx_air", "vy", "vx_ground", "kb_x", "kb_y", "facing", "percent", "stocks", "shield",
                   "jumps", "airborne", "hitlag", "hitstun", "hitstun_left", "state_age", "invulnerable", "present")
CONTROLLER_FEATURES = ("A", "B", "X", "Y", "Z", "L", "R", "D_UP", "main_x", "main_y", "c_x", "c_y", "shoulder")
ITEM_SLOTS = 4
ITEM_FEATURES = ("present", "x", "y", "vx", "vy", "mine")
FRAME_WIDTH = 4 * len(PLAYER_FEATURES) + len(CONTROLLER_FEATURES) + ITEM_SLOTS * len(ITEM_FEATURES)
ID_CLASSES = {"action": 512, "character": 33, "stage": 64, "item": 256}
# The id every value outside a table maps to (see the module doc): the table's last row.
UNKNOWN_ID = {name: classes - 1 for name, classes in ID_CLASSES.items()}
FEATURE_VERSION = 3  # bump when a column or an id table changes: cached episodes are keyed by it (3: percent floored,
# sticks as UMI carries them)
# Melee's damage (hitstun) action states, DAMAGE_HIGH_1 (0x4B) to DAMAGE_FLY_ROLL (0x5B): "in hitstun" is read from
# the action state, which replays and live game states (libmelee) both carry.
HITSTUN_ACTIONS = (0x4B, 0x5B)


def known_ids(name: str, values) -> np.ndarray:
    """``values`` (ids of table ``name`` of ``ID_CLASSES``, any shape, ints or floats) as int64 in
    ``[0, ID_CLASSES[name])``: every value outside it (negative, too large, NaN) becomes ``UNKNOWN_ID[name]``.

    The one place where ids are made safe for the model's embedding tables: every feature source calls it."""
    a = np.asarray(values)
    if a.dtype.kind == "f":
        ok = np.isfinite(a) & (a >= 0) & (a < ID_CLASSES[name]) & (a == np.trunc(a))
        return np.where(ok, np.nan_to_num(a), UNKNOWN_ID[name]).astype(np.int64)
    a = a.astype(np.int64)
    return np.where((a >= 0) & (a < ID_CLASSES[name]), a, UNKNOWN_ID[name])


def player_block(c: dict | None, n: int) -> np.ndarray:
    """One player's ``[n, 19]`` columns (``PLAYER_FEATURES``) from its parsed columns, zeros when ``c`` is None."""
    if c is None:
        return np.zeros((n, len(PLAYER_FEATURES)), dtype=np.float32)
    f = lambda k: np.asarray(c[k], dtype=np.float32)  # noqa: E731
    action = np.asarray(c["action"]).astype(np.int64)
    hitstun = (action >= HITSTUN_ACTIONS[0]) & (action <= HITSTUN_ACTIONS[1])
    whole = lambda k: np.trunc(np.nan_to_num(f(k)))  # noqa: E731 - frame counts as libmelee reads them (int())
    cols = [f("x") / 100, f("y") / 100, f("vx_air") / 3, f("vy") / 3, f("vx_ground") / 3, f("kb_x") / 3,
            f("kb_y") / 3, np.sign(f("facing")), np.floor(f("percent")) / 100, f("stocks") / 4, f("shield") / 60,
            f("jumps") / 6, (f("airborne") != 0).astype(np.float32), whole("hitlag") / 10,
            hitstun.astype(np.float32), np.where(hitstun, np.clip(whole("misc_as"), 0, 150), 0) / 30,
            np.clip(whole("state_age") / 60, 0, 5), (f("hurtbox") != 0).astype(np.float32),
            np.ones(n, dtype=np.float32)]
    return np.stack(cols, axis=-1)


def controller_block(c: dict) -> np.ndarray:
    """The ``[n, 13]`` controller columns (``CONTROLLER_FEATURES``) of a player's pre-frame input."""
    from .targets import button_bits

    bits = button_bits(c["buttons"]).astype(np.float32)
    sticks = [2 * stick_unit(c[k]).astype(np.float64) - 1 for k in ("stick_x", "stick_y", "cstick_x", "cstick_y")]
    axes = sticks + [np.asarray(c["trigger"], dtype=np.float32)]
    return np.concatenate([bits, np.stack(axes, axis=-1).astype(np.float32)], axis=-1)


def stick_unit(v) -> np.ndarray:
    """A stick axis in [-1, 1] as UMI and libmelee carry it: float32 in [0, 1], 0.5 neutral. The stick columns are
    read through this value, so a replay, a libmelee state and a UMI frame give the same column."""
    return ((np.asarray(v, dtype=np.float64) + 1) / 2).astype(np.float32)


def item_block(items: list | None, x: np.ndarray, y: np.ndarray, port: int) -> tuple[np.ndarray, np.ndarray]:
    """``([n, 24] float, [n, 4] type ids)`` for the 4 items nearest to (x, y) on each frame (``owner`` is the
    0-based port of the owner, -1 for none). Type ids are type + 1 (0: empty slot) and -1 for a negative (unknown)
    type: ``known_ids("item", ...)``, which ``game_features`` applies, makes every id valid."""
    n = len(x)
    feats = np.zeros((n, ITEM_SLOTS, len(ITEM_FEATURES)), dtype=np.float32)
    types = np.zeros((n, ITEM_SLOTS), dtype=np.int64)
    if items is None:
        return feats.reshape(n, -1), types
    for t, it in enumerate(items):
        if len(it["type"]) == 0:
            continue
        d = (it["x"] - x[t]) ** 2 + (it["y"] - y[t]) ** 2
        near = np.argsort(d, kind="stable")[:ITEM_SLOTS]
        k = len(near)
        feats[t, :k] = np.stack([np.ones(k), it["x"][near] / 100, it["y"][near] / 100, it["vx"][near] / 3,
                                 it["vy"][near] / 3, (it["owner"][near] == port - 1)], axis=-1)
        raw = np.asarray(it["type"][near]).astype(np.int64)
        types[t, :k] = np.where(raw >= 0, raw + 1, -1)  # -1 (an unknown type): known_ids makes it UNKNOWN_ID
    return feats.reshape(n, -1), types


def action_ids(c: dict | None, n: int) -> np.ndarray:
    """A player's raw action states (0 for an absent player); ``known_ids`` maps them into the table."""
    if c is None:
        return np.zeros(n, dtype=np.int64)
    return np.asarray(c["action"])


def game_features(me, opp, stage: int, items: list | None) -> tuple[np.ndarray, dict]:
    """``(frames [N, FRAME_WIDTH] float32, {ids name: int64 array})`` for player ``me`` against ``opp``
    (``parse.Player`` objects), every frame of the parsed replay."""
    lead, n = me.leader, len(me.leader["x"])
    blocks = [player_block(lead, n), player_block(me.follower, n), player_block(opp.leader, n),
              player_block(opp.follower, n), controller_block(lead)]
    item_feats, item_ids = item_block(items, np.asarray(lead["x"]), np.asarray(lead["y"]), me.port)
    frames = np.concatenate(blocks + [item_feats], axis=-1).astype(np.float32)
    frames[~np.isfinite(frames)] = 0.0
    ids = {
        "action": np.stack([action_ids(lead, n), action_ids(me.follower, n), action_ids(opp.leader, n),
                            action_ids(opp.follower, n)], axis=-1),
        "character": np.stack([np.asarray(lead["character"]), np.asarray(opp.leader["character"])], axis=-1),
        "stage": np.full(n, stage),
        "item": item_ids,
    }
    return frames, {name: known_ids(name, v) for name, v in ids.items()}
