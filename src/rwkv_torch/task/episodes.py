"""The episode format shared by training and the Slippi bot: ``Target``, ``IdSpec``, ``Sequence``, ``Dataset`` and
``episodes_dataset`` (episode arrays -> a Dataset).

An episode is the dict of arrays an episode ``.npz`` holds: ``frames`` ``[T, D]``, ``target_<name>`` arrays, optional
``ids_<name>`` inputs and ``classes_<name>`` scalars (see ``episodes_dataset``). ``rwkv_torch.train`` trains on them
and ``rwkv_torch.slippi`` makes them from replays and plays the trained model; neither imports the other.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Id columns ride in the float32 frame rows (see load_episodes); float32 holds every integer below 2**24 exactly.
MAX_ID = 2 ** 24


@dataclass(frozen=True)
class Target:
    """One per-frame output of an episode task: ``categorical`` (``size`` classes, cross-entropy), ``bernoulli``
    (``size`` independent bits, BCE) or ``regression`` (``size`` floats, MSE)."""

    name: str
    kind: str
    size: int


@dataclass(frozen=True)
class IdSpec:
    """One ``ids_<name>`` input: ``columns`` ids per frame (``[T]`` -> 1, ``[T, K]`` -> K), each in
    ``[0, classes)``, embedded by one learned table of ``classes`` rows."""

    name: str
    columns: int
    classes: int


@dataclass
class Sequence:
    """One episode or document: inputs ``x`` (frames ``[T, D]`` float32, or tokens ``[T]``: uint8 bytes or uint16
    World ids) and per-target arrays ``y[name]`` of length T (for text, ``y["next"]`` is ``x`` shifted by one)."""

    name: str
    x: np.ndarray
    y: dict
    group: str | None = None  # sequences of one group (both sides of one game) are held out together

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Dataset:
    """Sequences plus what a model needs to know about them: ``embed_dim`` (frames) or ``vocab_size`` (tokens)."""

    sequences: list
    targets: list
    embed_dim: int | None = None  # width of the float frame columns (the id columns of ``ids`` follow them in x)
    vocab_size: int | None = None
    source: str = ""
    ids: list = field(default_factory=list)  # IdSpec per ids_<name>, sorted by name
    meta: dict = field(default_factory=dict)  # what the loader records in checkpoints (e.g. feature_version)

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    def subset(self, indices) -> "Dataset":
        return Dataset([self.sequences[i] for i in indices], self.targets, self.embed_dim, self.vocab_size,
                       self.source, self.ids, self.meta)


def _episode_targets(path: Path, arrays: dict, T: int) -> tuple[dict, dict]:
    """The target arrays of one episode (``[T]`` int64 or ``[T, K]`` float32) and their kinds/sizes."""
    ys, kinds = {}, {}
    for key in sorted(k for k in arrays if k.startswith("classes_")):
        if "target_" + key[len("classes_"):] not in arrays and "ids_" + key[len("classes_"):] not in arrays:
            raise ValueError(f"{path}: {key} has no matching target_ or ids_{key[len('classes_'):]}")
    for key in sorted(k for k in arrays if k.startswith("target_")):
        name, a = key[len("target_"):], arrays[key]
        if not name.isidentifier():
            raise ValueError(f"{path}: target name {name!r} must be a Python identifier (letters, digits, _)")
        if a.ndim == 0 or len(a) != T:
            raise ValueError(f"{path}: {key} has shape {a.shape} but frames has T={T} rows; every target needs T")
        if a.dtype == np.bool_:
            ys[name] = a.reshape(T, -1).astype(np.float32)
            kinds[name] = ("bernoulli", ys[name].shape[1])
        elif np.issubdtype(a.dtype, np.integer):
            if a.ndim != 1:
                raise ValueError(f"{path}: categorical {key} must be [T] class ids, got shape {a.shape}")
            if a.min() < 0:
                raise ValueError(f"{path}: {key} has a negative class id {a.min()}")
            classes = int(a.max()) + 1
            if f"classes_{name}" in arrays:
                given = int(arrays[f"classes_{name}"])
                if given <= a.max():
                    raise ValueError(f"{path}: {key} has class id {a.max()} but classes_{name}={given}")
                classes = given
            ys[name] = a.astype(np.int64)
            kinds[name] = ("categorical", classes, f"classes_{name}" in arrays)
        elif np.issubdtype(a.dtype, np.floating):
            ys[name] = a.reshape(T, -1).astype(np.float32)
            if not np.isfinite(ys[name]).all():
                raise ValueError(f"{path}: {key} contains NaN or inf")
            kinds[name] = ("regression", ys[name].shape[1])
        else:
            raise ValueError(f"{path}: {key} has dtype {a.dtype}; use int (classes), bool (bits) or float (values)")
    if not ys:
        raise ValueError(f"{path}: no target_<name> arrays; an episode needs at least one target to train on")
    return ys, kinds


def _episode_ids(path, arrays: dict, T: int) -> tuple[np.ndarray, dict]:
    """The ``ids_<name>`` arrays of one episode as ``([T, sum K] int64, {name: (K, classes, given)})``."""
    cols, kinds = [], {}
    for key in sorted(k for k in arrays if k.startswith("ids_")):
        name, a = key[len("ids_"):], arrays[key]
        if not np.issubdtype(a.dtype, np.integer) or a.ndim not in (1, 2) or len(a) != T:
            raise ValueError(f"{path}: {key} must be int [T] or [T, K] with T={T} (the frames' rows), got "
                             f"{a.dtype} {a.shape}")
        a = a.reshape(T, -1).astype(np.int64)
        if a.shape[1] == 0:
            raise ValueError(f"{path}: {key} has no columns")
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0:
            raise ValueError(f"{path}: {key} has a negative id {lo}")
        given = f"classes_{name}" in arrays
        classes = int(arrays[f"classes_{name}"]) if given else hi + 1
        if hi >= classes:
            raise ValueError(f"{path}: {key} has id {hi} but classes_{name}={classes}")
        if classes > MAX_ID:
            raise ValueError(f"{path}: {key} needs {classes} classes; at most {MAX_ID} are supported")
        cols.append(a)
        kinds[name] = (a.shape[1], classes, given)
    return (np.concatenate(cols, axis=1) if cols else np.zeros((T, 0), np.int64)), kinds


def episodes_dataset(episodes, source: str) -> Dataset:
    """A Dataset from ``(name, arrays, group)`` triples (the arrays of one episode file each; see
    ``load_episodes``); ``group`` None makes each episode its own group for the held-out split."""
    sequences, spec, first = [], None, None
    for f, arrays, group in episodes:
        if "frames" not in arrays:
            raise ValueError(f"{f}: no 'frames' array (keys: {sorted(arrays)})")
        frames = arrays["frames"]
        if frames.ndim != 2 or len(frames) == 0 or not np.issubdtype(frames.dtype, np.number):
            raise ValueError(f"{f}: frames must be a non-empty numeric [T, D] array, got {frames.dtype} "
                             f"{frames.shape}")
        frames = frames.astype(np.float32)
        bad = ~np.isfinite(frames)
        if bad.any():
            raise ValueError(f"{f}: frames contain NaN or inf (first at row {int(np.argwhere(bad)[0, 0])})")
        ys, kinds = _episode_targets(f, arrays, len(frames))
        ids, id_kinds = _episode_ids(f, arrays, len(frames))
        this = (frames.shape[1], {n: k[:2] if k[0] != "categorical" else ("categorical",) for n, k in kinds.items()},
                {n: k[0] for n, k in id_kinds.items()})
        if spec is None:
            spec, first = this, f
        elif this != spec:
            raise ValueError(f"{f}: frames width / targets / ids {this} differ from {first}: {spec}")
        x = np.concatenate([frames, ids.astype(np.float32)], axis=1) if ids.shape[1] else frames
        sequences.append((Sequence(str(f), x, ys, None if group is None else str(group)), kinds, id_kinds))
    if spec is None:
        raise ValueError(f"{source}: no episodes")
    targets = []
    for name in sorted(spec[1]):
        kind = sequences[0][1][name]
        if kind[0] == "categorical":
            size = _classes([k[name] for _, k, _ in sequences], source, f"target_{name}", f"classes_{name}")
        else:
            size = kind[1]
        targets.append(Target(name, kind[0], size))
    ids = [IdSpec(name, k, _classes([i[name][1:] for _, _, i in sequences], source, f"ids_{name}",
                                    f"classes_{name}"))
           for name, k in sorted(spec[2].items())]
    return Dataset([s for s, _, _ in sequences], targets, embed_dim=spec[0], source=source, ids=ids)


def _classes(kinds: list, source: str, key: str, given_key: str) -> int:
    """The class count over all episodes from per-episode ``(kind, classes, given)`` (or ``(classes, given)``)."""
    kinds = [k[-2:] for k in kinds]
    given = {c for c, g in kinds if g}
    if len(given) > 1:
        raise ValueError(f"{source}: episodes disagree on {given_key}: {sorted(given)}")
    size = max(c for c, _ in kinds)
    if given and size > min(given):
        raise ValueError(f"{source}: {key} has ids up to {size - 1} but {given_key}={min(given)}")
    return size
