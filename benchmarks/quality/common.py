"""Shared pieces of the quality benchmarks: models at a matched parameter count, the machine line, result files.

Each script (``recall.py``, ``lm.py``, ``control.py``) imports this module from its own folder.
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import rwkv_torch as rt
from rwkv_torch.train import TrainConfig, adamw, build_model, param_groups
from rwkv_torch.train.data import Dataset, Target

RESULTS = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("rwkv7", "rwkv6", "rwkv4", "transformer", "lstm")
LABELS = {"rwkv7": "RWKV-7", "rwkv6": "RWKV-6", "rwkv5": "RWKV-5", "rwkv4": "RWKV-4", "transformer": "Transformer",
          "lstm": "LSTM"}
# Line styles that keep overlapping curves apart (RWKV-7 and RWKV-6 often coincide).
STYLES = {"rwkv7": "o-", "rwkv6": "s--", "rwkv5": "v-.", "rwkv4": "^-.", "transformer": "D-", "lstm": "x:"}


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test settings (< 1 minute)")
    p.add_argument("--out", default=None,
                   help=f"folder for <name>.md and <name>.png (default: a new scratch folder under the system's temp "
                        f"folder; --out {RESULTS.relative_to(RESULTS.parents[2])} refreshes the committed results)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def quick_defaults(p: argparse.ArgumentParser, args, **values) -> None:
    """With ``--quick``: each option the user left at its default takes the smoke-test value in ``values``."""
    if args.quick:
        for k, v in values.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)


def out_dir(args) -> Path:
    """``--out``, else a new scratch folder (the committed ``results/`` change only when ``--out`` names them)."""
    if args.out is not None:
        d = Path(args.out)
    else:
        d = Path(tempfile.mkdtemp(prefix="rwkv-quality-"))
        print(f"writing to the scratch folder {d} (--out {RESULTS} refreshes the committed results)", flush=True)
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}, fp32")


def build(backbone: str, *, hidden_size: int, num_layers: int, head_size: int, max_len: int, seed: int,
          vocab_size: int | None = None, embed_dim: int | None = None, targets: list | None = None):
    """``rwkv_torch.train.build_model``: RWKV-v at ``hidden_size``; the baselines at the width whose parameter
    count is closest to the RWKV-7 model of that size (the trainer's rule). Returns a ``TaskModel``."""
    if vocab_size is not None:
        data = Dataset([], [Target("next", "categorical", vocab_size)], vocab_size=vocab_size)
    else:
        data = Dataset([], targets, embed_dim=embed_dim)
    cfg = TrainConfig(backbone=backbone, hidden_size=hidden_size, num_layers=num_layers, head_size=head_size,
                      window_size=max_len, seed=seed)
    return build_model(cfg, data)


def optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the official recipe's groups (``train.param_groups``) and betas (0.9, 0.99), fused where torch has
    that form (``train.adamw``, as the trainer builds it) for every model alike."""
    return adamw(param_groups(model, lr, weight_decay), lr=lr, betas=(0.9, 0.99), eps=1e-8)


def width_of(model) -> int:
    b = model.backbone
    return b.config.hidden_size if isinstance(b, rt.RWKV) else b.out.ln.weight.shape[0]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, name: str, title: str, command: str, body: str, seconds: float) -> Path:
    text = (f"# {title}\n\n`{command}`\n\nMachine: {machine()}. Run time {seconds:.0f} s "
            f"({time.strftime('%Y-%m-%d')}).\n\n{body}\n")
    path = out / f"{name}.md"
    path.write_text(text)
    return path


def command_line(name: str, argv: list | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/quality/{name}.py", *args])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
