"""Fused CPU kernels, built from ``csrc/*.c`` on first use: the WKV-7 and WKV-6 recurrences (forward only,
``csrc/wkv_cpu.c``) and the whole one-token RWKV-7 block stack (``csrc/rwkv7_step.c``, driven by
``decode/c_step.py``).

The chunked form turns a sequence into many small matrix products and elementwise passes; on a CPU, with 64x64
head states that stay in L1, the plain spec recurrence in C does less work: one read of the inputs, two passes
over the state per token, threads over (batch, head) pairs. It has no backward, so ``backend="auto"`` picks it
only for CPU tensors when no gradient is needed (inference, prefill, evaluation) and T > 1; training keeps the
chunked form.

The C files are compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``: the same one
``torch.compile`` needs on CPU) into a cache directory (``$RWKV_TORCH_CACHE``, else ``~/.cache/rwkv_torch``) keyed by
the source, flags, compiler and CPU, and loaded with ``ctypes``; no build step at install time. Where there is no
compiler, ``auto`` falls back to the chunked form with one warning; ``backend="recurrent"`` on CPU raises with the
compiler's message. ``RWKV_TORCH_CPU_KERNEL=0`` turns the kernel off.

Each call is registered as a ``torch.library`` custom op, so a ``torch.compile``-d model keeps it as one opaque
kernel inside its graph.
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

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("wkv_cpu.c", "rwkv7_step.c")]
# Reassociation lets the compiler vectorise the sums (results differ from the naive loop at rounding level only,
# which the tests bound); no -ffinite-math-only, so NaN and inf still propagate.
_FAST_MATH = ["-ffp-contract=fast", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_BASE = ["-O3", "-fPIC", "-shared", "-pthread", *_FAST_MATH]
_NATIVE = ["-march=native", "-mprefer-vector-width=512"]

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
    for flags in (_BASE + _NATIVE + ["-fopenmp"], _BASE + ["-fopenmp"], _BASE + _NATIVE, _BASE):
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
            cc = _compiler()
            if cc is None:
                raise RuntimeError("the CPU WKV kernel needs a C compiler (cc, gcc or clang, or $CC); none was found "
                                   "(e.g. `apt install gcc`)")
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _error = str(e)
            raise RuntimeError(_error) from None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.rwkv_wkv7_forward.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_int] * 2
        lib.rwkv_wkv6_forward.argtypes = [ptr] * 7 + [i64] * 4 + [ctypes.c_int] * 2
        lib.rwkv7_blocks_step.argtypes = [i64] * 6 + [ptr] * 10 + [ctypes.c_int]
        lib.rwkv_wkv7_forward.restype = lib.rwkv_wkv6_forward.restype = lib.rwkv7_blocks_step.restype = ctypes.c_int
        lib.rwkv7_step_fields.argtypes = []
        lib.rwkv7_step_fields.restype = ctypes.c_char_p
        _lib = lib
        return lib


def available() -> bool:
    """Whether the kernel can run here (compiles it on the first call). Warns once when it cannot."""
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


def library() -> ctypes.CDLL:
    """The loaded library (built on first use); a clear RuntimeError when it cannot be built or is turned off."""
    return _load()


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _prepare(state: torch.Tensor, *tensors: torch.Tensor):
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    xs = [t.to(dtype).contiguous() for t in tensors]
    return dtype, xs, state.to(dtype, copy=True).contiguous()


def _wkv7_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, (r, w, k, v, a, b), s = _prepare(state, r, w, k, v, a, b)
    B, T, H, N = r.shape
    out = torch.empty_like(r)
    err = _load().rwkv_wkv7_forward(*map(_ptr, (r, w, k, v, a, b, out, s)), B, T, H, N,
                                    int(dtype == torch.float64), torch.get_num_threads())
    if err:
        raise MemoryError("the CPU WKV-7 kernel could not allocate its state buffer")
    return out, s


def _wkv6_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, (r, w, k, v, u), s = _prepare(state, r, w, k, v, u)
    B, T, H, N = r.shape
    out = torch.empty_like(r)
    err = _load().rwkv_wkv6_forward(*map(_ptr, (r, w, k, v, u, out, s)), B, T, H, N,
                                    int(dtype == torch.float64), torch.get_num_threads())
    if err:
        raise MemoryError("the CPU WKV-6 kernel could not allocate its buffer")
    return out, s


def _fake_outputs(r, state):
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    return r.new_empty(r.shape, dtype=dtype), state.new_empty(state.shape, dtype=dtype)


def _wkv7_fake(r, w, k, v, a, b, state):
    return _fake_outputs(r, state)


def _wkv6_fake(r, w, k, v, u, state):
    return _fake_outputs(r, state)


if hasattr(torch.library, "custom_op"):  # torch >= 2.4: opaque to torch.compile
    _wkv7_op = torch.library.custom_op("rwkv_torch::wkv7_recurrent_fwd", mutates_args=(), device_types="cpu")(
        _wkv7_impl)
    _wkv7_op.register_fake(_wkv7_fake)
    _wkv6_op = torch.library.custom_op("rwkv_torch::wkv6_recurrent_fwd", mutates_args=(), device_types="cpu")(
        _wkv6_impl)
    _wkv6_op.register_fake(_wkv6_fake)
else:  # pragma: no cover - older torch: plain calls (torch.compile breaks the graph here)
    _wkv7_op, _wkv6_op = _wkv7_impl, _wkv6_impl


def wkv7_c(r, w, k, v, a, b, state=None):
    """r, w, k, v, a, b: [B, T, H, N] CPU tensors; state: [B, H, N_v, N_k] or None. Returns (out, final state) in
    float32 (float64 for float64 inputs); no autograd."""
    if state is None:
        state = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3], dtype=torch.float32)
    return _wkv7_op(r, w, k, v, a, b, state)


def wkv6_c(r, w, k, v, u, state=None):
    """r, w, k, v: [B, T, H, N] CPU tensors; u: [H, N]; state: [B, H, N_k, N_v] or None. Returns (out, final state)
    in float32 (float64 for float64 inputs); no autograd."""
    if state is None:
        state = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3], dtype=torch.float32)
    return _wkv6_op(r, w, k, v, u.expand(r.shape[2], r.shape[3]), state)
