"""The WKV-4 recurrence in C (``ops/csrc/wkv4_cpu.c``, ``rwkv_wkv4_forward`` / ``rwkv_wkv4_backward``): forward,
backward (which recomputes the states from the initial one: autograd keeps the inputs and the initial state only)
and their autograd Function."""

import torch

from .._common import compute_dtype, needs_grad
from ..cpu_lib import I64, INT, PTR, Kernel, check_alloc, custom_op, dtype_args, ptr
from .naive import empty_state

# w, u, k, v, out, aa, bb, pp; B, T, C; fp64, threads
_FORWARD = Kernel("rwkv_wkv4_forward", [PTR] * 8 + [I64] * 3 + [INT] * 2)
# w, u, k, v, dy, aa, bb, pp, daa, dbb, dpp, dk, dv, dw [B, C], du [B, C]; B, T, C; fp64, threads
_BACKWARD = Kernel("rwkv_wkv4_backward", [PTR] * 15 + [I64] * 3 + [INT] * 2)


def _forward_impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aa: torch.Tensor,
                  bb: torch.Tensor, pp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, T, C], aa, bb, pp) from w, u [C], k, v [B, T, C] and the initial state, in float32 (float64 for
    float64 k)."""
    dtype = compute_dtype(k.dtype)
    w, u, k, v = (t.to(dtype).contiguous() for t in (w, u, k, v))
    aa, bb, pp = (s.to(dtype, copy=True).contiguous() for s in (aa, bb, pp))
    B, T, C = k.shape
    out = torch.empty_like(k)
    err = _FORWARD(*map(ptr, (w, u, k, v, out, aa, bb, pp)), B, T, C, *dtype_args(k))
    check_alloc(err, "WKV-4")
    return out, aa, bb, pp


def _forward_fake(w, u, k, v, aa, bb, pp):
    dtype = compute_dtype(k.dtype)
    return (k.new_empty(k.shape, dtype=dtype), *(s.new_empty(s.shape, dtype=dtype) for s in (aa, bb, pp)))


def _backward_impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                   aa: torch.Tensor, bb: torch.Tensor, pp: torch.Tensor, daa: torch.Tensor, dbb: torch.Tensor,
                   dpp: torch.Tensor) -> list[torch.Tensor]:
    """Gradients [dw, du, dk, dv, daa0, dbb0, dpp0] from the forward's inputs (compute dtype, contiguous), its
    initial state, the output gradient and the final state's."""
    B, T, C = k.shape
    dy = dy.to(k.dtype).contiguous()
    ga, gb, gp = (g.to(k.dtype, copy=True).contiguous() for g in (daa, dbb, dpp))
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    dw, du = k.new_empty(B, C), k.new_empty(B, C)
    err = _BACKWARD(*map(ptr, (w, u, k, v, dy, aa, bb, pp, ga, gb, gp, dk, dv, dw, du)), B, T, C, *dtype_args(k))
    check_alloc(err, "WKV-4 backward")
    return [dw.sum(0), du.sum(0), dk, dv, ga, gb, gp]


def _backward_fake(w, u, k, v, dy, aa, bb, pp, daa, dbb, dpp):
    return [w.new_empty(w.shape), u.new_empty(u.shape), torch.empty_like(k), torch.empty_like(v),
            *(torch.empty_like(s) for s in (aa, bb, pp))]


# Opaque to torch.compile: a compiled model keeps each call as one kernel inside its graph.
_forward_op = custom_op("wkv4_recurrent_fwd", _forward_impl, _forward_fake)
_backward_op = custom_op("wkv4_recurrent_bwd", _backward_impl, _backward_fake)


class _WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        out, *final = _forward_op(w, u, k, v, aa, bb, pp)
        cd = out.dtype
        ctx.save_for_backward(*(t.to(cd).contiguous() for t in (w, u, k, v, aa, bb, pp)))
        ctx.dtypes = [t.dtype for t in (w, u, k, v, aa, bb, pp)]
        return out, *final

    @staticmethod
    def backward(ctx, d_out, daa, dbb, dpp):
        w, u, k, v, aa, bb, pp = ctx.saved_tensors
        zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        grads = _backward_op(w, u, k, v, zero(d_out, k), aa, bb, pp, zero(daa, aa), zero(dbb, bb), zero(dpp, pp))
        return tuple(g.to(dt) if n else None for g, dt, n in zip(grads, ctx.dtypes, ctx.needs_input_grad))


def wkv4_c(w, u, k, v, state=None):
    """w, u: [C]; k, v: [B, T, C] CPU tensors; state: (aa, bb, pp) each [B, C], or None for the empty state. Returns
    (out [B, T, C], (aa, bb, pp)) in float32 (float64 for float64 k). Differentiable (the C backward, which
    recomputes the states from the initial one) in w, u, k, v and the initial state: autograd keeps the inputs and
    the initial state only."""
    if state is None:
        state = empty_state(k.shape[0], k.shape[2], torch.float32, k.device)
    if needs_grad(w, u, k, v, *state):
        out, *final = _WKV4.apply(w, u, k, v, *state)
    else:
        out, *final = _forward_op(w, u, k, v, *state)
    return out, tuple(final)
