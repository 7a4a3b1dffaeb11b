"""What the C recurrences of WKV-7 and WKV-6 share (``wkv7/recurrent_cpu.py``, ``wkv6/recurrent_cpu.py``): the
kernel calls' argument layout and the checkpointed autograd Function around them.

The chunked form turns a sequence into many small matrix products and elementwise passes; on a CPU, with 64x64
head states that stay in L1, the plain spec recurrence in C does less work: one read of the inputs, two passes
over the state per token, threads over (batch, head) pairs. For training the forward also keeps the state before
every ``CHECKPOINT_EVERY``-th token; the backward walks back through time one span at a time, recomputing the
span's states from its checkpoint, in the inputs' precision (fp32, fp64 for fp64 inputs), with the gradients of
every input and of the initial state. Autograd saves the inputs and the checkpoints only: none of the chunked
form's pair matrices. ``backend="auto"`` picks it for CPU tensors with T > 1, with or without autograd.
"""

import torch

from ._common import CHECKPOINT_EVERY, compute_dtype, needs_grad
from .cpu_lib import Kernel, check_alloc, dtype_args, ptr

__all__ = ["CHECKPOINT_EVERY", "forward_call", "backward_call", "fake_forward", "checkpointed", "run"]


def _n_checkpoints(T: int, every: int) -> int:
    return -(-T // every) if every > 0 else 0


def forward_call(kernel: Kernel, state: torch.Tensor, tensors, every: int):
    """One forward call of ``kernel`` on the ``[B, T, H, N]`` inputs (cast to the compute dtype, contiguous) and a copy
    of the initial state: (out, final state, checkpoints [B, H, ceil(T / every), N, N] or an empty tensor)."""
    dtype = compute_dtype(tensors[0].dtype)
    xs = [t.to(dtype).contiguous() for t in tensors]
    s = state.to(dtype, copy=True).contiguous()
    B, T, H, N = xs[0].shape
    out = torch.empty_like(xs[0])
    ckpt = xs[0].new_empty((B, H, _n_checkpoints(T, every), N, N))
    err = kernel(*map(ptr, (*xs, out, s)), ptr(ckpt) if every > 0 else None, B, T, H, N, every, *dtype_args(out))
    check_alloc(err, kernel.name)
    return out, s, ckpt


def backward_call(kernel: Kernel, what: str, xs, dy, ckpt, dstate, every: int, grads) -> torch.Tensor:
    """One backward call of ``kernel``: the forward's inputs ``xs`` (compute dtype, contiguous) and checkpoints, the
    output gradient ``dy`` and the final state's ``dstate``; writes the input gradients into ``grads`` and returns the
    initial state's gradient."""
    r = xs[0]
    B, T, H, N = r.shape
    dy, ds = dy.to(r.dtype).contiguous(), dstate.to(r.dtype, copy=True).contiguous()
    err = kernel(*map(ptr, (*xs, dy, ckpt, ds, *grads)), B, T, H, N, every, *dtype_args(r))
    check_alloc(err, what)
    return ds


def fake_forward(r, state, every):
    """The shapes and dtypes ``forward_call`` returns (the custom ops' fake form)."""
    dtype = compute_dtype(r.dtype)
    B, T, H, N = r.shape
    return (r.new_empty(r.shape, dtype=dtype), state.new_empty(state.shape, dtype=dtype),
            r.new_empty((B, H, _n_checkpoints(T, every), N, N), dtype=dtype))


def checkpointed(name: str, fwd_op, bwd_op) -> type[torch.autograd.Function]:
    """The autograd Function (class ``name``) of a checkpointed recurrence: ``apply(*inputs, state, every) -> (out,
    final state)``. ``fwd_op(*inputs, state, every) -> (out, final, checkpoints)``; ``bwd_op(*inputs, d_out,
    checkpoints, d_final, every)`` -> the gradients of the inputs and of the initial state. It saves the inputs (in
    the compute dtype) and the checkpoints; the gradients come back in the inputs' dtypes."""

    def forward(ctx, *args):
        *xs, state, every = args
        out, final, ckpt = fwd_op(*xs, state, every)
        ctx.save_for_backward(*(t.to(out.dtype).contiguous() for t in xs), ckpt)
        ctx.every, ctx.dtypes = every, [t.dtype for t in (*xs, state)]
        return out, final

    def backward(ctx, d_out, d_final):
        *xs, ckpt = ctx.saved_tensors
        d_out = torch.zeros_like(xs[0]) if d_out is None else d_out
        d_final = xs[0].new_zeros(ckpt.shape[:2] + ckpt.shape[-2:]) if d_final is None else d_final
        grads = bwd_op(*xs, d_out, ckpt, d_final, ctx.every)
        return (*(g.to(dt) if n else None for g, dt, n in zip(grads, ctx.dtypes, ctx.needs_input_grad)), None)

    # Built with type(): autograd names the backward node after the class (``<name>Backward``).
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward), "__module__": __name__})


def run(recurrence: type[torch.autograd.Function], fwd_op, xs, state, every: int):
    """(out, final state) of a checkpointed recurrence on the inputs ``xs`` (``[B, T, H, N]`` first) from ``state``
    (None: zeros, float32); through ``recurrence`` under autograd, else one forward call keeping no checkpoints."""
    r = xs[0]
    if state is None:
        state = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], r.shape[3], dtype=torch.float32)
    if needs_grad(*xs, state):
        return recurrence.apply(*xs, state, int(every))
    out, final, _ = fwd_op(*xs, state, 0)
    return out, final
