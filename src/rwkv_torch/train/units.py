"""The unit of every loss a run reports: the progress bar, ``metrics.jsonl``, ``loss.png`` and the summary line.

A run's ``loss`` is the mean per position of the sum over its targets (``step.task_loss``): cross-entropy for a
categorical target, the mean binary cross-entropy of its bits for a Bernoulli one (both in nats), mean squared error
for a regression one (no unit of information). So the unit is:

| data | unit | beside it |
|---|---|---|
| text, byte tokenizer | ``nats/byte`` | bits per byte (nats / ln 2), the unit LM benchmarks compare |
| text, World tokens | ``nats/token`` | bits per token |
| episodes (``.npz``, ``.slp``) of categorical / Bernoulli targets | ``nats/frame`` | bits per frame |
| episodes with a regression target | ``nats+mse/frame`` | (none: MSE is not in bits) |
"""

import math

LN2 = math.log(2)


def loss_unit(data, tokenizer: str = "byte") -> str:
    """The unit of the loss of a run on ``data`` (a ``train.data.Dataset``) with ``tokenizer`` (text data)."""
    if data.is_text:
        return "nats/byte" if tokenizer == "byte" else "nats/token"
    if any(t.kind == "regression" for t in data.targets):
        return "nats+mse/frame"
    return "nats/frame"


def bits_unit(unit: str) -> str | None:
    """``"nats/byte"`` -> ``"bits/byte"``; None for a unit that is not information (a regression target's MSE)."""
    return "bits/" + unit.split("/", 1)[1] if unit.startswith("nats/") else None


def _bits_key(unit: str) -> str | None:
    b = bits_unit(unit)
    return None if b is None else b.replace("/", "_per_")  # "bits_per_byte"


def label_metrics(row: dict, unit: str) -> dict:
    """A ``metrics.jsonl`` row with its unit: ``loss_unit`` (for ``loss``, ``val_loss`` and the per-target
    ``loss_<target>`` parts) and, where the unit is information, the same losses in bits (``bits_per_byte``,
    ``val_bits_per_byte``; ``_frame`` / ``_token`` for other data). Returns ``row`` (changed in place)."""
    row["loss_unit"] = unit
    key = _bits_key(unit)
    if key is not None:
        if isinstance(row.get("loss"), (int, float)):
            row[key] = row["loss"] / LN2
        if isinstance(row.get("val_loss"), (int, float)):
            row[f"val_{key}"] = row["val_loss"] / LN2
    return row


def bar_postfix(loss: float, unit: str, rate: float, rate_unit: str, val_loss: float | None = None) -> dict:
    """The progress bar's postfix: the loss (and validation loss) with its unit, the throughput."""
    out = {"loss": f"{loss:.4f} {unit}", f"{rate_unit}/s": f"{rate:,.0f}"}
    if val_loss is not None:
        out["val"] = f"{val_loss:.4f}"
    return out


def with_unit(loss: float | None, unit: str) -> str:
    """``"1.2345 nats/byte (1.78 bits/byte)"``: a loss with its unit, and in bits where that applies."""
    if loss is None:
        return "n/a"
    b = bits_unit(unit)
    return f"{loss:.4f} {unit}" + (f" ({loss / LN2:.2f} {b})" if b is not None else "")


def summary_line(res: dict) -> str:
    """``train``'s last line: step, loss and validation loss with their unit (``res["loss_unit"]``; "nats" when a
    summary does not carry it), checkpoint."""
    unit = res.get("loss_unit") or "nats"
    val = f", val_loss {with_unit(res['val_loss'], unit)}" if res.get("val_loss") is not None else ""
    return f"step {res['step']}: loss {with_unit(res['loss'], unit)}{val}; checkpoint {res['checkpoint']}"


def axis_label(unit: str) -> str:
    """The y label of a loss plot."""
    return f"loss ({unit})"
