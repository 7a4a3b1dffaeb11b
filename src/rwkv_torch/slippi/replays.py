"""Replays to training episodes: ``load_replay`` (one file) and ``load_replays`` (a folder, cached, with a
progress bar and one line on stderr per unusable file).

An episode is the dict of arrays an episode ``.npz`` holds (``np.savez(f, **episode)`` writes a file that
``rwkv-torch train`` reads): ``frames`` ``[T, 113]`` float32 and the ``ids_*`` arrays of ``features``, the
``target_*`` / ``classes_*`` arrays of ``targets``. Row t holds the game state after frame t (what a live bot sees,
as libmelee's ``GameState``) and the player's own input on frame t; its targets are the player's input on frame
``t + action_delay``. The default delay 1 is the least a bot can play with: the state after frame t already shows
the effect of the input on frame t, so with 0 the model would read its answer from the features (allowed, for
analysis only); online play adds frames of delay, which a larger ``--action-delay`` trains for.
"""

import functools
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ..checks import input_files
from ..task import Dataset, episodes_dataset
from .features import FEATURE_VERSION, ID_CLASSES, game_features
from .parse import read_replay
from .targets import controller_targets

DEFAULT_ACTION_DELAY = 1


def _episode(replay, me, opp, action_delay: int) -> dict:
    frames, ids = game_features(me, opp, replay.stage, replay.items)
    n = len(frames)
    if n <= action_delay:
        raise ValueError(f"{replay.path}: {n} frames, too short for action_delay={action_delay}")
    T = n - action_delay
    ep = {"frames": frames[:T]}
    for name, a in ids.items():
        ep[f"ids_{name}"] = a[:T]
        ep[f"classes_{name}"] = np.int64(ID_CLASSES[name])
    later = {k: np.asarray(v)[action_delay:] for k, v in me.leader.items()}
    ep.update(controller_targets(later))
    return ep


def check_delay(action_delay) -> int:
    if not isinstance(action_delay, (int, np.integer)) or isinstance(action_delay, bool) or action_delay < 0:
        raise ValueError(f"action_delay={action_delay!r}: must be an int >= 0 (frames between state and input)")
    return int(action_delay)


def load_replay(path, port: int | None = None, action_delay: int = DEFAULT_ACTION_DELAY) -> list[dict]:
    """One ``.slp`` replay -> a list with one episode per player perspective.

    Args:
        path: the replay file.
        port: 1-4, the player whose controller is the target (any player type, CPUs too); None: every human
            player, in port order. Ports are those of the file (a game on ports 2 and 3 has no port 1).
        action_delay: frames from the observed state to the predicted input (default 1, see the module doc).

    Returns episodes (dicts of arrays, see the module doc). Raises ValueError naming the file and the reason for a
    truncated, unsupported (peppi's message), non-1v1 or CPU-only replay, or a port not in the game.
    """
    return [ep for _, ep in player_perspectives(read_replay(path), port, check_delay(action_delay))]


def player_perspectives(replay, port: int | None, delay: int) -> list[tuple[int, dict]]:
    """``[(port, episode)]``: the player on ``port``, or every human player, against the other player."""
    ports = [p.port for p in replay.players]
    if port is not None:
        chosen = [p for p in replay.players if p.port == port]
        if not chosen:
            raise ValueError(f"{replay.path}: no player on port {port}; the game has ports {ports}")
    else:
        chosen = [p for p in replay.players if not p.cpu]
        if not chosen:
            raise ValueError(f"{replay.path}: no human player (ports {ports} are CPUs); pass port= to learn a "
                             f"CPU's inputs")
    return [(me.port, _episode(replay, me, next(p for p in replay.players if p is not me), delay)) for me in chosen]


def cache_dir() -> Path:
    """``$RWKV_TORCH_CACHE/slippi``, else ``$XDG_CACHE_HOME/rwkv_torch/slippi`` (``~/.cache`` by default): the
    folder the compiled kernels use too (``ops.cpu_lib``)."""
    root = os.environ.get("RWKV_TORCH_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkv_torch"
    return Path(root) / "slippi"


@functools.cache
def target_encoding_key() -> str:
    """A short hash of the target encoding (``targets.controller_targets`` on a fixed probe of button, stick and
    shoulder values): a change to the buckets, classes or bits keys new cache entries, as ``FEATURE_VERSION`` does
    for the features."""
    v = np.linspace(-1.0, 1.0, 201)
    probe = {"buttons": np.arange(201) * 37 % 4096, "stick_x": v, "stick_y": v[::-1], "cstick_x": v ** 3,
             "cstick_y": -v ** 3, "trigger": np.abs(v)}
    h = hashlib.sha256()
    for k, a in sorted(controller_targets(probe).items()):
        a = np.ascontiguousarray(a)
        h.update(f"{k}:{a.dtype}:{a.shape};".encode() + a.tobytes())
    return h.hexdigest()[:8]


def _cached(path: Path, delay: int, cache: Path | None) -> list[tuple[int, dict]]:
    """``[(port, episode)]`` of one file, from the cache when its content was parsed before (with the same
    features, target encoding and delay)."""
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    name = f"{key}-f{FEATURE_VERSION}-t{target_encoding_key()}-d{delay}.npz"
    file = None if cache is None else cache / name
    if file is not None and file.exists():
        try:
            with np.load(file, allow_pickle=False) as z:
                by_port: dict = {}
                for k in z.files:
                    p, name = k.split("__", 1)
                    by_port.setdefault(int(p[1:]), {})[name] = z[k]
            return sorted(by_port.items())
        except (OSError, ValueError):  # a damaged cache file: parse again
            pass
    out = player_perspectives(read_replay(path), None, delay)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, **{f"P{p}__{k}": v for p, e in out for k, v in e.items()})
            os.replace(tmp, file)
        finally:  # Ctrl-C while it writes: no half-written file left in the cache
            tmp.unlink(missing_ok=True)
    return out


def load_replays(path, action_delay: int = DEFAULT_ACTION_DELAY, *, cache: bool | str = True,
                 progress: bool = True) -> list[tuple[str, dict, str]]:
    """A ``.slp`` file or a folder of them (recursive) -> ``[(name, episode, game)]``, one per human player.

    ``name`` is ``<file>:P<port>``; ``game`` is the file, so a split by game keeps both sides of a game together.
    Each file is parsed once: its episodes are cached (``cache_dir()``, or the folder ``cache``) under the hash of
    its content, the feature version and the delay; ``cache=False`` turns that off. In a folder an unusable file
    is skipped with one line on stderr naming it and the reason, and a count at the end; a folder with no usable
    replay, or a single bad file, raises ValueError.
    """
    delay = check_delay(action_delay)
    path = Path(path)
    files = input_files(path, ".slp", "replay")
    where = None if cache is False else (cache_dir() if cache is True else Path(cache))
    from tqdm.auto import tqdm

    out, skipped = [], []
    for f in tqdm(files, desc="replays", leave=False, disable=not progress or len(files) < 2):
        try:
            eps = _cached(f, delay, where)
        except ValueError as e:
            if len(files) == 1:
                raise
            skipped.append(str(e))
            _say(f"skipping {e}")
            continue
        out.extend((f"{f}:P{port}", ep, str(f)) for port, ep in eps)
    if not out:
        raise ValueError(f"{path}: no usable replay among {len(files)} .slp files ({len(skipped)} refused: "
                         + "; ".join(skipped[:3]) + ")")
    if skipped:
        _say(f"{path}: skipped {len(skipped)} of {len(files)} replay files")
    return out


def _say(line: str) -> None:
    """One line on stderr, above the progress bar (``tqdm.write``: the bar is cleared and drawn again below it)."""
    from tqdm.auto import tqdm

    tqdm.write(" ".join(line.split()), file=sys.stderr)


def load_dataset(path, action_delay: int = DEFAULT_ACTION_DELAY, progress: bool = True) -> Dataset:
    """A ``.slp`` replay or a folder of them as a training Dataset (``load_replays``: parsed once and cached, bad
    files skipped with a warning): one episode per human player, held out by game (file)."""
    data = episodes_dataset(load_replays(path, action_delay, progress=progress), str(path))
    data.meta = dict(feature_version=FEATURE_VERSION, action_delay=int(action_delay))
    return data
