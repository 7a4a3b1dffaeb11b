"""Fine-tuning evidence: a small byte-level RWKV-7 pre-trained on one corpus, then fine-tuned on another three ways
(all weights, LoRA, the initial state), each with the same steps and batches.

    python benchmarks/bench_finetune.py [--threads 2] [--pre-steps 400] [--steps 150] [--quick]

Pre-training: the Python standard library's sources (``rwkv-torch train``'s default corpus, ``--pre-bytes``).
Fine-tuning target: the English licence texts in ``--target`` (default ``/usr/share/common-licenses``: GPL, Apache,
Artistic, ... ; held out by file). Every run is ``rwkv_torch.train.train`` with the flags shown in the table, the
same window, batch, seed and number of steps; held-out loss in bits per byte on the target's held-out files (the
same batches for every row; state carried across windows as in deployment). Checkpoint size is the newest
``ckpt-*.pt`` (model or trainable tensors, plus optimizer state). Prints a markdown table; nothing is written
outside a temporary folder.
"""

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_cpu import machine

import rwkv_torch as rt
from rwkv_torch.train import evaluate, load_task_model
from rwkv_torch.train import train as run_train
from rwkv_torch.train.config import TrainConfig
from rwkv_torch.train.data import load_data, split_by_sequence


def heldout_bpb(run: Path, cfg: TrainConfig) -> float:
    """Held-out bits per byte of the run's final model on the target's validation files."""
    model, _ = load_task_model(run)
    data = load_data(cfg.data, cfg.max_bytes, cfg.tokenizer)
    _, val = split_by_sequence(data, cfg.val_fraction, cfg.seed)
    return evaluate(model, val, cfg, torch.device("cpu"))["val_loss"] / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="/usr/share/common-licenses")
    ap.add_argument("--pre-bytes", type=int, default=2_000_000)
    ap.add_argument("--pre-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = ap.parse_args()
    if args.quick:
        args.pre_steps, args.steps, args.hidden, args.layers, args.pre_bytes = 4, 3, 32, 2, 100_000
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch {torch.__version__}, rwkv_torch {rt.__version__}, {args.threads} threads")
    common = dict(window_size=128, batch_size=8, eval_batches=8, seed=0, progress=False, warmup=10, log_every=50)
    root = Path(tempfile.mkdtemp(prefix="rwkv-finetune-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        run_train(dict(max_bytes=args.pre_bytes, steps=args.pre_steps, hidden_size=args.hidden,
                             num_layers=args.layers, head_size=32, lr=3e-3, eval_every=args.pre_steps,
                             out=str(root / "pre"), **common))
        pre_s = time.perf_counter() - t0
        tune = dict(data=args.target, steps=args.steps, eval_every=args.steps, val_fraction=0.25, **common)
        cfg0 = TrainConfig(**tune)
        base = rt.load(root / "pre" / "model")
        rows = [("pre-trained, no fine-tuning", "-", base.param_count(), None, pre_s,
                 heldout_bpb(root / "pre", cfg0))]
        runs = {
            "full fine-tune (all weights)": (dict(lr=1e-3), "--init-from PRE --lr 1e-3"),
            f"LoRA r={args.lora_rank}": (dict(lora_rank=args.lora_rank, lr=3e-3),
                                         f"--init-from PRE --lora-rank {args.lora_rank} --lr 3e-3"),
            "state tuning": (dict(train_state=True, lr=0.1), "--init-from PRE --train-state --lr 0.1"),
        }
        for name, (extra, flags) in runs.items():
            out = root / name.split()[0].lower()
            t0 = time.perf_counter()
            res = run_train(dict(init_from=str(root / "pre" / "model"), out=str(out), **tune, **extra))
            secs = time.perf_counter() - t0
            ck = torch.load(res["checkpoint"], weights_only=True)
            model, _ = load_task_model(out)
            held = ck["model"].values() if ck.get("partial") else model.parameters()  # partial: trainable only
            trainable = sum(t.numel() for t in held)
            rows.append((name, flags, trainable, Path(res["checkpoint"]).stat().st_size, secs,
                         heldout_bpb(out, cfg0)))
    print(f"\nPre-trained: RWKV-7 C{args.hidden} L{args.layers}, {args.pre_steps} steps on the Python stdlib "
          f"({args.pre_bytes / 1e6:.1f} MB), {pre_s:.0f} s. Fine-tuned on {args.target}: {args.steps} steps of "
          f"{common['batch_size']} x {common['window_size']} bytes.\n")
    print("| run | flags | trainable parameters | checkpoint | train s | held-out bits/byte on the target |")
    print("|---|---|---|---|---|---|")
    for name, flags, n, size, secs, bpb in rows:
        kb = "-" if size is None else f"{size / 1024:,.0f} kB"
        print(f"| {name} | `{flags}` | {n:,} | {kb} | {secs:.0f} | {bpb:.3f} |")


if __name__ == "__main__":
    main()
