"""Training data: episode files (``.npz`` replays, or Slippi ``.slp`` replays through a loader of
``rwkv_torch.slippi``), byte-level text, the built-in default corpus, and the window plans that walk each sequence
in order so the recurrent state can be carried from one window to the next.

Numpy only; ``step.py`` turns batches into tensors.
"""

import random
import sysconfig
import zipfile
from pathlib import Path

import numpy as np

from ..checks import input_files
from ..task import MAX_ID, Dataset, IdSpec, Sequence, Target, episodes_dataset  # noqa: F401 (the format, re-exported)
from ..tokenizer import TOKENIZERS

BYTE_VOCAB = 256
# Not text, whatever their first bytes hold: skipped under a --data directory, refused as a --data file.
BINARY_SUFFIXES = frozenset({".pyc", ".png", ".pt", ".pth", ".safetensors", ".npz", ".onnx", ".so", ".zip", ".gz"})
DEFAULT_CORPUS_BYTES = 8_000_000
def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays (ragged lists) cannot be loaded without pickle
        raise ValueError(f"{path}: unreadable array ({e}); ragged or object arrays are not supported, "
                         f"store one rectangular array per key") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


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


def data_kind(path) -> str:
    """What ``load_data`` makes of ``path``: ``"default"`` (None: the built-in corpus), ``"episodes"`` (``.npz``
    files, or a directory holding any), ``"slippi"`` (a ``.slp`` replay, or a directory holding some and no
    ``.npz``), ``"slippi-dataset"`` (a folder written by ``rwkv-torch prepare-replays``) or ``"text"``."""
    if path is None:
        return "default"
    p = Path(path)
    has = lambda pattern: p.is_dir() and next(p.rglob(pattern), None) is not None  # noqa: E731
    if (p / "metadata.parquet").is_file():  # a dataset from `rwkv-torch prepare-replays` (rwkv_torch.slippi.dataset)
        return "slippi-dataset"
    if p.suffix == ".slp" or (not has("*.npz") and has("*.slp")):
        return "slippi"
    if p.suffix == ".npz" or has("*.npz"):
        return "episodes"
    return "text"


# Data kinds read by a loader given in ``sources`` (``rwkv_torch.slippi.DATA_SOURCES``), by their key there.
SOURCE_SUFFIX = {"slippi": ".slp", "slippi-dataset": "slippi-dataset"}


def load_data(path=None, max_bytes: int | None = None, tokenizer: str = "byte", action_delay: int = 1,
              progress: bool = True, sources: dict | None = None) -> Dataset:
    """``None`` -> the default corpus; ``.npz`` files or a directory holding any -> episodes; else text, as bytes or
    World tokens (``tokenizer``) (see ``data_kind``).

    A ``.slp`` replay or a directory of them is read by ``sources[".slp"]`` (``rwkv_torch.slippi.DATA_SOURCES``,
    which the CLI passes: this package does not import the Slippi one), called as ``loader(path, action_delay=...,
    progress=...)`` and returning a Dataset (one episode per human player, held out by game). ``progress``: a bar
    over replay files while they parse."""
    kind = data_kind(path)
    if kind == "default":
        return default_corpus(DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes, tokenizer)
    p = Path(path)
    if kind in SOURCE_SUFFIX:
        loader = (sources or {}).get(SOURCE_SUFFIX[kind])
        if loader is None:
            what = ".slp replays are" if kind == "slippi" else "a prepared replay dataset is"
            raise ValueError(f"{p}: {what} read by rwkv_torch.slippi: pass "
                             f"sources=rwkv_torch.slippi.DATA_SOURCES (the rwkv-torch CLI does)")
        return loader(p, action_delay=action_delay, progress=progress)
    if kind == "episodes":
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


def window_plans(lengths: list, window: int, stride: int, batch_size: int, seed: int) -> "WindowPlans":
    """Endless, deterministic batch plans: per step a list of ``batch_size`` ``(sequence, start, reset)``.

    With ``stride == window`` (stateful) each batch row is a lane that walks one sequence window after window, so
    the state after a window is the right start for the next; ``reset`` marks a lane's first window of a new
    sequence. A trailing part shorter than a window is skipped. Otherwise windows overlap or leave gaps, so they
    are independent samples, shuffled, each with ``reset=True``. Sequences are taken in a fresh permutation
    each epoch. The plan depends only on the arguments; ``state_dict()`` / ``load_state_dict()`` save and restore
    the position (a resumed run continues the same order without replaying it).
    """
    return WindowPlans(lengths, window, stride, batch_size, seed)


class WindowPlans:
    """The iterator ``window_plans`` returns: ``next(plans)`` is the next step's plan."""

    def __init__(self, lengths: list, window: int, stride: int, batch_size: int, seed: int):
        self.window, self.stride, self.batch_size = window, stride, batch_size
        self.counts = window_counts(lengths, window, stride)
        self.usable = [i for i, c in enumerate(self.counts) if c > 0]
        if not self.usable:
            raise ValueError(f"window {window} is longer than every sequence (longest {max(lengths, default=0)})")
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        if stride != window:  # shuffled independent windows: a queue of window indices
            self.seq = np.repeat(np.arange(len(self.counts)), self.counts)
            self.start = np.concatenate([np.arange(c) * stride for c in self.counts])
            self.order = np.empty(0, dtype=np.int64)
        else:  # stateful lanes: a queue of sequences (the current epoch's permutation, reversed) and each lane's place
            self.queue: list = []
            self.lanes = [[self._next_sequence(), 0] for _ in range(batch_size)]

    def _next_sequence(self) -> int:
        if not self.queue:
            self.queue.extend(int(i) for i in self.rng.permutation(self.usable)[::-1])
        return self.queue.pop()

    def __iter__(self):
        return self

    def __next__(self) -> list:
        self.steps += 1
        if self.stride != self.window:
            while len(self.order) < self.batch_size:
                self.order = np.concatenate([self.order, self.rng.permutation(len(self.seq))])
            take, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
            return [(int(self.seq[j]), int(self.start[j]), True) for j in take]
        plan = []
        for lane in self.lanes:
            if lane[1] >= self.counts[lane[0]]:
                lane[:] = [self._next_sequence(), 0]
            plan.append((lane[0], lane[1] * self.window, lane[1] == 0))
            lane[1] += 1
        return plan

    def state_dict(self) -> dict:
        """The position: steps taken, the generator's state and the queues (plain ints and lists)."""
        out = {"steps": self.steps, "rng": self.rng.bit_generator.state}
        if self.stride != self.window:
            out["order"] = [int(i) for i in self.order]
        else:
            out["queue"], out["lanes"] = list(self.queue), [list(lane) for lane in self.lanes]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.rng.bit_generator.state = state["rng"]
        if self.stride != self.window:
            self.order = np.array(state["order"], dtype=np.int64)
        else:
            self.queue, self.lanes = list(state["queue"]), [list(lane) for lane in state["lanes"]]

    def skip(self, steps: int) -> None:
        """Advance ``steps`` plans (the position of a checkpoint that did not save it)."""
        for _ in range(steps):
            next(self)


def make_batch(data: Dataset, plan: list, window: int) -> tuple:
    """``(x [B, W, ...], {name: y [B, W, ...]}, reset [B] bool)`` numpy arrays for one plan."""
    seqs = [(data.sequences[i], s) for i, s, _ in plan]
    x = np.stack([q.x[s:s + window] for q, s in seqs])
    ys = {t.name: np.stack([q.y[t.name][s:s + window] for q, s in seqs]) for t in data.targets}
    return x, ys, np.array([r for _, _, r in plan], dtype=bool)
