"""Byte-level language modelling: validation bits per byte against wall-clock training time on this CPU.

    python benchmarks/quality/lm.py [--quick] [--steps 400] [--models rwkv7,rwkv6,rwkv4,transformer,lstm]

The corpus is the trainer's default one (``rwkv_torch.train.data.default_corpus``: the Python standard library's own
sources, no download), cut at ``--bytes`` and split by document (``split_by_sequence``) into training and held-out
files. Every model trains for the same number of AdamW steps on the same batches, built exactly as
``rwkv-torch train`` builds them: ``window_plans`` lanes that walk each document window after window, ``make_batch``,
and ``train_step`` (the recurrent state carried, detached, from one window to the next; the transformer sees one
window). Every ``--eval-every`` steps the clock stops and ``rwkv_torch.train.evaluate`` measures the loss on the same
held-out windows for every model (lanes walking held-out documents, state carried); bits per byte is that loss
(nats per byte) divided by ln 2. RWKV-7/6/4 are ``--hidden`` wide; the transformer and the LSTM get the width whose
parameter count is closest to RWKV-7's (``rwkv_torch.train.build_model``).
Writes ``lm.md`` and ``lm.png`` (validation bits per byte against training seconds and against steps).
"""

import math
import time

import numpy as np
import torch
from common import (
    ALL_MODELS,
    LABELS,
    STYLES,
    base_parser,
    build,
    command_line,
    markdown_table,
    n_params,
    optimizer,
    out_dir,
    pyplot,
    quick_defaults,
    width_of,
    write_report,
)

from rwkv_torch.train import TrainConfig, evaluate, lr_factor, train_step
from rwkv_torch.train.data import default_corpus, make_batch, split_by_sequence, window_plans

CPU = torch.device("cpu")


def val_bpb(model, val, args) -> float:
    cfg = TrainConfig(window_size=args.window, batch_size=args.eval_lanes, eval_batches=args.eval_batches,
                      seed=args.seed)
    return evaluate(model, val, cfg, CPU)["val_loss"] / math.log(2)


def train_one(backbone: str, args, train, val) -> dict:
    torch.manual_seed(args.seed)
    model = build(backbone, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size,
                  max_len=args.window, seed=args.seed, vocab_size=train.vocab_size)
    opt = optimizer(model, args.lr, args.weight_decay)
    cfg = TrainConfig(backbone=backbone, window_size=args.window, batch_size=args.batch, steps=args.steps,
                      lr=args.lr, lr_final=args.lr / 10, warmup=args.steps // 20 + 1, seed=args.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plans = window_plans([len(s) for s in train.sequences], args.window, args.window, args.batch, args.seed)
    state = model.init_state(args.batch)
    curve = [(0, 0.0, val_bpb(model, val, args))]
    train_s, losses = 0.0, []
    for step in range(1, args.steps + 1):
        batch = make_batch(train, next(plans), args.window)
        t0 = time.perf_counter()
        loss, _, state = train_step(model, opt, train, batch, state, cfg, CPU)
        sched.step()
        train_s += time.perf_counter() - t0
        losses.append(loss / math.log(2))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, train_s, val_bpb(model, val, args)))
    return dict(model=backbone, params=n_params(model), width=width_of(model), train_s=train_s, curve=curve,
                train_bpb=float(np.mean(losses[-args.eval_every:])), val_bpb=curve[-1][2],
                tokens_per_s=args.steps * args.batch * args.window / train_s)


def plot(results: list, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        steps, secs, bpb = zip(*r["curve"])
        axes[0].plot(secs, bpb, STYLES[r["model"]], ms=3, label=LABELS[r["model"]])
        axes[1].plot(steps, bpb, STYLES[r["model"]], ms=3, label=LABELS[r["model"]])
    axes[0].set_xlabel("training seconds (1 CPU thread, evaluation excluded)")
    axes[1].set_xlabel("AdamW steps")
    axes[0].set_ylabel("validation bits per byte")
    lo = min(min(b for _, _, b in r["curve"]) for r in results)
    hi = max(r["curve"][min(1, len(r["curve"]) - 1)][2] for r in results)
    axes[0].set_ylim(lo - 0.1, max(hi, lo + 0.5) + 0.1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle("Byte-level LM on Python standard-library sources (held-out files)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--bytes", type=int, default=3_000_000, help="corpus size before the split (default 3 MB)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=400, help="AdamW steps per model (default 400)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-lanes", type=int, default=16, help="held-out documents read side by side")
    p.add_argument("--eval-batches", type=int, default=16, help="consecutive windows per evaluation lane")
    args = p.parse_args(argv)
    quick_defaults(p, args, bytes=300_000, steps=8, batch=4, window=32, hidden=32, head_size=16, eval_every=4,
                   eval_lanes=4, eval_batches=2)
    return args


def main(argv=None) -> list:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    t_start = time.perf_counter()
    train, val = split_by_sequence(default_corpus(args.bytes), args.val_fraction, args.seed)
    n_train, n_val = sum(len(s) for s in train.sequences), sum(len(s) for s in val.sequences)
    results = []
    for backbone in args.models.split(","):
        r = train_one(backbone, args, train, val)
        results.append(r)
        print(f"{LABELS[backbone]:12s} {r['params']:,} params, width {r['width']}: val {r['val_bpb']:.3f} bpb, "
              f"train {r['train_bpb']:.3f} bpb, {r['train_s']:.0f} s, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    header = ["model", "params", "width", "val bpb", f"train bpb (last {args.eval_every} steps)", "train s", "tokens/s"]
    rows = [[LABELS[r["model"]], f"{r['params']:,}", r["width"], f"{r['val_bpb']:.3f}", f"{r['train_bpb']:.3f}",
             f"{r['train_s']:.0f}", f"{r['tokens_per_s']:,.0f}"] for r in results]
    table = markdown_table(header, rows)
    print(table)
    val_bytes = args.eval_lanes * args.eval_batches * args.window
    body = (f"{args.steps} AdamW steps of {args.batch} x {args.window} bytes per model "
            f"({args.steps * args.batch * args.window:,} training bytes, lr {args.lr:g} cosine to {args.lr / 10:g}, "
            f"weight decay {args.weight_decay}), {args.layers} layers, RWKV width {args.hidden} (head size "
            f"{args.head_size}), seed {args.seed}. Corpus: {len(train.sequences)} training files ({n_train:,} bytes) "
            f"and {len(val.sequences)} held-out files ({n_val:,} bytes) of the Python standard library; validation "
            f"reads the same {val_bytes:,} held-out bytes ({args.eval_lanes} files side by side, "
            f"{args.eval_batches} consecutive windows each, state carried) every {args.eval_every} steps. "
            f"Train s counts only the training steps; tokens/s = training bytes / train s. Uniform guessing is "
            f"8 bits per byte.\n\n{table}\n\n![validation bits per byte against time](lm.png)")
    seconds = time.perf_counter() - t_start
    write_report(out, "lm", "Byte-level language modelling", command_line("lm", argv), body, seconds)
    plot(results, out / "lm.png")
    print(f"wrote {out / 'lm.md'} and {out / 'lm.png'} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
