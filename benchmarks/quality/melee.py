"""Melee behavioural cloning from real Slippi replays: RWKV-7 (carried / windowed), LSTM and transformer at equal
parameters and equal CPU time.

    python benchmarks/quality/melee.py [--quick] [--seconds 150] [--models rwkv7,rwkv7-windowed,lstm,transformer]

Data: every usable ``.slp`` in ``--data`` (default ``../shared/data/slippi`` where it exists, 22 of 24 parse; the two
broken on purpose are skipped with a warning; else the repository's seven small ``tests/data/slippi`` replays),
through ``rwkv-torch train``'s own loader (``rwkv_torch.slippi``: one episode per human player, the ExPhil-style
features and learned id embeddings, controller targets ``--action-delay`` frames
after the observed state). Whole games are held out (``split_by_sequence`` by file, ``--val-fraction``), so no frame
of a test game, from either side, is seen in training.

Training: the trainer's pieces (``build_model``, ``param_groups``, ``window_plans`` / ``make_batch``,
``train_step``), batches of ``--batch`` windows of ``--window`` frames, the same batches in the same order for
every model, for ``--seconds`` of training each (equal CPU time; the steps each model reached are in the table).
RWKV-7 *carried* starts each window from the state the previous window of the same episode ended in (detached;
``rwkv-torch train`` with its default stride), *windowed* from zero; the LSTM carries its state; the transformer
(learned positions up to the window) has none. The baselines get the width whose parameter count is closest to
RWKV-7's (the trainer's rule).

Scoring: each held-out episode is run from its first frame to its last as it would be played: RWKV and LSTM from a
carried state over the whole game (the parallel form, equal to the one-frame step), the transformer on a sliding
window of the last ``--window`` frames. Per-head accuracy (buttons: per-button agreement over the 8 buttons; sticks
and shoulder: the class) and loss (cross-entropy / binary cross-entropy per frame). A *copy* row predicts that the
player holds the input they are holding now (the controller columns of the current frame): the bar any policy has to
clear, since players hold inputs for many frames; the *on changes* columns score only the frames where the
input changes, which the copy rule always gets wrong. Writes ``melee.md`` and ``melee.png``.
"""

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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

import rwkv_torch as rt
from rwkv_torch.slippi import DATA_SOURCES
from rwkv_torch.slippi.features import CONTROLLER_FEATURES, FRAME_WIDTH
from rwkv_torch.slippi.targets import shoulder_class, stick_class
from rwkv_torch.train import TrainConfig, build_model, lr_factor, train_step
from rwkv_torch.train.data import load_data, make_batch, split_by_sequence, window_plans

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "slippi"
DEFAULT_DATA = SHARED if SHARED.is_dir() else REPO / "tests" / "data" / "slippi"
HEADS = ("buttons", "main_x", "main_y", "c_x", "c_y", "shoulder")
VARIANTS = {"rwkv7": ("rwkv7", True), "rwkv7-windowed": ("rwkv7", False), "lstm": ("lstm", True),
            "transformer": ("transformer", False)}
NAMES = {"rwkv7": "RWKV-7, carried", "rwkv7-windowed": "RWKV-7, windowed", "lstm": "LSTM, carried",
         "transformer": "Transformer, sliding window"}
CTRL = FRAME_WIDTH - 24 - len(CONTROLLER_FEATURES)  # first controller column of a frame (before the 4 item slots)


def train_one(variant: str, args, data) -> tuple:
    backbone, carried = VARIANTS[variant]
    cfg = TrainConfig(backbone=backbone, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size,
                      window_size=args.window, batch_size=args.batch, steps=args.max_steps, lr=args.lr,
                      lr_final=args.lr / 10, warmup=20, seed=args.seed)
    model = build_model(cfg, data)
    opt = optimizer(model, args.lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plans = window_plans([len(s) for s in data.sequences], args.window, args.window, args.batch, args.seed)
    state = model.init_state(args.batch)
    t0, losses, steps = time.perf_counter(), [], 0
    while time.perf_counter() - t0 < args.seconds and steps < args.max_steps:
        plan = next(plans)
        if not carried:  # the same windows in the same order; only the start state differs
            plan = [(i, s, True) for i, s, _ in plan]
        loss, _, state = train_step(model, opt, data, make_batch(data, plan, args.window), state, cfg, CPU)
        sched.step()
        losses.append(loss)
        steps += 1
    return model, time.perf_counter() - t0, steps, float(np.mean(losses[-20:]))


@torch.no_grad()
def play(model, x: torch.Tensor, window: int) -> dict:
    """Head outputs ``{head: [T, size]}`` over one whole episode ``x [T, columns]``, as deployed."""
    model.eval()
    bb, h = model.backbone, model._join_ids(x[None])
    if isinstance(bb, rt.RWKV) or hasattr(bb, "lstm"):
        out = bb(h, bb.init_state(1), return_sequence=True, return_state=True)[0][0]
    else:
        T = h.shape[1]
        first = bb(h[:, :window], return_sequence=True)[0]
        wins = h.unfold(1, window, 1).permute(0, 1, 3, 2)[0, 1:]  # [T - window, window, C]
        last = [bb(w, return_sequence=False) for w in wins.split(256)]
        out = torch.cat([first, *last])[:T]
    return {name: head(out) for name, head in model.heads.items()}


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


def held(seqs: list) -> dict:
    """``{head: the input held on the observed frame}`` (bool ``[N, 8]`` buttons, else classes ``[N]``)."""
    x = np.concatenate([s.x[:, CTRL:CTRL + len(CONTROLLER_FEATURES)] for s in seqs])
    out = {"buttons": x[:, :8] > 0.5, "shoulder": shoulder_class(x[:, 12])}
    out.update({h: stick_class(x[:, col]) for h, col in (("main_x", 8), ("main_y", 9), ("c_x", 10), ("c_y", 11))})
    return out


def score(outs: list | None, seqs: list) -> dict:
    """Per-head accuracy and loss over all frames of the held-out episodes, and the accuracy on the frames where
    the input changes (the target differs from the held input). ``outs`` None scores the copy rule (no loss)."""
    res, copy = {}, held(seqs)
    for head in HEADS:
        y = np.concatenate([s.y[head] for s in seqs])
        if outs is None:
            pred = copy[head]
        else:
            o = torch.cat([d[head] for d in outs])
            pred = (o > 0).numpy() if head == "buttons" else o.argmax(-1).numpy()
            yt = torch.from_numpy(y)
            res[f"loss_{head}"] = (F.binary_cross_entropy_with_logits(o, yt.float()) if head == "buttons" else
                                   F.cross_entropy(o, yt)).item()
        hit = pred == (y > 0.5 if head == "buttons" else y)
        changed = copy[head] != (y > 0.5 if head == "buttons" else y)
        res[f"acc_{head}"] = float(hit.mean())
        res[f"chg_{head}"] = float(hit[changed].mean()) if changed.any() else float("nan")
    return res


def plot(results: list, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    width = 0.8 / len(results)
    panels = (("acc", "all frames"), ("chg", "frames where the input changes"))
    for ax, (key, title) in zip(axes, panels):
        for i, r in enumerate(results):
            ax.bar(np.arange(len(HEADS)) + i * width, [r["acc"][f"{key}_{h}"] for h in HEADS], width,
                   label=r["label"])
        ax.set_xticks(np.arange(len(HEADS)) + 0.4 - width / 2, HEADS)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"held-out accuracy, {title}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Melee behavioural cloning from Slippi replays, held-out games, equal CPU time per model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--data", "--replays", dest="replays", default=str(DEFAULT_DATA),
                   help="a .slp file or a folder of them (default ../shared/data/slippi where it exists, else "
                        "tests/data/slippi)")
    p.add_argument("--models", default="rwkv7,rwkv7-windowed,lstm,transformer")
    p.add_argument("--seconds", type=float, default=150.0, help="training time per model (default 150 s)")
    p.add_argument("--max-steps", type=int, default=100_000, help="also stop at this many steps")
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--action-delay", type=int, default=1)
    p.add_argument("--latency-frames", type=int, default=2000, help="frames of Policy.act to time (RWKV-7)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of games held out (default 0.2)")
    args = p.parse_args(argv)
    quick_defaults(p, args, seconds=3.0, max_steps=3, latency_frames=30, hidden=32, head_size=16, batch=4, window=30)
    for m in args.models.split(","):
        if m not in VARIANTS:
            p.error(f"--models: unknown {m!r}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> list:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        data = load_data(args.replays, action_delay=args.action_delay, sources=DATA_SOURCES)
    train, test = split_by_sequence(data, args.val_fraction, args.seed)
    if args.quick:  # a smoke run scores two short held-out episodes
        test = test.subset(sorted(range(len(test.sequences)), key=lambda i: len(test.sequences[i]))[:2])
    games = lambda d: len({s.group for s in d.sequences})  # noqa: E731
    print(f"{len(data.sequences)} episodes from {games(data)} games ({len(skipped)} warnings: skipped files); "
          f"train {games(train)} games / {sum(map(len, train.sequences)):,} frames, held out {games(test)} games / "
          f"{sum(map(len, test.sequences)):,} frames", flush=True)
    results = [dict(label="copy the held input", variant="copy", acc=score(None, test.sequences))]
    for variant in args.models.split(","):
        model, train_s, steps, loss = train_one(variant, args, train)
        outs = [play(model, torch.from_numpy(s.x), args.window) for s in test.sequences]
        acc = score(outs, test.sequences)
        r = dict(label=NAMES[variant], variant=variant, params=n_params(model), width=width_of(model),
                 train_s=train_s, steps=steps, loss=loss, acc=acc)
        if variant == "rwkv7":
            r["latency"] = policy_latency(model, max(test.sequences, key=len), args.latency_frames)
            print("policy latency (features -> controller), ms: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["latency"].items() if k != "frames"), flush=True)
        results.append(r)
        print(f"{NAMES[variant]:28s} {r['params']:,} params, {steps} steps in {train_s:.0f} s, loss {loss:.3f}: "
              + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    header = ["model", "params", "width", "steps in the time", *[f"acc {h}" for h in HEADS],
              *[f"on changes {h}" for h in HEADS], *[f"loss {h}" for h in HEADS], "train s"]
    rows = []
    for r in results:
        a = r["acc"]
        losses = [f"{a[f'loss_{h}']:.3f}" if f"loss_{h}" in a else "-" for h in HEADS]
        rows.append([r["label"], f"{r['params']:,}" if "params" in r else "-", r.get("width", "-"),
                     r.get("steps", "-"), *[f"{a[f'acc_{h}']:.3f}" for h in HEADS],
                     *[f"{a[f'chg_{h}']:.3f}" for h in HEADS], *losses,
                     f"{r['train_s']:.0f}" if "train_s" in r else "-"])
    table = markdown_table(header, rows)
    print(table)
    lat = next((r["latency"] for r in results if "latency" in r), None)
    test_games = sorted({Path(s.group).name for s in test.sequences})
    body = (f"Replays: `{args.replays}`; {len(data.sequences)} episodes (one per human player) from {games(data)} "
            f"usable games. Held out by game: {', '.join(test_games)} ({sum(map(len, test.sequences)):,} frames); "
            f"trained on {games(train)} games ({sum(map(len, train.sequences)):,} frames). Action delay "
            f"{args.action_delay} frame(s). {args.seconds:g} s of training per model (batch {args.batch} x "
            f"{args.window} frames, AdamW lr {args.lr:g} cosine to {args.lr / 10:g}, weight decay "
            f"{args.weight_decay}), {args.layers} layers, RWKV width {args.hidden} (head size {args.head_size}), "
            f"seed {args.seed}.\n\n*acc buttons*: agreement per button over the 8 buttons; sticks (17 classes) and "
            f"shoulder (5 classes): the class; *on changes*: the same accuracy on only the frames where the target "
            "differs from the input held on the observed frame (0 for the copy rule by definition: the part of "
            f"the task that needs prediction); losses per frame on the held-out games.\n\n{table}\n\n"
            + (f"Per-frame latency of the RWKV-7 policy (`rwkv_torch.slippi.Policy.act`: features and ids in, "
               f"controller out, greedy, one frame at a time, {lat['frames']} frames of a held-out game): p50 "
               f"{lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms, against the 16.7 ms of a "
               f"60 FPS frame.\n\n" if lat else "")
            + "![melee](melee.png)")
    seconds = time.perf_counter() - t_start
    report(out, "melee", "Melee behavioural cloning from Slippi replays", command_line("melee", argv), body, seconds)
    plot(results, out / "melee.png")
    print(f"wrote {out / 'melee.md'} and {out / 'melee.png'} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
