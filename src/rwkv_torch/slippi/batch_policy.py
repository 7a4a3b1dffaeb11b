"""Many Melee games in one step: the batched player a UMI bot (``slippi.bot``) answers with, and the weights it carries.

``BatchPolicy`` plays many games in one step: ``initial_state(n)`` is the RWKV state of n new games as a list of
tensors with the batch on axis 0 (the flat order of ``RWKVState.flat``) plus each game's frame counter; ``act(frames,
state, first, games)`` turns the UMI frames into rows (``slippi.umi.umi_rows``, the features of ``load_replay``),
resets the rows of games on their first frame, steps every row at once (``RWKV.step_`` at batch N: the C step on CPU)
and returns the controller rows, f32 ``[N, 13]`` in UMI's order (sticks and shoulder in [0, 1], 0.5 a neutral stick,
then the 8 buttons as 0/1). Rows are independent: a padding row changes no real game. Greedy by default (arg-max
classes, buttons above one half: the same controller as ``Policy.act``); ``sample=True`` draws each game's controller
from a counter-based generator keyed by (seed, game handle, frame), so a game's draws depend on nothing else in its
batch. An autoregressive head is decoded in its order (buttons, main stick, C-stick, shoulder), each head fed the
values drawn (or picked) before it, from the same uniforms. Rows are never NaN or out of range: a row whose outputs
are not finite gets the neutral controller and its game a fresh state.
"""

from pathlib import Path

import numpy as np
import torch

from ..state import RWKVState
from .targets import BUTTONS, SHOULDER_VALUES, STICK_VALUES, STICKS
from .umi import umi_rows

CTRL_WIDTH = 5 + len(BUTTONS)  # UMI's controller row: main_x, main_y, c_x, c_y, shoulder, then BUTTONS
NEUTRAL = np.array([0.5] * 4 + [0.0] * (1 + len(BUTTONS)), np.float32)
STICK_UNIT = ((STICK_VALUES + 1) / 2).astype(np.float32)  # a stick class -> UMI's [0, 1] value
ROW_LIMIT = 1e4  # float features beyond this (garbage, never a real frame) are clipped
WEIGHTS = "weights/model.pt"


class BatchPolicy:
    """A ``TaskModel`` with the controller heads and an RWKV backbone, stepping N games per call."""

    def __init__(self, model, *, sample: bool = False, seed: int = 0, temperature: float = 1.0):
        from .policy import Policy

        Policy(model)  # the same checks: an RWKV backbone with the controller heads
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.model, self.sample, self.seed, self.temperature = model.eval(), sample, int(seed), float(temperature)
        self.meta = model.backbone.state_meta()
        self.decode_weights = model.backbone.decode_weights()  # this player's handle: rebuilt only on weight changes

    @classmethod
    def load(cls, path, **kw) -> "BatchPolicy":
        """From a run (folder or ``ckpt-*.pt``) or a bot's ``weights/model.pt``."""
        return cls(load_weights(path), **kw)

    def initial_state(self, n: int) -> list:
        state = self.model.init_state(n, device="cpu")
        return [t.detach().clone().contiguous() for t in state.flat()] + [torch.zeros(n, dtype=torch.int64)]

    def inputs(self, frames) -> torch.Tensor:
        """UMI frames ``[N]`` -> the model's input rows ``[N, frame_dim + id columns]`` (ids clamped into the
        model's tables)."""
        with np.errstate(all="ignore"):  # garbage floats become zeros (features) or are clipped (below)
            rows, ids = umi_rows(frames)
        if rows.shape[1] != self.model.frame_dim:
            raise ValueError(f"the model reads {self.model.frame_dim} features per frame, UMI frames give "
                             f"{rows.shape[1]}: a run trained on other features")
        cols = [np.clip(rows, -ROW_LIMIT, ROW_LIMIT)]
        for spec in self.model.id_specs:
            v = np.asarray(ids[spec.name]).reshape(len(rows), -1)
            cols.append(np.clip(v, 0, spec.classes - 1).astype(np.float32))
        return torch.from_numpy(np.concatenate(cols, axis=1))

    @torch.inference_mode()
    def step(self, x: torch.Tensor, state: list, first=None, u=None) -> tuple[dict, list]:
        """One step of every row: ``({head: [N, size]}, state)``; rows with ``first`` start from a fresh state. An
        autoregressive head is decoded greedily, or with ``u`` (``[N, 13]`` uniforms, see ``controls``) by the
        draws ``controls`` makes from them."""
        state = [t.contiguous() for t in state]
        if first is not None and np.any(first):
            rows = torch.from_numpy(np.flatnonzero(first))
            for t, t0 in zip(state, self.initial_state(len(rows))):
                t.index_copy_(0, rows, t0.to(t.dtype))
        flat, t = state[:-1], state[-1]
        rwkv = RWKVState.from_flat(flat, self.meta)
        h = self.model.backbone.step_(self.model.join_ids(x), rwkv, weights=self.decode_weights)
        choose = None
        if self.model.order:
            def choose(name, logits):
                v = self._choose(name, logits.detach().double().numpy(), u)
                return torch.from_numpy(v).to(logits.dtype if name == "buttons" else torch.long)
        heads, _ = self.model.decode_heads(h, choose=choose)
        return heads, rwkv.flat() + [t + 1]

    def _choose(self, name: str, logits: np.ndarray, u) -> np.ndarray:
        """One head's value per row (class ids, or button bits as 0/1) from its float64 outputs: greedy, or drawn
        from the uniforms ``u`` (columns: ``STICKS`` and the shoulder, then the buttons)."""
        temp = self.temperature
        if name == "buttons":
            if not self.sample:
                return (logits > 0).astype(np.float64)  # sigmoid above one half
            with np.errstate(over="ignore"):
                return (u[:, 5:] < 1 / (1 + np.exp(-logits / temp))).astype(np.float64)
        j = (*STICKS, "shoulder").index(name)
        return _draw(logits / temp, u[:, j]) if self.sample else np.argmax(np.nan_to_num(logits, nan=-np.inf), 1)

    def uniforms(self, n: int, games=None, t=None):
        """The ``[n, 13]`` uniforms of each row's draws when sampling (None when greedy)."""
        if not self.sample:
            return None
        return _uniforms(self.seed, np.zeros(n) if games is None else games, np.zeros(n) if t is None else t,
                         len(BUTTONS) + len(STICKS) + 1)

    def controls(self, heads: dict, games=None, t=None) -> tuple[np.ndarray, np.ndarray]:
        """The heads' outputs -> (controller rows f32 ``[N, 13]``, bool ``[N]``: rows whose outputs were not finite,
        given the neutral controller); ``games``, ``t``: each row's game handle and frame (the keys of its draws when
        sampling)."""
        out = {k: v.detach().double().numpy() for k, v in heads.items()}
        n = len(out["buttons"])
        u = self.uniforms(n, games, t)
        ctrl = np.empty((n, CTRL_WIDTH), np.float32)
        for j, (name, values) in enumerate([(s, STICK_UNIT) for s in STICKS] + [("shoulder", SHOULDER_VALUES)]):
            ctrl[:, j] = values[self._choose(name, out[name], u)]
        ctrl[:, 5:] = self._choose("buttons", out["buttons"], u)
        bad = ~np.all([np.isfinite(v).all(axis=1) for v in out.values()], axis=0)
        ctrl[bad] = NEUTRAL
        return np.clip(np.nan_to_num(ctrl, nan=0.5), 0.0, 1.0), bad

    def act(self, frames, state: list, first=None, games=None) -> tuple[np.ndarray, list]:
        """UMI frames of N games -> (controller rows f32 ``[N, 13]``, their new state)."""
        x = self.inputs(frames)
        t = np.asarray(state[-1]).copy()  # each row's frame (rows with ``first`` restart at 0)
        if first is not None:
            t[np.asarray(first, bool)] = 0
        u = self.uniforms(len(x), games, t) if self.model.order else None
        heads, state = self.step(x, state, first, u)
        ctrl, bad = self.controls(heads, games, state[-1].numpy() - 1)
        if bad.any():  # a game whose outputs went non-finite starts over rather than play NaN forever
            rows = torch.from_numpy(np.flatnonzero(bad))
            for s, s0 in zip(state, self.initial_state(len(rows))):
                s.index_copy_(0, rows, s0.to(s.dtype))
        return ctrl, state


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, games, t, k: int) -> np.ndarray:
    """``[N, k]`` uniforms in [0, 1), a function of (seed, game, t, column) only."""
    with np.errstate(over="ignore"):
        key = _splitmix(np.full(len(games), seed % 2**64, np.uint64))
        key = _splitmix(key ^ np.asarray(games).astype(np.uint64))
        key = _splitmix(key ^ np.asarray(t).astype(np.int64).astype(np.uint64))
        bits = _splitmix(key[:, None] ^ np.arange(1, k + 1, dtype=np.uint64)[None])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One class per row from softmax(logits), by inverting its CDF at ``u``."""
    z = np.nan_to_num(logits, nan=-np.inf, posinf=1e30, neginf=-np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.nan_to_num(np.exp(z))
    cdf = np.cumsum(p, axis=1)
    total = cdf[:, -1:]
    cls = (cdf < u[:, None] * np.where(total > 0, total, 1)).sum(axis=1)
    return np.minimum(cls, logits.shape[1] - 1)


# ---- the weights a bot carries

def load_weights(path):
    """The ``TaskModel`` of a run (folder or ``ckpt-*.pt``) or of a bot's ``weights/model.pt``, eval mode, CPU."""
    from ..task import load_task_model
    from ..task.model import InitialState

    model, ckpt = load_task_model(path)
    if ckpt.get("state0_wkv") is not None:
        template = model.backbone.init_state(1)
        model.state0 = InitialState(template)
        with torch.no_grad():
            for p, t in zip(model.state0.wkv, ckpt["state0_wkv"]):
                p.copy_(t)
    return model.eval()


def save_weights(run, path) -> dict:
    """A run's model (a fine-tune merged: LoRA folded in, its base's weights included) as one plain checkpoint
    that ``load_weights`` reads; returns its training config."""
    from ..task import load_task_model

    model, ckpt = load_task_model(run)
    c = model.backbone.config
    arch = dict(backbone=f"rwkv{c.version}", hidden_size=c.hidden_size, num_layers=c.num_layers, head_size=c.head_size)
    plain = dict(init_from=None, lora_rank=None, lora_alpha=None, lora_targets=None, train_also=None,
                 train_state=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("state0.")}
    out = dict(format=ckpt["format"], format_version=ckpt.get("format_version", 1), step=ckpt.get("step", 0),
               config={**ckpt["config"], **arch, **plain}, targets=ckpt["targets"], embed_dim=ckpt["embed_dim"],
               ids=ckpt.get("ids", []), vocab_size=ckpt["vocab_size"], partial=False, model=state,
               data_meta=ckpt.get("data_meta", {}), held_out=ckpt.get("held_out", []), run_cwd=ckpt.get("run_cwd"),
               state0_wkv=None if model.state0 is None else [p.detach().clone() for p in model.state0.wkv])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return ckpt["config"]
