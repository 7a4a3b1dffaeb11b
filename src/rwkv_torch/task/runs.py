"""Building and loading task models: ``build_task_model`` (a fresh or ``init_from`` model for a Dataset, with LoRA and
a learned start state where asked) and ``load_task_model`` (the model of a training run's checkpoint), for the
trainer and for whoever plays a trained run (the Slippi policy) alike.

The options are those of ``rwkv_torch.train.TrainConfig`` (a TrainConfig, or a checkpoint's ``config`` dict): the
backbone and its sizes, ``init_from``, ``lora_*``, ``train_state``, ``train_also``.
"""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..config import param_count
from ..model import build
from . import lora
from .baselines import build_baseline, matched_width
from .episodes import Dataset, IdSpec, Target
from .model import InitialState, TaskModel, autoregressive_order, input_width

CHECKPOINT_FORMAT = "rwkv-torch-train"
# What a model description needs beside the backbone and its sizes, where an older checkpoint's config lacks it.
OPTION_DEFAULTS = dict(seed=0, dropout=0.0, init_from=None, lora_rank=None, lora_alpha=None, lora_targets=None,
                       train_state=False, train_also=None, tokenizer="byte", window_size=256,
                       controller_head=None)  # None: independent heads (checkpoints from before the option)


def model_options(cfg, **overrides) -> SimpleNamespace:
    """The model options of a TrainConfig or a config dict (``OPTION_DEFAULTS`` filling what is absent)."""
    if isinstance(cfg, SimpleNamespace):
        d = vars(cfg)
    else:
        d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return SimpleNamespace(**{**OPTION_DEFAULTS, **d, **overrides})


def finetune_mode(o) -> bool:
    """LoRA, state tuning or --train-also: most weights frozen, checkpoints hold only the trainable tensors."""
    return o.lora_rank is not None or bool(o.train_state) or o.train_also is not None


def find_checkpoint(path) -> Path:
    """A checkpoint file, or the newest ``ckpt-*.pt`` in a run directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("ckpt-*.pt"))
        if not found:
            raise ValueError(f"{path}: no ckpt-*.pt checkpoint to resume from")
        return found[-1]
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    return path


def build_task_model(cfg, data: Dataset) -> TaskModel:
    """The backbone named by ``cfg.backbone`` for ``data``; baselines get about the RWKV model's parameter count.

    With ``cfg.init_from`` the weights come from there (``load_init_weights``); then LoRA
    (``lora_rank``), the learned initial state (``train_state``) and the frozen/trainable split of the fine-tuning
    mode are applied (``task/lora.py``)."""
    cfg = model_options(cfg)
    torch.manual_seed(cfg.seed)
    model = _from_init(cfg, data) if cfg.init_from is not None else _fresh(cfg, data)
    if cfg.train_state:
        model.state0 = InitialState(model.backbone.init_state(1))
    if cfg.lora_rank is not None:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",")) if cfg.lora_targets else None
        lora.apply_lora(model.backbone, cfg.lora_rank, cfg.lora_alpha or float(cfg.lora_rank),
                            targets or lora.DEFAULT_LORA_TARGETS)
    if finetune_mode(cfg):
        also = tuple(t.strip() for t in cfg.train_also.split(",")) if cfg.train_also else ()
        lora.freeze_for_finetune(model, also)
    return model


def _fresh(cfg, data: Dataset) -> TaskModel:
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
    return TaskModel(backbone, data.targets, width, data.is_text, ids, data.embed_dim, head_order(cfg, data))


def head_order(cfg, data: Dataset) -> tuple:
    """The autoregressive order of ``data``'s targets when ``cfg.controller_head`` is ``"autoregressive"``, else
    () (independent heads)."""
    return autoregressive_order(data.targets) if getattr(cfg, "controller_head", None) == "autoregressive" else ()


def _from_init(cfg, data: Dataset) -> TaskModel:
    """A TaskModel for ``data`` holding the weights ``cfg.init_from`` names (architecture checks: ``init_config``)."""
    kind, loaded = load_init_weights(cfg.init_from)
    if kind == "run":  # the run's model (a fine-tune's base plus its trained tensors, LoRA merged), all trainable
        trained = lora.merge_lora(_checkpoint_model(loaded, data, f"--init-from {cfg.init_from}"))
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
    return TaskModel(backbone, data.targets, c.output_size, False, list(data.ids), data.embed_dim,
                     head_order(cfg, data))


def load_task_model(run) -> tuple[TaskModel, dict]:
    """The model of a training run's newest checkpoint (a run folder or a ``ckpt-*.pt`` file), in eval mode on CPU,
    and the checkpoint itself (its ``config``, ``targets``, ``step``, ...). A fine-tuning run's checkpoint holds its
    trainable tensors only: the weights come from its ``init_from`` first; LoRA comes back merged."""
    path = find_checkpoint(run)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rwkv-torch training checkpoint")
    data = Dataset([], [Target(**t) for t in ckpt["targets"]], ckpt["embed_dim"], ckpt["vocab_size"],
                   ids=[IdSpec(**i) for i in ckpt.get("ids", [])])
    return lora.merge_lora(_checkpoint_model(ckpt, data)).eval(), ckpt


def _saved_config(ckpt: dict, **overrides) -> SimpleNamespace:
    """A checkpoint's config as a description of its model (not of a run to continue)."""
    return model_options(ckpt["config"], **overrides)


def _checkpoint_model(ckpt: dict, data: Dataset, source: str = "the checkpoint") -> TaskModel:
    """The model a training checkpoint holds, built for ``data``; a fine-tune's partial checkpoint is loaded over
    its ``init_from`` weights. Raises ValueError saying what differs when the weights do not fit ``data``'s model."""
    model = build_task_model(_saved_config(ckpt), data)
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


def load_init_weights(path) -> tuple[str, object]:
    """What ``--init-from PATH`` names: ``("run", checkpoint dict)`` for a training run (folder or ``ckpt-*.pt``),
    ``("model", RWKV)`` for a native model directory or an official ``.pth``. Raises ValueError for anything else."""
    from ..checkpoints import load

    p = Path(path)
    if (p.is_dir() and any(p.glob("ckpt-*.pt"))) or (p.is_file() and p.suffix == ".pt"):
        ck = torch.load(find_checkpoint(p), map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--init-from {path}: not an rwkv-torch training checkpoint")
        return "run", ck
    try:
        return "model", load(p, dtype=torch.float32)
    except FileNotFoundError:
        raise ValueError(f"--init-from {path}: no such file or directory") from None
    except ValueError as e:
        raise ValueError(f"--init-from {path}: {e}") from None
