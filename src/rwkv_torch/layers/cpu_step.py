"""The fused RWKV-7 ``step`` on CPU: every block of one token in one C call (``ops/csrc/rwkv7_step.c``).

The eager fused step (``rwkv7.time_mix_step`` / ``channel_mix_step``) already runs few ops per layer, but on a small
model each op's dispatch costs as much as its arithmetic. This path runs the same math over the same cached
``step_weights()`` in C, one OpenMP team for the whole stack, so a C=256 6-layer step costs about what reading its
weights costs. It applies to fp32 RWKV-7 models on CPU without autograd (``RWKV.step``/``step_`` pick it by
themselves; ``RWKV_TORCH_CPU_KERNEL=0`` or a missing C compiler falls back to the eager fused step). The embedding,
ln0, ln_out and the head stay in PyTorch.
"""

import ctypes

import torch

from ..ops import cpu_kernel


def _layer_pointers(block_weights: tuple) -> tuple[list[torch.Tensor], int, int, tuple[float, float, float]] | None:
    """The tensors of one block in the C table's order (enum P_* of rwkv7_step.c), its LoRA count and padded rank,
    and its three epsilons; None when a tensor is not a contiguous fp32 CPU tensor (the eager step then runs)."""
    ln1_w, ln1_b, ln1_eps, ln2_w, ln2_b, ln2_eps, att, ffn = block_weights
    (mus, first, second, bias, one_minus_k_a, k_a, k_k, r_k, w_r, w_k, w_v, w_o, lnx_w, lnx_b, _layer_id, _H,
     lnx_eps) = att
    x_k, w_key, w_value = ffn
    tensors = [ln1_w, ln1_b, ln2_w, ln2_b, mus, first, second, bias, one_minus_k_a, k_a, k_k, r_k, w_r, w_k, w_v, w_o,
               lnx_w, lnx_b, x_k, w_key, w_value]
    if any(t is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return tensors, first.shape[0], first.shape[2], (ln1_eps, ln2_eps, lnx_eps)


class _Table:
    """The C call's constant arguments for one step plan: the pointer table, LoRA counts, epsilons, sizes."""

    def __init__(self, plan: list, config):
        layers = [_layer_pointers(w) for w in plan]
        self.ok = all(x is not None for x in layers) and len({x[2] for x in layers if x}) == 1
        if not self.ok:
            return
        self.keep = [t for x in layers for t in x[0]]  # the pointers stay valid while the plan lives
        self.params = (ctypes.c_void_p * len(self.keep))(*(t.data_ptr() for t in self.keep))
        self.n_lora = (ctypes.c_int64 * len(layers))(*(x[1] for x in layers))
        self.eps = (ctypes.c_double * (3 * len(layers)))(*(e for x in layers for e in x[3]))
        self.dims = (len(layers), config.hidden_size, config.num_heads, config.ffn_dim, layers[0][2])


def _table(model, plan: list) -> _Table:
    cached = model.__dict__.get("_cpu_step_table")
    if cached is None or cached[0] is not plan:
        cached = model.__dict__["_cpu_step_table"] = (plan, _Table(plan, model.config))
    return cached[1]


def applies(model, h: torch.Tensor, state) -> bool:
    """Whether ``blocks_step`` can run this step (fp32 RWKV-7 on CPU, fp32 contiguous state, kernel built)."""
    if model.config.version != 7 or h.device.type != "cpu" or h.dtype != torch.float32:
        return False
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in state.tensors().values()):
        return False
    return cpu_kernel.available()


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def blocks_step(model, plan: list, h: torch.Tensor, state, *, inplace: bool):
    """h [B, C] (after ln0) through every block: returns (h [B, C] before ln_out, the new per-layer state lists
    (shift_att, shift_ffn, wkv)), or None when this plan cannot run in C. ``inplace`` overwrites ``state``'s
    tensors; otherwise they are only read."""
    table = _table(model, plan)
    if not table.ok:
        return None
    x = h.contiguous().clone()  # updated in place by the kernel: the residual stream
    ins = (state.shift_att, state.shift_ffn, state.wkv)
    outs = ins if inplace else tuple([torch.empty_like(t) for t in ts] for ts in ins)
    L, C, H, F, D = table.dims
    err = cpu_kernel.library().rwkv7_blocks_step(
        L, x.shape[0], C, H, F, D, table.params, table.n_lora, table.eps, ctypes.c_void_p(x.data_ptr()),
        *map(_ptrs, ins), *map(_ptrs, outs), torch.get_num_threads())
    if err:
        raise MemoryError("the CPU RWKV-7 step could not allocate its scratch buffer")
    return x, outs
