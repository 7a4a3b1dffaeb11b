"""The C passes of ``mix.py``'s training forms (``ops/csrc/mix_cpu.c``): the reductions of a token-shift mix's
backward (RWKV-6's data-dependent one too) and the squared ReLU of the feed-forward, each a custom op (opaque to
``torch.compile``)."""

import torch

from .cpu_lib import I64, INT, PTR, Kernel, check_alloc, custom_op, dtype_args, ptr, ptrs

# Row blocks of the per-channel sums (their partial sums are [blocks, n, C]): rows -> blocks
_MIX_BLOCKS = Kernel("rwkv_mix_blocks", [I64], I64)
# n, rows, C, d[n], mus[n], xx, dx, dxx, partial sums; fp64, threads
_MIX_BACKWARD = Kernel("rwkv_mix_backward", [INT, I64, I64, PTR, PTR] + [PTR] * 4 + [INT] * 2)
# J, rows, C, d[J], m[J], mus[J], x, xx, dx, dxx, partial sums; fp64, threads
_DATA_MIX_BACKWARD = Kernel("rwkv_data_mix_backward", [INT, I64, I64] + [PTR] * 8 + [INT] * 2, None)
# n, z, relu(z)², g (or NULL); fp64, threads
_SQUARED_RELU = Kernel("rwkv_squared_relu", [I64, PTR, PTR, PTR, INT, INT], None)


def _mix_backward_impl(d: list[torch.Tensor], mus: list[torch.Tensor],
                       xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C = xx.shape[-1]
    d = [t.contiguous() for t in d]
    mus = [m.reshape(C).contiguous() for m in mus]
    xx = xx.contiguous()
    dx, dxx = torch.empty_like(xx), torch.empty_like(xx)
    part = xx.new_empty(_MIX_BLOCKS(xx.numel() // C), len(d), C)
    err = _MIX_BACKWARD(len(d), xx.numel() // C, C, ptrs(d), ptrs(mus), *map(ptr, (xx, dx, dxx, part)),
                        *dtype_args(xx))
    check_alloc(err, "mix backward")
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
    x, xx, mus = x.contiguous(), xx.contiguous(), [t.contiguous() for t in mus]
    dx, dxx = torch.empty_like(xx), torch.empty_like(xx)
    part = xx.new_empty(_MIX_BLOCKS(R), len(d), C)
    _DATA_MIX_BACKWARD(len(d), R, C, ptrs(d.unbind(0)), ptrs(m.unbind(0)), ptrs(mus),
                       *map(ptr, (x, xx, dx, dxx, part)), *dtype_args(xx))
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
    _SQUARED_RELU(z.numel(), ptr(z), ptr(s), None if g is None else ptr(g), *dtype_args(z))
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


_mix_backward_op = custom_op("mix_backward", _mix_backward_impl, _mix_backward_fake)
_data_mix_backward_op = custom_op("data_mix_backward", _data_mix_backward_copy, _data_mix_backward_fake,
                                  eager=_data_mix_backward_impl)
_squared_relu_op = custom_op("squared_relu", _squared_relu_impl, _squared_relu_fake)
_squared_relu_bwd_op = custom_op("squared_relu_backward", _squared_relu_bwd_impl, _squared_relu_fake,
                                 mutates_args=("g",))
