"""What is trained: ``build_model`` (a ``task.TaskModel``: a backbone plus one head per target), ``load_task_model``,
and the official RWKV
optimizer recipe (spec 4.7): ``param_groups``, the ``lr_factor`` schedule and ``adamw``.

``att.w0`` (v7) / ``time_decay`` (v4-v6) at 2x lr and v4 ``time_first`` at 3x; weight decay only on 2-D
``.weight`` tensors; a warm-up factor ``0.01 + 0.99 * step / warmup`` on a cosine from ``lr`` to ``lr_final``.
"""

import math

import torch
import torch.nn as nn

from ..config import param_count
from ..model import build
from ..task import Dataset, IdSpec, Target, TaskModel, id_embed_dim, input_width  # noqa: F401 (re-exported)
from . import finetune
from .baselines import build_baseline, matched_width
from .config import TrainConfig

LR_SCALE = {"att.w0": 2.0, "att.time_decay": 2.0, "att.time_first": 3.0}


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


def _fresh(cfg: TrainConfig, data: Dataset) -> TaskModel:
    ids = list(data.ids)
    io = dict(vocab_size=data.vocab_size) if data.is_text else dict(embed_dim=input_width(data))
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
        trained = finetune.merge_lora(_checkpoint_model(loaded, data, f"--init-from {cfg.init_from}"))
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
    if c.embed_dim != input_width(data):
        raise ValueError(f"--init-from {cfg.init_from}: a backbone of embed_dim {c.embed_dim}, the episodes give "
                         f"{input_width(data)} input features")
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


def _checkpoint_model(ckpt: dict, data: Dataset, source: str = "the checkpoint") -> TaskModel:
    """The model a training checkpoint holds, built for ``data``; a fine-tune's partial checkpoint is loaded over
    its ``init_from`` weights. Raises ValueError saying what differs when the weights do not fit ``data``'s model."""
    model = build_model(_saved_config(ckpt), data)
    load_weights(model, ckpt["model"], strict=not ckpt.get("partial", False), source=source)
    return model


def load_weights(model: nn.Module, state_dict: dict, *, strict: bool = True, source: str = "the checkpoint") -> None:
    """``model.load_state_dict`` that, when the tensors do not fit, raises ValueError naming what differs: the
    tensors whose shapes disagree (an input width of 8 against 40, another number of classes), and the missing or
    unexpected names (targets or ids the data has and the weights lack, or the other way round)."""
    own = model.state_dict()
    shapes = [f"{k} {list(v.shape)} (this data's model: {list(own[k].shape)})" for k, v in state_dict.items()
              if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(own))
    if shapes or missing or unexpected:
        parts = [f"{len(shapes)} tensor(s) of another shape: {', '.join(shapes[:4])}" if shapes else "",
                 f"missing {_names(missing)}" if missing else "",
                 f"unexpected {_names(unexpected)}" if unexpected else ""]
        width = next((f"; input width {v.shape[-1]} in {source}, {own[k].shape[-1]} from this data"
                      for k, v in state_dict.items() if k.endswith("input_proj.weight") and k in own
                      and own[k].shape != v.shape), "")
        raise ValueError(f"{source}: its model does not fit this data (targets, ids or input width differ): "
                         + "; ".join(p for p in parts if p) + width)
    model.load_state_dict(state_dict, strict=strict)


def _names(keys: list, limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


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
