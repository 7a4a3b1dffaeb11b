"""Training data: episode files (``.npz`` replays, or Slippi ``.slp`` replays through ``rwkv_torch.slippi``),
byte-level text, the built-in default corpus, and the window plans that walk each sequence in order so the
recurrent state can be carried from one window to the next.

Numpy only; ``step.py`` turns batches into tensors.
"""

import random
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import input_files
from ..tokenizer import TOKENIZERS

BYTE_VOCAB = 256
# Not text, whatever their first bytes hold: skipped under a --data directory, refused as a --data file.
BINARY_SUFFIXES = frozenset({".pyc", ".png", ".pt", ".pth", ".safetensors", ".npz", ".onnx", ".so", ".zip", ".gz"})
DEFAULT_CORPUS_BYTES = 8_000_000
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

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    def subset(self, indices) -> "Dataset":
        return Dataset([self.sequences[i] for i in indices], self.targets, self.embed_dim, self.vocab_size,
                       self.source, self.ids)


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays (ragged lists) cannot be loaded without pickle
        raise ValueError(f"{path}: unreadable array ({e}); ragged or object arrays are not supported, "
                         f"store one rectangular array per key") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


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


def load_episodes(path) -> Dataset:
    """A directory of ``.npz`` episodes (searched recursively) or one ``.npz`` file.

    Each file holds ``frames`` ``[T, D]`` (finite floats) and ``target_<name>`` arrays of length T: int -> a
    categorical head (classes = max id + 1 over all episodes, or a ``classes_<name>`` scalar), bool ``[T]`` or
    ``[T, K]`` -> K Bernoulli outputs, float ``[T]`` or ``[T, K]`` -> K regression outputs. Every episode must have
    the same D and the same targets. Raises ValueError naming the offending file.

    Optional ``ids_<name>`` int arrays ``[T]`` or ``[T, K]`` are categorical *inputs* (an action state, a
    character, a stage): the model embeds each with a learned table (``classes_<name>`` rows when that scalar is
    given, else max id + 1 over all episodes; the K columns share the table) and joins the embeddings to
    ``frames`` before the backbone. Every episode must have the same ids names and K. In a ``Sequence`` the ids
    ride as float32 columns after the D frame columns (exact below 2**24), so batches stay one array.
    """
    path = Path(path)
    files = input_files(path, ".npz", "episode")
    return episodes_dataset(((f, _read_npz(f), None) for f in files), str(path))


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


def _documents(files: list, max_bytes: int | None, tokenizer: str = "byte") -> list:
    """One document per file (up to ``max_bytes`` of files in all), as bytes (uint8) or World token ids (uint16)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r} for text data; known: {list(TOKENIZERS)}")
    encode = None
    if tokenizer != "byte":  # bytes stay a zero-copy view of the file
        encode = TOKENIZERS[tokenizer]().encode_bytes
    docs, total = [], 0
    files = list(files)
    bar = _progress(len(files), "tokenizing (World)") if encode is not None else None
    for f in files:
        raw = Path(f).read_bytes()
        if bar is not None:
            bar.update(1)
        if max_bytes is not None and total + len(raw) > max_bytes:
            break
        total += len(raw)
        data = np.frombuffer(raw, dtype=np.uint8) if encode is None else np.array(encode(raw), dtype=np.uint16)
        if len(data) < 2:
            continue
        docs.append(Sequence(str(f), data[:-1], {"next": data[1:]}))
    if bar is not None:
        bar.close()
    return docs


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=total < 50)


def _text_dataset(docs: list, tokenizer: str, source: str) -> Dataset:
    vocab = TOKENIZERS[tokenizer].vocab_size
    return Dataset(docs, [Target("next", "categorical", vocab)], vocab_size=vocab, source=source)


def is_binary(path) -> bool:
    """A known binary suffix (``BINARY_SUFFIXES``) or a NUL byte in the first 8 KB."""
    path = Path(path)
    if path.suffix.lower() in BINARY_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def load_text(path, max_bytes: int | None = None, tokenizer: str = "byte") -> Dataset:
    """A text file, or every text file under a directory (sorted; hidden folders such as ``.git`` and binary files
    are skipped, see ``is_binary``), as documents of bytes (``tokenizer="byte"``, vocab 256) or of RWKV World tokens
    (``"world"``, vocab 65536; needs the ``rwkv`` package). Each file is one document; windows never cross a
    document boundary. A binary file given as ``path`` raises ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1]))
        files = [p for p in files if not is_binary(p)]
        if not files:
            raise ValueError(f"{path}: no text files (hidden folders and binary files are skipped)")
    elif path.is_file():
        if is_binary(path):
            raise ValueError(f"{path}: a binary file, not text; give a text file or a folder of them as --data")
        files = [path]
    else:
        raise ValueError(f"{path}: no such file or directory")
    docs = _documents(files, max_bytes, tokenizer)
    if not docs:
        sizes = [(p.stat().st_size, str(p)) for p in files]
        if max_bytes is not None and sizes[0][0] > max_bytes:
            if all(n > max_bytes for n, _ in sizes):
                n, name = min(sizes)
                raise ValueError(f"{path}: every text file is larger than --max-bytes {max_bytes} (the smallest, "
                                 f"{name}, has {n} bytes); raise --max-bytes")
            raise ValueError(f"{path}: the first text file, {sizes[0][1]}, has {sizes[0][0]} bytes, more than "
                             f"--max-bytes {max_bytes}; raise --max-bytes")
        raise ValueError(f"{path}: no non-empty text files")
    return _text_dataset(docs, tokenizer, str(path))


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES, tokenizer: str = "byte") -> Dataset:
    """The Python standard library's own ``.py`` sources, found at run time (no download), as byte-level text.

    Generated tables (``encodings``' codec maps, ``pydoc_data``) and tests are left out; the files are taken in a
    fixed pseudo-random order, so a ``max_bytes`` prefix samples the whole library rather than its first letters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings", "pydoc_data"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    random.Random(0).shuffle(files)
    docs = _documents(files, max_bytes, tokenizer)
    if not docs:
        raise ValueError(f"{root}: found no standard-library sources for the default corpus; pass --data")
    return _text_dataset(docs, tokenizer, f"python-stdlib:{root}")


def load_slippi(path, action_delay: int = 1, progress: bool = True) -> Dataset:
    """A ``.slp`` replay or a folder of them: one episode per human player (``rwkv_torch.slippi.load_replays``:
    parsed once and cached, bad files skipped with a warning), held out by game (file)."""
    from ..slippi.replays import load_replays  # needs peppi-py (the melee extra); only .slp data imports it

    return episodes_dataset(load_replays(path, action_delay, progress=progress), str(path))


def load_data(path=None, max_bytes: int | None = None, tokenizer: str = "byte", action_delay: int = 1,
              progress: bool = True) -> Dataset:
    """``None`` -> the default corpus; ``.npz`` files or a directory holding any -> episodes; a ``.slp`` replay or
    a directory holding any -> Slippi episodes (``action_delay``: see ``load_slippi``); else text, as bytes or
    World tokens (``tokenizer``). ``progress``: a bar over replay files while they parse."""
    if path is None:
        return default_corpus(DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes, tokenizer)
    p = Path(path)
    if (p / "metadata.parquet").is_file():  # a dataset from `rwkv-torch prepare-replays` (rwkv_torch.slippi.dataset)
        from ..slippi.dataset import training_data

        return training_data(p, episodes_dataset, action_delay, progress)
    if p.suffix == ".slp" or (p.is_dir() and next(p.rglob("*.npz"), None) is None
                              and next(p.rglob("*.slp"), None) is not None):
        return load_slippi(p, action_delay, progress)
    if p.suffix == ".npz" or (p.is_dir() and next(p.rglob("*.npz"), None) is not None):
        return load_episodes(p)
    if p.is_dir() and next((q for q in p.rglob("*") if q.is_file()), None) is None:
        raise ValueError(f"{p}: directory is empty")
    return load_text(p, max_bytes, tokenizer)


def split_by_sequence(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out whole episodes/documents for validation (at least one when val_fraction > 0 and there are two);
    sequences that share a ``group`` (the two sides of one replay) go to the same side."""
    groups: dict = {}
    for i, s in enumerate(data.sequences):
        groups.setdefault(s.group if s.group is not None else ("seq", i), []).append(i)
    members = list(groups.values())
    n = len(members)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
    if n_val <= 0:
        return data, None
    order = np.random.default_rng(seed).permutation(n)
    pick = lambda gs: sorted(i for g in gs for i in members[g])  # noqa: E731
    return data.subset(pick(order[n_val:].tolist())), data.subset(pick(order[:n_val].tolist()))


def check_window(data: Dataset, window: int) -> None:
    """Raise ValueError when no sequence is long enough for one window."""
    longest = max(data.sequences, key=len)
    if len(longest) < window:
        raise ValueError(f"--window-size {window} is longer than every sequence of {data.source}; the longest is "
                         f"{longest.name} with {len(longest)} positions")


def window_counts(lengths: list, window: int, stride: int) -> list[int]:
    """Windows per sequence (one epoch's worth): every full window starting at a multiple of ``stride``."""
    return [0 if n < window else (n - window) // stride + 1 for n in lengths]


def window_plans(lengths: list, window: int, stride: int, batch_size: int, seed: int) -> Iterator[list]:
    """Endless, deterministic batch plans: per step a list of ``batch_size`` ``(sequence, start, reset)``.

    With ``stride == window`` (stateful) each batch row is a lane that walks one sequence window after window, so
    the state after a window is the right start for the next; ``reset`` marks a lane's first window of a new
    sequence. A trailing part shorter than a window is skipped. Otherwise windows overlap or leave gaps, so they
    are independent samples, shuffled, each with ``reset=True``. Sequences are taken in a fresh permutation
    each epoch. The plan depends only on the arguments, so a resumed run replays it by skipping steps.
    """
    rng = np.random.default_rng(seed)
    counts = window_counts(lengths, window, stride)
    usable = [i for i, c in enumerate(counts) if c > 0]
    if not usable:
        raise ValueError(f"window {window} is longer than every sequence (longest {max(lengths, default=0)})")
    if stride != window:
        seq = np.repeat(np.arange(len(counts)), counts)
        start = np.concatenate([np.arange(c) * stride for c in counts])
        order = np.empty(0, dtype=np.int64)
        while True:
            while len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(seq))])
            take, order = order[:batch_size], order[batch_size:]
            yield [(int(seq[j]), int(start[j]), True) for j in take]
    queue: list = []

    def next_sequence() -> int:
        if not queue:
            queue.extend(int(i) for i in rng.permutation(usable)[::-1])
        return queue.pop()

    lanes = [[next_sequence(), 0] for _ in range(batch_size)]
    while True:
        plan = []
        for lane in lanes:
            if lane[1] >= counts[lane[0]]:
                lane[:] = [next_sequence(), 0]
            plan.append((lane[0], lane[1] * window, lane[1] == 0))
            lane[1] += 1
        yield plan


def make_batch(data: Dataset, plan: list, window: int) -> tuple:
    """``(x [B, W, ...], {name: y [B, W, ...]}, reset [B] bool)`` numpy arrays for one plan."""
    seqs = [(data.sequences[i], s) for i, s, _ in plan]
    x = np.stack([q.x[s:s + window] for q, s in seqs])
    ys = {t.name: np.stack([q.y[t.name][s:s + window] for q, s in seqs]) for t in data.targets}
    return x, ys, np.array([r for _, _, r in plan], dtype=bool)
