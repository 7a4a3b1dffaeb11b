"""The RWKV-7 decode weights: what the C step reads per layer, as one typed object with one invalidation rule.

The six large matrices (r, k, v, o, ffn key and value) are read in the model's weight format: fp32, or, after
``rwkv_torch.quantize``, bf16 or int8 with a per-row fp32 scale (the ``s_*`` fields); everything else is fp32.

Most fields are the parameters themselves (views, no copy); a few are derived once: the six token-shift mixes stacked
``[6, C]`` (order r, k, v, a, w, g), the LoRAs zero-padded to one rank and stacked (order (v,) a, w, g: layer 0 has
no value-residual LoRA), their biases, and ``1 - k_a``. The gate's ``sigmoid(u) @ g2`` is rewritten as
``tanh(u / 2) @ (g2 / 2) + sum(g2 / 2)`` so that one tanh pass serves both the decay and the gate LoRA.

``DecodeWeights`` (``RWKV.decode_weights()``) is an explicit handle, held by whoever steps (``Stream``, ``generate``,
the replay policy) and passed to ``RWKV.step(..., weights=dw)``; ``dw.current()`` gives the layers, rebuilt when
stale. The invalidation rule (``DecodeWeights.is_current``), checked per step over this model's own objects only:

* every parameter copied into a derived field keeps its version counter (bumped by every in-place update: optimizer
  steps, ``load_state_dict``, ``copy_``/``add_`` under no_grad); the parameters read directly are read live;
* every module and parameter the weights were read from is still in its place (``module.w = nn.Parameter(...)``,
  ``load_state_dict(assign=True)``, ``quantize``'s module surgery: identity checks, ``is``);
* the model was not moved or cast since (``RWKV._apply`` and ``RWKV.clear_decode_weights()`` bump the model's
  ``_decode_epoch``).

Nothing outside the model is watched: no global hook, so building or changing other modules costs nothing here. The
changes not seen are ``param.data = other_tensor`` and a ``.to()``/cast of a submodule alone (not through the
model); call ``RWKV.clear_decode_weights()`` after one.
"""

import copy
import dataclasses
import operator

import torch
import torch.nn as nn


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
    lora_ranks: tuple[int, ...] = ()  # each LoRA's own rank (lora_first/second are zero-padded to the largest)

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


class _Reader:
    """Reads modules and parameters by name and records every hop as (container dict, key, object): the identity
    part of the invalidation rule is that each container still holds the same object under the same key."""

    def __init__(self):
        self.slots: list[tuple[dict, str, object]] = []

    def child(self, module, name: str):
        obj = module._modules[name]
        self.slots.append((module._modules, name, obj))
        return obj

    def param(self, module, name: str):
        obj = module._parameters.get(name)
        if obj is None:
            return None
        self.slots.append((module._parameters, name, obj))
        return obj


class NotReadable(Exception):
    """A block whose projections the C step cannot read as plain weights: a module that computes more than
    ``x @ Wᵀ`` (a LoRA adapter, peft's wrappers, any other module): its handle holds no layers and the step runs
    the blocks' own forward."""


def _scale(r: _Reader, linear) -> torch.Tensor:
    """An int8 ``QuantLinear``'s per-row scale (read live), else an empty fp32 tensor (the C step ignores it)."""
    scale = r.param(linear, "scale")
    return scale.detach() if scale is not None else linear.weight.new_empty(0, dtype=torch.float32)


@torch.no_grad()
def rwkv7_layer_weights(block, reader: _Reader | None = None) -> tuple[RWKV7LayerWeights, list[torch.nn.Parameter]]:
    """The decode weights of one RWKV-7 ``Block`` and the parameters whose values were copied into derived fields
    (``reader`` records every module and parameter read)."""
    r = reader or _Reader()
    att, ffn, ln1, ln2 = (r.child(block, n) for n in ("att", "ffn", "ln1", "ln2"))
    lin = {n: r.child(att, n) for n in ("receptance", "key", "value", "output", "ln_x")}
    fkey, fval = r.child(ffn, "key"), r.child(ffn, "value")
    p = {n: r.param(att, n) for n in ("x_r", "x_k", "x_v", "x_a", "x_w", "x_g", "a0", "a1", "a2", "w0", "w1", "w2",
                                      "g1", "g2", "k_a", "k_k", "r_k", "v0", "v1", "v2")}
    g1, g2 = p["g1"] / 2, p["g2"] / 2
    loras = [(p["a1"], p["a2"], p["a0"]), (p["w1"], p["w2"], p["w0"]), (g1, g2, g2.sum(0))]
    derived_from = [p[n] for n in ("x_r", "x_k", "x_v", "x_a", "x_w", "x_g", "a1", "a2", "a0", "w1", "w2", "w0",
                                   "g1", "g2", "k_a")]
    if att.layer_id > 0:
        loras.insert(0, (p["v1"], p["v2"], p["v0"]))
        derived_from += [p["v1"], p["v2"], p["v0"]]

    for proj in (*(lin[n] for n in ("receptance", "key", "value", "output")), fkey, fval):
        if not (type(proj) is nn.Linear or getattr(type(proj), "READ_BY_DECODE", False)):
            raise NotReadable(f"{type(proj).__name__} projection (a wrapper such as a LoRA adapter)")

    def w(module, name="weight"):
        return r.param(module, name).detach()

    weights = RWKV7LayerWeights(
        ln1_w=w(ln1), ln1_b=w(ln1, "bias"), ln2_w=w(ln2), ln2_b=w(ln2, "bias"),
        mus=torch.stack([p[n] for n in ("x_r", "x_k", "x_v", "x_a", "x_w", "x_g")]),
        lora_first=_stack_padded([m for m, _, _ in loras], dim=1).contiguous(),
        lora_second=_stack_padded([m for _, m, _ in loras], dim=0).contiguous(),
        lora_bias=torch.stack([b for _, _, b in loras]),
        one_minus_k_a=1 - p["k_a"], k_a=p["k_a"].detach(), k_k=p["k_k"].detach(), r_k=p["r_k"].detach().view(-1),
        w_r=w(lin["receptance"]), w_k=w(lin["key"]), w_v=w(lin["value"]), w_o=w(lin["output"]),
        ln_x_w=w(lin["ln_x"]), ln_x_b=w(lin["ln_x"], "bias"),
        ffn_x_k=w(ffn, "x_k"), ffn_key=w(fkey), ffn_value=w(fval),
        s_r=_scale(r, lin["receptance"]), s_k=_scale(r, lin["key"]), s_v=_scale(r, lin["value"]),
        s_o=_scale(r, lin["output"]), s_ffn_key=_scale(r, fkey), s_ffn_value=_scale(r, fval),
        n_lora=len(loras), lora_ranks=tuple(m.shape[1] for m, _, _ in loras),
        eps_ln1=ln1.eps, eps_ln2=ln2.eps, eps_ln_x=lin["ln_x"].eps,
    )
    return weights, derived_from


_version = operator.attrgetter("_version")
_get = dict.get


class DecodeWeights:
    """Every block's ``RWKV7LayerWeights`` for one model, rebuilt when stale by the module docstring's rule.

    Get one with ``model.decode_weights()`` and hold it for as long as you step (``model.step(x, s, weights=dw)``):
    each step then costs a few identity and version checks over this model's objects, never a rebuild unless one of
    them changed. ``current()`` returns the up-to-date handle (``layers`` valid); ``rebuilds`` counts the rebuilds
    after the first build. ``table`` is free for the C step to hang its pointer table on (built from these tensors,
    valid as long as they are) and ``extras`` for further derived forms (the batched engine's); both are dropped at
    every rebuild. A deep copy of the model copies an unbuilt handle."""

    def __init__(self, model):
        self.model = model
        self.layers: list[RWKV7LayerWeights] | None = None
        self.table = None
        self.extras: dict = {}  # further derived forms (the batched engine's), dropped at every rebuild
        self.rebuilds = 0
        self._builds = 0

    def _build(self) -> None:
        model = self.model
        reader = _Reader()
        blocks = reader.child(model, "blocks")
        try:
            built = [rwkv7_layer_weights(reader.child(blocks, str(i)), reader) for i in range(len(blocks))]
        except NotReadable:  # the step runs the blocks' forward; replacing the wrappers (e.g. a merge) rebuilds
            built = []
        watched = [p for _, ps in built for p in ps if not p.is_inference()]  # inference tensors have no version
        self._epoch = model._decode_epoch
        self._dicts, self._keys, self._objs = (tuple(x) for x in zip(*reader.slots))
        self._watched, self._versions = tuple(watched), list(map(_version, watched))
        self.layers, self.table, self.extras = [w for w, _ in built], None, {}
        self.rebuilds += self._builds > 0
        self._builds += 1

    def is_current(self) -> bool:
        if self.layers is None or self.model._decode_epoch != self._epoch:
            return False
        if not all(map(operator.is_, map(_get, self._dicts, self._keys), self._objs)):
            return False
        return list(map(_version, self._watched)) == self._versions

    def watch(self, params) -> None:
        """Add tensors that a further derived form (``extras``) was computed from to the version rule."""
        params = [p for p in params if not p.is_inference()]
        self._watched += tuple(params)
        self._versions += list(map(_version, params))

    def current(self) -> "DecodeWeights":
        """This handle with its layers up to date (rebuilt here if stale)."""
        if not self.is_current():
            self._build()
        return self

    def clear(self) -> None:
        """Drop the layers (rebuilt on the next ``current()``)."""
        self.layers = self.table = None
        self.extras = {}

    def __deepcopy__(self, memo):
        return DecodeWeights(copy.deepcopy(self.model, memo))

    def __getstate__(self):
        return {"model": self.model}

    def __setstate__(self, state):
        self.__init__(state["model"])
