"""The C passes of the RWKV time mix's training form (``ops/csrc/time_mix_cpu.c``): the elementwise backwards of
RWKV-7's WKV inputs and of the RWKV-5/6/7 gated output, each a custom op (opaque to ``torch.compile``)."""

import torch

from .cpu_lib import DOUBLE, I64, INT, PTR, Kernel, check_alloc, custom_op, dtype_args, ptr, ptrs

# Row blocks of the per-channel sums (their partial sums are [blocks, n, C]): rows -> blocks
_BLOCKS = Kernel("rwkv_time_mix_blocks", [I64], I64)
# rows, heads, head size, inputs[9], eps, outputs[6], partial sums; fp64, threads
_GATED_OUTPUT_BACKWARD = Kernel("rwkv_gated_output_backward", [I64] * 3 + [PTR, DOUBLE, PTR, PTR] + [INT] * 2)
# rows, heads, head size, inputs[11], decay scale, eps, outputs[3], partial sums; fp64, threads
_WKV_INPUTS_BACKWARD = Kernel("rwkv_wkv_inputs_backward", [I64] * 3 + [PTR, DOUBLE, DOUBLE, PTR, PTR, INT, INT])


def _gated_output_bwd_impl(dzg: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None, k: torch.Tensor | None,
                           v: torch.Tensor | None, g: torch.Tensor, r_k: torch.Tensor | None, ln_w: torch.Tensor,
                           ln_b: torch.Tensor, n_head: int, eps: float) -> list[torch.Tensor]:
    C = y.shape[-1]
    R = y.numel() // C
    bonus = r is not None
    ins = [None if t is None else t.contiguous() for t in (dzg, y, r, k, v, g)]
    ins += [None if t is None else t.reshape(C).contiguous() for t in (r_k, ln_w, ln_b)]
    outs = [torch.empty_like(ins[1]) if bonus or i in (0, 4, 5) else None for i in range(6)]
    part = y.new_empty(_BLOCKS(R), 3, C)
    err = _GATED_OUTPUT_BACKWARD(R, n_head, C // n_head, ptrs(ins), eps, ptrs(outs), ptr(part), *dtype_args(y))
    check_alloc(err, "gated output backward")
    return [y.new_empty(0) if t is None else t for t in outs] + [part.sum(0)]


def _gated_output_bwd_fake(dzg, y, r, k, v, g, r_k, ln_w, ln_b, n_head, eps):
    C = y.shape[-1]
    return [torch.empty_like(y) if r is not None or i in (0, 4, 5) else y.new_empty(0) for i in range(6)] + [
        y.new_empty(3, C)]


def gated_output_backward(dzg, y, r, k, v, g, r_k, ln_w, ln_b, n_head: int, eps: float) -> list:
    """The elementwise backward of the time mix's gated output ``((group_norm(y) ln_w + ln_b + bonus v) g) @ W_outᵀ``
    (``ops/gated_output.py``) in one pass (``csrc/time_mix_cpu.c``): from ``dzg = d_out @ W_out`` and the saved
    ``[..., C]`` tensors, returns ``[dy, dr, dk, dv, dg, zg, dr_k, dln_w, dln_b]`` (``zg = z g``, the projection's
    input; the last three ``[C]``, summed over fixed row blocks: independent of the thread count). RWKV-7's bonus
    ``Σ_head r k r_k`` needs r, k, v and r_k; RWKV-5/6 pass all four as None and get None for dr, dk, dv and dr_k.
    float32 or float64 CPU tensors of one dtype."""
    bonus = (r, k, v, r_k)
    if any(t is None for t in bonus) and any(t is not None for t in bonus):
        raise ValueError("gated_output_backward: r, k, v and r_k are all given (RWKV-7's bonus) or all None")
    ts = [t for t in (dzg, y, r, k, v, g, r_k, ln_w, ln_b) if t is not None]
    if y.dtype not in (torch.float32, torch.float64) or any(t.dtype != y.dtype for t in ts):
        raise TypeError(f"gated_output_backward takes float32 or float64 tensors of one dtype, got "
                        f"{sorted({str(t.dtype) for t in ts})}")
    C = y.shape[-1]
    rows = [t for t in (dzg, y, r, k, v, g) if t is not None]
    if any(t.shape != y.shape for t in rows) or any(t.numel() != C for t in ts[len(rows):]) or C % n_head:
        raise ValueError(f"gated_output_backward: tensors shaped like y {tuple(y.shape)} (dzg, y, g; and r, k, v), "
                         f"vectors of {C} elements (ln_w, ln_b; and r_k) and {n_head} heads dividing {C}, got "
                         f"{[tuple(t.shape) for t in ts]}")
    *grads, sums = _gated_output_bwd_op(dzg, y, r, k, v, g, r_k, ln_w, ln_b, int(n_head), float(eps))
    if r is None:
        grads[1:4] = [None] * 3
    return [*grads, None if r is None else sums[0], sums[1], sums[2]]


def _wkv_inputs_bwd_impl(dw: torch.Tensor, dk: torch.Tensor, d_minus_kk: torch.Tensor, db: torch.Tensor,
                         k0: torch.Tensor, a: torch.Tensor, norm: torch.Tensor, w: torch.Tensor,
                         minus_kk: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, decay_scale: float,
                         eps: float) -> list[torch.Tensor]:
    C = k0.shape[-1]
    R, H = k0.numel() // C, norm.numel() * C // k0.numel()
    ins = [t.contiguous() for t in (dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk)]
    ins += [t.reshape(C).contiguous() for t in (k_k, k_a)]
    outs = [torch.empty_like(ins[4]) for _ in range(3)]
    part = k0.new_empty(_BLOCKS(R), 2, C)
    _WKV_INPUTS_BACKWARD(R, H, C // H, ptrs(ins), decay_scale, eps, ptrs(outs), ptr(part), *dtype_args(k0))
    return [*outs, part.sum(0)]


def _wkv_inputs_bwd_fake(dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, decay_scale, eps):
    C = k0.shape[-1]
    return [torch.empty_like(k0) for _ in range(3)] + [k0.new_empty(2, C)]


def wkv_inputs_backward(dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a, decay_scale: float,
                        eps: float) -> list:
    """The elementwise backward of RWKV-7's WKV inputs (``ops/wkv7/fused_inputs.py``, ``wkv_inputs``) in one pass
    (``csrc/time_mix_cpu.c``): from the gradients of ``(w, k, -kk, kk a)`` and the saved ``k0, a, w, -kk``
    (``[..., C]``), the per-head norms of ``k0 k_k`` (``[..., H, 1]``) and ``k_k, k_a`` (``C`` elements), returns
    ``[dk0, dw_raw, da_raw, dk_k, dk_a]`` (the last two ``[C]``, summed over fixed row blocks). float32 or float64 CPU
    tensors of one dtype."""
    ts = (dw, dk, d_minus_kk, db, k0, a, norm, w, minus_kk, k_k, k_a)
    if k0.dtype not in (torch.float32, torch.float64) or any(t.dtype != k0.dtype for t in ts):
        raise TypeError(f"wkv_inputs_backward takes float32 or float64 tensors of one dtype, got "
                        f"{sorted({str(t.dtype) for t in ts})}")
    C = k0.shape[-1]
    H = norm.shape[-2] if norm.dim() >= 2 else 0
    if (any(t.shape != k0.shape for t in (*ts[:6], *ts[7:9])) or H < 1 or C % H
            or norm.numel() * C != k0.numel() * H or any(t.numel() != C for t in ts[9:])):
        raise ValueError(f"wkv_inputs_backward: eight tensors shaped like k0 {tuple(k0.shape)}, norms [..., H, 1] "
                         f"with H dividing {C}, two of {C} elements; got {[tuple(t.shape) for t in ts]}")
    *grads, sums = _wkv_inputs_bwd_op(*ts, float(decay_scale), float(eps))
    return [*grads, *sums.unbind(0)]


_wkv_inputs_bwd_op = custom_op("wkv_inputs_backward", _wkv_inputs_bwd_impl, _wkv_inputs_bwd_fake)
_gated_output_bwd_op = custom_op("gated_output_backward", _gated_output_bwd_impl, _gated_output_bwd_fake)
