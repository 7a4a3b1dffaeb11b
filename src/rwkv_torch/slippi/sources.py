"""What ``rwkv_torch.train`` reads through this package: ``train(config, sources=DATA_SOURCES)`` (the CLI passes it;
the trainer does not import the Melee package). Keys are ``train.data.SOURCE_SUFFIX``'s: a ``.slp`` replay or folder
of them, and a dataset written by ``rwkv-torch prepare-replays``."""

from pathlib import Path

from ..task import Dataset, episodes_dataset
from .replays import DEFAULT_ACTION_DELAY, load_dataset


def load_prepared(path, action_delay: int = DEFAULT_ACTION_DELAY, progress: bool = True) -> Dataset:
    """A dataset written by ``rwkv-torch prepare-replays`` as a training Dataset, its games read from their files
    when a batch first touches them (``slippi.dataset.training_data``: resident memory bounded, not one list of
    every episode); the filters saved with it applied."""
    from .dataset import training_data  # pyarrow: only a prepared dataset needs it

    return training_data(Path(path), episodes_dataset, action_delay, progress)


DATA_SOURCES = {".slp": load_dataset, "slippi-dataset": load_prepared}
