"""A streaming Melee policy: a model trained on replays (``rwkv-torch train --data DIR`` of ``.slp`` files) played one
frame at a time.

``Policy.from_run(run_dir)`` loads the newest checkpoint of a run. Each frame, ``act(frame, ids)`` takes the frame's
features (a row of ``frames``, ``[FRAME_WIDTH]`` float) and its ids (``{name: int or [K] ints}``, the row of each
``ids_<name>``), advances the carried recurrent state by one step (O(1): the C step for fp32 RWKV-7 on CPU) and
returns a ``Controller`` decoded from the heads: greedy (arg-max classes, buttons above one half) or sampled
(``sample=True``, reproducible with ``seed``). An autoregressive head (``train --controller-head``, the default for
replays) is decoded in its order, buttons, main stick, C-stick, shoulder, each head fed the values chosen before it.
``action_delay`` and ``feature_version`` come from the checkpoint. ``snapshot()`` / ``restore()`` rewind state,
position and the sampler (netplay rollback: restore then replay gives the same controllers). ``export_onnx`` writes
the whole step, id embeddings, backbone and heads (an autoregressive head decoded greedily in the graph), as one ONNX
graph."""

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..task import TaskModel, load_task_model
from .features import FEATURE_VERSION
from .targets import BUTTONS, HEAD_ORDER, SHOULDER_VALUES, STICK_VALUES, STICKS

# Each of the policy's buttons (``targets.BUTTONS``) -> the name of its ``melee.Button`` member (libmelee).
LIBMELEE_BUTTONS = {b: f"BUTTON_{b}" for b in BUTTONS}


@dataclass
class Controller:
    """One frame's controller: buttons pressed, sticks in [-1, 1] (0 = neutral), analog shoulder in [0, 1]."""

    buttons: dict = field(default_factory=lambda: dict.fromkeys(BUTTONS, False))
    main_x: float = 0.0
    main_y: float = 0.0
    c_x: float = 0.0
    c_y: float = 0.0
    shoulder: float = 0.0

    def as_libmelee(self) -> dict:
        """The controller in libmelee's terms: ``buttons`` ``{melee.Button: pressed}`` (``BUTTON_A`` ...
        ``BUTTON_D_UP``), sticks ``main``/``c`` as (x, y) in libmelee's 0..1 convention (0.5 = neutral) and the
        analog ``shoulder`` in 0..1, for ``melee.Controller``::

            for button, pressed in pad["buttons"].items():
                ctrl.press_button(button) if pressed else ctrl.release_button(button)
            ctrl.tilt_analog(melee.Button.BUTTON_MAIN, *pad["main"])
            ctrl.tilt_analog(melee.Button.BUTTON_C, *pad["c"])
            ctrl.press_shoulder(melee.Button.BUTTON_L, pad["shoulder"])

        Without libmelee installed the button keys are the names of those ``melee.Button`` members
        (``LIBMELEE_BUTTONS``: "A" -> "BUTTON_A", ..., "D_UP" -> "BUTTON_D_UP")."""
        try:
            from melee import Button
        except ImportError:
            key = LIBMELEE_BUTTONS.get
        else:
            key = lambda b: getattr(Button, LIBMELEE_BUTTONS[b])  # noqa: E731
        return dict(buttons={key(b): bool(v) for b, v in self.buttons.items()},
                    main=((self.main_x + 1) / 2, (self.main_y + 1) / 2), c=((self.c_x + 1) / 2, (self.c_y + 1) / 2),
                    shoulder=self.shoulder)


@dataclass
class PolicySnapshot:
    state: object
    position: int
    rng: torch.Tensor


class Policy:
    """A ``TaskModel`` with the controller heads of ``slippi.targets`` and an RWKV backbone, one frame at a time."""

    def __init__(self, model: TaskModel, *, sample: bool = False, seed: int = 0, temperature: float = 1.0,
                 action_delay: int | None = None, feature_version: int | None = None):
        if feature_version is not None and feature_version != FEATURE_VERSION:
            raise ValueError(f"the model was trained on features version {feature_version}; this rwkv-torch makes "
                             f"version {FEATURE_VERSION} (retrain, or use the rwkv-torch it was trained with)")
        self.action_delay, self.feature_version = action_delay, feature_version
        if not hasattr(model.backbone, "step_"):
            raise ValueError(f"a streaming policy needs an RWKV backbone (one step per frame), got "
                             f"{type(model.backbone).__name__}")
        need = {"buttons", *STICKS, "shoulder"}
        if not need <= set(model.heads):
            raise ValueError(f"the model has heads {sorted(model.heads)}; a Melee policy needs {sorted(need)} "
                             f"(a run trained on .slp replays)")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.model = model.eval()
        self.sample, self.temperature = sample, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.frame_dim = model.frame_dim
        self.id_columns = {s.name: s.columns for s in model.id_specs}
        self.decode_weights = model.backbone.decode_weights()  # this policy's handle, rebuilt only on weight changes
        self.reset()

    @classmethod
    def from_run(cls, run, **kw) -> "Policy":
        """The newest checkpoint of a training run (a run folder or a ``ckpt-*.pt`` file); ``kw`` as ``Policy``."""
        model, ckpt = load_task_model(run)
        return cls(model, **{**checkpoint_info(ckpt), **kw})

    def reset(self) -> None:
        """A new game: a fresh state."""
        self.state = self.model.init_state(1, device="cpu").clone()  # its own tensors: step_ writes into them
        self.position = 0

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(self.state.clone(), self.position, self.generator.get_state())

    def restore(self, snap: PolicySnapshot) -> None:
        self.state, self.position = snap.state.clone(), snap.position
        self.generator.set_state(snap.rng)

    def row(self, frame, ids: dict) -> torch.Tensor:
        """The model's input row ``[1, frame_dim + id columns]`` from one frame's features and ids."""
        frame = np.asarray(frame, dtype=np.float32).reshape(-1)
        if frame.shape[0] != self.frame_dim:
            raise ValueError(f"frame has {frame.shape[0]} features, the model was trained on {self.frame_dim}")
        if set(ids) != set(self.id_columns):
            raise ValueError(f"ids {sorted(ids)} do not match the model's {sorted(self.id_columns)}")
        cols = [frame]
        for spec in self.model.id_specs:
            v = np.asarray(ids[spec.name]).reshape(-1)
            if v.shape[0] != spec.columns or (v < 0).any() or (v >= spec.classes).any():
                raise ValueError(f"ids[{spec.name!r}] must be {spec.columns} ints in [0, {spec.classes}), got {v}")
            cols.append(v.astype(np.float32))
        return torch.from_numpy(np.concatenate(cols))[None]

    @property
    def controller_head(self) -> str:
        return self.model.controller_head

    def _advance(self, frame, ids: dict) -> torch.Tensor:
        x = self.model.join_ids(self.row(frame, ids))
        h = self.model.backbone.step_(x, self.state, weights=self.decode_weights)
        self.position += 1
        return h

    @torch.inference_mode()
    def logits(self, frame, ids: dict) -> dict:
        """Advance one frame; the heads' raw outputs ``{head: [size]}`` (an autoregressive head's conditioned on
        the greedy values before each)."""
        outs, _ = self.model.decode_heads(self._advance(frame, ids))
        return {name: o[0] for name, o in outs.items()}

    @torch.inference_mode()
    def act(self, frame, ids: dict) -> Controller:
        """Advance one frame; the controller to press (see the module doc)."""
        h = self._advance(frame, ids)
        if not self.model.order:
            return self.decode({name: o[0] for name, o in self.model.decode_heads(h)[0].items()})
        _, values = self.model.decode_heads(h, choose=self.choose)
        return self.controller({k: v[0] for k, v in values.items()})

    def choose(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """One head's value from its output ``[..., size]``: greedy, or drawn from the policy's generator."""
        t = self.temperature
        if name == "buttons":
            if not self.sample:
                return (out > 0).to(out.dtype)
            return (torch.rand(out.shape, generator=self.generator) < torch.sigmoid(out / t)).to(out.dtype)
        if not self.sample:
            return out.argmax(-1)
        p = torch.softmax(out.reshape(-1, out.shape[-1]) / t, -1)
        return torch.multinomial(p, 1, generator=self.generator).reshape(out.shape[:-1])

    def decode(self, out: dict) -> Controller:
        """The controller from independent heads' outputs ``{head: [size]}`` (drawn in ``HEAD_ORDER``)."""
        return self.controller({name: self.choose(name, out[name]) for name in HEAD_ORDER})

    @staticmethod
    def controller(values: dict) -> Controller:
        """``{head: value}`` (button bits ``[8]``, class ids) -> the ``Controller``."""
        return Controller(buttons={b: bool(v) for b, v in zip(BUTTONS, values["buttons"].tolist())},
                          **{s: float(STICK_VALUES[int(values[s])]) for s in STICKS},
                          shoulder=float(SHOULDER_VALUES[int(values["shoulder"])]))

    def export_onnx(self, path, opset: int = 17):
        """The whole step as one ONNX graph: inputs ``frame [B, frame_dim]`` float32, ``ids [B, id columns]``
        int64 (the ``ids_*`` columns in name order), then the state as in ``export.export_onnx``; outputs
        ``heads [B, sum of head sizes]`` (heads in name order; an autoregressive head's conditioned on the greedy
        values before each) then the new state. The model's metadata (``metadata()``) rides in the graph's
        ``metadata_props``."""
        from ..checks import check_output_file
        from ..export import state_names

        check_output_file(path, str(path))
        graph = _PolicyGraph(self.model).eval()
        L = self.model.backbone.config.num_layers
        state = self.model.init_state(1, device="cpu")
        frame = torch.zeros(1, self.frame_dim)
        ids = torch.zeros(1, sum(self.id_columns.values()), dtype=torch.long)
        ins, outs = ["frame", "ids", *state_names(L)], ["heads", *state_names(L, "_out")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (frame, ids, *state.flat()), str(path), input_names=ins, output_names=outs,
                              dynamic_axes={n: {0: "batch"} for n in ins + outs}, opset_version=opset, dynamo=False)
        try:
            import onnx
        except ImportError:
            warnings.warn("onnx is not installed: the graph is written without its metadata", stacklevel=2)
            return path
        proto = onnx.load(str(path))
        for k, v in self.metadata().items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(path))
        return path

    def head_sizes(self) -> dict:
        """``{head: size}`` in the order of the ONNX graph's ``heads`` output."""
        return {name: head.out_features for name, head in self.model.heads.items()}

    def metadata(self) -> dict:
        """What a player of the ONNX graph needs to know, as strings (JSON lists/dicts): ``action_delay``,
        ``feature_version``, ``controller_head``, ``head_order`` (the decode order), ``head_sizes`` (the ``heads``
        output's slices, in order), ``id_columns`` (the ``ids`` input's columns: ``[[name, K], ...]``)."""
        import json

        order = list(self.model.order) or list(HEAD_ORDER)
        return dict(action_delay=json.dumps(self.action_delay), feature_version=json.dumps(self.feature_version),
                    controller_head=self.controller_head, head_order=json.dumps(order),
                    head_sizes=json.dumps(list(self.head_sizes().items())),
                    id_columns=json.dumps([[s.name, s.columns] for s in self.model.id_specs]))


def checkpoint_info(ckpt: dict) -> dict:
    """The policy's ``action_delay`` and ``feature_version`` from a training checkpoint (None where it does not
    say: a checkpoint from before they were recorded)."""
    meta = ckpt.get("data_meta") or {}
    return dict(action_delay=meta.get("action_delay", ckpt.get("config", {}).get("action_delay")),
                feature_version=meta.get("feature_version"))


class _PolicyGraph(nn.Module):
    def __init__(self, model: TaskModel):
        super().__init__()
        from ..decode import StepGraph

        self.model, self.step = model, StepGraph(model.backbone)

    def forward(self, frame, ids, *flat):
        x = self.model.join_ids(torch.cat([frame, ids.to(frame.dtype)], dim=-1))
        h, *new = self.step(x, *flat)
        return (torch.cat(list(self.model.decode_heads(h)[0].values()), dim=-1), *new)
