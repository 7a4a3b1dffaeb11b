"""The WKV-6 recurrence in C (``ops/csrc/wkv_cpu.c``, ``rwkv_wkv6_forward`` / ``rwkv_wkv6_backward``): forward,
backward and their autograd Function (the scaffolding shared with WKV-7 in ``ops/recurrent_cpu.py``)."""

import torch

from ..cpu_lib import I64, INT, PTR, Kernel, custom_op
from ..recurrent_cpu import CHECKPOINT_EVERY, backward_call, checkpointed, fake_forward, forward_call, run

# r, w, k, v, u, out, state, checkpoints; B, T, H, N, every; fp64, threads
_FORWARD = Kernel("rwkv_wkv6_forward", [PTR] * 8 + [I64] * 5 + [INT] * 2)
# r, w, k, v, u, dy, checkpoints, dstate, dr, dw, dk, dv, du [B, H, N]; B, T, H, N, every; fp64, threads
_BACKWARD = Kernel("rwkv_wkv6_backward", [PTR] * 13 + [I64] * 5 + [INT] * 2)


def _forward_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                  state: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_call(_FORWARD, state, (r, w, k, v, u), every)


def _forward_fake(r, w, k, v, u, state, every):
    return fake_forward(r, state, every)


def _backward_impl(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                   dy: torch.Tensor, ckpt: torch.Tensor, dstate: torch.Tensor, every: int) -> list[torch.Tensor]:
    """Gradients [dr, dw, dk, dv, du [H, N], dstate0] (see ``wkv7/recurrent_cpu.py``)."""
    B, _, H, N = r.shape
    grads = [torch.empty_like(r) for _ in range(4)] + [r.new_empty(B, H, N)]
    ds = backward_call(_BACKWARD, "WKV-6 backward", (r, w, k, v, u), dy, ckpt, dstate, every, grads)
    return [*grads[:4], grads[4].sum(0), ds]


def _backward_fake(r, w, k, v, u, dy, ckpt, dstate, every):
    return [torch.empty_like(r) for _ in range(4)] + [r.new_empty(u.shape), r.new_empty(dstate.shape)]


# Opaque to torch.compile: a compiled model keeps each call as one kernel inside its graph.
_forward_op = custom_op("wkv6_recurrent_fwd", _forward_impl, _forward_fake)
_backward_op = custom_op("wkv6_recurrent_bwd", _backward_impl, _backward_fake)
_WKV6 = checkpointed("_WKV6", _forward_op, _backward_op)


def wkv6_c(r, w, k, v, u, state=None, *, every: int = CHECKPOINT_EVERY):
    """r, w, k, v: [B, T, H, N] CPU tensors; u: [H, N]; state: [B, H, N_k, N_v] or None. Returns (out, final state)
    in float32 (float64 for float64 inputs); differentiable like ``wkv7_c``."""
    return run(_WKV6, _forward_op, (r, w, k, v, u.expand(r.shape[2], r.shape[3])), state, every)
