"""The RWKV-7 step in C: every block of one fp32 token in one call (``ops/csrc/rwkv7_step.c``).

On a small model each PyTorch op's dispatch costs as much as its arithmetic; this path runs the block math over the
``DecodeWeights`` in C, one OpenMP team for the whole stack, so a C=256 6-layer step costs about what reading its
weights costs. It applies to fp32 RWKV-7 models on CPU without autograd or autocast (``RWKV.step``/``step_`` pick it
by themselves); ``RWKV_TORCH_CPU_KERNEL=0`` or a missing C compiler leaves the spec form at T = 1. The embedding,
ln0, ln_out and the head stay in PyTorch. ``blocks_step`` is the one place that steps many streams: from
``batched.MIN_ROWS`` rows on it hands them to the batched engine (``decode/batched.py``: GEMMs over the rows).
"""

import ctypes

import torch

from ..ops import cpu_lib
from ..ops.cpu_lib import WEIGHT_FORMAT_CODES as WEIGHT_FORMATS
from . import batched
from .weights import DecodeWeights, RWKV7LayerWeights

_checked = []


def _library() -> ctypes.CDLL:
    """The C library, with its pointer-table layout checked once against ``RWKV7LayerWeights``."""
    lib = cpu_lib.library()
    if not _checked:
        c_fields = lib.rwkv7_step_fields().decode().split(",")
        if c_fields != RWKV7LayerWeights.tensor_fields():
            raise RuntimeError(f"rwkv7_step.c reads the fields {c_fields}, RWKV7LayerWeights holds "
                               f"{RWKV7LayerWeights.tensor_fields()}: the two must list the same names in the same "
                               "order")
        _checked.append(True)
    return lib


def _table_ok(layers: list[RWKV7LayerWeights]) -> bool:
    """Every tensor contiguous on the CPU, the matrices of all layers in one weight format (int8 with fp32 scales
    of one per row), everything else fp32, and one LoRA rank."""
    wdtype = layers[0].weight_dtype
    if wdtype not in WEIGHT_FORMATS or len({w.lora_rank for w in layers}) != 1:
        return False
    scales = RWKV7LayerWeights.matrix_scales()
    for w in layers:
        for name, t in zip(RWKV7LayerWeights.tensor_fields(), w.tensors()):
            want = wdtype if name in scales else torch.float32
            if t.dtype != want or t.device.type != "cpu" or not t.is_contiguous():
                return False
        if wdtype == torch.int8 and any(getattr(w, s).numel() != getattr(w, m).shape[0] for m, s in scales.items()):
            return False
    return True


class _Table:
    """The C call's constant arguments: the pointer table, LoRA counts, epsilons, weight format and sizes (``ok``
    False when ``_table_ok`` fails)."""

    def __init__(self, layers: list[RWKV7LayerWeights], config):
        tensors = [t for w in layers for t in w.tensors()]
        self.ok = _table_ok(layers)
        if not self.ok:
            return
        self.wfmt = WEIGHT_FORMATS[layers[0].weight_dtype]
        self.keep = tensors  # the pointers stay valid while these live
        self.params = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
        self.n_lora = (ctypes.c_int64 * len(layers))(*(w.n_lora for w in layers))
        self.eps = (ctypes.c_double * (3 * len(layers)))(
            *(e for w in layers for e in (w.eps_ln1, w.eps_ln2, w.eps_ln_x)))
        self.dims = (len(layers), config.hidden_size, config.num_heads, config.ffn_dim, layers[0].lora_rank)


def applies(model, h: torch.Tensor, state) -> bool:
    """Whether the C step can run this step: fp32 RWKV-7 on CPU, fp32 contiguous state, kernel built here."""
    if model.config.version != 7 or h.device.type != "cpu" or h.dtype != torch.float32:
        return False
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in state.tensors().values()):
        return False
    return cpu_lib.available()


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def blocks_step(weights: DecodeWeights, config, h: torch.Tensor, state, *, inplace: bool):
    """h [B, C] (after ln0) through every block (from ``batched.MIN_ROWS`` rows on, the batched engine where its
    weight format applies; else the fused C step): returns (h [B, C] before ln_out, the new per-layer state lists
    (shift_att, shift_ffn, wkv)), or None when these weights cannot run in C. ``inplace`` overwrites ``state``'s
    tensors; otherwise they are only read."""
    if not weights.layers:  # projections the C step cannot read (decode.weights.NotReadable)
        return None
    if weights.table is None:
        weights.table = _Table(weights.layers, config)
    table = weights.table
    if not table.ok:
        return None
    ins = (state.shift_att, state.shift_ffn, state.wkv)
    outs = ins if inplace else tuple([torch.empty_like(t) for t in ts] for ts in ins)
    if batched.applies(weights, h.shape[0]):  # many rows: the projections as matrix-matrix products
        return batched.blocks_step(_library(), table, weights, h, ins, outs), outs
    x = h.contiguous().clone()  # updated in place by the kernel: the residual stream
    L, C, H, F, D = table.dims
    err = _library().rwkv7_blocks_step(
        L, x.shape[0], C, H, F, D, table.params, table.n_lora, table.eps, table.wfmt, ctypes.c_void_p(x.data_ptr()),
        *map(_ptrs, ins), *map(_ptrs, outs), torch.get_num_threads())
    if err:
        raise MemoryError("the CPU RWKV-7 step could not allocate its scratch buffer")
    return x, outs
