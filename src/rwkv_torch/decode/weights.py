"""The RWKV-7 decode weights: what the C step reads per layer, as one typed object with one invalidation rule.

The six large matrices (r, k, v, o, ffn key and value) are read in the model's weight format: fp32, or, after
``rwkv_torch.quantize``, bf16 or int8 with a per-row fp32 scale (the ``s_*`` fields); everything else is fp32.

Most fields are the parameters themselves (views, no copy); a few are derived once: the six token-shift mixes stacked
``[6, C]`` (order r, k, v, a, w, g), the LoRAs zero-padded to one rank and stacked (order (v,) a, w, g: layer 0 has
no value-residual LoRA), their biases, and ``1 - k_a``. The gate's ``sigmoid(u) @ g2`` is rewritten as
``tanh(u / 2) @ (g2 / 2) + sum(g2 / 2)`` so that one tanh pass serves both the decay and the gate LoRA.

The invalidation rule (``DecodeWeights.is_current``): the weights stay valid while every parameter they were derived
from keeps its version counter (bumped by every in-place update: optimizer steps, ``load_state_dict``, ``copy_``/
``add_`` under no_grad), while no module anywhere had a parameter replaced (``module.w = nn.Parameter(...)``,
``load_state_dict(assign=True)``: a global registration hook counts these) and while the model is not moved or cast
(``RWKV._apply`` drops them). The parameters read directly are read live through their own memory. The one change
not seen is ``param.data = other_tensor``; call ``RWKV.clear_decode_weights()`` after it.
"""

import dataclasses

import torch
import torch.nn as nn

# Bumped whenever any module registers or replaces a parameter; decode weights remember the value they were built at.
_generation = [0]


def _on_parameter_registered(module, name, param):
    _generation[0] += 1


if hasattr(nn.modules.module, "register_module_parameter_registration_hook"):
    nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


@dataclasses.dataclass(frozen=True)
class RWKV7LayerWeights:
    """One RWKV-7 block's decode weights. The tensor fields, in this order, are the C step's pointer table (checked
    against ``rwkv7_step_fields()`` of ``ops/csrc/rwkv7_step.c`` when the library loads); all fp32 contiguous on the
    CPU path. Shapes: C = hidden size, D = padded LoRA rank, n = number of LoRAs (4, or 3 in layer 0), F = ffn size."""

    ln1_w: torch.Tensor  # [C]
    ln1_b: torch.Tensor  # [C]
    ln2_w: torch.Tensor  # [C]
    ln2_b: torch.Tensor  # [C]
    mus: torch.Tensor  # [6, C]: r, k, v, a, w, g
    lora_first: torch.Tensor  # [n, C, D]
    lora_second: torch.Tensor  # [n, D, C]
    lora_bias: torch.Tensor  # [n, C]
    one_minus_k_a: torch.Tensor  # [C]
    k_a: torch.Tensor  # [C]
    k_k: torch.Tensor  # [C]
    r_k: torch.Tensor  # [C] (the [H, N] parameter flattened)
    w_r: torch.Tensor  # [C, C] (out x in)
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    ln_x_w: torch.Tensor  # [C]
    ln_x_b: torch.Tensor  # [C]
    ffn_x_k: torch.Tensor  # [C]
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    # The six matrices' per-row scales ([out] fp32) when they are int8 (rwkv_torch.quantize), else empty tensors.
    s_r: torch.Tensor
    s_k: torch.Tensor
    s_v: torch.Tensor
    s_o: torch.Tensor
    s_ffn_key: torch.Tensor
    s_ffn_value: torch.Tensor
    n_lora: int
    eps_ln1: float
    eps_ln2: float
    eps_ln_x: float

    @classmethod
    def tensor_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.type in (torch.Tensor, "torch.Tensor")]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_fields()]

    @property
    def lora_rank(self) -> int:
        return self.lora_first.shape[2]

    @classmethod
    def matrix_scales(cls) -> dict[str, str]:
        """The fields stored in the weight format (fp32, bf16 or int8), each with its scale field; every other tensor
        field is fp32."""
        return {"w_r": "s_r", "w_k": "s_k", "w_v": "s_v", "w_o": "s_o", "ffn_key": "s_ffn_key",
                "ffn_value": "s_ffn_value"}

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the six matrices (torch.float32, torch.bfloat16 or torch.int8)."""
        return self.w_r.dtype


def _stack_padded(mats: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Stack matrices whose size along ``dim`` (0 or 1) differs, zero-padded to the largest: zero rows/columns add
    nothing to a product, so one pass does the work of several."""
    size = max(m.shape[dim] for m in mats)
    out = mats[0].new_zeros(len(mats), *(size if d == dim else s for d, s in enumerate(mats[0].shape)))
    for i, m in enumerate(mats):
        out[i].narrow(dim, 0, m.shape[dim]).copy_(m)
    return out


def _scale(linear) -> torch.Tensor:
    """An int8 ``QuantLinear``'s per-row scale (read live), else an empty fp32 tensor (the C step ignores it)."""
    scale = getattr(linear, "scale", None)
    return scale.detach() if scale is not None else linear.weight.new_empty(0, dtype=torch.float32)


@torch.no_grad()
def rwkv7_layer_weights(block) -> tuple[RWKV7LayerWeights, list[torch.nn.Parameter]]:
    """The decode weights of one RWKV-7 ``Block`` and the parameters whose values were copied into derived fields."""
    att, ffn = block.att, block.ffn
    g1, g2 = att.g1 / 2, att.g2 / 2
    loras = [(att.a1, att.a2, att.a0), (att.w1, att.w2, att.w0), (g1, g2, g2.sum(0))]
    derived_from = [att.x_r, att.x_k, att.x_v, att.x_a, att.x_w, att.x_g, att.a1, att.a2, att.a0, att.w1, att.w2,
                    att.w0, att.g1, att.g2, att.k_a]
    if att.layer_id > 0:
        loras.insert(0, (att.v1, att.v2, att.v0))
        derived_from += [att.v1, att.v2, att.v0]
    weights = RWKV7LayerWeights(
        ln1_w=block.ln1.weight.detach(), ln1_b=block.ln1.bias.detach(),
        ln2_w=block.ln2.weight.detach(), ln2_b=block.ln2.bias.detach(),
        mus=torch.stack([att.x_r, att.x_k, att.x_v, att.x_a, att.x_w, att.x_g]),
        lora_first=_stack_padded([m for m, _, _ in loras], dim=1).contiguous(),
        lora_second=_stack_padded([m for _, m, _ in loras], dim=0).contiguous(),
        lora_bias=torch.stack([b for _, _, b in loras]),
        one_minus_k_a=1 - att.k_a, k_a=att.k_a.detach(), k_k=att.k_k.detach(), r_k=att.r_k.detach().view(-1),
        w_r=att.receptance.weight.detach(), w_k=att.key.weight.detach(), w_v=att.value.weight.detach(),
        w_o=att.output.weight.detach(), ln_x_w=att.ln_x.weight.detach(), ln_x_b=att.ln_x.bias.detach(),
        ffn_x_k=ffn.x_k.detach(), ffn_key=ffn.key.weight.detach(), ffn_value=ffn.value.weight.detach(),
        s_r=_scale(att.receptance), s_k=_scale(att.key), s_v=_scale(att.value), s_o=_scale(att.output),
        s_ffn_key=_scale(ffn.key), s_ffn_value=_scale(ffn.value),
        n_lora=len(loras), eps_ln1=block.ln1.eps, eps_ln2=block.ln2.eps, eps_ln_x=att.ln_x.eps,
    )
    return weights, derived_from


def _version(p: torch.Tensor) -> int:
    """The version counter; inference tensors (made under ``torch.inference_mode``, e.g. a model loaded there) have
    none, and their in-place changes go unseen (call ``RWKV.clear_decode_weights()`` after one)."""
    return -1 if p.is_inference() else p._version


class DecodeWeights:
    """Every block's ``RWKV7LayerWeights`` and what decides whether they are current (the module docstring's rule).

    ``table`` is free for the C step to hang its pointer table on (built from these tensors, valid as long as they
    are)."""

    def __init__(self, model):
        built = [rwkv7_layer_weights(block) for block in model.blocks]
        self.layers = [w for w, _ in built]
        self._watched = [p for _, ps in built for p in ps]
        self._versions = [_version(p) for p in self._watched]
        self._generation = _generation[0]
        self.table = None

    def is_current(self) -> bool:
        if self._generation != _generation[0]:
            return False
        return all(_version(p) == v for p, v in zip(self._watched, self._versions))
