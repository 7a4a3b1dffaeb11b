"""Multi-query associative recall (MQAR): can the model look up values by key from its memory of the sequence?

    python benchmarks/quality/recall.py [--quick] [--steps 600] [--models rwkv7,rwkv6,rwkv4,transformer,lstm]

A sequence of ``seq_len`` tokens starts with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; each key is then
queried once, in random order, at random later positions (the other positions hold a filler token). At a query
position the model must output the value that followed that key (Zoology's MQAR, Arora et al. 2023). The loss and
the accuracy count only query positions.

Every model is trained once, for the same number of AdamW steps, on batches that cycle through all
``(seq_len, pairs)`` settings, then tested on fresh sequences of each setting. RWKV-7/6/4 are token models of
``--hidden`` width; the transformer and the LSTM get the width whose parameter count is closest to RWKV-7's
(``rwkv_torch.train.build_model``). Fixed seeds: same data, same order for every model.
Writes ``recall.md`` and ``recall.png`` (accuracy against the number of pairs, one panel per sequence length).
"""

import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F
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

from rwkv_torch.train import TrainConfig, lr_factor

IGNORE = -100


def mqar_batch(rng: np.random.Generator, batch: int, seq_len: int, pairs: int, n_keys: int, n_values: int) -> tuple:
    """``(x [B, T], y [B, T])`` int64: token 0 is the filler, keys are ``1..n_keys``, values follow them.
    ``y`` holds the value at query positions and ``IGNORE`` elsewhere."""
    if 3 * pairs > seq_len or pairs > n_keys:
        raise ValueError(f"{pairs} pairs do not fit seq_len={seq_len} with {n_keys} keys")
    x = np.zeros((batch, seq_len), dtype=np.int64)
    y = np.full((batch, seq_len), IGNORE, dtype=np.int64)
    for row in range(batch):
        keys = rng.choice(n_keys, pairs, replace=False) + 1
        values = rng.integers(0, n_values, pairs) + 1 + n_keys
        x[row, 0:2 * pairs:2], x[row, 1:2 * pairs:2] = keys, values
        where = np.sort(rng.choice(np.arange(2 * pairs, seq_len), pairs, replace=False))
        order = rng.permutation(pairs)
        x[row, where], y[row, where] = keys[order], values[order]
    return torch.from_numpy(x), torch.from_numpy(y)


def train_one(backbone: str, args, settings: list, vocab: int) -> dict:
    torch.manual_seed(args.seed)
    model = build(backbone, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size,
                  max_len=max(t for t, _ in settings), seed=args.seed, vocab_size=vocab)
    opt = optimizer(model, args.lr, args.weight_decay)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, lr_final=args.lr / 10, warmup=args.steps // 20 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    rng = np.random.default_rng(args.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for _step, (seq_len, pairs) in zip(range(args.steps), itertools.cycle(settings)):
        x, y = mqar_batch(rng, args.batch, seq_len, pairs, args.keys, args.values)
        out, _ = model(x, model.init_state(x.shape[0]))
        loss = F.cross_entropy(out["next"].reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    acc = evaluate(model, args, settings, vocab)
    return dict(model=backbone, params=n_params(model), width=width_of(model), train_s=train_s,
                final_loss=float(np.mean(losses[-len(settings) * 5:])), acc=acc)


@torch.no_grad()
def evaluate(model, args, settings: list, vocab: int) -> dict:
    """Accuracy at query positions on ``--eval`` fresh sequences per setting (the same sequences for every model)."""
    model.eval()
    acc = {}
    for seq_len, pairs in settings:
        rng = np.random.default_rng([args.seed, 1, seq_len, pairs])
        hits = total = 0
        for a in range(0, args.eval, 256):
            x, y = mqar_batch(rng, min(256, args.eval - a), seq_len, pairs, args.keys, args.values)
            out, _ = model(x, model.init_state(x.shape[0]))
            mask = y != IGNORE
            hits += (out["next"].argmax(-1)[mask] == y[mask]).sum().item()
            total += mask.sum().item()
        acc[(seq_len, pairs)] = hits / total
    return acc


def plot(results: list, settings: list, path) -> None:
    plt = pyplot()
    lengths = sorted({t for t, _ in settings})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.8), sharey=True, squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        pairs = sorted(p for t, p in settings if t == seq_len)
        for r in results:
            ax.plot(pairs, [r["acc"][(seq_len, p)] for p in pairs], STYLES[r["model"]], label=LABELS[r["model"]],
                    alpha=0.85)
        ax.set_title(f"MQAR, sequence length {seq_len}")
        ax.set_xlabel("key-value pairs")
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(p) for p in pairs])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy at query positions")
    axes[0][-1].legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--seq-lens", default="64,128")
    p.add_argument("--pairs", default="4,8,16")
    p.add_argument("--steps", type=int, default=600, help="AdamW steps per model (default 600)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-size", type=int, default=16)
    p.add_argument("--keys", type=int, default=32, help="distinct keys (default 32)")
    p.add_argument("--values", type=int, default=32, help="distinct values (default 32)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval", type=int, default=512, help="test sequences per setting (default 512)")
    args = p.parse_args(argv)
    quick_defaults(p, args, steps=12, batch=8, eval=32, seq_lens="32", pairs="2,4")
    return args


def main(argv=None) -> list:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    lengths = [int(s) for s in args.seq_lens.split(",")]
    pair_counts = [int(s) for s in args.pairs.split(",")]
    settings = [(t, p) for t in lengths for p in pair_counts if 3 * p <= t]
    vocab = 1 + args.keys + args.values
    t_start, results = time.perf_counter(), []
    for backbone in args.models.split(","):
        r = train_one(backbone, args, settings, vocab)
        results.append(r)
        accs = " ".join(f"T{t}/p{p}={a:.2f}" for (t, p), a in r["acc"].items())
        print(f"{LABELS[backbone]:12s} {r['params']:,} params, width {r['width']}, trained in {r['train_s']:.0f} s, "
              f"loss {r['final_loss']:.3f}: {accs}", flush=True)
    header = ["model", "params", "width", *[f"T={t} pairs={p}" for t, p in settings], "train s"]
    rows = [[LABELS[r["model"]], f"{r['params']:,}", r["width"], *[f"{r['acc'][s]:.3f}" for s in settings],
             f"{r['train_s']:.0f}"] for r in results]
    table = markdown_table(header, rows)
    print(table)
    body = (f"Accuracy at query positions on {args.eval} fresh sequences per setting, after {args.steps} AdamW steps "
            f"of {args.batch} sequences (cycling through the settings), lr {args.lr}, {args.layers} layers, "
            f"RWKV width {args.hidden} (head size {args.head_size}), {args.keys} keys, {args.values} values, "
            f"seed {args.seed}. Chance is {1 / args.values:.3f}.\n\n{table}\n\n![MQAR accuracy](recall.png)")
    seconds = time.perf_counter() - t_start
    write_report(out, "recall", "Multi-query associative recall", command_line("recall", argv), body, seconds)
    plot(results, settings, out / "recall.png")
    print(f"wrote {out / 'recall.md'} and {out / 'recall.png'} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
