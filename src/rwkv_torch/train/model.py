"""What is trained: ``build_model`` (``task.build_task_model`` for a TrainConfig), and the official RWKV
optimizer recipe (spec 4.7): ``param_groups``, the ``lr_factor`` schedule and ``adamw``.

``att.w0`` (v7) / ``time_decay`` (v4-v6) at 2x lr and v4 ``time_first`` at 3x; weight decay only on 2-D
``.weight`` tensors; a warm-up factor ``0.01 + 0.99 * step / warmup`` on a cosine from ``lr`` to ``lr_final``.
"""

import math

import torch
import torch.nn as nn

from ..task import Dataset, TaskModel, build_task_model, load_task_model  # noqa: F401 (load_task_model: re-exported)
from .config import TrainConfig

LR_SCALE = {"att.w0": 2.0, "att.time_decay": 2.0, "att.time_first": 3.0}


def build_model(cfg: TrainConfig, data: Dataset) -> TaskModel:
    """The model ``cfg`` describes for ``data`` (``task.build_task_model``): the backbone named by ``cfg.backbone``
    (baselines get about the RWKV model's parameter count), with the weights of ``cfg.init_from`` where given, then
    LoRA, the learned initial state and the frozen/trainable split of a fine-tune."""
    return build_task_model(cfg, data)


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
