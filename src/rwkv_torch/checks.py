"""What users pass by name: device names (``--device``, ``device=``), input and output paths, checked once, with
one-line errors, before any work."""

from pathlib import Path

import torch


def check_device(device: str, *, flag: str = "--device", allowed=("cpu", "cuda", "mps")) -> torch.device:
    """The ``torch.device`` for ``device`` when torch knows it and this machine has it; else a ValueError that names
    the flag and what to use instead."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {device!r} is not a device: use cpu, cuda, cuda:1, ... or mps") from None
    if d.type not in allowed:
        raise ValueError(f"{flag} {device}: this runs on {', '.join(allowed)}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA GPU is available here (use {flag} cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available here (use {flag} cpu)")
    return d


def check_output_file(path, name: str) -> None:
    """An output file's folder must exist and the path must not be a folder; ``name`` starts the message (a flag and
    the path, or the path)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{name}: the folder {p.parent} does not exist")


def input_files(path, suffix: str, what: str) -> list[Path]:
    """The files an input path names: every ``*<suffix>`` under a folder (sorted; none is a ValueError naming
    ``what``), or the one file given. A missing path is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob(f"*{suffix}"))
        if not files:
            raise ValueError(f"{path}: directory has no {suffix} {what} files")
        return files
    if path.is_file():
        return [path]
    raise ValueError(f"{path}: no such file or directory")


def check_threads(threads, flag: str = "--threads") -> int | None:
    """A CPU thread count (``--threads`` of ``demo``, ``check``, ``stream-bench``): None (torch's choice) or an int
    >= 1; else a ValueError naming the flag (torch's own error is a RuntimeError without it)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{flag} must be >= 1 (leave it out for torch's choice), got {threads}")
    return threads
