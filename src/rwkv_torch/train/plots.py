"""The ``loss.png`` plot of a run directory's ``metrics.jsonl`` (when matplotlib is installed): training and
validation loss against the optimizer step, in the unit the rows name (``loss_unit``, see ``units``), with the
same curve read in bits on the right-hand axis where the unit is information (bits per byte / token / frame)."""

import json
from pathlib import Path

from .units import LN2, axis_label, bits_unit


def write_plot(run_dir: Path) -> bool:
    """Write ``loss.png``; False when matplotlib is not installed (nothing written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    unit = next((r["loss_unit"] for r in rows if "loss_unit" in r), "nats")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_title(f"{run_dir.name}: loss per step ({unit})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(axis_label(unit))
    bits = bits_unit(unit)
    if bits is not None:  # the same curve in bits, the unit a reader compares models in
        right = ax.secondary_yaxis("right", functions=(lambda x: x / LN2, lambda x: x * LN2))
        right.set_ylabel(f"loss ({bits})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return True
