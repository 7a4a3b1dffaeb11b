"""``TaskModel``: a backbone with one head per episode target (a text model: the backbone's own LM head), its id
embeddings, and ``InitialState``, the learned start state of a state-tuned model."""

import torch
import torch.nn as nn

from ..state import RWKVState
from .episodes import Dataset


class TaskModel(nn.Module):
    """A backbone (``[B, T, in] -> [B, T, width]``) with one linear head per episode target; a text model uses the
    backbone's own LM head. ``forward(x, state) -> ({target: out [B, T, size]}, state)``."""

    def __init__(self, backbone: nn.Module, targets: list, width: int, lm: bool, ids: list = (),
                 frame_dim: int | None = None):
        super().__init__()
        self.backbone, self.lm = backbone, lm
        # ids_<name> inputs (data.IdSpec): their columns follow the frame_dim float columns of x; each is looked up
        # in its own learned table and the embeddings are joined to the frames before the backbone.
        self.frame_dim = frame_dim
        self.id_specs = list(ids)
        self.id_embed = nn.ModuleDict({i.name: nn.Embedding(i.classes, id_embed_dim(i.classes)) for i in ids})
        self.heads = nn.ModuleDict() if lm else nn.ModuleDict({t.name: nn.Linear(width, t.size) for t in targets})
        self.target_names = [t.name for t in targets]
        self.state0 = None  # InitialState when the initial wkv state is learned (--train-state)

    def init_state(self, batch_size: int, device=None):
        """The state every sequence starts from: zeros, or the learned initial state (``state0``)."""
        state = self.backbone.init_state(batch_size, device=device)
        return state if self.state0 is None else self.state0.apply(state)

    def _join_ids(self, x):
        if not self.id_specs:
            return x
        parts, at = [x[..., :self.frame_dim]], self.frame_dim
        for spec in self.id_specs:
            ids = x[..., at:at + spec.columns].long()  # [B, T, K]
            parts.append(self.id_embed[spec.name](ids).flatten(-2))  # [B, T, K * dim]
            at += spec.columns
        return torch.cat(parts, dim=-1)

    def forward(self, x, state, cu_seqlens=None):
        x = self._join_ids(x)
        # cu_seqlens: episodes packed along T in x [1, T, ...] (RWKV backbones only; see RWKV.forward).
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        h, state = self.backbone(x, state, return_sequence=True, return_state=True, **packed)
        if self.lm:
            return {self.target_names[0]: h}, state
        return {name: head(h) for name, head in self.heads.items()}, state


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
