"""The C library of the CPU kernels: built from ``csrc/*.c`` on first use, loaded with ``ctypes``; what every
wrapper of a kernel shares (its declared signature, pointers, the custom-op registration).

The C files are compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``: the same one
``torch.compile`` needs on CPU) into a cache directory (``$RWKV_TORCH_CACHE``, else ``~/.cache/rwkv_torch``) keyed by
the source, flags, compiler and CPU, and loaded with ``ctypes``; no build step at install time. Where there is no
compiler, ``auto`` falls back to the chunked form with one warning; ``backend="recurrent"`` on CPU raises with the
compiler's message. ``RWKV_TORCH_CPU_KERNEL=0`` turns the kernels off; ``RWKV_TORCH_KERNEL_LIB=PATH`` loads a library
built ahead of time from these sources instead (no compiler needed: ``slippi.bot`` ships them in a bot's folder).

The kernels and their Python wrappers, each signature declared next to its wrapper (``Kernel``):

* the WKV-7, WKV-6 and WKV-4 recurrences with their backward (``csrc/wkv_cpu.c``, ``csrc/wkv4_cpu.c``):
  ``wkv7/recurrent_cpu.py``, ``wkv6/recurrent_cpu.py``, ``wkv4/recurrent_cpu.py`` (the checkpointed autograd
  scaffolding of the first two in ``recurrent_cpu.py``);
* a token-shift mix's backward and the squared ReLU (``csrc/mix_cpu.c``): ``mix_cpu.py``, used by ``mix.py``;
* the elementwise backwards of RWKV-7's WKV inputs and the gated output (``csrc/time_mix_cpu.c``):
  ``time_mix_cpu.py``;
* the int8/bf16 matrix-vector product (``rwkv_qgemv``): ``quantize.py``; the whole one-token RWKV-7 block stack
  (``csrc/rwkv7_step.c``), called on ``library()`` by ``decode/c_step.py``: declared in ``_LIBRARY_SIGNATURES``.

Each call is registered as a ``torch.library`` custom op (``custom_op``), so a ``torch.compile``-d model keeps it as
one opaque kernel inside its graph.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("wkv_cpu.c", "wkv4_cpu.c", "rwkv7_step.c",
                                                                        "mix_cpu.c", "time_mix_cpu.c")]
# Reassociation lets the compiler vectorise the sums (results differ from the naive loop at rounding level only,
# which the tests bound); no -ffinite-math-only, so NaN and inf still propagate.
_FAST_MATH = ["-ffp-contract=fast", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", *_FAST_MATH]
_NATIVE = ["-march=native", "-mprefer-vector-width=512"]

# The argument types of the C signatures.
PTR, I64, INT, DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
# The weight formats (``wfmt``) of the C matrix kernels (``rwkv_qgemv``, ``rwkv7_blocks_step``): the weight dtype.
WEIGHT_FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
# Kernels called directly on ``library()`` from outside ops (``decode/c_step.py``): name -> (argtypes, restype).
_LIBRARY_SIGNATURES = {
    "rwkv7_blocks_step": ([I64] * 6 + [PTR] * 3 + [INT] + [PTR] * 7 + [INT], INT),
    "rwkv7_step_fields": ([], ctypes.c_char_p),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_warned = False


def _enabled() -> bool:
    return os.environ.get("RWKV_TORCH_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "off", "no")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("RWKV_TORCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rwkv_torch")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """The CPU model and feature flags: a library built with -march=native only runs where it was built."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build(cc: str) -> Path:
    src = b"\0".join(p.read_bytes() for p in SOURCES)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    # -march=native where the compiler knows it, else portable code; OpenMP (PyTorch's own runtime, already loaded)
    # where available, else pthreads.
    for flags in (BASE_FLAGS + _NATIVE + ["-fopenmp"], BASE_FLAGS + ["-fopenmp"], BASE_FLAGS + _NATIVE, BASE_FLAGS):
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_id().encode()]))
        target = _cache_dir() / f"wkv_cpu-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name, then rename: concurrent processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-2000:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling the CPU WKV kernel failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL:
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise RuntimeError(_error)
        try:
            if not _enabled():
                raise RuntimeError("the CPU WKV kernel is turned off (RWKV_TORCH_CPU_KERNEL=0)")
            prebuilt = os.environ.get("RWKV_TORCH_KERNEL_LIB")  # built ahead of time (a UMI bot's folder)
            cc = None if prebuilt else _compiler()
            if cc is None and not prebuilt:
                raise RuntimeError("the CPU WKV kernel needs a C compiler (cc, gcc or clang, or $CC); none was found "
                                   "(e.g. `apt install gcc`)")
            lib = ctypes.CDLL(prebuilt or str(_build(cc)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _error = str(e)
            raise RuntimeError(_error) from None
        for name, (argtypes, restype) in _LIBRARY_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        _lib = lib
        return lib


def available() -> bool:
    """Whether the kernels can run here (compiles them on the first call). Warns once when they cannot."""
    global _warned
    if not _enabled():
        return False
    if _lib is not None:
        return True
    try:
        _load()
        return True
    except RuntimeError as e:
        if not _warned:
            _warned = True
            warnings.warn(f"{e}\nFalling back to the chunked form on CPU.", RuntimeWarning, stacklevel=3)
        return False


# Evaluated once while torch.compile traces, not traced: what ``torch.compiler.assume_constant_result`` does (it
# sets this flag), without its ``import torch._dynamo`` (~5 s) at ``import rwkv_torch``; ``available`` stays a plain
# function.
available._dynamo_marked_constant = True


def loaded() -> bool:
    """Whether the library is loaded in this process (built, found in the cache or ``$RWKV_TORCH_KERNEL_LIB``)."""
    return _lib is not None


def library() -> ctypes.CDLL:
    """The loaded library (built on first use); a clear RuntimeError when it cannot be built or is turned off."""
    return _load()


class Kernel:
    """One C function of the library with its declared signature: ``Kernel(name, argtypes, restype)(*args)`` loads
    the library on first use (a clear RuntimeError where it cannot be built) and sets the types once per load."""

    def __init__(self, name: str, argtypes: list, restype=INT):
        self.name, self.argtypes, self.restype = name, list(argtypes), restype
        self._lib = self._fn = None

    def __call__(self, *args):
        lib = _load()
        if lib is not self._lib:
            fn = getattr(lib, self.name)
            fn.argtypes, fn.restype = self.argtypes, self.restype
            self._lib, self._fn = lib, fn
        return self._fn(*args)


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer as a C argument (NULL for None)."""
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def ptrs(ts) -> ctypes.Array:
    """A C array of the tensors' data pointers (a ``const void *const *`` argument; NULL for None)."""
    return (ctypes.c_void_p * len(ts))(*(None if t is None else t.data_ptr() for t in ts))


def dtype_args(t: torch.Tensor) -> tuple[int, int]:
    """The two trailing arguments of every kernel: whether it computes in float64, and the thread count."""
    return int(t.dtype == torch.float64), torch.get_num_threads()


def check_alloc(err: int, what: str) -> None:
    """A kernel's nonzero return: it could not allocate its buffers."""
    if err:
        raise MemoryError(f"the CPU {what} kernel could not allocate its buffers")


def custom_op(name, impl, fake, mutates_args=(), eager=None):
    """``impl`` as a ``torch.library`` custom op while ``torch.compile`` traces, a plain call otherwise (of ``eager``
    where given: a form that may reuse its inputs' storage, which an op in a compiled graph cannot): the op's Python
    dispatch costs ~70 us a call, as much as a small kernel's work."""
    eager = eager or impl
    if not hasattr(torch.library, "custom_op"):  # pragma: no cover - older torch: plain calls (graph breaks)
        return eager
    op = torch.library.custom_op(f"rwkv_torch::{name}", mutates_args=mutates_args, device_types="cpu")(impl)
    op.register_fake(fake)
    is_compiling = torch.compiler.is_compiling

    def call(*args):
        return op(*args) if is_compiling() else eager(*args)

    call.op = op
    return call
