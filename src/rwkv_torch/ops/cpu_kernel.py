"""Fused CPU kernels, built from ``csrc/*.c`` on first use: the WKV-7 and WKV-6 recurrences with their backward
(``csrc/wkv_cpu.c``), the WKV-4 recurrence with its backward (``csrc/wkv4_cpu.c``), the whole one-token RWKV-7
block stack (``csrc/rwkv7_step.c``, driven by ``decode/c_step.py``), the reductions of a token-shift mix's backward
(RWKV-6's data-dependent one too) and the squared ReLU of the feed-forward (``csrc/mix_cpu.c``, used by
``ops/mix.py``), and the elementwise backwards of RWKV-7's WKV inputs and the RWKV-5/6/7 gated output
(``csrc/time_mix_cpu.c``, used by ``layers/rwkv7_fused.py`` and ``layers/gated_output.py``).

The chunked form turns a sequence into many small matrix products and elementwise passes; on a CPU, with 64x64
head states that stay in L1, the plain spec recurrence in C does less work: one read of the inputs, two passes
over the state per token, threads over (batch, head) pairs. For training the forward also keeps the state before
every ``CHECKPOINT_EVERY``-th token; the backward walks back through time one span at a time, recomputing the
span's states from its checkpoint, in the inputs' precision (fp32, fp64 for fp64 inputs), with the gradients of
every input and of the initial state. Autograd saves the inputs and the checkpoints only: none of the chunked
form's pair matrices. ``backend="auto"`` picks it for CPU tensors with T > 1, with or without autograd.

The C files are compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``: the same one
``torch.compile`` needs on CPU) into a cache directory (``$RWKV_TORCH_CACHE``, else ``~/.cache/rwkv_torch``) keyed by
the source, flags, compiler and CPU, and loaded with ``ctypes``; no build step at install time. Where there is no
compiler, ``auto`` falls back to the chunked form with one warning; ``backend="recurrent"`` on CPU raises with the
compiler's message. ``RWKV_TORCH_CPU_KERNEL=0`` turns the kernel off; ``RWKV_TORCH_KERNEL_LIB=PATH`` loads a library
built ahead of time from these sources instead (no compiler needed: ``slippi.bot`` ships them in a bot's folder).

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

from ._common import compute_dtype

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("wkv_cpu.c", "wkv4_cpu.c", "rwkv7_step.c",
                                                                        "mix_cpu.c", "time_mix_cpu.c")]
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
            prebuilt = os.environ.get("RWKV_TORCH_KERNEL_LIB")  # built ahead of time (a UMI bot's folder)
            cc = None if prebuilt else _compiler()
            if cc is None and not prebuilt:
                raise RuntimeError("the CPU WKV kernel needs a C compiler (cc, gcc or clang, or $CC); none was found "
                                   "(e.g. `apt install gcc`)")
            lib = ctypes.CDLL(prebuilt or str(_build(cc)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _error = str(e)
            raise RuntimeError(_error) from None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.rwkv_wkv7_forward.argtypes = [ptr] * 9 + [i64] * 5 + [ctypes.c_int] * 2
        lib.rwkv_wkv6_forward.argtypes = [ptr] * 8 + [i64] * 5 + [ctypes.c_int] * 2
        lib.rwkv_wkv7_backward.argtypes = [ptr] * 15 + [i64] * 5 + [ctypes.c_int] * 2
        lib.rwkv_wkv6_backward.argtypes = [ptr] * 13 + [i64] * 5 + [ctypes.c_int] * 2
        lib.rwkv_wkv7_backward.restype = lib.rwkv_wkv6_backward.restype = ctypes.c_int
        lib.rwkv7_blocks_step.argtypes = [i64] * 6 + [ptr] * 3 + [ctypes.c_int] + [ptr] * 7 + [ctypes.c_int]
        lib.rwkv_qgemv.argtypes = [ctypes.c_int] + [ptr] * 5 + [i64] * 3 + [ctypes.c_int]
        lib.rwkv_qgemv.restype = ctypes.c_int
        lib.rwkv_wkv7_forward.restype = lib.rwkv_wkv6_forward.restype = lib.rwkv7_blocks_step.restype = ctypes.c_int
        lib.rwkv_wkv4_forward.argtypes = [ptr] * 8 + [i64] * 3 + [ctypes.c_int] * 2
        lib.rwkv_wkv4_backward.argtypes = [ptr] * 15 + [i64] * 3 + [ctypes.c_int] * 2
        lib.rwkv_wkv4_forward.restype = lib.rwkv_wkv4_backward.restype = ctypes.c_int
        lib.rwkv_mix_blocks.argtypes = [i64]
        lib.rwkv_mix_blocks.restype = i64
        lib.rwkv_mix_backward.argtypes = [ctypes.c_int, i64, i64, ptr, ptr] + [ptr] * 4 + [ctypes.c_int] * 2
        lib.rwkv_mix_backward.restype = ctypes.c_int
        lib.rwkv_data_mix_backward.argtypes = [ctypes.c_int, i64, i64] + [ptr] * 8 + [ctypes.c_int] * 2
        lib.rwkv_data_mix_backward.restype = None
        lib.rwkv_squared_relu.argtypes = [i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
        lib.rwkv_squared_relu.restype = None
        lib.rwkv_time_mix_blocks.argtypes = [i64]
        lib.rwkv_time_mix_blocks.restype = i64
        lib.rwkv_gated_output_backward.argtypes = [i64] * 3 + [ptr, ctypes.c_double, ptr, ptr] + [ctypes.c_int] * 2
        lib.rwkv_gated_output_backward.restype = ctypes.c_int
        lib.rwkv_wkv_inputs_backward.argtypes = [i64] * 3 + [ptr, ctypes.c_double, ctypes.c_double, ptr, ptr,
                                                             ctypes.c_int, ctypes.c_int]
        lib.rwkv_wkv_inputs_backward.restype = ctypes.c_int
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


def _ptrs(ts) -> ctypes.Array:
    """A C array of the tensors' data pointers (a ``const void *const *`` argument; NULL for None)."""
    return (ctypes.c_void_p * len(ts))(*(None if t is None else t.data_ptr() for t in ts))


def _prepare(state: torch.Tensor, *tensors: torch.Tensor):
    dtype = compute_dtype(tensors[0].dtype)
    xs = [t.to(dtype).contiguous() for t in tensors]
    return dtype, xs, state.to(dtype, copy=True).contiguous()


def _check(err: int, what: str) -> None:
    if err:
        raise MemoryError(f"the CPU {what} kernel could not allocate its buffers")


def _n_checkpoints(T: int, every: int) -> int:
    return -(-T // every) if every > 0 else 0


def _forward(name: str, state, tensors, every: int):
    """One forward call: (out, final state, checkpoints [B, H, ceil(T / every), N, N] or an empty tensor)."""
    dtype, xs, s = _prepare(state, *tensors)
    B, T, H, N = xs[0].shape
    out = torch.empty_like(xs[0])
    ckpt = xs[0].new_empty((B, H, _n_checkpoints(T, every), N, N))
    err = getattr(_load(), name)(*map(_ptr, (*xs, out, s)), _ptr(ckpt) if every > 0 else None, B, T, H, N, every,
                                 int(dtype == torch.float64), torch.get_num_threads())
    _check(err, name)
    return out, s, ckpt


def _wkv7_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               state: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward("rwkv_wkv7_forward", state, (r, w, k, v, a, b), every)


def _wkv6_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
               state: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward("rwkv_wkv6_forward", state, (r, w, k, v, u), every)


def _wkv7_bwd_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, dy: torch.Tensor, ckpt: torch.Tensor, dstate: torch.Tensor,
                   every: int) -> list[torch.Tensor]:
    """Gradients [dr, dw, dk, dv, da, db, dstate0] from the forward's inputs (in the compute dtype, contiguous) and
    checkpoints, the output gradient ``dy`` and the final state's gradient ``dstate``."""
    B, T, H, N = r.shape
    dy, ds = dy.to(r.dtype).contiguous(), dstate.to(r.dtype, copy=True).contiguous()
    grads = [torch.empty_like(r) for _ in range(6)]
    err = _load().rwkv_wkv7_backward(*map(_ptr, (r, w, k, v, a, b, dy, ckpt, ds, *grads)), B, T, H, N, every,
                                     int(r.dtype == torch.float64), torch.get_num_threads())
    _check(err, "WKV-7 backward")
    return [*grads, ds]


def _wkv6_bwd_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                   dy: torch.Tensor, ckpt: torch.Tensor, dstate: torch.Tensor, every: int) -> list[torch.Tensor]:
    """Gradients [dr, dw, dk, dv, du [H, N], dstate0] (see ``_wkv7_bwd_impl``)."""
    B, T, H, N = r.shape
    dy, ds = dy.to(r.dtype).contiguous(), dstate.to(r.dtype, copy=True).contiguous()
    grads = [torch.empty_like(r) for _ in range(4)]
    du = r.new_empty(B, H, N)
    err = _load().rwkv_wkv6_backward(*map(_ptr, (r, w, k, v, u, dy, ckpt, ds, *grads, du)), B, T, H, N, every,
                                     int(r.dtype == torch.float64), torch.get_num_threads())
    _check(err, "WKV-6 backward")
    return [*grads, du.sum(0), ds]


def _wkv4_impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aa: torch.Tensor,
               bb: torch.Tensor, pp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, T, C], aa, bb, pp) from w, u [C], k, v [B, T, C] and the initial state, in float32 (float64 for
    float64 k)."""
    dtype = compute_dtype(k.dtype)
    w, u, k, v = (t.to(dtype).contiguous() for t in (w, u, k, v))
    aa, bb, pp = (s.to(dtype, copy=True).contiguous() for s in (aa, bb, pp))
    B, T, C = k.shape
    out = torch.empty_like(k)
    err = _load().rwkv_wkv4_forward(*map(_ptr, (w, u, k, v, out, aa, bb, pp)), B, T, C,
                                    int(dtype == torch.float64), torch.get_num_threads())
    _check(err, "WKV-4")
    return out, aa, bb, pp


def _wkv4_bwd_impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                   aa: torch.Tensor, bb: torch.Tensor, pp: torch.Tensor, daa: torch.Tensor, dbb: torch.Tensor,
                   dpp: torch.Tensor) -> list[torch.Tensor]:
    """Gradients [dw, du, dk, dv, daa0, dbb0, dpp0] from the forward's inputs (compute dtype, contiguous), its
    initial state, the output gradient and the final state's."""
    B, T, C = k.shape
    dy = dy.to(k.dtype).contiguous()
    ga, gb, gp = (g.to(k.dtype, copy=True).contiguous() for g in (daa, dbb, dpp))
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    dw, du = k.new_empty(B, C), k.new_empty(B, C)
    err = _load().rwkv_wkv4_backward(*map(_ptr, (w, u, k, v, dy, aa, bb, pp, ga, gb, gp, dk, dv, dw, du)), B, T, C,
                                     int(k.dtype == torch.float64), torch.get_num_threads())
    _check(err, "WKV-4 backward")
    return [dw.sum(0), du.sum(0), dk, dv, ga, gb, gp]


def _mix_backward_impl(d: list[torch.Tensor], mus: list[torch.Tensor],
                       xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C = xx.shape[-1]
    lib = _load()
    d = [t.contiguous() for t in d]
    mus = [m.reshape(C).contiguous() for m in mus]
    xx = xx.contiguous()
    dx, dxx = torch.empty_like(xx), torch.empty_like(xx)
    part = xx.new_empty(lib.rwkv_mix_blocks(xx.numel() // C), len(d), C)
    err = lib.rwkv_mix_backward(len(d), xx.numel() // C, C, _ptrs(d), _ptrs(mus), *map(_ptr, (xx, dx, dxx, part)),
                                int(xx.dtype == torch.float64), torch.get_num_threads())
    _check(err, "mix backward")
    return dx, dxx, part.sum(0)


def _mix_backward_fake(d, mus, xx):
    return torch.empty_like(xx), torch.empty_like(xx), xx.new_empty(len(d), xx.shape[-1])


def mix_backward(d: list, mus: list, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reductions of a token-shift mix's backward in one pass (``csrc/mix_cpu.c``): from the projections' input
    gradients ``d`` (each shaped like ``xx``, ``[..., C]``), their mixing vectors ``mus`` (``C`` elements each) and
    ``xx = x_prev - x``, returns ``(Σ d_i - dxx, dxx, dmu)`` with ``dxx = Σ d_i mu_i`` and ``dmu`` ``[n, C]`` the
    per-channel sums of ``d_i xx``. float32 or float64 CPU tensors, all of one dtype; independent of the thread
    count (the channel sums are taken over fixed row blocks, added in order)."""
    dtype, C = xx.dtype, xx.shape[-1]
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in (*d, *mus)):
        raise TypeError(f"mix_backward takes float32 or float64 tensors of one dtype, got {dtype} and "
                        f"{sorted({str(t.dtype) for t in (*d, *mus)})}")
    if not d or len(mus) != len(d) or any(t.shape != xx.shape for t in d) or any(m.numel() != C for m in mus):
        raise ValueError(f"mix_backward: gradients shaped like xx {tuple(xx.shape)} and as many {C}-vectors, got "
                         f"{[tuple(t.shape) for t in d]} and {[tuple(m.shape) for m in mus]}")
    return _mix_backward_op(list(d), list(mus), xx)


def _data_mix_backward_impl(d: torch.Tensor, m: torch.Tensor, mus: list[torch.Tensor], x: torch.Tensor,
                            xx: torch.Tensor) -> list[torch.Tensor]:
    """The pass itself, in place on d and m (``[J, ..., C]``, contiguous)."""
    C = xx.shape[-1]
    R = xx.numel() // C
    lib = _load()
    x, xx, mus = x.contiguous(), xx.contiguous(), [t.contiguous() for t in mus]
    dx, dxx = torch.empty_like(xx), torch.empty_like(xx)
    part = xx.new_empty(lib.rwkv_mix_blocks(R), len(d), C)
    lib.rwkv_data_mix_backward(len(d), R, C, _ptrs(d.unbind(0)), _ptrs(m.unbind(0)), _ptrs(mus),
                               *map(_ptr, (x, xx, dx, dxx, part)), int(xx.dtype == torch.float64),
                               torch.get_num_threads())
    return [dx, dxx, part.sum(0), d, m]


def _data_mix_backward_copy(d: torch.Tensor, m: torch.Tensor, mus: list[torch.Tensor], x: torch.Tensor,
                            xx: torch.Tensor) -> list[torch.Tensor]:
    """The custom op's form: d and m left as they are (a compiled graph cannot take an op that overwrites a list of
    tensors), the results in new tensors."""
    return _data_mix_backward_impl(d.clone(), m.clone(), mus, x, xx)


def _data_mix_backward_fake(d, m, mus, x, xx):
    return [torch.empty_like(xx), torch.empty_like(xx), xx.new_empty(d.shape[0], xx.shape[-1]), torch.empty_like(d),
            torch.empty_like(m)]


def data_mix_backward(d: torch.Tensor, m: torch.Tensor, mus: list, x: torch.Tensor, xx: torch.Tensor) -> tuple:
    """The elementwise part of RWKV-6's data-dependent mix backward (``ops/mix.py``, ``data_lerp_linear``) in one pass
    (``csrc/mix_cpu.c``). ``d``: the J projections' input gradients, ``m``: the mixing LoRA's offsets (both
    ``[J, ..., C]``, contiguous, each row shaped like ``xx``), ``mus``: the J mixing vectors (``C`` elements each),
    ``x`` and ``xx = x_prev - x``. Returns ``(Σ d_j - dxx, dxx, dmu, dm, lerps)`` with ``dxx = Σ d_j (mu_j + m_j)``,
    ``dmu`` ``[J, C]`` the per-channel sums of ``d_j xx``, ``dm_j = d_j xx`` (the offsets' gradient) and the lerps
    ``x + xx (mu_j + m_j)``. Eager calls write ``dm`` over ``d`` and the lerps over ``m`` (and return them); inside
    ``torch.compile`` they are new tensors. float32 or float64 CPU tensors of one dtype; independent of the thread
    count."""
    dtype, C = xx.dtype, xx.shape[-1]
    ts = (d, m, *mus, x)
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in ts):
        raise TypeError(f"data_mix_backward takes float32 or float64 tensors of one dtype, got "
                        f"{sorted({str(t.dtype) for t in (*ts, xx)})}")
    J = d.shape[0] if d.dim() > 1 else 0
    if (not J or d.shape != m.shape or d.shape[1:] != xx.shape or x.shape != xx.shape or len(mus) != J
            or not (d.is_contiguous() and m.is_contiguous()) or any(u.numel() != C for u in mus)):
        raise ValueError(f"data_mix_backward: contiguous gradients and offsets [J, *{tuple(xx.shape)}] (xx's and x's "
                         f"shape) and J {C}-vectors, got {tuple(d.shape)}, {tuple(m.shape)} and "
                         f"{[tuple(u.shape) for u in mus]}")
    return tuple(_data_mix_backward_op(d, m, list(mus), x, xx))


def _squared_relu_pass(z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """relu(z)² into a new tensor; with g, also g *= 2 relu(z) in place (csrc/mix_cpu.c, rwkv_squared_relu)."""
    s = torch.empty_like(z)
    _load().rwkv_squared_relu(z.numel(), _ptr(z), _ptr(s), None if g is None else _ptr(g),
                              int(z.dtype == torch.float64), torch.get_num_threads())
    return s


def _squared_relu_impl(z: torch.Tensor) -> torch.Tensor:
    return _squared_relu_pass(z, None)


def _squared_relu_bwd_impl(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _squared_relu_pass(z, g)


def _squared_relu_fake(z, g=None):
    return torch.empty_like(z)


def _check_squared_relu(*ts: torch.Tensor) -> None:
    if any(t.dtype not in (torch.float32, torch.float64) or t.dtype != ts[0].dtype for t in ts):
        raise TypeError(f"squared_relu takes float32 or float64 tensors of one dtype, got {[t.dtype for t in ts]}")
    if any(not t.is_contiguous() or t.shape != ts[0].shape or t.device.type != "cpu" for t in ts):
        raise ValueError(f"squared_relu takes contiguous CPU tensors of one shape, got {[tuple(t.shape) for t in ts]}")


def squared_relu(z: torch.Tensor) -> torch.Tensor:
    """``relu(z)²`` in one pass (``csrc/mix_cpu.c``): z a contiguous float32/float64 CPU tensor. Same bits as
    ``torch.relu(z) ** 2`` computed as ``r * r``; NaN propagates."""
    _check_squared_relu(z)
    return _squared_relu_op(z)


def squared_relu_backward(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The squared ReLU's backward pass, in one pass: ``g *= 2 relu(z)`` in place (g becomes z's gradient) and
    returns ``relu(z)²`` (recomputed, for the next projection's weight gradient). Contiguous tensors of one shape."""
    _check_squared_relu(z, g)
    return _squared_relu_bwd_op(z, g)


def _gated_output_bwd_impl(dzg: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None, k: torch.Tensor | None,
                           v: torch.Tensor | None, g: torch.Tensor, r_k: torch.Tensor | None, ln_w: torch.Tensor,
                           ln_b: torch.Tensor, n_head: int, eps: float) -> list[torch.Tensor]:
    C = y.shape[-1]
    R = y.numel() // C
    bonus = r is not None
    ins = [None if t is None else t.contiguous() for t in (dzg, y, r, k, v, g)]
    ins += [None if t is None else t.reshape(C).contiguous() for t in (r_k, ln_w, ln_b)]
    outs = [torch.empty_like(ins[1]) if bonus or i in (0, 4, 5) else None for i in range(6)]
    lib = _load()
    part = y.new_empty(lib.rwkv_time_mix_blocks(R), 3, C)
    err = lib.rwkv_gated_output_backward(R, n_head, C // n_head, _ptrs(ins), eps, _ptrs(outs), _ptr(part),
                                         int(y.dtype == torch.float64), torch.get_num_threads())
    _check(err, "gated output backward")
    return [y.new_empty(0) if t is None else t for t in outs] + [part.sum(0)]


def _gated_output_bwd_fake(dzg, y, r, k, v, g, r_k, ln_w, ln_b, n_head, eps):
    C = y.shape[-1]
    return [torch.empty_like(y) if r is not None or i in (0, 4, 5) else y.new_empty(0) for i in range(6)] + [
        y.new_empty(3, C)]


def gated_output_backward(dzg, y, r, k, v, g, r_k, ln_w, ln_b, n_head: int, eps: float) -> list:
    """The elementwise backward of the time mix's gated output ``((group_norm(y) ln_w + ln_b + bonus v) g) @ W_outᵀ``
    (``layers/gated_output.py``) in one pass (``csrc/time_mix_cpu.c``): from ``dzg = d_out @ W_out`` and the saved
    ``[..., C]`` tensors, returns ``[dy, dr, dk, dv, dg, zg, dr_k, dln_w, dln_b]`` (``zg = z g``, the projection's
    input; the last three ``[C]``, summed over fixed row blocks: independent of the thread count). RWKV-7's bonus
    ``Σ_head r k r_k`` needs r, k, v and r_k; RWKV-5/6 pass all four as None and get None for dr, dk, dv and dr_k.
    float32 or float64 CPU tensors of one dtype."""
    bonus = (r, k, v, r_k)
    if any(t is None for t in bonus) and any(t is not None for t in bonus):
        raise ValueError("gated_output_backward: r, k, v and r_k are all given (RWKV-7's bonus) or all None")
    ts = [t for t in (dzg, y, r, k, v, g, r_k, ln_w, ln_b) if t is not None]
    if y.dtype not in (torch.float32, torch.float64) or any(t.dtype != y.dtype for t in ts):
        raise TypeError(f"gated_output_backward takes float32 or float64 tensors of one dtype, got "
                        f"{sorted({str(t.dtype) for t in ts})}")
    C = y.shape[-1]
    rows = [t for t in (dzg, y, r, k, v, g) if t is not None]
    if any(t.shape != y.shape for t in rows) or any(t.numel() != C for t in ts[len(rows):]) or C % n_head:
        raise ValueError(f"gated_output_backward: tensors shaped like y {tuple(y.shape)} (dzg, y, g; and r, k, v), "
                         f"vectors of {C} elements (ln_w, ln_b; and r_k) and {n_head} heads dividing {C}, got "
                         f"{[tuple(t.shape) for t in ts]}")
    *grads, sums = _gated_output_bwd_op(dzg, y, r, k, v, g, r_k, ln_w, ln_b, int(n_head), float(eps))
    if r is None:
        grads[1:4] = [None] * 3
    return [*grads, None if r is None else sums[0], sums[1], sums[2]]


def _wkv_inputs_bwd_impl(dw: torch.Tensor, dk: torch.Tensor, d_minus_kk: torch.Tensor, db: torch.Tensor,
                         k0: torch.Tensor, a: torch.Tensor, norm: torch.Tensor, w: torch.Tensor,
                         minus_kk: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, decay_scale: float,
                         eps: float) -> list[torch.Tensor]:
    C = k0.shape[-1]
    R, H = k0.numel() // C, norm.numel() * C // k0.numel()
    ins = [t.contiguous() for t in (dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk)]
    ins += [t.reshape(C).contiguous() for t in (k_k, k_a)]
    outs = [torch.empty_like(ins[4]) for _ in range(3)]
    lib = _load()
    part = k0.new_empty(lib.rwkv_time_mix_blocks(R), 2, C)
    lib.rwkv_wkv_inputs_backward(R, H, C // H, _ptrs(ins), decay_scale, eps, _ptrs(outs), _ptr(part),
                                 int(k0.dtype == torch.float64), torch.get_num_threads())
    return [*outs, part.sum(0)]


def _wkv_inputs_bwd_fake(dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, decay_scale, eps):
    C = k0.shape[-1]
    return [torch.empty_like(k0) for _ in range(3)] + [k0.new_empty(2, C)]


def wkv_inputs_backward(dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, decay_scale: float,
                        eps: float) -> list:
    """The elementwise backward of RWKV-7's WKV inputs (``layers/rwkv7_fused.py``, ``wkv_inputs``) in one pass
    (``csrc/time_mix_cpu.c``): from the gradients of ``(w, k, -kk, kk a)`` and the saved ``k0, a, w, -kk``
    (``[..., C]``), the per-head norms of ``k0 k_k`` (``[..., H, 1]``) and ``k_k, k_a`` (``C`` elements), returns
    ``[dk0, dw_raw, da_raw, dk_k, dk_a]`` (the last two ``[C]``, summed over fixed row blocks). float32 or float64 CPU
    tensors of one dtype."""
    ts = (dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a)
    if k0.dtype not in (torch.float32, torch.float64) or any(t.dtype != k0.dtype for t in ts):
        raise TypeError(f"wkv_inputs_backward takes float32 or float64 tensors of one dtype, got "
                        f"{sorted({str(t.dtype) for t in ts})}")
    C = k0.shape[-1]
    H = norm.shape[-2] if norm.dim() >= 2 else 0
    if (any(t.shape != k0.shape for t in (*ts[:6], *ts[7:9])) or H < 1 or C % H
            or norm.numel() * C != k0.numel() * H or any(t.numel() != C for t in ts[9:])):
        raise ValueError(f"wkv_inputs_backward: eight tensors shaped like k0 {tuple(k0.shape)}, norms [..., H, 1] "
                         f"with H dividing {C}, two of {C} elements; got {[tuple(t.shape) for t in ts]}")
    *grads, sums = _wkv_inputs_bwd_op(*ts, float(decay_scale), float(eps))
    return [*grads, *sums.unbind(0)]


def _fake_forward(r, state, every):
    dtype = compute_dtype(r.dtype)
    B, T, H, N = r.shape
    return (r.new_empty(r.shape, dtype=dtype), state.new_empty(state.shape, dtype=dtype),
            r.new_empty((B, H, _n_checkpoints(T, every), N, N), dtype=dtype))


def _wkv4_fake(w, u, k, v, aa, bb, pp):
    dtype = compute_dtype(k.dtype)
    return (k.new_empty(k.shape, dtype=dtype), *(s.new_empty(s.shape, dtype=dtype) for s in (aa, bb, pp)))


def _wkv4_bwd_fake(w, u, k, v, dy, aa, bb, pp, daa, dbb, dpp):
    return [w.new_empty(w.shape), u.new_empty(u.shape), torch.empty_like(k), torch.empty_like(v),
            *(torch.empty_like(s) for s in (aa, bb, pp))]


def _wkv7_fake(r, w, k, v, a, b, state, every):
    return _fake_forward(r, state, every)


def _wkv6_fake(r, w, k, v, u, state, every):
    return _fake_forward(r, state, every)


def _wkv7_bwd_fake(r, w, k, v, a, b, dy, ckpt, dstate, every):
    return [torch.empty_like(r) for _ in range(6)] + [r.new_empty(dstate.shape)]


def _wkv6_bwd_fake(r, w, k, v, u, dy, ckpt, dstate, every):
    return [torch.empty_like(r) for _ in range(4)] + [r.new_empty(u.shape), r.new_empty(dstate.shape)]


def _custom_op(name, impl, fake, mutates_args=(), eager=None):
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


# Opaque to torch.compile: a compiled model keeps each call as one kernel inside its graph.
_wkv7_op = _custom_op("wkv7_recurrent_fwd", _wkv7_impl, _wkv7_fake)
_wkv6_op = _custom_op("wkv6_recurrent_fwd", _wkv6_impl, _wkv6_fake)
_wkv7_bwd_op = _custom_op("wkv7_recurrent_bwd", _wkv7_bwd_impl, _wkv7_bwd_fake)
_wkv6_bwd_op = _custom_op("wkv6_recurrent_bwd", _wkv6_bwd_impl, _wkv6_bwd_fake)
_wkv4_op = _custom_op("wkv4_recurrent_fwd", _wkv4_impl, _wkv4_fake)
_wkv4_bwd_op = _custom_op("wkv4_recurrent_bwd", _wkv4_bwd_impl, _wkv4_bwd_fake)
_mix_backward_op = _custom_op("mix_backward", _mix_backward_impl, _mix_backward_fake)
_data_mix_backward_op = _custom_op("data_mix_backward", _data_mix_backward_copy, _data_mix_backward_fake,
                                   eager=_data_mix_backward_impl)
_wkv_inputs_bwd_op = _custom_op("wkv_inputs_backward", _wkv_inputs_bwd_impl, _wkv_inputs_bwd_fake)
_gated_output_bwd_op = _custom_op("gated_output_backward", _gated_output_bwd_impl, _gated_output_bwd_fake)
_squared_relu_op = _custom_op("squared_relu", _squared_relu_impl, _squared_relu_fake)
_squared_relu_bwd_op = _custom_op("squared_relu_backward", _squared_relu_bwd_impl, _squared_relu_fake,
                                  mutates_args=("g",))

# The forward keeps the state before every CHECKPOINT_EVERY-th token for the backward, which recomputes the states
# of one such span at a time: 32 states of 16 kB at N = 64 in fp32, about one core's L2. Measured (fwd + bwd of one op,
# 1 thread): 32 is 2-10% faster than 16 and keeps half the checkpoints (1/32 of the input bytes per head).
CHECKPOINT_EVERY = 32


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, every):
        out, final, ckpt = _wkv7_op(r, w, k, v, a, b, state, every)
        cd = out.dtype
        ctx.save_for_backward(*(t.to(cd).contiguous() for t in (r, w, k, v, a, b)), ckpt)
        ctx.every, ctx.dtypes = every, [t.dtype for t in (r, w, k, v, a, b, state)]
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        *xs, ckpt = ctx.saved_tensors
        d_out = torch.zeros_like(xs[0]) if d_out is None else d_out
        d_final = xs[0].new_zeros(ckpt.shape[:2] + ckpt.shape[-2:]) if d_final is None else d_final
        grads = _wkv7_bwd_op(*xs, d_out, ckpt, d_final, ctx.every)
        return (*(g.to(dt) if n else None for g, dt, n in zip(grads, ctx.dtypes, ctx.needs_input_grad)), None)


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, u, state, every):
        out, final, ckpt = _wkv6_op(r, w, k, v, u, state, every)
        cd = out.dtype
        ctx.save_for_backward(*(t.to(cd).contiguous() for t in (r, w, k, v, u)), ckpt)
        ctx.every, ctx.dtypes = every, [t.dtype for t in (r, w, k, v, u, state)]
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        *xs, ckpt = ctx.saved_tensors
        d_out = torch.zeros_like(xs[0]) if d_out is None else d_out
        d_final = xs[0].new_zeros(ckpt.shape[:2] + ckpt.shape[-2:]) if d_final is None else d_final
        grads = _wkv6_bwd_op(*xs, d_out, ckpt, d_final, ctx.every)
        return (*(g.to(dt) if n else None for g, dt, n in zip(grads, ctx.dtypes, ctx.needs_input_grad)), None)


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        out, *final = _wkv4_op(w, u, k, v, aa, bb, pp)
        cd = out.dtype
        ctx.save_for_backward(*(t.to(cd).contiguous() for t in (w, u, k, v, aa, bb, pp)))
        ctx.dtypes = [t.dtype for t in (w, u, k, v, aa, bb, pp)]
        return out, *final

    @staticmethod
    def backward(ctx, d_out, daa, dbb, dpp):
        w, u, k, v, aa, bb, pp = ctx.saved_tensors
        zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        grads = _wkv4_bwd_op(w, u, k, v, zero(d_out, k), aa, bb, pp, zero(daa, aa), zero(dbb, bb), zero(dpp, pp))
        return tuple(g.to(dt) if n else None for g, dt, n in zip(grads, ctx.dtypes, ctx.needs_input_grad))


def wkv4_c(w, u, k, v, state=None):
    """w, u: [C]; k, v: [B, T, C] CPU tensors; state: (aa, bb, pp) each [B, C], or None for the empty state. Returns
    (out [B, T, C], (aa, bb, pp)) in float32 (float64 for float64 k). Differentiable (the C backward, which
    recomputes the states from the initial one) in w, u, k, v and the initial state: autograd keeps the inputs and
    the initial state only."""
    if state is None:
        from .wkv4.naive import empty_state

        state = empty_state(k.shape[0], k.shape[2], torch.float32, k.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v, *state)):
        out, *final = _WKV4.apply(w, u, k, v, *state)
    else:
        out, *final = _wkv4_op(w, u, k, v, *state)
    return out, tuple(final)


def wkv7_c(r, w, k, v, a, b, state=None, *, every: int = CHECKPOINT_EVERY):
    """r, w, k, v, a, b: [B, T, H, N] CPU tensors; state: [B, H, N_v, N_k] or None. Returns (out, final state) in
    float32 (float64 for float64 inputs). Differentiable (the C backward) in every input and the initial state;
    without autograd no checkpoints are kept."""
    if state is None:
        state = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3], dtype=torch.float32)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b, state)):
        return _WKV7.apply(r, w, k, v, a, b, state, int(every))
    out, final, _ = _wkv7_op(r, w, k, v, a, b, state, 0)
    return out, final


def wkv6_c(r, w, k, v, u, state=None, *, every: int = CHECKPOINT_EVERY):
    """r, w, k, v: [B, T, H, N] CPU tensors; u: [H, N]; state: [B, H, N_k, N_v] or None. Returns (out, final state)
    in float32 (float64 for float64 inputs); differentiable like ``wkv7_c``."""
    if state is None:
        state = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3], dtype=torch.float32)
    u = u.expand(r.shape[2], r.shape[3])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, u, state)):
        return _WKV6.apply(r, w, k, v, u, state, int(every))
    out, final, _ = _wkv6_op(r, w, k, v, u, state, 0)
    return out, final
