"""A training run as a bot for the Computer Melee Championship (CMC), which talks UMI (the ``umi-melee`` package, the
``umi`` extra): ``rwkv-torch bot RUN --out DIR`` writes ``DIR/run.py`` (a ``umi.Bot`` subclass, started by
``umi.serve``), ``DIR/requirements.txt``, ``DIR/weights/model.pt`` and ``DIR.zip`` of the three.

The batched player is ``slippi.batch_policy.BatchPolicy``.

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

import torch

from .batch_policy import WEIGHTS, BatchPolicy, save_weights
from .umi import UMI_EXTRA

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
