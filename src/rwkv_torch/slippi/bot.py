"""A training run as a bot for the Computer Melee Championship (CMC), which talks UMI (the ``umi-melee`` package, the
``umi`` extra): ``rwkv-torch bot RUN --out DIR`` writes ``DIR/run.py`` (a ``umi.Bot`` subclass, started by
``umi.serve``), ``DIR/requirements.txt``, ``DIR/weights/model.pt`` and ``DIR.zip`` of the three.

``BatchPolicy`` plays many games in one step: ``initial_state(n)`` is the RWKV state of n new games as a list of
tensors with the batch on axis 0 (the flat order of ``RWKVState.flat``) plus each game's frame counter; ``act(frames,
state, first, games)`` turns the UMI frames into rows (``slippi.umi.umi_rows``, the features of ``load_replay``),
resets the rows of games on their first frame, steps every row at once (``RWKV.step_`` at batch N: the C step on CPU)
and returns the controller rows, f32 ``[N, 13]`` in UMI's order (sticks and shoulder in [0, 1], 0.5 a neutral stick,
then the 8 buttons as 0/1). Rows are independent: a padding row changes no real game. Greedy by default (arg-max
classes, buttons above one half: the same controller as ``Policy.act``); ``sample=True`` draws each game's controller
from a counter-based generator keyed by (seed, game handle, frame), so a game's draws depend on nothing else in its
batch. An autoregressive head is decoded in its order (buttons, main stick, C-stick, shoulder), each head fed the
values drawn (or picked) before it, from the same uniforms. Rows are never NaN or out of range: a row whose outputs
are not finite gets the neutral controller and its game a fresh state.

``RWKVBot`` (``from rwkv_torch.slippi.bot import RWKVBot``; needs umi) is the ``umi.Bot`` that ``run.py`` subclasses.
Its delay is the run's ``--action-delay``: 18 and 21 enter the Delay 18 / Delay 21 leaderboards, any other delay from
0 to 30 the imitation leaderboard only."""

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..state import RWKVState
from .targets import BUTTONS, SHOULDER_VALUES, STICK_VALUES, STICKS
from .umi import UMI_EXTRA, umi_rows

CTRL_WIDTH = 5 + len(BUTTONS)  # UMI's controller row: main_x, main_y, c_x, c_y, shoulder, then BUTTONS
NEUTRAL = np.array([0.5] * 4 + [0.0] * (1 + len(BUTTONS)), np.float32)
STICK_UNIT = ((STICK_VALUES + 1) / 2).astype(np.float32)  # a stick class -> UMI's [0, 1] value
ROW_LIMIT = 1e4  # float features beyond this (garbage, never a real frame) are clipped
WEIGHTS = "weights/model.pt"


class BatchPolicy:
    """A ``TaskModel`` with the controller heads and an RWKV backbone, stepping N games per call."""

    def __init__(self, model, *, sample: bool = False, seed: int = 0, temperature: float = 1.0):
        from .policy import Policy

        Policy(model)  # the same checks: an RWKV backbone with the controller heads
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.model, self.sample, self.seed, self.temperature = model.eval(), sample, int(seed), float(temperature)
        self.meta = model.backbone.state_meta()

    @classmethod
    def load(cls, path, **kw) -> "BatchPolicy":
        """From a run (folder or ``ckpt-*.pt``) or a bot's ``weights/model.pt``."""
        return cls(load_weights(path), **kw)

    def initial_state(self, n: int) -> list:
        state = self.model.init_state(n, device="cpu")
        return [t.detach().clone().contiguous() for t in state.flat()] + [torch.zeros(n, dtype=torch.int64)]

    def inputs(self, frames) -> torch.Tensor:
        """UMI frames ``[N]`` -> the model's input rows ``[N, frame_dim + id columns]`` (ids clamped into the
        model's tables)."""
        with np.errstate(all="ignore"):  # garbage floats become zeros (features) or are clipped (below)
            rows, ids = umi_rows(frames)
        if rows.shape[1] != self.model.frame_dim:
            raise ValueError(f"the model reads {self.model.frame_dim} features per frame, UMI frames give "
                             f"{rows.shape[1]}: a run trained on other features")
        cols = [np.clip(rows, -ROW_LIMIT, ROW_LIMIT)]
        for spec in self.model.id_specs:
            v = np.asarray(ids[spec.name]).reshape(len(rows), -1)
            cols.append(np.clip(v, 0, spec.classes - 1).astype(np.float32))
        return torch.from_numpy(np.concatenate(cols, axis=1))

    @torch.inference_mode()
    def step(self, x: torch.Tensor, state: list, first=None, u=None) -> tuple[dict, list]:
        """One step of every row: ``({head: [N, size]}, state)``; rows with ``first`` start from a fresh state. An
        autoregressive head is decoded greedily, or with ``u`` (``[N, 13]`` uniforms, see ``controls``) by the
        draws ``controls`` makes from them."""
        state = [t.contiguous() for t in state]
        if first is not None and np.any(first):
            rows = torch.from_numpy(np.flatnonzero(first))
            for t, t0 in zip(state, self.initial_state(len(rows))):
                t.index_copy_(0, rows, t0.to(t.dtype))
        flat, t = state[:-1], state[-1]
        rwkv = RWKVState.from_flat(flat, self.meta)
        h = self.model.backbone.step_(self.model._join_ids(x), rwkv)
        choose = None
        if self.model.order:
            def choose(name, logits):
                v = self._choose(name, logits.detach().double().numpy(), u)
                return torch.from_numpy(v).to(logits.dtype if name == "buttons" else torch.long)
        heads, _ = self.model.decode_heads(h, choose=choose)
        return heads, rwkv.flat() + [t + 1]

    def _choose(self, name: str, logits: np.ndarray, u) -> np.ndarray:
        """One head's value per row (class ids, or button bits as 0/1) from its float64 outputs: greedy, or drawn
        from the uniforms ``u`` (columns: ``STICKS`` and the shoulder, then the buttons)."""
        temp = self.temperature
        if name == "buttons":
            if not self.sample:
                return (logits > 0).astype(np.float64)  # sigmoid above one half
            with np.errstate(over="ignore"):
                return (u[:, 5:] < 1 / (1 + np.exp(-logits / temp))).astype(np.float64)
        j = (*STICKS, "shoulder").index(name)
        return _draw(logits / temp, u[:, j]) if self.sample else np.argmax(np.nan_to_num(logits, nan=-np.inf), 1)

    def uniforms(self, n: int, games=None, t=None):
        """The ``[n, 13]`` uniforms of each row's draws when sampling (None when greedy)."""
        if not self.sample:
            return None
        return _uniforms(self.seed, np.zeros(n) if games is None else games, np.zeros(n) if t is None else t,
                         len(BUTTONS) + len(STICKS) + 1)

    def controls(self, heads: dict, games=None, t=None) -> tuple[np.ndarray, np.ndarray]:
        """The heads' outputs -> (controller rows f32 ``[N, 13]``, bool ``[N]``: rows whose outputs were not finite,
        given the neutral controller); ``games``, ``t``: each row's game handle and frame (the keys of its draws when
        sampling)."""
        out = {k: v.detach().double().numpy() for k, v in heads.items()}
        n = len(out["buttons"])
        u = self.uniforms(n, games, t)
        ctrl = np.empty((n, CTRL_WIDTH), np.float32)
        for j, (name, values) in enumerate([(s, STICK_UNIT) for s in STICKS] + [("shoulder", SHOULDER_VALUES)]):
            ctrl[:, j] = values[self._choose(name, out[name], u)]
        ctrl[:, 5:] = self._choose("buttons", out["buttons"], u)
        bad = ~np.all([np.isfinite(v).all(axis=1) for v in out.values()], axis=0)
        ctrl[bad] = NEUTRAL
        return np.clip(np.nan_to_num(ctrl, nan=0.5), 0.0, 1.0), bad

    def act(self, frames, state: list, first=None, games=None) -> tuple[np.ndarray, list]:
        """UMI frames of N games -> (controller rows f32 ``[N, 13]``, their new state)."""
        x = self.inputs(frames)
        t = np.asarray(state[-1]).copy()  # each row's frame (rows with ``first`` restart at 0)
        if first is not None:
            t[np.asarray(first, bool)] = 0
        u = self.uniforms(len(x), games, t) if self.model.order else None
        heads, state = self.step(x, state, first, u)
        ctrl, bad = self.controls(heads, games, state[-1].numpy() - 1)
        if bad.any():  # a game whose outputs went non-finite starts over rather than play NaN forever
            rows = torch.from_numpy(np.flatnonzero(bad))
            for s, s0 in zip(state, self.initial_state(len(rows))):
                s.index_copy_(0, rows, s0.to(s.dtype))
        return ctrl, state


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, games, t, k: int) -> np.ndarray:
    """``[N, k]`` uniforms in [0, 1), a function of (seed, game, t, column) only."""
    with np.errstate(over="ignore"):
        key = _splitmix(np.full(len(games), seed % 2**64, np.uint64))
        key = _splitmix(key ^ np.asarray(games).astype(np.uint64))
        key = _splitmix(key ^ np.asarray(t).astype(np.int64).astype(np.uint64))
        bits = _splitmix(key[:, None] ^ np.arange(1, k + 1, dtype=np.uint64)[None])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One class per row from softmax(logits), by inverting its CDF at ``u``."""
    z = np.nan_to_num(logits, nan=-np.inf, posinf=1e30, neginf=-np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.nan_to_num(np.exp(z))
    cdf = np.cumsum(p, axis=1)
    total = cdf[:, -1:]
    cls = (cdf < u[:, None] * np.where(total > 0, total, 1)).sum(axis=1)
    return np.minimum(cls, logits.shape[1] - 1)


# ---- the weights a bot carries

def load_weights(path):
    """The ``TaskModel`` of a run (folder or ``ckpt-*.pt``) or of a bot's ``weights/model.pt``, eval mode, CPU."""
    from ..train import finetune
    from ..train.model import load_task_model

    model, ckpt = load_task_model(path)
    if ckpt.get("state0_wkv") is not None:
        template = model.backbone.init_state(1)
        model.state0 = finetune.InitialState(template)
        with torch.no_grad():
            for p, t in zip(model.state0.wkv, ckpt["state0_wkv"]):
                p.copy_(t)
    return model.eval()


def save_weights(run, path) -> dict:
    """A run's model (a fine-tune merged: LoRA folded in, its base's weights included) as one plain checkpoint
    that ``load_weights`` reads; returns its training config."""
    from ..train.model import load_task_model

    model, ckpt = load_task_model(run)
    c = model.backbone.config
    arch = dict(backbone=f"rwkv{c.version}", hidden_size=c.hidden_size, num_layers=c.num_layers, head_size=c.head_size)
    plain = dict(init_from=None, lora_rank=None, lora_alpha=None, lora_targets=None, train_also=None,
                 train_state=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("state0.")}
    out = dict(format=ckpt["format"], format_version=ckpt.get("format_version", 1), step=ckpt.get("step", 0),
               config={**ckpt["config"], **arch, **plain}, targets=ckpt["targets"], embed_dim=ckpt["embed_dim"],
               ids=ckpt.get("ids", []), vocab_size=ckpt["vocab_size"], partial=False, model=state,
               data_meta=ckpt.get("data_meta", {}), held_out=ckpt.get("held_out", []), run_cwd=ckpt.get("run_cwd"),
               state0_wkv=None if model.state0 is None else [p.detach().clone() for p in model.state0.wkv])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return ckpt["config"]


# ---- the C kernels a bot carries: built at `bot` time for three x86-64 levels, the best one the CPU runs picked
# at start (no compiler needed there, no -march=native binary)

V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})
KERNEL_LEVELS = (("x86-64-v4", ["-march=x86-64-v4", "-mprefer-vector-width=512"],
                  V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
                 ("x86-64-v3", ["-march=x86-64-v3"], V3), ("x86-64", ["-march=x86-64"], frozenset()))


def _kernel_key() -> str:
    """The hash of the kernel sources: a library is used only with the sources it was built from."""
    from ..ops import cpu_lib

    return hashlib.sha256(b"\0".join(p.read_bytes() for p in cpu_lib.SOURCES)).hexdigest()[:16]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def build_kernels(dest) -> list[str]:
    """Compile the C kernels into ``dest`` for each of ``KERNEL_LEVELS`` (x86-64 with a C compiler only; none
    elsewhere). Returns the libraries written."""
    from ..ops import cpu_lib

    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    jobs = []
    for level, flags, _ in KERNEL_LEVELS:
        out = dest / f"wkv_cpu-{_kernel_key()}-{level}.so"
        cmd = [cc, *cpu_lib.BASE_FLAGS, *flags, "-fopenmp", *map(str, cpu_lib.SOURCES), "-o", str(out)]
        jobs.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    built = []
    for out, proc in jobs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            built.append(str(out))
        elif out.exists():
            out.unlink()
    return built


def use_kernels(folder) -> str | None:
    """Point the C kernels at the best library of ``folder`` this CPU runs (``RWKV_TORCH_KERNEL_LIB``), unless
    that is set already; returns the library, or None (then they are built here, or the step runs in PyTorch)."""
    if os.environ.get("RWKV_TORCH_KERNEL_LIB"):
        return os.environ["RWKV_TORCH_KERNEL_LIB"]
    if folder is None:
        return None
    flags = _cpu_flags()
    for level, _, need in KERNEL_LEVELS:
        lib = Path(folder) / f"wkv_cpu-{_kernel_key()}-{level}.so"
        if lib.is_file() and need <= flags:
            os.environ["RWKV_TORCH_KERNEL_LIB"] = str(lib)
            return str(lib)
    return None


# ---- the umi.Bot

def set_threads() -> int:
    """torch's thread pool from ``UMI_CORES`` (the arena's allotted cores), else ``OMP_NUM_THREADS``."""
    for var in ("UMI_CORES", "OMP_NUM_THREADS"):
        try:
            n = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if n >= 1:
            torch.set_num_threads(n)
            return n
    return torch.get_num_threads()


def writable_cache() -> str:
    """``$RWKV_TORCH_CACHE`` where it is set; else ``~/.cache/rwkv_torch`` if writable, else ``$TMPDIR``."""
    if os.environ.get("RWKV_TORCH_CACHE"):
        return os.environ["RWKV_TORCH_CACHE"]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = home / "rwkv_torch"
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK):
            raise PermissionError(where)
    except OSError:
        where = Path(tempfile.gettempdir()) / "rwkv_torch"
    os.environ["RWKV_TORCH_CACHE"] = str(where)
    return str(where)


def _bot_class():
    try:
        import umi
    except ImportError as e:
        raise ImportError(f"a UMI bot needs umi-melee, the `umi` extra: {UMI_EXTRA}") from e

    class RWKVBot(umi.Bot):
        """An RWKV policy as a UMI bot. Subclasses set ``name``, ``characters``, ``delay`` and ``deterministic``
        in their class body, and ``weights`` (the path of ``weights/model.pt``), ``sample`` and ``seed``."""

        name = "rwkv-torch"
        deterministic = True
        weights: str | None = None
        kernels: str | None = None  # the folder of the bundled C kernels
        sample = False
        seed = 0

        def setup(self, session) -> None:
            set_threads()
            writable_cache()
            use_kernels(self.kernels)
            self.policy = BatchPolicy.load(self.weights, sample=self.sample,
                                           seed=(int(session.rng_seed) * 1_000_003 + int(self.seed)) % 2**63)

        def initial_state(self, n: int) -> list:
            return self.policy.initial_state(n)

        def act(self, batch, state):
            ctrl, state = self.policy.act(batch.frames, state, batch.first, batch.games)
            return umi.Actions(ctrl=ctrl), state

    return RWKVBot


def __getattr__(name):  # RWKVBot subclasses umi.Bot: built on first use, so the rest needs no umi
    if name == "RWKVBot":
        cls = _bot_class()
        globals()["RWKVBot"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- rwkv-torch bot RUN --out DIR

RUN_PY = '''"""UMI bot {name!r} for the Computer Melee Championship: an RWKV policy trained with rwkv-torch
(run {run!r}) at --action-delay {delay}, so it can enter {board}.

Start: python run.py (it connects to $UMI_SOCKET); check: umi-conform --cmd "python run.py" --realtime
"""
from pathlib import Path

import umi
from rwkv_torch.slippi.bot import RWKVBot

HERE = Path(__file__).resolve().parent


class Bot(RWKVBot):
    name = {name!r}
    characters = {characters!r}
    delay = {delay!r}
    deterministic = {deterministic!r}
    sample = {sample!r}
    seed = {seed!r}
    weights = str(HERE / {weights!r})
    kernels = str(HERE / "kernels")


if __name__ == "__main__":
    umi.serve(Bot())
'''


def leaderboards(delay: int) -> str:
    """Which CMC leaderboards a bot of this delay can enter."""
    if delay in (18, 21):
        return f"the Delay {delay} leaderboard and the imitation leaderboard"
    if 0 <= delay <= 30:
        return "the imitation leaderboard only (Delay 18 / Delay 21 need --action-delay 18 or 21)"
    return "no leaderboard (UMI delays are 0 to 30)"


def _requirements() -> str:
    from importlib import metadata

    from .. import __version__

    torch_version = torch.__version__.split("+")[0]
    return ("--extra-index-url https://download.pytorch.org/whl/cpu\n"
            f"torch=={torch_version}\nrwkv-torch=={__version__}\numi-melee==0.1.0\n"
            f"numpy=={metadata.version('numpy')}\n")


def write_bot(run, out, *, name: str | None = None, characters: str = "12", sample: bool = False,
              seed: int = 0, kernels: bool = True) -> dict:
    """Write the bot folder ``out`` (``run.py``, ``requirements.txt``, ``weights/``, and with ``kernels`` the C
    kernels built for three x86-64 levels in ``kernels/``) and ``out.zip`` of it."""
    try:
        from umi.frame import canonical_characters, valid_delay
    except ImportError as e:
        raise ImportError(f"writing a UMI bot needs umi-melee, the `umi` extra: {UMI_EXTRA}") from e
    chars = characters if characters in ("12", "ALL") else canonical_characters(characters)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; pass a new folder for the bot")
    config = save_weights(run, out / WEIGHTS)
    delay = int(config.get("action_delay", 1))
    if not valid_delay(delay):
        raise ValueError(f"{run}: trained at --action-delay {delay}; UMI bots play at 0 to 30 frames")
    name = name or Path(run).resolve().name
    BatchPolicy.load(out / WEIGHTS)  # the written weights load
    (out / "run.py").write_text(RUN_PY.format(name=name, run=Path(run).name, characters=chars, delay=delay,
                                              deterministic=not sample, sample=bool(sample), seed=int(seed),
                                              weights=WEIGHTS, board=leaderboards(delay)))
    (out / "requirements.txt").write_text(_requirements())
    libs = build_kernels(out / "kernels") if kernels else []
    zip_path = shutil.make_archive(str(out), "zip", root_dir=out)
    return dict(out=str(out), zip=zip_path, name=name, characters=chars, delay=delay,
                leaderboards=leaderboards(delay), deterministic=not sample, kernels=libs)


def bot_command(args) -> dict:
    info = write_bot(args.run, args.out, name=args.name, characters=args.characters, sample=args.sample,
                     seed=args.seed, kernels=args.kernels)
    print(f"wrote {info['out']} and {info['zip']}: bot {info['name']!r}, characters {info['characters']}, "
          f"delay {info['delay']}: {info['leaderboards']}; prebuilt C kernels: "
          f"{', '.join(Path(k).name for k in info['kernels']) or 'none (built where it starts, else PyTorch steps)'}")
    print(f'check it: umi-conform --cmd "python {info["out"]}/run.py" --realtime')
    return info


def add_parser(sub):
    """The ``rwkv-torch bot`` subcommand (cli.COMMANDS)."""
    p = sub.add_parser("bot", help="a Melee run as a UMI bot for the Computer Melee Championship (run.py + zip)")
    p.add_argument("run", help="a training run on .slp replays (its folder or one of its ckpt-*.pt)")
    p.add_argument("--out", required=True, help="the bot folder to write (DIR; DIR.zip beside it)")
    p.add_argument("--name", default=None, help="the bot's name (default: the run folder's name)")
    p.add_argument("--characters", default="12", help='what it plays: "12" (slippi-ai\'s 12), "ALL", or names '
                   'joined by +, e.g. FOX+FALCO (default 12)')
    p.add_argument("--sample", action="store_true", help="sample the controller (seeded per game) instead of greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, with the session's rng_seed")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="do not ship the C kernels prebuilt (default: built for x86-64, -v3 and -v4, picked at start)")
    p.set_defaults(call=bot_command, ok=lambda r: True, errors=(ValueError, ImportError, FileNotFoundError))
