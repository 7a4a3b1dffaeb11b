"""Melee behavioural cloning from real Slippi replays at the delays bots play at: RWKV-7 (independent and
autoregressive heads, carried state; windowed), an LSTM, slippi-ai's residual LSTM and a transformer, at equal
parameters and equal CPU time, over ``--seeds`` seeds (mean and range).

    python benchmarks/quality/melee.py [--quick] [--seconds 150] [--delays 1,18] [--seeds 3]
        [--models rwkv7,rwkv7-ar,rwkv7-windowed,lstm,residual-lstm,transformer]

Data: every usable ``.slp`` in ``--data`` (default ``../shared/data/slippi`` where it exists, 22 of 24 parse; the two
broken on purpose are skipped with a warning; else the repository's seven small ``tests/data/slippi`` replays),
through ``rwkv-torch train``'s own loader (``rwkv_torch.slippi``: one episode per human player, the ExPhil-style
features and learned id embeddings, controller targets ``--action-delay`` frames after the observed state), loaded
once per delay; a prepared folder of ``.npz`` episodes is read as it is (its delay is the one it was made with).
Whole games are held out (``split_by_sequence`` by file, ``--val-fraction``, the split of ``--seed`` for every seed),
so no frame of a test game, from either side, is seen in training.

Training: the trainer's pieces (``build_model``, ``param_groups``, ``window_plans`` / ``make_batch``,
``train_step``: an autoregressive head teacher-forced), batches of ``--batch`` windows of ``--window`` frames, the same
batches in the same order for every model of a seed, for ``--seconds`` of training each (equal CPU time; the steps
each model reached are in the table). RWKV-7 *carried* starts each window from the state the previous window of the
same episode ended in (detached; ``rwkv-torch train`` with its default stride), *windowed* from zero; the LSTMs carry
their state; the transformer (learned positions up to the window) has none. ``rwkv7-ar`` is RWKV-7 with the
autoregressive controller head (buttons, main stick, C-stick, shoulder, each conditioned on the ones before: the
default of ``rwkv-torch train`` on replays); ``residual-lstm`` is slippi-ai's default core (LSTM layers alternating
with pre-LayerNorm feed-forward blocks, residual) with the autoregressive head, as slippi-ai has it; the others have
independent heads. The baselines get the width whose parameter count is closest to RWKV-7's (the trainer's rule).

Scoring (``rwkv_torch.slippi.evaluate``, what ``rwkv-torch eval`` prints): each held-out episode is run from its first
frame to its last as it would be played: the recurrent models from a carried state over the whole game (the parallel
form, equal to the one-frame step), the transformer on a sliding window of the last ``--window`` frames. Per
component: NLL of the human's input in bits per frame (an autoregressive head teacher-forced, so the components add
up to the joint NLL: the number that compares heads fairly; buttons: the 8 bits summed), accuracy of the greedy
controller on all frames (buttons: all 8 right) and on the frames where the input changes (the target differs from
the input held on the observed frame, ``delay`` frames earlier), and the *copy* rule, "keep holding the current
input". Frames are scored from the delay-th on. Writes ``melee.md`` and ``melee.png`` (held-out accuracy and each
model's training curve per delay).
"""

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import (
    base_parser,
    command_line,
    markdown_table,
    n_params,
    optimizer,
    out_dir,
    pyplot,
    quick_defaults,
    width_of,
)
from common import write_report as report

from rwkv_torch.slippi import DATA_SOURCES
from rwkv_torch.slippi.evaluate import score_sequence, summarise
from rwkv_torch.train import TrainConfig, build_model, lr_factor, train_step
from rwkv_torch.train.data import load_data, make_batch, split_by_sequence, window_plans

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "slippi"
DEFAULT_DATA = SHARED if SHARED.is_dir() else REPO / "tests" / "data" / "slippi"
HEADS = ("buttons", "main_x", "main_y", "c_x", "c_y", "shoulder")
# variant -> (backbone, carried state, controller head)
VARIANTS = {"rwkv7": ("rwkv7", True, "independent"), "rwkv7-ar": ("rwkv7", True, "autoregressive"),
            "rwkv7-windowed": ("rwkv7", False, "independent"), "lstm": ("lstm", True, "independent"),
            "residual-lstm": ("residual-lstm", True, "autoregressive"),
            "transformer": ("transformer", False, "independent")}
NAMES = {"rwkv7": "RWKV-7, carried", "rwkv7-ar": "RWKV-7, carried, AR head", "rwkv7-windowed": "RWKV-7, windowed",
         "lstm": "LSTM, carried", "residual-lstm": "Residual LSTM (slippi-ai), AR head",
         "transformer": "Transformer, sliding window"}


def train_one(variant: str, args, data, seed: int) -> tuple:
    """(model, seconds, steps, mean of the last 20 losses, curve [(seconds, loss)])."""
    backbone, carried, head = VARIANTS[variant]
    cfg = TrainConfig(backbone=backbone, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size,
                      window_size=args.window, batch_size=args.batch, steps=args.max_steps, lr=args.lr,
                      lr_final=args.lr / 10, warmup=20, seed=seed, controller_head=head)
    model = build_model(cfg, data)
    opt = optimizer(model, args.lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plans = window_plans([len(s) for s in data.sequences], args.window, args.window, args.batch, seed)
    state = model.init_state(args.batch)
    t0, losses, curve, steps = time.perf_counter(), [], [], 0
    while time.perf_counter() - t0 < args.seconds and steps < args.max_steps:
        plan = next(plans)
        if not carried:  # the same windows in the same order; only the start state differs
            plan = [(i, s, True) for i, s, _ in plan]
        loss, _, state = train_step(model, opt, data, make_batch(data, plan, args.window), state, cfg, CPU)
        sched.step()
        losses.append(loss)
        steps += 1
        if steps % 10 == 0 or steps == 1:
            curve.append((time.perf_counter() - t0, float(np.mean(losses[-10:]))))
    return model, time.perf_counter() - t0, steps, float(np.mean(losses[-20:])), curve


def score(model, targets: list, seqs: list, delay: int) -> dict:
    """``evaluate.summarise`` of the held-out episodes, flattened: ``nll``, ``nll_<h>``, ``acc_<h>``, ``chg_<h>``,
    ``copy_<h>``."""
    rows = summarise([score_sequence(model, targets, s.x, s.y, delay) for s in seqs])
    out = {"nll": rows["all"]["nll_bits"]}
    for h in HEADS:
        r = rows[h]
        out.update({f"nll_{h}": r["nll_bits"], f"acc_{h}": r["acc"], f"chg_{h}": r["acc_changes"],
                    f"copy_{h}": r["copy_acc"]})
    return out


def policy_latency(model, seq, frames: int) -> dict:
    """Per-frame latency of ``slippi.Policy.act`` (features in, controller out, greedy) over the first ``frames``
    frames of one held-out episode: p50 / p99 / max in ms."""
    from rwkv_torch.slippi import Policy

    pol = Policy(model)
    D = pol.frame_dim
    rows, at = [], D
    for spec in model.id_specs:
        rows.append((spec.name, at, spec.columns))
        at += spec.columns
    times = []
    for t in range(min(frames, len(seq))):
        x = seq.x[t]
        ids = {name: x[a:a + k].astype(np.int64) for name, a, k in rows}
        t0 = time.perf_counter()
        pol.act(x[:D], ids)
        times.append(time.perf_counter() - t0)
    ms = np.array(times[10:] or times) * 1e3
    return dict(p50=float(np.median(ms)), p99=float(np.percentile(ms, 99)), max=float(ms.max()), frames=len(times))


def spread(values: list, digits: int = 3) -> str:
    """``mean`` with one seed, else ``mean (min-max)``."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "-"
    m = f"{np.mean(v):.{digits}f}"
    return m if len(v) == 1 else f"{m} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def plot(groups: dict, copies: dict, delays: list, path) -> None:
    """Per delay: held-out accuracy per component (seed means; the copy rule as a black mark) and the training
    curves (first seed)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(delays), 2, figsize=(15, 4.5 * len(delays)), squeeze=False)
    for row, delay in zip(axes, delays):
        models = [g for (d, _), g in groups.items() if d == delay]
        width = 0.8 / max(1, len(models))
        for i, g in enumerate(models):
            row[0].bar(np.arange(len(HEADS)) + i * width, [np.mean([a[f"acc_{h}"] for a in g["acc"]]) for h in HEADS],
                       width, label=g["label"])
            if g.get("curves"):
                t, loss = zip(*g["curves"][0])
                row[1].plot(t, loss, marker=".", label=g["label"])
        if delay in copies:
            row[0].scatter(np.arange(len(HEADS)) + 0.4 - width / 2, [copies[delay][f"acc_{h}"] for h in HEADS],
                           marker="_", s=900, color="k", label="copy rule", zorder=3)
        row[0].set_xticks(np.arange(len(HEADS)) + 0.4 - width / 2, HEADS)
        row[0].set_ylim(0, 1)
        row[0].grid(alpha=0.3, axis="y")
        row[0].set_title(f"held-out accuracy, all frames, delay {delay}")
        row[0].legend(fontsize=7, loc="lower left")
        row[1].set_xlabel("training seconds")
        row[1].set_ylabel("training loss (sum of the heads' losses)")
        row[1].grid(alpha=0.3)
        row[1].set_title(f"training curves, delay {delay} (first seed)")
        row[1].legend(fontsize=7)
    fig.suptitle("Melee behavioural cloning from Slippi replays, held-out games, equal CPU time per model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--data", "--replays", dest="replays", default=str(DEFAULT_DATA),
                   help="a .slp file or a folder of them, or a prepared folder of .npz episodes (default "
                        "../shared/data/slippi where it exists, else tests/data/slippi)")
    p.add_argument("--models", default=",".join(VARIANTS))
    p.add_argument("--delays", default="1,18", help="action delays to train and score at (default 1,18)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (--seed, --seed + 1, ...): mean and range")
    p.add_argument("--seconds", type=float, default=150.0, help="training time per model (default 150 s)")
    p.add_argument("--max-steps", type=int, default=100_000, help="also stop at this many steps")
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--latency-frames", type=int, default=2000, help="frames of Policy.act to time (RWKV-7)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of games held out (default 0.2)")
    args = p.parse_args(argv)
    quick_defaults(p, args, seconds=3.0, max_steps=3, latency_frames=30, hidden=32, head_size=16, batch=4, window=30)
    for m in args.models.split(","):
        if m not in VARIANTS:
            p.error(f"--models: unknown {m!r}; choose from {', '.join(VARIANTS)}")
    try:
        args.delay_list = [int(d) for d in args.delays.split(",")]
    except ValueError:
        p.error(f"--delays {args.delays!r}: comma-separated frame counts, e.g. 1,18")
    if min(args.delay_list) < 1 or args.seeds < 1:
        p.error("--delays: at least 1 frame each; --seeds: at least 1")
    return args


def main(argv=None) -> list:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    t_start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    results, groups, described = [], {}, []
    for delay in args.delay_list:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            data = load_data(args.replays, action_delay=delay, sources=DATA_SOURCES)
        train, test = split_by_sequence(data, args.val_fraction, args.seed)
        if args.quick:  # a smoke run scores two short held-out episodes
            test = test.subset(sorted(range(len(test.sequences)), key=lambda i: len(test.sequences[i]))[:2])
        games = lambda d: len({s.group for s in d.sequences})  # noqa: E731
        line = (f"delay {delay}: {len(data.sequences)} episodes from {games(data)} games ({len(skipped)} warnings: "
                f"skipped files); train {games(train)} games / {sum(map(len, train.sequences)):,} frames, held out "
                f"{games(test)} games / {sum(map(len, test.sequences)):,} frames")
        print(line, flush=True)
        described.append((line, sorted({Path(s.group).name for s in test.sequences if s.group})))
        # the copy rule needs no model: any one scores it (its numbers come from the targets alone)
        copy = None
        for variant in args.models.split(","):
            g = groups.setdefault((delay, variant), dict(label=NAMES[variant], variant=variant, delay=delay, acc=[],
                                                         steps=[], curves=[]))
            for seed in seeds:
                model, train_s, steps, loss, curve = train_one(variant, args, train, seed)
                acc = score(model, train.targets, test.sequences, delay)
                if copy is None:
                    copy = {k: v for k, v in acc.items() if k.startswith("copy_")}
                    copy.update({f"acc_{h}": copy[f"copy_{h}"] for h in HEADS})
                    copy.update({f"chg_{h}": 0.0 for h in HEADS})
                    results.append(dict(label="copy the held input", variant="copy", delay=delay, acc=copy))
                r = dict(label=NAMES[variant], variant=variant, delay=delay, seed=seed, params=n_params(model),
                         width=width_of(model), train_s=train_s, steps=steps, loss=loss, acc=acc, curve=curve)
                if variant == "rwkv7" and seed == seeds[0] and delay == args.delay_list[0]:
                    r["latency"] = policy_latency(model, max(test.sequences, key=len), args.latency_frames)
                    print("policy latency (features -> controller), ms: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in r["latency"].items() if k != "frames"), flush=True)
                results.append(r)
                g["acc"].append(acc)
                g["steps"].append(steps)
                g["curves"].append(curve)
                g.update(params=r["params"], width=r["width"])
                print(f"delay {delay} seed {seed} {NAMES[variant]:34s} {r['params']:,} params, {steps} steps in "
                      f"{train_s:.0f} s, loss {loss:.3f}: NLL {acc['nll']:.3f} bits/frame; "
                      + " ".join(f"{k}={v:.3f}" for k, v in acc.items() if k.startswith(("acc_", "chg_"))),
                      flush=True)
    header = ["delay", "model", "params", "width", "steps", "NLL bits/frame", *[f"acc {h}" for h in HEADS],
              *[f"on changes {h}" for h in HEADS], *[f"NLL {h}" for h in HEADS]]
    rows = []
    for delay in args.delay_list:
        copy = next(r["acc"] for r in results if r["variant"] == "copy" and r["delay"] == delay)
        rows.append([delay, "copy the held input", "-", "-", "-", "-", *[f"{copy[f'acc_{h}']:.3f}" for h in HEADS],
                     *["0" for _ in HEADS], *["-" for _ in HEADS]])
        for (d, _), g in groups.items():
            if d != delay:
                continue
            a = g["acc"]
            rows.append([delay, g["label"], f"{g['params']:,}", g["width"], spread(g["steps"], 0),
                         spread([x["nll"] for x in a]), *[spread([x[f"acc_{h}"] for x in a]) for h in HEADS],
                         *[spread([x[f"chg_{h}"] for x in a]) for h in HEADS],
                         *[spread([x[f"nll_{h}"] for x in a]) for h in HEADS]])
    table = markdown_table(header, rows)
    print(table)
    lat = next((r["latency"] for r in results if "latency" in r), None)
    seeds_text = (f"seed {args.seed}" if len(seeds) == 1 else
                  f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}; cells: mean (min-max))")
    data_text = " ".join(f"{line}; held out: {', '.join(names)}." for line, names in described)
    body = (f"Replays: `{args.replays}`. {data_text} {args.seconds:g} s of training per model and seed (batch "
            f"{args.batch} x {args.window} frames, AdamW lr {args.lr:g} cosine to {args.lr / 10:g}, weight decay "
            f"{args.weight_decay}), {args.layers} layers, RWKV width {args.hidden} (head size {args.head_size}), "
            f"{seeds_text}.\n\n*NLL*: negative log-likelihood of the human's controller on the held-out games, bits "
            "per frame (the components add up to the joint NLL; buttons: the 8 bits); *acc*: the greedy controller "
            "(buttons: all 8 right; sticks 17 classes, shoulder 5); *on changes*: the same on only the frames where "
            "the target differs from the input held on the observed frame (0 for the copy rule by definition: the "
            f"part of the task that needs prediction). Frames from the delay-th on.\n\n{table}\n\n"
            + (f"Per-frame latency of the RWKV-7 policy (`rwkv_torch.slippi.Policy.act`: features and ids in, "
               f"controller out, greedy, one frame at a time, {lat['frames']} frames of a held-out game): p50 "
               f"{lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms, against the 16.7 ms of a "
               f"60 FPS frame.\n\n" if lat else "")
            + "![melee](melee.png)")
    seconds = time.perf_counter() - t_start
    report(out, "melee", "Melee behavioural cloning from Slippi replays", command_line("melee", argv), body, seconds)
    copies = {r["delay"]: r["acc"] for r in results if r["variant"] == "copy"}
    plot(groups, copies, args.delay_list, out / "melee.png")
    print(f"wrote {out / 'melee.md'} and {out / 'melee.png'} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
