"""Shared by the WKV ops: backend names and resolution, compute dtype, input checks, the checkpoint interval of the
fused recurrences."""

import importlib.util
import math
import os

import torch

from . import cpu_lib
from .packing import check_cu_seqlens

BACKENDS = ("auto", "naive", "chunk", "recurrent")
# The fused recurrences (C and Triton) keep the state before every CHECKPOINT_EVERY-th token for the backward, which
# recomputes the states of one such span at a time: 32 states of 16 kB at N = 64 in fp32, about one core's L2 (the
# Triton backward keeps one span of states in scratch). Measured (C, fwd + bwd of one op, 1 thread): 32 is 2-10%
# faster than 16 and keeps half the checkpoints (1/32 of the input bytes per head).
CHECKPOINT_EVERY = 32
TRITON_INSTALL_HINT = "pip install rwkv-torch[gpu]"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and state) dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_importable() -> bool:
    """Whether Triton is installed (looked up without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """TRITON_INTERPRET set (as Triton reads it): kernels run on CPU tensors in Triton's interpreter, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def needs_grad(*tensors) -> bool:
    """Whether autograd will need a backward through an op on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS``, else a ValueError naming the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def recurrent_kernel(op: str, device: torch.device, grad: bool, *, c_kernel: bool = True,
                     triton: bool = True) -> str:
    """Which implementation of the fused recurrence runs for ``backend='recurrent'``: ``"triton"`` on CUDA (and on
    CPU tensors under TRITON_INTERPRET=1, Triton's interpreter, for tests), ``"c"`` on CPU. Clear errors when the
    one needed is missing."""
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting() and triton):
        if not triton:
            raise ValueError(f"backend='recurrent' has no GPU kernel for {op} yet; use 'chunk' or 'naive'")
        if not triton_importable():
            raise ImportError(f"backend='recurrent' on {device.type} needs the triton package, which is not "
                              f"installed: `{TRITON_INSTALL_HINT}`")
        return "triton"
    if device.type != "cpu":
        raise ValueError(f"backend='recurrent' runs on CPU (C) or CUDA (Triton) tensors, got {device.type} tensors")
    if not c_kernel:
        raise ValueError(f"backend='recurrent' has no CPU kernel for {op}; use 'chunk' or 'naive'")
    cpu_lib.library()  # a clear error when it cannot be built here
    return "c"


def resolve_backend(op: str, backend: str, device: torch.device, T: int, grad: bool, *, c_kernel: bool = True,
                    triton: bool = True) -> str:
    """The implementation an op runs: ``"naive"``, ``"chunk"``, ``"c"`` or ``"triton"`` (the last two are the
    ``recurrent`` backend on CPU and CUDA).

    ``auto`` picks the Triton recurrence on CUDA (when installed), the C recurrence on CPU for T > 1 (when it builds
    here; not while tracing for export; with autograd too: its C backward trains 2.5-4.5x faster than the chunked
    form's, benchmarks/RESULTS.md), else chunk for T > 1 and the naive loop for T == 1 (one token is one step of the
    spec). Explicit choices are checked with clear errors."""
    backend = check_backend(backend)
    if backend == "recurrent":
        return recurrent_kernel(op, device, grad, c_kernel=c_kernel, triton=triton)
    if backend != "auto":
        return backend
    if triton and device.type == "cuda" and triton_importable():
        return "triton"
    if T > 1 and c_kernel and device.type == "cpu" and not _tracing_for_export() and cpu_lib.available():
        return "c"
    return "chunk" if T > 1 else "naive"


def _tracing_for_export() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def check_same(name_ref: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every tensor must have ref's shape, dtype and device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {name_ref} {tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {name_ref} ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref.device} like {name_ref}, got {t.device}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_log_decay(w: torch.Tensor, w_min: float | None = None) -> None:
    """w is a log decay: finite and <= 0 (the per-step factor exp(w) lies in (0, 1]), and >= ``w_min`` if given."""
    if w_min is not None and not w_min <= 0:
        raise ValueError(f"w_min is a lower bound on the log decay and must be <= 0, got {w_min!r}")
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph cannot read values back; the eager warm-up call before capture checked them
    lo = -math.inf if w_min is None else w_min
    if torch.compiler.is_compiling():  # inside a compiled graph: the same rules, without a graph break
        torch._assert_async(torch.isfinite(w).all() & (w <= 0).all() & (w >= lo).all(),
                            "w (log decay) must be finite, <= 0 and >= w_min")
        return
    if w.numel() == 0:
        return
    # One pass and one read-back: min and max propagate NaN, and an infinity shows up in one of them.
    w_lo, w_hi = torch.stack(torch.aminmax(w)).tolist()
    if not (math.isfinite(w_lo) and math.isfinite(w_hi)):
        raise ValueError("w (log decay) must be finite; got inf or NaN")
    if w_hi > 0:
        raise ValueError(f"w is the log decay and must be <= 0; got max {w_hi:.4g}")
    if w_lo < lo:
        raise ValueError(f"w must be >= w_min={w_min:.6g} as promised; got min {w_lo:.6g}")


def check_seq_and_state(r: torch.Tensor, cu_seqlens, state, layout: str):
    """Validate cu_seqlens and the [B or S, H, N, N] float32/64 state of a head-wise op; return cu_seqlens as
    ``PackedOffsets`` (its one read-back), or None."""
    B, T, H, N = r.shape
    cs = check_cu_seqlens(cu_seqlens, B, T) if cu_seqlens is not None else None
    n_states = B if cs is None else len(cs.offsets) - 1
    if state is not None:
        if not isinstance(state, torch.Tensor) or state.shape != (n_states, H, N, N):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be [{n_states}, {H}, {N}, {N}] ([B or S, H, {layout}]), got {got}")
        if state.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state must be float32 (or float64), got {state.dtype}")
        if state.device != r.device:
            raise ValueError(f"state must be on {r.device}, got {state.device}")
    return cs
