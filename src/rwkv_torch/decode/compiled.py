"""``RWKV.compile_step``: the spec form at T = 1 (``StepGraph``) compiled ahead of time by AOTInductor.

On CPU the C step is faster (benchmarks/RESULTS.md); this serves where it does not apply: other dtypes, devices
(CUDA), or a deployment that wants one precompiled artefact with no Python per layer.
"""

import tempfile
from pathlib import Path

import torch

from ..state import RWKVState
from .graph import StepGraph


class CompiledStep:
    """``RWKV.step`` compiled ahead of time for one batch size (``RWKV.compile_step``).

    ``step(x_t, state) -> (out, new state)`` and ``step_(x_t, state) -> out`` behave as the model's (same inputs,
    checks and results up to fp32 rounding); ``init_state()`` and ``is_token_model`` make it usable by ``Stream``. It
    holds a snapshot of the weights: compile again after changing the model.
    """

    def __init__(self, model, batch_size: int = 1):
        inductor = getattr(torch, "_inductor", None)
        if not hasattr(inductor, "aoti_compile_and_package"):
            raise RuntimeError(f"compile_step needs torch >= 2.6 (AOTInductor); this is torch {torch.__version__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.config, self.batch_size = model, model.config, batch_size
        c, p = model.config, next(model.parameters())
        x = (torch.zeros(batch_size, dtype=torch.long) if model.is_token_model
             else torch.zeros(batch_size, c.embed_dim, dtype=p.dtype))
        state = model.init_state(batch_size, device=p.device)
        graph = StepGraph(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                program = torch.export.export(graph, (x.to(p.device), *state.flat()), strict=False)
                self._dir = tempfile.TemporaryDirectory(prefix="rwkv-step-")
                package = inductor.aoti_compile_and_package(program,
                                                            package_path=str(Path(self._dir.name) / "step.pt2"))
        finally:
            model.train(was_training)
        self._run = inductor.aoti_load_package(package)
        self._state_dtypes = [t.dtype for t in state.flat()]

    @property
    def is_token_model(self) -> bool:
        return self.model.is_token_model

    def init_state(self, batch_size: int | None = None) -> RWKVState:
        return self.model.init_state(batch_size or self.batch_size)

    def step(self, x_t, state: RWKVState | None = None):
        """Like ``RWKV.step`` (batch size fixed at compile time)."""
        self.model._check_input(x_t, time_axis=False)
        if x_t.shape[0] != self.batch_size:
            raise ValueError(f"compiled for batch size {self.batch_size}, input has batch size {x_t.shape[0]}")
        state = self.init_state() if state is None else state
        self.model._check_state(state, self.batch_size)
        if not self.model.is_token_model:
            x_t = x_t.to(self.model.input_proj.weight.dtype)
        # The compiled code assumes the example's (contiguous) strides and does not check them.
        flat = (t.to(dt).contiguous() for t, dt in zip(state.flat(), self._state_dtypes))
        out, *flat = self._run(x_t.contiguous(), *flat)
        return out, RWKVState.from_flat(flat, state.meta)

    def step_(self, x_t, state: RWKVState) -> torch.Tensor:
        """Like ``RWKV.step_``: the new state is copied into ``state``'s tensors."""
        out, new = self.step(x_t, state)
        for old, t in zip(state.flat(), new.flat()):
            old.copy_(t)
        return out
