"""One step of the spec form as a traceable module over flat state tensors: what ONNX export and ``compile_step``
trace. It is the model's own forward at T = 1 (the naive WKV step), without the input checks (they read values)."""

import torch.nn as nn

from ..state import RWKVState


class StepGraph(nn.Module):
    """``(x_t, *state.flat()) -> (out, *new_state.flat())`` for an ``RWKV`` model (any version)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, *flat):
        m = self.model
        state = RWKVState.from_flat(flat, m.state_meta())
        h = m._embed_unchecked(x_t).unsqueeze(1)
        out = m._head(m._blocks(h, state, "naive")[:, 0])
        return (out, *state.flat())
