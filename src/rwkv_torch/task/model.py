"""``TaskModel``: a backbone with one head per episode target (a text model: the backbone's own LM head), its id
embeddings, and ``InitialState``, the learned start state of a state-tuned model.

Heads are independent (one linear layer each on the backbone output) or autoregressive (``order``): the targets
predicted one after another in ``order``, each head (a small MLP) reading the backbone output joined to a learned
embedding of the values of the targets before it: the true values in training (teacher forcing, ``forward(...,
targets=ys)``), the values chosen when playing (``decode_heads(h, choose)``; greedy without ``choose``). The joint
likelihood of a frame's targets is then the product of the per-target terms (``frame_nll``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..state import RWKVState
from .episodes import Dataset

# The autoregressive order of the Melee controller (``slippi.targets.HEAD_ORDER``): buttons, main stick, C-stick,
# shoulder. ``autoregressive_order`` puts a dataset's targets in this order (others after, by name).
CONTROLLER_ORDER = ("buttons", "main_x", "main_y", "c_x", "c_y", "shoulder")
VALUE_EMBED = 32  # width of the learned embedding of one target's value, fed to the heads after it
CONTROLLER_HEADS = ("autoregressive", "independent")


class TaskModel(nn.Module):
    """A backbone (``[B, T, in] -> [B, T, width]``) with one head per episode target: independent linear heads, or
    autoregressive ones in ``order`` (see the module doc); a text model uses the backbone's own LM head.
    ``forward(x, state, targets=None) -> ({target: out [B, T, size]}, state)``."""

    def __init__(self, backbone: nn.Module, targets: list, width: int, lm: bool, ids: list = (),
                 frame_dim: int | None = None, order: tuple = ()):
        super().__init__()
        self.backbone, self.lm = backbone, lm
        # ids_<name> inputs (data.IdSpec): their columns follow the frame_dim float columns of x; each is looked up
        # in its own learned table and the embeddings are joined to the frames before the backbone.
        self.frame_dim = frame_dim
        self.id_specs = list(ids)
        self.id_embed = nn.ModuleDict({i.name: nn.Embedding(i.classes, id_embed_dim(i.classes)) for i in ids})
        self.target_names = [t.name for t in targets]
        self.order = tuple(order)  # empty: independent heads
        if lm and self.order:
            raise ValueError("an autoregressive head is for episode targets, not a language model")
        if self.order:
            if sorted(self.order) != sorted(self.target_names):
                raise ValueError(f"autoregressive order {self.order} must name every target {self.target_names}")
            kinds = {t.name: t for t in targets}
            at = {n: i for i, n in enumerate(self.order)}
            self.heads = nn.ModuleDict({t.name: ARHead(width + VALUE_EMBED * at[t.name], width, t.size)
                                        for t in targets})
            self.value_embed = nn.ModuleDict({
                n: nn.Embedding(kinds[n].size, VALUE_EMBED) if kinds[n].kind == "categorical"
                else nn.Linear(kinds[n].size, VALUE_EMBED, bias=False) for n in self.order[:-1]})
            self.target_kinds = {t.name: t.kind for t in targets}
        else:
            self.heads = nn.ModuleDict() if lm else nn.ModuleDict({t.name: nn.Linear(width, t.size)
                                                                   for t in targets})
        self.state0 = None  # InitialState when the initial wkv state is learned (--train-state)

    def init_state(self, batch_size: int, device=None):
        """The state every sequence starts from: zeros, or the learned initial state (``state0``)."""
        state = self.backbone.init_state(batch_size, device=device)
        return state if self.state0 is None else self.state0.apply(state)

    def join_ids(self, x):
        """``x [..., frame_dim + id columns]`` (the ids as floats after the frame) -> ``[..., backbone input]``: the
        frame joined with the learned embedding of every id column (what the backbone reads)."""
        if not self.id_specs:
            return x
        parts, at = [x[..., :self.frame_dim]], self.frame_dim
        for spec in self.id_specs:
            ids = x[..., at:at + spec.columns].long()  # [B, T, K]
            parts.append(self.id_embed[spec.name](ids).flatten(-2))  # [B, T, K * dim]
            at += spec.columns
        return torch.cat(parts, dim=-1)

    @property
    def controller_head(self) -> str:
        return "autoregressive" if self.order else "independent"

    def forward(self, x, state, cu_seqlens=None, targets: dict | None = None):
        """``({target: out [B, T, size]}, state)``; an autoregressive head is teacher-forced on ``targets``
        (``{name: [B, T] class ids or [B, T, K] values}``) where given, decoded greedily otherwise."""
        x = self.join_ids(x)
        # cu_seqlens: episodes packed along T in x [1, T, ...] (RWKV backbones only; see RWKV.forward).
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        h, state = self.backbone(x, state, return_sequence=True, return_state=True, **packed)
        if self.lm:
            return {self.target_names[0]: h}, state
        return self.decode_heads(h, targets=targets)[0], state

    def greedy(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """The most likely value of one target from its head's output: a class id, bits above one half, the mean."""
        kind = self.target_kinds[name] if self.order else None
        if kind == "categorical":
            return out.argmax(-1)
        return (out > 0).to(out.dtype) if kind == "bernoulli" else out

    def decode_heads(self, h, choose=None, targets: dict | None = None) -> tuple[dict, dict]:
        """The heads on backbone outputs ``h [..., width]``: ``({target: out}, {target: value})`` in target (name)
        order. Independent heads: every output from ``h`` (values: none). Autoregressive: in ``order``, each head
        sees ``h`` and the embedded values before it: ``targets[name]`` (teacher forcing), else ``choose(name,
        out)`` (a sampler), else the greedy value."""
        if not self.order:
            return {name: head(h) for name, head in self.heads.items()}, {}
        outs, values, ctx = {}, {}, [h]
        for i, name in enumerate(self.order):
            out = self.heads[name](torch.cat(ctx, -1) if len(ctx) > 1 else h)
            outs[name] = out
            if targets is not None:
                v = targets[name]
            else:
                v = choose(name, out) if choose is not None else self.greedy(name, out)
            values[name] = v
            if i + 1 < len(self.order):
                emb = self.value_embed[name]
                ctx.append(emb(v.long()) if isinstance(emb, nn.Embedding) else emb(v.to(h.dtype)))
        return {n: outs[n] for n in self.target_names}, values


class ARHead(nn.Module):
    """One autoregressive head: a linear layer plus an MLP, ``Linear(x) + Linear(GELU(Linear(x)))`` (the linear path
    learns as fast as an independent head; the MLP adds what the values before it change beyond a bias)."""

    def __init__(self, in_features: int, width: int, size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, size
        self.linear = nn.Linear(in_features, size)
        self.hidden, self.out = nn.Linear(in_features, width), nn.Linear(width, size)

    def forward(self, x):
        return self.linear(x) + self.out(F.gelu(self.hidden(x)))


def autoregressive_order(targets: list) -> tuple:
    """The targets' names in ``CONTROLLER_ORDER``, any others after it by name."""
    rank = {n: i for i, n in enumerate(CONTROLLER_ORDER)}
    return tuple(sorted((t.name for t in targets), key=lambda n: (rank.get(n, len(rank)), n)))


def frame_nll(outs: dict, ys: dict, targets: list) -> dict:
    """Per-frame negative log-likelihood in nats of each categorical / Bernoulli target, ``{name: [...]}``
    (a Bernoulli target's bits summed). With an autoregressive head teacher-forced on ``ys`` their sum is the
    joint NLL of the frame's targets."""
    out = {}
    for t in targets:
        o, y = outs[t.name].float(), ys[t.name]
        if t.kind == "categorical":
            out[t.name] = F.cross_entropy(o.reshape(-1, t.size), y.reshape(-1).long(),
                                          reduction="none").reshape(y.shape)
        elif t.kind == "bernoulli":
            out[t.name] = F.binary_cross_entropy_with_logits(o, y.float(), reduction="none").sum(-1)
    return out


def id_embed_dim(classes: int) -> int:
    """Width of the learned table of an ``ids_<name>`` input with ``classes`` ids: min(32, classes)."""
    return min(32, classes)


def input_width(data: Dataset) -> int:
    """Features per frame the backbone reads: the float columns plus the embeddings of the ``ids_*`` columns."""
    return (data.embed_dim or 0) + sum(i.columns * id_embed_dim(i.classes) for i in data.ids)


class InitialState(nn.Module):
    """The trainable initial wkv state of every layer (``wkv_<l>``, ``[H, N, N]`` each, fp32)."""

    def __init__(self, template: RWKVState):
        super().__init__()
        self.wkv = nn.ParameterList([nn.Parameter(t[0].detach().clone().float()) for t in template.wkv])

    def apply(self, state: RWKVState) -> RWKVState:
        """``state`` with each layer's wkv replaced by the learned one, broadcast over the batch (differentiable)."""
        B = state.batch_size
        wkv = [p.unsqueeze(0).expand(B, *p.shape).to(t.dtype) for p, t in zip(self.wkv, state.wkv)]
        return RWKVState(list(state.shift_att), list(state.shift_ffn), wkv, dict(state.meta))

    def as_state(self, template: RWKVState) -> RWKVState:
        """An ``RWKVState`` of batch 1 to save: zero token-shift states, the learned wkv states."""
        one = template.select(slice(0, 1))
        return RWKVState([t.detach().clone() for t in one.shift_att], [t.detach().clone() for t in one.shift_ffn],
                         [p.detach().clone().unsqueeze(0) for p in self.wkv], dict(one.meta))
