"""Stream: one frame in, one output out, with O(1) state, snapshots for rollback and a reset."""

import torch

from .state import RWKVState


class Stream:
    """Run a model (an ``RWKV`` or an ``export.OnnxStep``) one frame or token at a time.

    ``push(frame)`` takes ``[embed_dim]`` (or ``[B, embed_dim]``; a token id or ``[B]`` ids for token models) and
    returns the output for that position. ``snapshot()`` returns an independent copy of the state;
    ``restore(snap)`` rewinds to it, so restore-then-replay reproduces the same outputs bit for bit (netplay
    rollback). ``reset()`` starts a fresh sequence. With an ``RWKV`` model the state is updated in place
    (``model.step_``): ``stream.state`` is owned by the stream, copy it with ``snapshot()``; the stream holds its own
    decode-weights handle (``model.decode_weights()``, ``None`` for other models), rebuilt only when the model's
    weights change.
    """

    def __init__(self, model, batch_size: int = 1):
        self.model = model
        self.batch_size = batch_size
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.decode_weights = model.decode_weights() if hasattr(model, "decode_weights") else None
        self.reset()

    def reset(self) -> None:
        self.state = self.model.init_state(self.batch_size)
        self.position = 0

    @torch.inference_mode()
    def push(self, frame) -> torch.Tensor:
        x = torch.as_tensor(frame)
        single = x.dim() == (0 if self.model.is_token_model else 1)
        if single:
            x = x.unsqueeze(0)
        if self.decode_weights is not None:
            y = self.model.step_(x, self.state, weights=self.decode_weights)
        elif hasattr(self.model, "step_"):
            y = self.model.step_(x, self.state)
        else:
            y, self.state = self.model.step(x, self.state)
        self.position += 1
        return y[0] if single else y

    def snapshot(self) -> tuple[RWKVState, int]:
        return self.state.clone(), self.position

    def restore(self, snap: tuple[RWKVState, int]) -> None:
        state, position = snap
        self.state, self.position = state.clone(), position

    def state_bytes(self) -> int:
        """Bytes held by the recurrent state (constant in the sequence length)."""
        return sum(t.numel() * t.element_size() for t in self.state.tensors().values())

