"""What is trained: ``TaskModel`` (a backbone plus one head per target), ``build_model``, and the official RWKV
optimizer recipe (spec 4.7): ``param_groups``, the ``lr_factor`` schedule and ``adamw``.

``att.w0`` (v7) / ``time_decay`` (v4-v6) at 2x lr and v4 ``time_first`` at 3x; weight decay only on 2-D
``.weight`` tensors; a warm-up factor ``0.01 + 0.99 * step / warmup`` on a cosine from ``lr`` to ``lr_final``.
"""

import math

import torch
import torch.nn as nn

from ..config import param_count
from ..model import build
from . import finetune
from .baselines import build_baseline, matched_width
from .config import TrainConfig
from .data import Dataset, IdSpec, Target

LR_SCALE = {"att.w0": 2.0, "att.time_decay": 2.0, "att.time_first": 3.0}


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
        self.state0 = None  # finetune.InitialState when the initial wkv state is learned (--train-state)

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


def build_model(cfg: TrainConfig, data: Dataset) -> TaskModel:
    """The backbone named by ``cfg.backbone`` for ``data``; baselines get about the RWKV model's parameter count.

    With ``cfg.init_from`` the weights come from there (``finetune.load_init_weights``); then LoRA
    (``lora_rank``), the learned initial state (``train_state``) and the frozen/trainable split of the fine-tuning
    mode are applied (``train/finetune.py``)."""
    torch.manual_seed(cfg.seed)
    model = _from_init(cfg, data) if cfg.init_from is not None else _fresh(cfg, data)
    if cfg.train_state:
        model.state0 = finetune.InitialState(model.backbone.init_state(1))
    if cfg.lora_rank is not None:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",")) if cfg.lora_targets else None
        finetune.apply_lora(model.backbone, cfg.lora_rank, cfg.lora_alpha or float(cfg.lora_rank),
                            targets or finetune.DEFAULT_LORA_TARGETS)
    if cfg.finetune_mode:
        also = tuple(t.strip() for t in cfg.train_also.split(",")) if cfg.train_also else ()
        finetune.freeze_for_finetune(model, also)
    return model


def _input_width(data: Dataset) -> int:
    """Features per frame the backbone reads: the float columns plus the embeddings of the ``ids_*`` columns."""
    return (data.embed_dim or 0) + sum(i.columns * id_embed_dim(i.classes) for i in data.ids)


def _fresh(cfg: TrainConfig, data: Dataset) -> TaskModel:
    ids = list(data.ids)
    io = dict(vocab_size=data.vocab_size) if data.is_text else dict(embed_dim=_input_width(data))
    rwkv = dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, head_size=cfg.head_size, dropout=cfg.dropout,
                **io)
    if cfg.backbone.startswith("rwkv"):
        backbone = build(version=int(cfg.backbone[4:]), seed=cfg.seed, **rwkv)
        width = cfg.hidden_size
    else:
        opts = dict(num_layers=cfg.num_layers, head_size=cfg.head_size, max_len=cfg.window_size,
                    dropout=cfg.dropout, **io)
        width = matched_width(cfg.backbone, param_count(**rwkv), **opts)
        backbone = build_baseline(cfg.backbone, width=width, **opts)
    return TaskModel(backbone, data.targets, width, data.is_text, ids, data.embed_dim)


def _from_init(cfg: TrainConfig, data: Dataset) -> TaskModel:
    """A TaskModel for ``data`` holding the weights ``cfg.init_from`` names (architecture checks: ``init_config``)."""
    kind, loaded = finetune.load_init_weights(cfg.init_from)
    if kind == "run":  # the run's model (a fine-tune's base plus its trained tensors, LoRA merged), all trainable
        try:
            trained = finetune.merge_lora(_checkpoint_model(loaded, data))
        except RuntimeError as e:
            raise ValueError(f"--init-from {cfg.init_from}: its model does not fit this data (targets, ids or input "
                             f"width differ): {str(e).splitlines()[0]}") from None
        if trained.state0 is not None:
            raise ValueError(f"--init-from {cfg.init_from}: a state-tuning run; fine-tune its base model")
        plain = dict.fromkeys(("init_from", "lora_rank", "lora_alpha", "lora_targets", "train_also"))
        model = _fresh(_saved_config(loaded, **plain, train_state=False), data)
        model.load_state_dict(trained.state_dict())
        return model
    backbone = loaded
    c = backbone.config
    if data.is_text:
        if c.vocab_size != data.vocab_size:
            from ..tokenizer import TOKENIZER_BY_VOCAB

            need = TOKENIZER_BY_VOCAB.get(c.vocab_size, "of its own (none known for that vocab)")
            raise ValueError(f"--init-from {cfg.init_from}: a model of vocab {c.vocab_size}, the data has vocab "
                             f"{data.vocab_size} (--tokenizer {cfg.tokenizer}; this model needs --tokenizer {need})")
        return TaskModel(backbone, data.targets, c.hidden_size, True)
    if c.embed_dim != _input_width(data):
        raise ValueError(f"--init-from {cfg.init_from}: a backbone of embed_dim {c.embed_dim}, the episodes give "
                         f"{_input_width(data)} input features")
    return TaskModel(backbone, data.targets, c.output_size, False, list(data.ids), data.embed_dim)


def load_task_model(run) -> tuple[TaskModel, dict]:
    """The model of a training run's newest checkpoint (a run folder or a ``ckpt-*.pt`` file), in eval mode on CPU,
    and the checkpoint itself (its ``config``, ``targets``, ``step``, ...). A fine-tuning run's checkpoint holds its
    trainable tensors only: the weights come from its ``init_from`` first; LoRA comes back merged."""
    from .checkpointing import CHECKPOINT_FORMAT, find_checkpoint

    path = find_checkpoint(run)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rwkv-torch training checkpoint")
    data = Dataset([], [Target(**t) for t in ckpt["targets"]], ckpt["embed_dim"], ckpt["vocab_size"],
                   ids=[IdSpec(**i) for i in ckpt.get("ids", [])])
    return finetune.merge_lora(_checkpoint_model(ckpt, data)).eval(), ckpt


def _saved_config(ckpt: dict, **overrides) -> TrainConfig:
    """A checkpoint's TrainConfig as a description of its model (not of a run to continue)."""
    return TrainConfig(**{**ckpt["config"], "resume": None, "out": None, **overrides})


def _checkpoint_model(ckpt: dict, data: Dataset) -> TaskModel:
    """The model a training checkpoint holds, built for ``data``; a fine-tune's partial checkpoint is loaded over
    its ``init_from`` weights. Raises RuntimeError when the weights do not fit ``data``'s model."""
    model = build_model(_saved_config(ckpt), data)
    model.load_state_dict(ckpt["model"], strict=not ckpt.get("partial", False))
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """Adam groups of the official recipe: lr scale by name (``LR_SCALE``), decay on 2-D ``.weight`` only."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for suffix, s in LR_SCALE.items() if name.endswith(suffix)), 1.0)
        decay = weight_decay if p.dim() >= 2 and name.endswith(".weight") else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [dict(params=ps, lr=lr * s, weight_decay=d) for (s, d), ps in groups.items()]


def adamw(params, *, lr: float, device="cpu", **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors) on CPU and CUDA, where torch has that form: on CPU 3-5x
    faster per step than the default per-tensor loop, which costs RWKV's many small parameters most
    (benchmarks/RESULTS.md, "Training cost")."""
    return torch.optim.AdamW(params, lr=lr, fused=torch.device(device).type in ("cpu", "cuda") or None, **kwargs)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on each group's lr: cosine from 1 to ``lr_final / lr`` over ``steps``, times the warm-up."""
    final = min(1.0, cfg.lr_final / cfg.lr)
    progress = min(1.0, step / max(1, cfg.steps))
    factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor * (0.01 + 0.99 * step / cfg.warmup if step < cfg.warmup else 1.0)


def unwrap_model(model):
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers (or the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
