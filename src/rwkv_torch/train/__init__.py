"""Training: ``train(config)`` (``rwkv-torch train``) for the RWKV backbones and the transformer/LSTM baselines,
on ``.npz`` episodes or text, stateful across windows, resumable, single process or torchrun/DDP.

``config`` (TrainConfig), ``loop`` (train), ``step`` (one optimizer step, evaluation), ``model`` (build_model, the
optimizer recipe), ``finetune`` (--init-from), ``checkpointing``, ``distributed``, ``signals``, ``data``, ``plots``.
The task model, LoRA, the baselines and the episode format are ``rwkv_torch.task``'s.
"""

from .checkpointing import CHECKPOINT_FORMAT, RESUME_OVERRIDES, find_checkpoint, save_checkpoint
from .config import BACKBONES, TrainConfig, as_config
from .data import Dataset, check_window, load_data, make_batch, split_by_sequence, window_counts, window_plans
from .loop import train
from .model import LR_SCALE, TaskModel, adamw, build_model, load_task_model, lr_factor, param_groups
from .step import L2Wrap, evaluate, task_loss, train_step

__all__ = [
    "BACKBONES", "CHECKPOINT_FORMAT", "LR_SCALE", "RESUME_OVERRIDES", "L2Wrap", "TaskModel", "TrainConfig",
    "adamw", "as_config", "build_model", "evaluate", "find_checkpoint", "load_task_model", "lr_factor", "param_groups",
    "save_checkpoint", "task_loss", "train", "train_step",
    "Dataset", "check_window", "load_data", "make_batch", "split_by_sequence", "window_counts", "window_plans",
]
