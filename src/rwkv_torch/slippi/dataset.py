"""A prepared replay dataset (``rwkv-torch prepare-replays``): one zstd Parquet file per game holding the raw
per-frame columns that ``parse.read_replay`` reads, plus one metadata table, and the reader that turns it back into
episodes through the same feature code as a folder of ``.slp`` files.

Layout of a dataset folder ``DS``::

    DS/metadata.parquet    one row per source file (``META_SCHEMA``): ok games, refused files with their reason
    DS/filters.json        the filters chosen at prepare time (``Filters``), applied again by the reader
    DS/games/ab/<id>.parquet  one game: columns ``frame_id``, ``p0.<col>``, ``p1.<col>`` (``parse.COLUMNS``, the
                           players in port order), ``p0f.<col>`` / ``p1f.<col>`` for Nana, ``item.<col>`` lists

The game files keep the parser's dtypes, so ``replay_from_file`` rebuilds the exact ``parse.Replay`` and the
episodes equal ``load_replay``'s. Features are computed when the data is read: a feature change needs no re-parse.
"""

import dataclasses
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .parse import COLUMNS, ITEM_COLUMNS, Player, Replay

FORMAT_VERSION = 1
META_FILE = "metadata.parquet"
FILTERS_FILE = "filters.json"
DEFAULT_GAME_CACHE = 128  # games kept featurized by training_data (see there)
HEADER_KEY = "rwkv_torch"  # a game file's key-value metadata: the game's header and metadata row (JSON)
CHARACTERS = ("FALCON", "DK", "FOX", "GAME_AND_WATCH", "KIRBY", "BOWSER", "LINK", "LUIGI", "MARIO", "MARTH",
              "MEWTWO", "NESS", "PEACH", "PIKACHU", "ICE_CLIMBERS", "JIGGLYPUFF", "SAMUS", "YOSHI", "ZELDA", "SHEIK",
              "FALCO", "YOUNG_LINK", "DOC", "ROY", "PICHU", "GANONDORF")  # Melee's external character ids 0-25
ALIASES = {"CAPTAIN_FALCON": 0, "GNW": 3, "GAMEANDWATCH": 3, "ICS": 14, "ICIES": 14, "PUFF": 15, "JIGGS": 15,
           "YL": 21, "YLINK": 21, "DR_MARIO": 22, "DRMARIO": 22, "GANON": 25, "DONKEY_KONG": 1}


def _pa():
    import pyarrow as pa  # peppi-py's own dependency: present wherever replays can be parsed

    return pa


def meta_schema():
    pa = _pa()
    return pa.schema([
        ("source", pa.string()), ("size", pa.int64()), ("hash", pa.string()), ("file", pa.string()),
        ("status", pa.string()), ("reason", pa.string()), ("format_version", pa.int32()),
        ("slippi_version", pa.string()), ("num_players", pa.int32()), ("ports", pa.list_(pa.int32())),
        ("characters", pa.list_(pa.int32())), ("types", pa.list_(pa.string())), ("names", pa.list_(pa.string())),
        ("codes", pa.list_(pa.string())), ("stage", pa.int32()), ("frames", pa.int64()), ("winner", pa.int32()),
        ("damage", pa.list_(pa.float32())), ("online", pa.bool_()), ("is_pal", pa.bool_()),
    ])


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader (or a resumed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_game(path: Path, replay: Replay, info: dict) -> None:
    """One parsed game -> a zstd Parquet file; ``info`` (its metadata row, less the source) rides in the schema
    metadata so a run interrupted before its table was written can recover the row without parsing again."""
    pa = _pa()
    import pyarrow.parquet as pq

    cols = {"frame_id": pa.array(replay.frame_ids)}
    for i, p in enumerate(replay.players):
        for tag, c in (("", p.leader), ("f", p.follower)):
            if c is not None:
                cols.update({f"p{i}{tag}.{k}": pa.array(np.asarray(c[k])) for k, _ in COLUMNS})
    if replay.items is not None:
        offsets = np.zeros(len(replay.items) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([len(it["type"]) for it in replay.items])
        for k, _ in ITEM_COLUMNS:
            flat = np.concatenate([it[k] for it in replay.items]) if replay.items else np.zeros(0, np.float32)
            cols[f"item.{k}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    head = dict(version=list(replay.version), stage=replay.stage, is_pal=replay.is_pal, missing=replay.missing,
                players=[[p.port, p.character, p.cpu, p.follower is not None] for p in replay.players], info=info)
    table = pa.table(cols)
    # Floats split by byte (zstd then finds the slowly changing high bytes), frame ids as deltas; no statistics or
    # Arrow schema copy in the footer (the Parquet types give the same dtypes back): ~17 bytes a frame + ~7 KB a game.
    enc = {k: "BYTE_STREAM_SPLIT" for k, c in cols.items() if pa.types.is_floating(c.type)}
    enc["frame_id"] = "DELTA_BINARY_PACKED"

    def write(tmp):
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", use_dictionary=False, write_statistics=False,
                              store_schema=False, column_encoding=enc) as w:
            w.write_table(table)
            w.add_key_value_metadata({HEADER_KEY: json.dumps(head)})

    write_atomic(path, write)


def game_header(path: Path) -> dict:
    """The schema metadata ``write_game`` stored (``info`` is the game's metadata row)."""
    import pyarrow.parquet as pq

    kv = pq.ParquetFile(path).metadata.metadata or {}
    if HEADER_KEY.encode() not in kv:
        raise ValueError(f"{path}: not a game file of this dataset format (no {HEADER_KEY} header)")
    return json.loads(kv[HEADER_KEY.encode()])


def replay_from_file(path: Path, name: str | None = None) -> Replay:
    """A game file -> the ``parse.Replay`` it was written from (same arrays, same dtypes)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path, memory_map=True) as f:
        head = json.loads(f.metadata.metadata[HEADER_KEY.encode()])
        table = f.read()
    col = lambda k: table.column(k).to_numpy()  # noqa: E731
    players = []
    for i, (port, character, cpu, has_follower) in enumerate(head["players"]):
        leader = {k: col(f"p{i}.{k}") for k, _ in COLUMNS}
        follower = {k: col(f"p{i}f.{k}") for k, _ in COLUMNS} if has_follower else None
        players.append(Player(port, character, cpu, leader, follower))
    items = None
    if "item.type" in table.column_names:
        lists = {k: table.column(f"item.{k}").combine_chunks() for k, _ in ITEM_COLUMNS}
        first = lists["type"]
        offsets = first.offsets.to_numpy() - first.offsets[0].as_py()
        flat = {k: a.flatten().to_numpy(zero_copy_only=False) for k, a in lists.items()}
        items = [{k: v[offsets[t]:offsets[t + 1]] for k, v in flat.items()} for t in range(len(first))]
    return Replay(name or str(path), tuple(head["version"]), head["stage"], head["is_pal"], col("frame_id"),
                  players, items, head["missing"])


def read_metadata(ds) -> list[dict]:
    """The rows of ``DS/metadata.parquet`` (an empty list when there is none yet)."""
    import pyarrow.parquet as pq

    f = Path(ds) / META_FILE
    return pq.read_table(f).to_pylist() if f.exists() else []


def write_metadata(ds, rows: list[dict]) -> None:
    """Rewrite the table atomically, rows sorted by source (so the table does not depend on completion order)."""
    pa = _pa()
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["source"]), schema=meta_schema())
    write_atomic(Path(ds) / META_FILE, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def is_dataset(path) -> bool:
    """A prepared dataset folder: it holds ``metadata.parquet``."""
    return (Path(path) / META_FILE).is_file()


def character_ids(spec) -> tuple | None:
    """``"FOX,FALCO"`` (names, aliases such as PUFF or ICS, or ids 0-25) -> ``(2, 20)``; None/"" -> None (all)."""
    if spec is None or spec == "" or spec == ():
        return None
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for n in names:
        key = str(n).strip().upper().replace(" ", "_").replace("-", "_").replace(".", "")
        if key.isdigit() and int(key) < len(CHARACTERS):
            out.append(int(key))
        elif key in CHARACTERS:
            out.append(CHARACTERS.index(key))
        elif key in ALIASES:
            out.append(ALIASES[key])
        else:
            raise ValueError(f"--characters: unknown character {n!r}; known: {', '.join(CHARACTERS)} (or ids 0-25)")
    return tuple(sorted(set(out)))


@dataclass
class Filters:
    """Which games (and player sides) enter training; each field is a ``prepare-replays`` flag, default stated.

    one_v_one (True): exactly two players. humans_only (True): no CPU in the game. min_frames (3600, one minute):
    games shorter are dropped. dedup (True): a game whose content hash was seen before (in source order) is dropped.
    min_damage (0): each player must deal at least this much percent over the game. characters (None: all): only the
    sides played by these characters become episodes; a game with none of them is dropped.
    """

    one_v_one: bool = True
    humans_only: bool = True
    min_frames: int = 3600
    dedup: bool = True
    min_damage: float = 0.0
    characters: tuple | None = None

    RULES = ("unreadable", "not_1v1", "cpu", "short", "duplicate", "low_damage", "characters")

    def apply(self, rows: list[dict]) -> tuple[list[tuple[dict, list[int]]], dict]:
        """``([(row, [player index kept, ...])], {rule: games dropped})``; each game counts for the first rule
        (in ``RULES`` order) that drops it."""
        dropped = dict.fromkeys(self.RULES, 0)
        seen, kept = set(), []
        for r in sorted(rows, key=lambda r: r["source"]):
            rule, sides = None, list(range(len(r["ports"] or [])))
            if r["status"] == "not_1v1":
                rule = "not_1v1" if self.one_v_one else "unreadable"  # the features are 1v1: never stored
            elif r["status"] != "ok":
                rule = "unreadable"
            elif self.humans_only and any(t != "human" for t in r["types"]):
                rule = "cpu"
            elif r["frames"] < self.min_frames:
                rule = "short"
            elif self.dedup and r["hash"] in seen:
                rule = "duplicate"
            elif self.min_damage > 0 and min(r["damage"]) < self.min_damage:
                rule = "low_damage"
            elif self.characters is not None:
                sides = [i for i in sides if r["characters"][i] in self.characters]
                rule = None if sides else "characters"
            if r["status"] == "ok":
                seen.add(r["hash"])
            if rule is None:
                kept.append((r, sides))
            else:
                dropped[rule] += 1
        return kept, dropped

    def save(self, ds) -> None:
        d = asdict(self)
        write_atomic(Path(ds) / FILTERS_FILE, lambda tmp: tmp.write_text(json.dumps(d, indent=1) + "\n"))

    @classmethod
    def load(cls, ds) -> "Filters":
        f = Path(ds) / FILTERS_FILE
        d = json.loads(f.read_text()) if f.exists() else {}
        known = {x.name for x in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        out.characters = character_ids(out.characters)
        return out


class Episodes:
    """The kept games of a dataset as ``load_replays`` gives them, ``(name, episode, game)`` per player side, each
    game read from its file and featurized when iterated (nothing is held here but the metadata rows)."""

    def __init__(self, ds, action_delay: int, filters: "Filters", progress: bool = True):
        from .replays import check_delay

        self.ds, self.delay, self.progress = Path(ds), check_delay(action_delay), progress
        self.games, self.dropped = filters.apply(read_metadata(ds))
        short = [g for g in self.games if g[0]["frames"] <= self.delay]  # no frame left to predict
        self.games = [g for g in self.games if g[0]["frames"] > self.delay]
        self.dropped["short"] += len(short)
        if not self.games:
            raise ValueError(f"{ds}: no game passes the filters ({filters}); dropped per rule: {self.dropped}")

    def __len__(self) -> int:  # the human sides kept (``load_replays`` makes episodes of humans only)
        return sum(r["types"][i] == "human" for r, s in self.games for i in s)

    def game(self, k: int) -> list[tuple[str, dict, str]]:
        from .replays import player_perspectives

        row, sides = self.games[k]
        replay = replay_from_file(self.ds / row["file"], row["source"])
        out = []
        for port, ep in player_perspectives(replay, None, self.delay):
            i = [p.port for p in replay.players].index(port)
            if i in sides:
                out.append((f"{row['source']}:P{port}", ep, row["source"]))
        return out

    def __iter__(self):
        from tqdm.auto import tqdm

        for k in tqdm(range(len(self.games)), desc="games", leave=False,
                      disable=not self.progress or len(self.games) < 50):
            yield from self.game(k)


def load_dataset(ds, action_delay: int = 1, filters: Filters | None = None, progress: bool = True) -> Episodes:
    """A prepared dataset -> its episodes in ``load_replays``' format (``[(name, episode, game)]``, lazily: a game
    file is read when the episodes are iterated). ``filters``: default the ones saved by ``prepare-replays``."""
    return Episodes(ds, action_delay, Filters.load(ds) if filters is None else filters, progress)


class _Side:
    """One player side of one game, as the trainer sees a ``train.data.Sequence`` (``name``, ``group``, ``len``,
    ``x``, ``y``), with ``x`` and ``y`` built from the game file on first use and kept in a small cache."""

    def __init__(self, games: "_GameCache", k: int, name: str, group: str, length: int):
        self.games, self.k, self.name, self.group, self.length = games, k, name, group, length

    def __len__(self) -> int:
        return self.length

    @property
    def x(self):
        return self.games.get(self.k)[self.name].x

    @property
    def y(self) -> dict:
        return self.games.get(self.k)[self.name].y


class _GameCache:
    """The featurized sequences of the ``size`` most recently used games (a stateful batch walks one game per lane
    for many steps, so a cache of a few batches of games is read once per game and epoch)."""

    def __init__(self, episodes: Episodes, build, size: int):
        self.episodes, self.build, self.size, self.cache = episodes, build, size, OrderedDict()

    def get(self, k: int) -> dict:
        if k in self.cache:
            self.cache.move_to_end(k)
        else:
            seqs = self.build(self.episodes.game(k), str(self.episodes.ds)).sequences
            self.cache[k] = {s.name: s for s in seqs}
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return self.cache[k]


def training_data(ds, episodes_dataset, action_delay: int = 1, progress: bool = True, filters: Filters | None = None,
                  cache_games: int | None = None):
    """A prepared dataset as the trainer's ``Dataset``, resident memory bounded by ``cache_games`` games whatever
    the number of games: the sequences are read from their game files when a batch first touches them. The cache
    (default ``$RWKV_TORCH_GAME_CACHE``, else 128 games) must hold the games a batch walks at once (one per lane,
    plus the held-out batches), or games are read again: give it at least twice the batch size.

    ``episodes_dataset`` is the episode format's builder (``task.episodes_dataset``, passed in so this module does
    not import the trainer); it makes the first game's dataset, whose targets and ids (every class count is fixed
    by the features) the whole dataset shares, and each game's sequences when they are read. Lengths come from the
    metadata (frames - action_delay), so the window plan (and ``--resume``'s replay of it) reads no game file.
    """
    eps = load_dataset(ds, action_delay, filters, progress)
    if cache_games is None:
        cache_games = int(os.environ.get("RWKV_TORCH_GAME_CACHE", DEFAULT_GAME_CACHE))
    games = _GameCache(eps, episodes_dataset, max(1, cache_games))
    first = next((k for k in range(len(eps.games)) if eps.game(k)), None)
    if first is None:
        raise ValueError(f"{ds}: no human player side among the {len(eps.games)} games that pass the filters")
    spec = episodes_dataset(eps.game(first), str(ds))
    sides = []
    for k, (row, kept) in enumerate(eps.games):
        for i in kept:
            if row["types"][i] == "human" and row["frames"] > eps.delay:
                port = row["ports"][i]
                sides.append(_Side(games, k, f"{row['source']}:P{port}", row["source"], row["frames"] - eps.delay))
    from .features import FEATURE_VERSION

    meta = dict(feature_version=FEATURE_VERSION, action_delay=int(eps.delay))  # what a run records (``eval``)
    return dataclasses.replace(spec, sequences=sides, meta=meta)
