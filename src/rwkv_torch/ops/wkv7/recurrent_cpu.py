"""The WKV-7 recurrence in C (``ops/csrc/wkv_cpu.c``, ``rwkv_wkv7_forward`` / ``rwkv_wkv7_backward``): forward,
backward and their autograd Function (the scaffolding shared with WKV-6 in ``ops/recurrent_cpu.py``)."""

import torch

from ..cpu_lib import I64, INT, PTR, Kernel, custom_op
from ..recurrent_cpu import CHECKPOINT_EVERY, backward_call, checkpointed, fake_forward, forward_call, run

# r, w, k, v, a, b, out, state, checkpoints; B, T, H, N, every; fp64, threads
_FORWARD = Kernel("rwkv_wkv7_forward", [PTR] * 9 + [I64] * 5 + [INT] * 2)
# r, w, k, v, a, b, dy, checkpoints, dstate, dr, dw, dk, dv, da, db; B, T, H, N, every; fp64, threads
_BACKWARD = Kernel("rwkv_wkv7_backward", [PTR] * 15 + [I64] * 5 + [INT] * 2)


def _forward_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, state: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_call(_FORWARD, state, (r, w, k, v, a, b), every)


def _forward_fake(r, w, k, v, a, b, state, every):
    return fake_forward(r, state, every)


def _backward_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, dy: torch.Tensor, ckpt: torch.Tensor, dstate: torch.Tensor,
                   every: int) -> list[torch.Tensor]:
    """Gradients [dr, dw, dk, dv, da, db, dstate0] from the forward's inputs (in the compute dtype, contiguous) and
    checkpoints, the output gradient ``dy`` and the final state's gradient ``dstate``."""
    grads = [torch.empty_like(r) for _ in range(6)]
    ds = backward_call(_BACKWARD, "WKV-7 backward", (r, w, k, v, a, b), dy, ckpt, dstate, every, grads)
    return [*grads, ds]


def _backward_fake(r, w, k, v, a, b, dy, ckpt, dstate, every):
    return [torch.empty_like(r) for _ in range(6)] + [r.new_empty(dstate.shape)]


# Opaque to torch.compile: a compiled model keeps each call as one kernel inside its graph.
_forward_op = custom_op("wkv7_recurrent_fwd", _forward_impl, _forward_fake)
_backward_op = custom_op("wkv7_recurrent_bwd", _backward_impl, _backward_fake)
_WKV7 = checkpointed("_WKV7", _forward_op, _backward_op)


def wkv7_c(r, w, k, v, a, b, state=None, *, every: int = CHECKPOINT_EVERY):
    """r, w, k, v, a, b: [B, T, H, N] CPU tensors; state: [B, H, N_v, N_k] or None. Returns (out, final state) in
    float32 (float64 for float64 inputs). Differentiable (the C backward) in every input and the initial state;
    without autograd no checkpoints are kept."""
    return run(_WKV7, _forward_op, (r, w, k, v, a, b), state, every)
