"""Training checkpoints: the atomic ``ckpt-<step>.pt`` writer (keeping the newest few), ``find_checkpoint`` and
the config of a resumed run."""

import os
import shutil
from pathlib import Path

import torch

from ..task import CHECKPOINT_FORMAT, find_checkpoint  # noqa: F401 (re-exported)
from .config import TrainConfig

# Fields a resumed run may change; everything else comes from the checkpoint.
RESUME_OVERRIDES = ("steps", "stop_after", "time_limit", "device", "eval_every", "save_every", "log_every",
                    "keep_checkpoints", "progress", "gradient_checkpoint", "compile")


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically (temp file + os.replace) and keep only the newest ``keep``."""
    path = run_dir / f"ckpt-{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    for old in sorted(run_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def _run_files(run_dir: Path) -> list:
    """The files and folders of a training run in ``run_dir`` (checkpoints, metrics, config, plot, model)."""
    if not run_dir.is_dir():
        return []
    names = ("config.json", "metrics.jsonl", "loss.png", "model", "state.safetensors")
    return sorted(list(run_dir.glob("ckpt-*.pt*")) + [run_dir / n for n in names if (run_dir / n).exists()])


def claim_run_dir(run_dir: Path, overwrite: bool, lead: bool = True, delete: bool = True) -> None:
    """A new run in ``run_dir``: refuse a folder holding another run, or (``overwrite``) delete that run's files
    (on the lead rank, and only with ``delete``: a check before the run is known to start deletes nothing)."""
    found = _run_files(run_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"{run_dir}: holds another run ({shown}); continue it with --resume {run_dir}, give "
                         f"another --out, or pass --overwrite to delete that run first")
    if lead and delete:
        for p in found:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def resume_config(cfg: TrainConfig, given: dict) -> tuple:
    ckpt_path = find_checkpoint(cfg.resume)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt_path}: not an rwkv-torch training checkpoint")
    saved = dict(ckpt["config"])
    saved.update({k: v for k, v in given.items() if k in RESUME_OVERRIDES and v is not None})
    saved["stop_after"] = given.get("stop_after")  # limits of the earlier invocation, not of the run
    saved["time_limit"] = given.get("time_limit")
    saved.update(resume=str(ckpt_path), out=str(ckpt_path.parent), overwrite=False)
    return TrainConfig(**saved), ckpt
