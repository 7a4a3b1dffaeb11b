"""Stream: one frame in, one output out, with O(1) state, snapshots for rollback and a reset."""

import torch

from .state import RWKVState


class Stream:
    """Run a model (an ``RWKV`` or an ``export.OnnxStep``) one frame or token at a time.

    ``push(frame)`` takes ``[embed_dim]`` (or ``[B, embed_dim]``; a token id or ``[B]`` ids for token models) and
    returns the output for that position. ``snapshot()`` returns an independent copy of the state;
    ``restore(snap)`` rewinds to it, so restore-then-replay reproduces the same outputs bit for bit (netplay
    rollback). ``reset()`` starts a fresh sequence. With an ``RWKV`` model the state is updated in place
    (``model.step_``): ``stream.state`` is owned by the stream, copy it with ``snapshot()``.
    """

    def __init__(self, model, batch_size: int = 1):
        self.model = model
        self.batch_size = batch_size
        if isinstance(model, torch.nn.Module):
            model.eval()
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
        if hasattr(self.model, "step_"):
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


def bench_stream(model, frames: int = 10_000, *, warmup: int = 100, seed: int = 0) -> dict:
    """Per-frame latency of ``Stream(model).push`` over ``frames`` random frames (or tokens), batch 1.

    Returns ``{"p50_ms", "p99_ms", "mean_ms", "frames"}``."""
    import time

    g = torch.Generator().manual_seed(seed)
    s = Stream(model)
    c = model.config
    if c.vocab_size is not None:
        xs = torch.randint(0, c.vocab_size, (warmup + frames,), generator=g)
    else:
        xs = torch.randn(warmup + frames, c.embed_dim, generator=g)
    lat = []
    for i, x in enumerate(xs):
        t0 = time.perf_counter()
        s.push(x)
        if i >= warmup:
            lat.append(time.perf_counter() - t0)
    ms = torch.tensor(lat, dtype=torch.float64) * 1e3
    return dict(p50_ms=ms.quantile(0.5).item(), p99_ms=ms.quantile(0.99).item(), mean_ms=ms.mean().item(),
                frames=frames)
