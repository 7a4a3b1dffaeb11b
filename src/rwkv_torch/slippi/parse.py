"""Reading one ``.slp`` replay with peppi-py into plain numpy columns: ``read_replay(path) -> Replay``.

Every refusal is a ``ValueError`` that names the file and the reason (the parser's own message for a truncated or
unsupported file), raised here, before any feature code sees the data. Rollback frames (online games write a frame
again when it is re-simulated) are resolved by keeping the last copy of each frame id, which is the finalized one.
Fields a replay version does not record (``hitlag`` before 3.8, ``velocities`` before 3.5, items before 3.0, ...)
come back as zeros, listed in ``Replay.missing``.
"""

from dataclasses import dataclass, field

import numpy as np

MELEE_EXTRA = "pip install 'rwkv-torch[melee]' (or: pip install peppi-py)"

# (column name, path inside peppi's per-port ``Data`` struct); a path the file lacks reads as zeros.
COLUMNS = (
    ("x", "post.position.x"), ("y", "post.position.y"), ("facing", "post.direction"),
    ("percent", "post.percent"), ("stocks", "post.stocks"), ("shield", "post.shield"), ("jumps", "post.jumps"),
    ("airborne", "post.airborne"), ("hitlag", "post.hitlag"), ("state_age", "post.state_age"),
    ("misc_as", "post.misc_as"), ("flags4", "post.state_flags.3"), ("hurtbox", "post.hurtbox_state"),
    ("vx_air", "post.velocities.self_x_air"), ("vy", "post.velocities.self_y"),
    ("vx_ground", "post.velocities.self_x_ground"), ("kb_x", "post.velocities.knockback_x"),
    ("kb_y", "post.velocities.knockback_y"), ("action", "post.state"), ("character", "post.character"),
    ("stick_x", "pre.joystick.x"), ("stick_y", "pre.joystick.y"), ("cstick_x", "pre.cstick.x"),
    ("cstick_y", "pre.cstick.y"), ("trigger", "pre.triggers"), ("buttons", "pre.buttons_physical"),
)
ITEM_COLUMNS = (("type", "type"), ("x", "position.x"), ("y", "position.y"), ("vx", "velocity.x"),
                ("vy", "velocity.y"), ("owner", "owner"))


@dataclass
class Player:
    """One port: ``leader`` (and ``follower``, Nana, for the Ice Climbers) as ``{column: [N] array}``."""

    port: int  # 1-4, as in the file
    character: int  # the game-start (external) character id
    cpu: bool
    leader: dict
    follower: dict | None = None


@dataclass
class Replay:
    path: str
    version: tuple
    stage: int
    is_pal: bool
    frame_ids: np.ndarray  # [N] int, increasing (rollbacks resolved)
    players: list
    items: list | None  # per frame, {column: [n_items] array}; None when the file records no items
    missing: list = field(default_factory=list)


def peppi_modules():
    """peppi-py's raw reader, its ``Start`` type and ``dc_from_json`` (ImportError naming the extra without it)."""
    try:
        import peppi_py._peppi as raw
        from peppi_py.game import Start
        from peppi_py.parse import dc_from_json
    except ImportError as e:
        raise ImportError(f"reading Slippi .slp replays needs peppi-py, the `melee` extra: {MELEE_EXTRA}") from e
    return raw, Start, dc_from_json


def arrow_field(arr, path: str):
    """The nested field ``path`` ("a.b.c") of an Arrow struct array, or None where the file's version lacks it."""
    for part in path.split("."):
        try:
            arr = arr.field(part)
        except KeyError:
            return None
    return arr


def _numpy(arr, order: np.ndarray) -> np.ndarray:
    a = arr.fill_null(0) if arr.null_count else arr
    return np.asarray(a.to_numpy(zero_copy_only=False))[order]


def _columns(data, order: np.ndarray, missing: set, prefix: str) -> dict:
    out = {}
    for name, path in COLUMNS:
        arr = arrow_field(data, path)
        if arr is None:
            missing.add(f"{prefix}{path}")
            out[name] = np.zeros(len(order), dtype=np.float32)
        else:
            out[name] = _numpy(arr, order)
    return out


def _items(frames, order: np.ndarray) -> list | None:
    lists = arrow_field(frames, "item")
    if lists is None:
        return None
    offsets = np.asarray(lists.offsets.to_numpy(zero_copy_only=False))
    flat = lists.flatten()
    cols = {name: np.asarray(arrow_field(flat, path).to_numpy(zero_copy_only=False)) for name, path in ITEM_COLUMNS}
    return [{k: v[offsets[i]:offsets[i + 1]] for k, v in cols.items()} for i in order]


# Every .slp file starts with this UBJSON header (an object whose first key is "raw", an array of bytes).
SLP_MAGIC = b"{U\x03raw[$U#l"


def _check_magic(path: str) -> None:
    """ValueError when ``path`` does not start as a Slippi replay (a text file renamed ``.slp``, ...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SLP_MAGIC))
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if head != SLP_MAGIC:
        what = "it is empty" if not head else f"it starts with {head!r}, not the Slippi header {SLP_MAGIC!r}"
        raise ValueError(f"{path} is not a Slippi replay ({what})")


def read_replay(path) -> Replay:
    """Parse ``path`` (a ``.slp`` file). Raises ValueError naming the file and the reason it is refused, ImportError
    naming the ``melee`` extra when peppi-py is missing."""
    raw, Start, dc_from_json = peppi_modules()
    path = str(path)
    _check_magic(path)
    try:
        game = raw.read_slippi(path, False)
        start = dc_from_json(Start, game.start)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # peppi raises OSError, and pyo3 panics are BaseExceptions
        reason = str(e).strip() or type(e).__name__
        raise ValueError(f"{path}: not a readable Slippi replay (peppi-py: {reason})") from None
    frames = game.frames
    if frames is None or len(frames) == 0:
        raise ValueError(f"{path}: the replay holds no frames")
    players = sorted(start.players, key=lambda p: int(p.port))
    if len(players) != 2:
        raise ValueError(f"{path}: {len(players)} players; the features are 1v1 (self, opponent), as ExPhil's")
    ids = np.asarray(frames.field("id").to_numpy(zero_copy_only=False)).astype(np.int64)
    # Keep the last copy of each frame id: a rollback rewrites frames, the final write is what was played.
    uniq, last_from_end = np.unique(ids[::-1], return_index=True)
    order = (len(ids) - 1 - last_from_end)[np.argsort(uniq)]
    ports = frames.field("ports")
    missing: set = set()
    out = []
    for p in players:
        name = f"P{int(p.port) + 1}"
        data = arrow_field(ports, name)
        if data is None:
            raise ValueError(f"{path}: port {name} is in the game start but has no frame data")
        follower = arrow_field(data, "follower")
        out.append(Player(int(p.port) + 1, int(p.character), int(p.type) != 0,
                          _columns(data.field("leader"), order, missing, ""),
                          None if follower is None else _columns(follower, order, missing, "follower.")))
    items = _items(frames, order)
    if items is None:
        missing.add("item")
    version = tuple(start.slippi.version)
    return Replay(path, version, int(start.stage), bool(start.is_pal), ids[order], out, items,
                  sorted(m for m in missing if not m.startswith("follower.")))
