"""Weight-only int8 and bf16 formats: ``quantize(model, "int8" | "bf16")`` replaces the large linear layers.

Module surgery after construction (gpt-fast's ``quantize.py``): every ``nn.Linear`` inside the blocks (r, k, v, o,
gate, ffn key/value/receptance) and the head becomes a ``QuantLinear`` holding

* ``"int8"``: ``weight`` int8 ``[out, in]`` and ``scale`` fp32 ``[out]``, symmetric per output row:
  ``scale = max|W[o, :]| / 127``, ``weight = round(W / scale)``; the layer computes ``x @ (weight * scale)ᵀ``;
* ``"bf16"``: ``weight`` bf16 ``[out, in]`` (round to nearest even), no scale.

Activations, the recurrent state, the embedding, LayerNorms, LoRAs and every vector stay fp32 (they are a few % of
the bytes at the 0.1B shape, except the embedding, of which a step reads one row). The quantized tensors are
parameters with ``requires_grad=False`` under the same names (``...key.weight``, plus ``...key.scale``), so
``state_dict``, ``save``/``load`` and ``param_count`` see them; a quantized model is for inference.

How each path reads them:

* one token (``step``, ``step_``, ``generate``, ``Stream``): RWKV-7 runs the C step, which reads the int8/bf16
  rows directly (``ops/csrc/rwkv7_step.c``); the head and, for RWKV-4/5/6, every layer, call the C matrix-vector
  product ``rwkv_qgemv`` for up to ``C_ROWS`` rows;
* sequences (``forward``, prefill): the weight is widened to fp32 per call and multiplied by MKL's fp32 GEMM (on a
  CPU without fast bf16 or int8 GEMMs, e.g. AVX2 only, that is the fastest; benchmarks/RESULTS.md has the
  measurements); under bf16 autocast a bf16 weight is used as stored, without a cast;
* traced or compiled graphs (ONNX export, ``compile_step``, ``torch.compile``) and autograd see the same
  dequantize-then-linear in plain torch ops.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import cpu_lib
from .ops.cpu_lib import I64, INT, PTR, WEIGHT_FORMAT_CODES, Kernel, ptr

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
# The documented accuracy of each format: relative error ||q - f|| / ||f|| of the logits against the fp32 model.
# tests/test_quantize.py enforces it on tiny random official-format models of every version; measured on RWKV-7
# (benchmarks/bench_quantize.py, per position over 1000 tokens): bf16 max 4.3e-3 at C256-L6, 6.7e-3 at 0.1B; int8
# max 2.0e-2 at C256-L6, 3.3e-2 at 0.1B (greedy agreement 100% / 98.7% bf16, 100% / 94.5% int8).
ERROR_BOUNDS = {"bf16": 1e-2, "int8": 5e-2}
_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8}
# wfmt, weight, scale, bias, x, y; rows, out, in; threads (ops/csrc/rwkv7_step.c)
_QGEMV = Kernel("rwkv_qgemv", [INT] + [PTR] * 5 + [I64] * 3 + [INT])
# Up to this many rows a linear layer runs the C matrix-vector product (each weight row read once for all rows);
# beyond it, widening to fp32 + MKL's GEMM. Batch-1 steps are the case that matters; the crossover is not tuned.
C_ROWS = 4


class QuantLinear(nn.Module):
    """A linear layer with a stored int8 (per-row scale) or bf16 weight: ``y = x @ Wᵀ + bias``, x fp32 ``[..., in]``.

    Build it with ``QuantLinear.from_linear(linear, "int8" | "bf16")``; ``dequantized()`` is the fp32 ``W [out, in]``.
    """

    READ_BY_DECODE = True  # the C step reads ``weight`` (and ``scale``) directly: the module is exactly x @ Wᵀ

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        if weight.dim() != 2 or weight.dtype not in (torch.int8, torch.bfloat16, torch.float32):
            raise ValueError(f"weight must be a 2-D int8, bf16 or fp32 tensor, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        if (scale is None) != (weight.dtype != torch.int8):
            raise ValueError("an int8 weight needs a per-row scale; bf16/fp32 weights take none")
        if scale is not None and scale.shape != (weight.shape[0],):
            raise ValueError(f"scale must be [out] = [{weight.shape[0]}], got {tuple(scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False) if scale is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantLinear":
        w = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        if fmt == "bf16":
            return cls(w.to(torch.bfloat16), None, bias)
        if fmt != "int8":
            raise ValueError(f"weight format must be 'int8' or 'bf16', got {fmt!r}")
        weight, scale = quantize_int8(w)
        return cls(weight, scale, bias)

    @property
    def weight_format(self) -> str:
        return {torch.int8: "int8", torch.bfloat16: "bf16"}.get(self.weight.dtype, "fp32")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` as ``dtype`` (int8 times its scale)."""
        if self.scale is None:
            return self.weight.to(dtype)
        return torch.mul(self.weight, self.scale.to(dtype)[:, None])  # one pass: int8 * fp32 promotes to fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if 0 < rows <= C_ROWS and self._c_applies(x):
            return self._c_forward(x)
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 or _autocast_bf16(x):
            w = self.weight if self.weight.dtype == torch.bfloat16 else self.dequantized(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), w, None if self.bias is None else self.bias.to(torch.bfloat16))
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return F.linear(x, self.dequantized(dtype), None if self.bias is None else self.bias.to(dtype))

    def _c_applies(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.device.type != "cpu":
            return False
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _exporting():
            return False
        if torch.is_grad_enabled() and x.requires_grad or _autocast_bf16(x):
            return False
        return cpu_lib.available()

    def _c_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = x2.new_empty(x2.shape[0], self.out_features)
        w = self.weight.contiguous()
        scale = None if self.scale is None else self.scale.float().contiguous()
        bias = None if self.bias is None else self.bias.float().contiguous()
        _QGEMV(WEIGHT_FORMAT_CODES[w.dtype], ptr(w), ptr(scale), ptr(bias), ptr(x2), ptr(y), x2.shape[0],
               self.out_features, self.in_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={self.weight_format}")


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.onnx.is_in_onnx_export()


def _autocast_bf16(x: torch.Tensor) -> bool:
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()
    return on and torch.get_autocast_dtype(x.device.type) == torch.bfloat16


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (int8 ``[out, in]``, fp32 scale ``[out]``): symmetric, per row, ``max|w_row| / 127``
    (a zero row gets scale 1)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _linears(model) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer that quantization replaces: inside the blocks, and the head."""
    out = [(parent, name) for block in model.blocks for parent in block.modules()
           for name, child in parent.named_children() if isinstance(child, nn.Linear | QuantLinear)]
    if isinstance(model.head, nn.Linear | QuantLinear):
        out.append((model, "head"))
    return out


def weight_format(model) -> str:
    """``"fp32"`` (plain ``nn.Linear`` layers, whatever their dtype), ``"bf16"`` or ``"int8"``; ValueError when the
    layers mix formats."""
    model = getattr(model, "_orig_mod", model)
    kinds = {getattr(parent, name).weight_format if isinstance(getattr(parent, name), QuantLinear) else "fp32"
             for parent, name in _linears(model)}
    if len(kinds) > 1:
        raise ValueError(f"the model's linear layers mix weight formats {sorted(kinds)}")
    return kinds.pop() if kinds else "fp32"


@torch.no_grad()
def quantize(model, weights: str = "int8"):
    """Replace the model's large linear layers (blocks and head) by ``QuantLinear`` in format ``weights``, in place;
    returns the model.

    Args:
        model: an ``rwkv_torch.RWKV`` (any version), fp32/bf16/fp16, on the CPU or not; it stays on its device.
        weights: ``"int8"`` (per-row scales, ~4x smaller than fp32), ``"bf16"`` (~2x) or ``"fp32"`` (no change).

    The rest of the model is cast to fp32 (activations and state are fp32 in every format). Quantizing a model
    already in ``weights`` does nothing; converting between int8 and bf16 raises (it would round twice).

    >>> import rwkv_torch as rt
    >>> m = rt.quantize(rt.build(vocab_size=256, hidden_size=64, num_layers=2, head_size=16, seed=0), "int8")
    >>> rt.weight_format(m), m.blocks[0].att.key.weight.dtype
    ('int8', torch.int8)
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    current = weight_format(model)
    if current == weights:
        return model
    if current != "fp32":
        raise ValueError(f"the model's weights are already {current}; quantize the fp32 model to {weights} instead "
                         "(converting between formats would round twice)")
    model.float()  # the vectors, LoRAs, norms and embedding (and the weights, rounded once from fp32 below)
    for parent, name in _linears(model):
        setattr(parent, name, QuantLinear.from_linear(getattr(parent, name), weights))
    model.clear_decode_weights()
    return model


def quantized_like(model, weights: str):
    """The module structure of ``quantize(model, weights)`` without computing anything (for loading a quantized
    file into a model on the meta device): the replaced layers get empty tensors of the right dtypes and shapes."""
    if weights == "fp32":
        return model
    dtype = _DTYPES[weights]
    for parent, name in _linears(model):
        lin = getattr(parent, name)
        out, inp = lin.weight.shape
        dev = lin.weight.device
        scale = torch.empty(out, device=dev) if weights == "int8" else None
        bias = None if lin.bias is None else torch.empty(out, device=dev)
        setattr(parent, name, QuantLinear(torch.empty(out, inp, dtype=dtype, device=dev), scale, bias))
    return model


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every ``QuantLinear`` as a plain fp32 linear layer (no ``scale`` keys): what an
    fp32 ``RWKV`` of the same config loads (e.g. for ONNX export or an official ``.pth``)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sd[f"{name}.weight"] = m.dequantized(torch.float32)
            sd.pop(f"{name}.scale", None)
    return sd
