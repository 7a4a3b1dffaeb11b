"""The batched RWKV-7 step on CPU: N independent streams, one state row each, in one call per step.

The fused C step (``rwkv7_blocks_step``) reads every weight row once for all rows, but its products are
matrix-vector dot products per row: at N >= 8 it runs at ~1.5-1.8x the time of the same products as matrix-matrix
products (measured, C256 L6, 1 thread). Here the projections (r, k, v, o, ffn key and value) and the LoRAs (each at
its own rank) are matrix-matrix products over the N rows (``torch.mm``/``addmm``: MKL or oneDNN GEMMs), and
everything between them, row by row, is C (``rwkv7_batch_*`` in ``ops/csrc/rwkv7_step.c``: ln1 and the token-shift
mixes; the gates, the WKV state update, group norm, bonus and gate; ln2 and the ffn mix): the same math as the fused
step, three C calls and about sixteen GEMMs per layer.

Weight formats: fp32 always; bf16 and int8 only on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX, read
from ``/proc/cpuinfo`` at run time), where a bf16 GEMM runs ~4x the fp32 rate: the activations entering the six
large products are rounded to bf16 and their results come back in bf16 (oneDNN gives no fp32 output on CPU), so the
results agree with the fused step to bf16 rounding, not to fp32. int8 weights are multiplied as bf16 copies of their
integers (exact: |q| <= 127) times the per-row scale; the copies (2 bytes a weight) are derived once per
``DecodeWeights`` and watched by its version rule. Elsewhere bf16/int8 keep the fused step.
"""

import ctypes
import functools
from pathlib import Path

import torch

# From this many rows on, by weight format, the batched engine runs; fewer take the fused C step, whose one call
# costs less than the engine's ~15 per layer and whose matrix-vector products stay memory-bound there anyway.
# Measured on a 2-core AVX-512-BF16 VM (C256 L6, 1 thread, benchmarks/bench_step.py): fp32 GEMMs overtake the fused
# step between 16 and 32 rows, bf16 ones (4x the fp32 rate) between 4 and 8.
MIN_ROWS = {torch.float32: 32, torch.bfloat16: 8, torch.int8: 8}


@functools.cache
def bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16): a bf16 GEMM is then faster than fp32."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def applies(weights, rows: int) -> bool:
    """Whether ``rows`` rows over these decode weights take the batched engine."""
    dtype = weights.layers[0].weight_dtype
    if rows < MIN_ROWS[dtype]:
        return False
    return dtype == torch.float32 or bf16_matmul()


_signed = []


def _declare(lib) -> None:
    if _signed:
        return
    i64, ptr, f64, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    lib.rwkv7_batch_att_in.argtypes = [i64, i64, ptr, i64, f64] + [ptr] * 4 + [i32]
    lib.rwkv7_batch_att_mid.argtypes = [i64, i64, i64, ptr, i64, i64, f64] + [ptr] * 8 + [i32]
    lib.rwkv7_batch_ffn_in.argtypes = [i64, i64, ptr, i64, f64] + [ptr] * 4 + [i32]
    for f in (lib.rwkv7_batch_att_in, lib.rwkv7_batch_att_mid, lib.rwkv7_batch_ffn_in):
        f.restype = None
    _signed.append(True)


class _Layer:
    """One layer as the GEMMs take it: the six matrices as transposed views ``[in, out]`` (int8: bf16 copies of the
    integers) with their scales (int8, else None), and each LoRA's two matrices and bias."""

    def __init__(self, w):
        mats = [w.w_r, w.w_k, w.w_v, w.w_o, w.ffn_key, w.ffn_value]
        if w.weight_dtype == torch.int8:
            mats = [m.to(torch.bfloat16) for m in mats]  # exact: the integers fit bf16's 8 significant bits
            self.scales = [w.s_r, w.s_k, w.s_v, w.s_o, w.s_ffn_key, w.s_ffn_value]
        else:
            self.scales = [None] * 6
        self.r, self.k, self.v, self.o, self.key, self.value = (m.t() for m in mats)
        self.n = n = w.n_lora
        # Each LoRA at its own rank (views into the zero-padded stacks: no padding multiplied), mix 6 - n + i
        # feeding LoRA i: (first [C, r], second [r, C], bias [C]).
        self.loras = [(w.lora_first[i, :, :r], w.lora_second[i, :r], w.lora_bias[i])
                      for i, r in enumerate(w.lora_ranks)]
        assert len(self.loras) == n


def _plan(weights) -> list[_Layer]:
    plan = weights.extras.get("batched")
    if plan is None:
        layers = weights.layers
        plan = weights.extras["batched"] = [_Layer(w) for w in layers]
        if layers[0].weight_dtype == torch.int8:  # the bf16 copies are derived: watch the int8 parameters
            weights.watch([m for w in layers for m in (w.w_r, w.w_k, w.w_v, w.w_o, w.ffn_key, w.ffn_value)])
    return plan


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _mm(x: torch.Tensor, m: torch.Tensor, scale, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, in] (bf16 for narrow formats) @ m [in, out] -> fp32 [B, out] (into ``out`` where given)."""
    if x.dtype == torch.float32:
        return torch.mm(x, m, out=out)
    y = torch.mm(x, m)
    if out is None:
        return y.float() if scale is None else torch.mul(y, scale)
    return out.copy_(y) if scale is None else torch.mul(y, scale, out=out)


def blocks_step(lib, table, weights, h: torch.Tensor, ins, outs) -> torch.Tensor:
    """h [B, C] (after ln0) through every block over ``weights`` (``c_step._Table`` ``table``): returns x [B, C]
    before ln_out; the state lists ``ins`` (shift_att, shift_ffn, wkv) are read and ``outs`` written (they may be
    the same tensors)."""
    _declare(lib)
    plan = _plan(weights)
    L, C, H, F, D = table.dims
    B, threads = h.shape[0], torch.get_num_threads()
    x = h.contiguous().clone()
    xs = x.new_empty(6, B, C)  # the six token-shift mixes (r, k, v, a, w, g); the ffn's mix reuses row 0
    lo = x.new_empty(4, B, C)
    r, k, v, y, vfirst = (x.new_empty(B, C) for _ in range(5))
    kf = x.new_empty(B, F)
    narrow = weights.layers[0].weight_dtype != torch.float32
    xs_r, xs_k, xs_v = xs[0], xs[1], xs[2]
    params, att_in, att_mid, ffn_in = table.params, lib.rwkv7_batch_att_in, lib.rwkv7_batch_att_mid, \
        lib.rwkv7_batch_ffn_in
    xp, xsp, rp, kp, vp, yp, vfp = map(_ptr, (x, xs, r, k, v, y, vfirst))
    for l, (w, m) in enumerate(zip(weights.layers, plan)):
        n = m.n
        att_in(B, C, params, l, w.eps_ln1, xp, _ptr(ins[0][l]), _ptr(outs[0][l]), xsp, threads)
        if narrow:
            xr, xk, xv = xs[:3].to(torch.bfloat16).unbind(0)
            _mm(xr, m.r, m.scales[0], r)
            _mm(xk, m.k, m.scales[1], k)
            _mm(xv, m.v, m.scales[2], v)
        else:
            torch.mm(xs_r, m.r, out=r)
            torch.mm(xs_k, m.k, out=k)
            torch.mm(xs_v, m.v, out=v)
        lon = lo[:n]
        for i, (first, second, bias) in enumerate(m.loras):
            zi = torch.mm(xs[6 - n + i], first)
            if i >= n - 2:  # the decay and gate LoRAs
                zi.tanh_()
            torch.addmm(bias, zi, second, out=lon[i])
        att_mid(B, C, H, params, l, n, w.eps_ln_x, rp, kp, vp, _ptr(lon), vfp, _ptr(ins[2][l]), _ptr(outs[2][l]),
                yp, threads)
        if narrow:
            x.add_(_mm(y.to(torch.bfloat16), m.o, m.scales[3]))
        else:
            x.addmm_(y, m.o)
        ffn_in(B, C, params, l, w.eps_ln2, xp, _ptr(ins[1][l]), _ptr(outs[1][l]), xsp, threads)
        if narrow:
            kb = torch.mm(xs_r.to(torch.bfloat16), m.key)
            if m.scales[4] is not None:
                kb.mul_(m.scales[4])
            x.add_(_mm(kb.relu_().square_(), m.value, m.scales[5]))
        else:
            torch.mm(xs_r, m.key, out=kf).relu_().square_()
            x.addmm_(kf, m.value)
    return x
