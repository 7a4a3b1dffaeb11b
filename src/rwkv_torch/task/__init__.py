"""The task layer, shared by ``train`` and ``slippi`` (neither imports the other): the episode format
(``episodes``), ``TaskModel`` and the learned start state (``model``), LoRA (``lora``), the transformer, LSTM and
residual-LSTM baselines (``baselines``), and building and loading task models and training checkpoints (``runs``)."""

from .episodes import MAX_ID, Dataset, IdSpec, Sequence, Target, episodes_dataset
from .model import InitialState, TaskModel, id_embed_dim, input_width
from .runs import (
    CHECKPOINT_FORMAT,
    build_task_model,
    find_checkpoint,
    load_init_weights,
    load_task_model,
    load_weights,
)

__all__ = [
    "CHECKPOINT_FORMAT", "MAX_ID", "Dataset", "IdSpec", "InitialState", "Sequence", "Target", "TaskModel",
    "build_task_model", "episodes_dataset", "find_checkpoint", "id_embed_dim", "input_width", "load_init_weights",
    "load_task_model", "load_weights",
]
