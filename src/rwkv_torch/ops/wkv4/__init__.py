"""WKV-4: the per-channel RWKV-4 recurrence with the stable (aa, bb, pp) state (spec section 2.2). See README.md."""

import torch

from .._common import check_float, check_log_decay, check_same, compute_dtype, resolve_backend
from .chunk import DEFAULT_CHUNK_SIZE, wkv4_chunk
from .naive import PP_INIT, empty_state, wkv4_naive, wkv4_step
from .recurrent_cpu import wkv4_c

__all__ = [
    "wkv4", "wkv4_unchecked", "wkv4_naive", "wkv4_chunk", "wkv4_step", "empty_state", "PP_INIT", "DEFAULT_CHUNK_SIZE",
]


def _check_channel_vector(name: str, t, k: torch.Tensor) -> None:
    """w and u are [C] in k's dtype or float32 (checkpoints keep time_decay/time_first in fp32), on k's device."""
    C = k.shape[-1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [C], got {type(t).__name__}")
    if t.shape != (C,):
        raise ValueError(f"{name} must be [C] = [{C}], got {tuple(t.shape)}")
    if t.dtype not in (k.dtype, torch.float32):
        raise TypeError(f"{name} must have k's dtype ({k.dtype}) or float32, got {t.dtype}")
    if t.device != k.device:
        raise ValueError(f"{name} must be on {k.device} like k, got {t.device}")


def _check_state(state, k: torch.Tensor) -> None:
    B, _, C = k.shape
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError(f"state must be a tuple (aa, bb, pp) of three [{B}, {C}] tensors, got {type(state).__name__}")
    for name, s in zip(("aa", "bb", "pp"), state):
        if not isinstance(s, torch.Tensor) or s.shape != (B, C):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"state must be a tuple (aa, bb, pp) of three [{B}, {C}] tensors; {name} is {got}")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state {name} must be float32 (or float64), got {s.dtype}")
        if s.device != k.device:
            raise ValueError(f"state {name} must be on {k.device} like k, got {s.device}")


def wkv4(w, u, k, v, state=None, *, backend: str = "auto", chunk_size: int | None = None):
    """RWKV-4 WKV over a sequence, per channel, from an initial state.

    With the carried state as the true numerator ``aa·e^pp`` and denominator ``bb·e^pp``::

        out_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})

    computed in the stable (aa, bb, pp) form, where ``pp`` is the largest exponent seen so far.

    Args:
        w: the per-channel log decay ``[C]`` (finite, <= 0; RWKV-4 passes ``-exp(time_decay)``).
        u: the bonus ``[C]`` (``time_first``), added in the exponent.
        k, v: ``[B, T, C]``, one floating dtype (fp32/bf16/fp16/fp64), one device. ``w`` and ``u`` are in k's dtype
            or float32.
        state: ``(aa, bb, pp)`` each ``[B, C]`` float32 (or float64), or None for the empty state
            ``aa = bb = 0, pp = PP_INIT = -1e38`` (the official kernels' value; the pip package's -1e30 gives the
            same results).
        backend: ``"auto"`` (the C recurrence on CPU for T > 1 where it builds, else chunk for T > 1 and naive
            for one token), ``"naive"`` (the spec loop), ``"chunk"``, ``"recurrent"`` (the C loop on CPU,
            ``ops/csrc/wkv4_cpu.c``, with a C backward that keeps only the inputs and the initial state; no GPU
            kernel yet). Any other name is a ValueError.
        chunk_size: chunk length of the chunk backend (default ``DEFAULT_CHUNK_SIZE``).

    Returns:
        ``(out [B, T, C] in k's dtype, (aa, bb, pp))``, the state float32, or float64 for float64 inputs.

    Example:
        >>> k, v = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
        >>> out, (aa, bb, pp) = wkv4(-torch.rand(16), torch.randn(16), k, v)
        >>> out.shape, pp.shape
        (torch.Size([2, 8, 16]), torch.Size([2, 16]))
    """
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    if k.dim() != 3:
        raise ValueError(f"k must be [B, T, C] (3-D), got shape {tuple(k.shape)}")
    check_float("k", k)
    check_same("k", k, v=v)
    _check_channel_vector("w", w, k)
    _check_channel_vector("u", u, k)
    check_log_decay(w)
    if state is not None:
        _check_state(state, k)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return wkv4_unchecked(w, u, k, v, state, backend=backend, chunk_size=chunk_size)


def wkv4_unchecked(w, u, k, v, state=None, *, backend: str = "auto", chunk_size: int | None = None):
    """``wkv4`` without its value checks (the layers' entry; the model checks its inputs once, at its edge)."""
    cd = compute_dtype(k.dtype)
    be = resolve_backend("wkv4", backend, k.device, k.shape[1], False, triton=False)
    if be == "c":
        out, final = wkv4_c(w, u, k, v, state)
    elif be == "chunk":
        out, final = wkv4_chunk(w, u, k, v, state, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
    else:
        out, final = wkv4_naive(w, u, k, v, state)
    return out.to(k.dtype), tuple(s.to(cd) for s in final)
