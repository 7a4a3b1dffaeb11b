"""UMI frames (the Universal Melee Interface of the Computer Melee Championship, ``umi-melee``): a replay as UMI
``Frame`` records, and UMI frames to the model's input rows through the one feature code (``features``).

``replay_to_umi(path, port)`` -> ``umi.frame.FRAME [T]``: every frame of the file from that player's seat (the
player in ``players[0]``, the opponent in ``players[1]``, Nana in ``nana``, items in UMI's 15 slots with owner
0 = self, 1 = opponent, -1 = none, internal character and stage ids). ``umi_rows(frames)`` -> ``(rows float32
[N, FRAME_WIDTH], {name: int64 [N, K]})``: the frames (one game or a batch of many) as parsed columns
(``parse.Player``), through ``features.game_features``, the code ``load_replay`` and ``slippi.live`` use. So
``umi_rows(replay_to_umi(f, p))`` equals ``load_replay(f, p)``'s rows exactly (``tests/test_umi.py``).

What UMI carries, the features read: percent floored, sticks as float32 in [0, 1] (``features.stick_unit``), frame
counts whole. Limits of the conversion: only the six legal stages have a UMI (internal) id (others become the stage
table's unknown id, as in the libmelee source); a frame with more than 15 items keeps the 15 oldest; each item keeps
its slot for its lifetime (by spawn id), and the features take the nearest four in slot order, so two items at
exactly the same distance can rank differently from the replay's order. Ids outside the model's tables map to each
table's unknown id (``features.known_ids``, as for every source).
"""

import numpy as np

from .features import FRAME_WIDTH, PLAYER_FEATURES, game_features, stick_unit
from .live import STAGE_FROM_LIBMELEE
from .parse import Player, read_replay
from .targets import BUTTON_BITS, BUTTONS

UMI_EXTRA = 'pip install -e ".[umi]"'  # or: pip install umi-melee==0.1.0
STAGE_TO_UMI = {ext: internal for internal, ext in STAGE_FROM_LIBMELEE.items()}
_BLOCK = len(PLAYER_FEATURES)


def umi_frame():
    """``umi.frame`` (the ``umi-melee`` package), or ImportError naming the ``umi`` extra."""
    try:
        from umi import frame
    except ImportError as e:
        raise ImportError(f"UMI frames need the umi-melee package, the `umi` extra: {UMI_EXTRA}") from e
    return frame


# ---- a replay -> UMI frames

def _fighter(out, c: dict, ctrl: bool) -> None:
    """Fill a FIGHTER field array ``out [T]`` from one player's parsed columns."""
    whole = lambda k, hi=65535: np.clip(np.trunc(np.nan_to_num(np.asarray(c[k], np.float64))), 0, hi)  # noqa: E731
    out["exists"] = 1
    out["character"] = np.clip(c["character"], 0, 255)
    out["stocks"] = np.clip(c["stocks"], 0, 255)
    out["facing"] = np.asarray(c["facing"]) > 0
    out["on_ground"] = np.asarray(c["airborne"]) == 0
    out["invulnerable"] = np.asarray(c["hurtbox"]) != 0
    out["hurtbox_state"] = np.clip(c["hurtbox"], 0, 255)
    out["jumps_left"] = np.clip(c["jumps"], 0, 255)
    out["action"] = np.clip(c["action"], 0, 65535)
    out["action_frame"] = np.clip(np.trunc(np.nan_to_num(np.asarray(c["state_age"], np.float64))), -32768, 32767)
    out["percent"] = np.clip(np.floor(np.nan_to_num(np.asarray(c["percent"], np.float64))), 0, 65535)
    out["hitlag_left"] = whole("hitlag")
    out["hitstun_left"] = whole("misc_as")
    for umi_name, col in (("x", "x"), ("y", "y"), ("shield_strength", "shield"), ("speed_air_x_self", "vx_air"),
                          ("speed_ground_x_self", "vx_ground"), ("speed_y_self", "vy"), ("speed_x_attack", "kb_x"),
                          ("speed_y_attack", "kb_y")):
        out[umi_name] = c[col]
    if ctrl:
        k = out["controller"]
        for umi_name, col in (("main_x", "stick_x"), ("main_y", "stick_y"), ("c_x", "cstick_x"), ("c_y", "cstick_y")):
            k[umi_name] = stick_unit(c[col])
        k["shoulder"] = c["trigger"]
        b = np.asarray(c["buttons"]).astype(np.int64)
        k["buttons"] = sum(((b & BUTTON_BITS[n]) != 0).astype(np.uint8) << i for i, n in enumerate(BUTTONS))


def _items(out, items: list, me: int, opp: int, spawn: list | None) -> None:
    """Fill ``out [T, 15]`` (ITEM) from the replay's per-frame items; an item keeps one slot while it lives."""
    slots: dict = {}  # spawn id -> slot
    for t, it in enumerate(items):
        n = len(it["type"])
        keys = list(spawn[t]) if spawn is not None else list(range(n))  # without ids: the list position
        alive = set(keys)
        slots = {k: s for k, s in slots.items() if k in alive}
        free = sorted(set(range(out.shape[1])) - set(slots.values()))
        for j, key in enumerate(keys):
            if key not in slots:
                if not free:
                    continue
                slots[key] = free.pop(0)
            s = slots[key]
            o = int(it["owner"][j])
            out[t, s] = (1, it["type"][j], 0, 0 if o == me - 1 else 1 if o == opp - 1 else -1, it["x"][j], it["y"][j],
                         it["vx"][j], it["vy"][j], key if spawn is not None else 0, 0.0, 0)


def replay_frames(replay, port: int, spawn: list | None = None) -> np.ndarray:
    """A parsed replay (``parse.Replay``) as ``FRAME [T]`` from the seat of the player on ``port``; ``spawn``: the
    items' spawn ids per frame (None: items are told apart by their list position)."""
    FRAME = umi_frame().FRAME
    by_port = {p.port: p for p in replay.players}
    if port not in by_port:
        raise ValueError(f"{replay.path}: no player on port {port}; the game has ports {sorted(by_port)}")
    me = by_port[port]
    opp = next(p for p in replay.players if p is not me)
    T = len(replay.frame_ids)
    out = np.zeros(T, FRAME)
    out["frame"] = replay.frame_ids
    out["stage"] = STAGE_TO_UMI.get(replay.stage, 0)
    for seat, p in enumerate((me, opp)):
        _fighter(out["players"][:, seat], p.leader, True)
        if p.follower is not None:
            _fighter(out["nana"][:, seat], p.follower, False)
    if replay.items is not None:
        _items(out["items"], replay.items, me.port, opp.port, spawn)
    return out


def _spawn_ids(path) -> list | None:
    """Each frame's item spawn ids (peppi's ``item.id``), rollbacks resolved as ``parse.read_replay`` does."""
    from .parse import arrow_field, peppi_modules

    raw, _, _ = peppi_modules()
    frames = raw.read_slippi(str(path), False).frames
    ids = np.asarray(frames.field("id").to_numpy(zero_copy_only=False)).astype(np.int64)
    uniq, last_from_end = np.unique(ids[::-1], return_index=True)
    order = (len(ids) - 1 - last_from_end)[np.argsort(uniq)]
    lists = arrow_field(frames, "item")
    spawn = None if lists is None else arrow_field(lists.flatten(), "id")
    if spawn is None:
        return None
    offsets = np.asarray(lists.offsets.to_numpy(zero_copy_only=False))
    flat = np.asarray(spawn.to_numpy(zero_copy_only=False))
    return [flat[offsets[i]:offsets[i + 1]] for i in order]


def replay_to_umi(path, port: int) -> np.ndarray:
    """Every frame of the replay ``path`` as ``umi.frame.FRAME [T]`` from the seat of the player on ``port`` (1-4,
    as ``load_replay`` takes it). Raises ValueError as ``load_replay`` does."""
    replay = read_replay(path)
    return replay_frames(replay, port, None if replay.items is None else _spawn_ids(path))


# ---- UMI frames -> the model's rows

def _columns(f) -> dict:
    """One seat's FIGHTER array ``[N]`` as the parsed columns of ``parse.COLUMNS``."""
    k = f["controller"]
    bits = np.zeros(len(f), np.int64)
    for i, name in enumerate(BUTTONS):
        bits |= ((k["buttons"].astype(np.int64) >> i) & 1) * BUTTON_BITS[name]
    back = lambda u: 2 * np.asarray(u, np.float64) - 1  # noqa: E731 - exact: stick_unit gives u back
    return dict(x=f["x"], y=f["y"], facing=np.where(f["facing"] != 0, 1.0, -1.0), percent=f["percent"],
                stocks=f["stocks"], shield=f["shield_strength"], jumps=f["jumps_left"], airborne=f["on_ground"] == 0,
                hitlag=f["hitlag_left"], state_age=f["action_frame"], misc_as=f["hitstun_left"],
                hurtbox=np.maximum(f["hurtbox_state"], f["invulnerable"]), vx_air=f["speed_air_x_self"],
                vy=f["speed_y_self"], vx_ground=f["speed_ground_x_self"], kb_x=f["speed_x_attack"],
                kb_y=f["speed_y_attack"], action=f["action"], character=f["character"], stick_x=back(k["main_x"]),
                stick_y=back(k["main_y"]), cstick_x=back(k["c_x"]), cstick_y=back(k["c_y"]),
                trigger=k["shoulder"], buttons=bits)


_NO_ITEMS = {k: np.zeros(0) for k in ("type", "x", "y", "vx", "vy", "owner")}


def _item_lists(items) -> list:
    """``ITEM [N, 15]`` -> per row the existing items as ``{column: [n]}`` (owner 0 = self, as port 1 reads it)."""
    live = items["exists"] != 0
    out = []
    for t in range(len(items)):
        if not live[t].any():
            out.append(_NO_ITEMS)
            continue
        it = items[t][live[t]]
        out.append(dict(type=it["type"].astype(np.int64), x=it["x"], y=it["y"], vx=it["vx"], vy=it["vy"],
                        owner=it["owner"].astype(np.int64)))
    return out


def umi_rows(frames) -> tuple[np.ndarray, dict]:
    """UMI frames ``FRAME [N]`` (each from its bot's seat; one game's frames or one frame of many games) ->
    ``(rows float32 [N, FRAME_WIDTH], {name: int64 [N, K]})``, the rows ``load_replay`` gives for the same frames."""
    frames = np.asarray(frames)
    if frames.dtype != umi_frame().FRAME:
        raise ValueError(f"umi_rows takes umi.frame.FRAME records, got dtype {frames.dtype}")
    frames = frames.reshape(-1)
    n = len(frames)
    players, nana = frames["players"], frames["nana"]
    has_nana = nana["exists"] != 0  # [N, 2]
    seats = []
    for s in range(2):
        follower = _columns(nana[:, s]) if has_nana[:, s].any() else None
        seats.append(Player(1 + s, 0, False, _columns(players[:, s]), follower))
    stage = np.asarray([STAGE_FROM_LIBMELEE.get(int(v), -1) for v in frames["stage"]], np.int64)
    items = _item_lists(frames["items"])
    rows = np.zeros((n, FRAME_WIDTH), np.float32)
    ids: dict = {}
    for s in np.unique(stage):  # game_features takes one stage: one call per stage in the batch
        at = np.flatnonzero(stage == s)
        r, i = game_features(_subset(seats[0], at), _subset(seats[1], at), int(s), [items[t] for t in at])
        rows[at] = r
        for k, v in i.items():
            ids.setdefault(k, np.zeros((n, *v.shape[1:]), np.int64))[at] = v
    for s, block in ((0, 1), (1, 3)):  # an absent Nana: a zero block and action 0, per row
        gone = ~has_nana[:, s]
        rows[gone, block * _BLOCK:(block + 1) * _BLOCK] = 0
        ids["action"][gone, block] = 0
    return rows, ids


def _subset(p: Player, at: np.ndarray) -> Player:
    pick = lambda c: None if c is None else {k: np.asarray(v)[at] for k, v in c.items()}  # noqa: E731
    return Player(p.port, p.character, p.cpu, pick(p.leader), pick(p.follower))
