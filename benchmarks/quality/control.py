"""Replay-style control: hidden dynamics and delayed effects, windowed training against state-carrying training.

    python benchmarks/quality/control.py [--quick] [--steps 2000] [--windows 30,60,120]
                                         [--models rwkv7,lstm,transformer]

A generated game-like task (fixed seeds, numpy). Each episode is a stream of ``D = 16`` continuous features per frame
(unit Gaussian noise on every feature) driven by hidden processes:

* events with delayed effects: an event of one of 4 types fires (its fixed random pattern, norm ``--event-scale``,
  is added to features 0-7); its impact comes a hidden, random 5 to 40 frames later and shows in the frame only as
  a generic impact pattern that does not say which type hit. After an impact, the next event fires about ``--gap``
  frames later (one event in flight at a time);
* a hidden mode (0/1, a Markov chain that switches about every ``--dwell`` frames) shifts the mean of features 8-15
  by ``--mode-shift`` along a fixed direction: too weak to read from one frame, clear after a few dozen.

Targets per frame: ``effect`` (categorical, 9 classes): 0 when no event is in flight, else the type of the event
in flight combined with the current mode (type + 4 * mode), from the frame after it fired up to and including its
impact; ``flags`` (2 Bernoulli bits): the mode, and whether an event is in flight. So the targets depend on frames
up to 40 steps back (the class at an impact frame on the frame 5-40 steps back) and on evidence integrated over
longer spans.

Each model is trained with windows of 30, 60 and 120 frames (batch size scaled so every step holds the same number
of frames), the same steps, the same batches, in two ways that differ only in the state at the start of a window:
*windowed* (reset to zero every window) and *carried* (the state after the previous window of the same episode,
detached: ``rwkv-torch train`` with ``--stride`` equal to the window). Then every model is deployed the same way:
test episodes longer than any training episode are streamed one frame at a time from a carried state (RWKV:
``model.step``; LSTM: one-frame forward with its ``(h, c)``). The transformer has no state to carry: it is trained on
windows and deployed on a sliding window of the last W frames. RWKV-7 is ``--hidden`` wide; the baselines get the
width whose parameter count is closest to it (``rwkv_torch.train.build_model``).
Writes ``control.md`` and ``control.png``.
"""

import time

import numpy as np
import torch
from common import (
    LABELS,
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

import rwkv_torch as rt
from rwkv_torch.train import TrainConfig, lr_factor, train_step
from rwkv_torch.train.data import Dataset, Sequence, Target, make_batch, window_plans

CPU = torch.device("cpu")
N_TYPES, MIN_DELAY, MAX_DELAY = 4, 5, 40  # event types; frames from an event to its impact
SHORT, LONG = 20, 30  # scored apart: events in flight for <= SHORT frames and for > LONG frames
D = 16
TARGETS = [Target("effect", "categorical", 1 + 2 * N_TYPES), Target("flags", "bernoulli", 2)]


class World:
    """The fixed hidden parameters of the task: the event and impact patterns and the direction the mode shifts."""

    def __init__(self, args):
        rng = np.random.default_rng([args.seed, 7])
        protos = rng.normal(size=(N_TYPES + 1, 8))  # event types 1..N_TYPES, then the impact cue
        self.protos = args.event_scale * protos / np.linalg.norm(protos, axis=1, keepdims=True)
        u = rng.normal(size=8)
        self.shift = args.mode_shift * u / np.linalg.norm(u)
        self.args = args

    def episode(self, rng: np.random.Generator, T: int, name: str) -> Sequence:
        """One episode: frames ``x [T, D]`` and targets ``effect [T]``, ``flags [T, 2]``; for scoring also ``age [T]``
        (frames since the event in flight, 0 when none) and ``impact [T]`` (bool)."""
        a = self.args
        mode = (rng.integers(2) + np.cumsum(rng.random(T) < 1 / a.dwell)) % 2
        x = rng.normal(size=(T, D))
        x[:, 8:] += (2 * mode - 1)[:, None] * self.shift
        effect = np.zeros(T, dtype=np.int64)
        age = np.zeros(T, dtype=np.int64)
        pending, impact = np.zeros(T, dtype=bool), np.zeros(T, dtype=bool)
        t = int(rng.geometric(1 / a.gap))
        while t < T:  # one event in flight at a time: fire, impact DELAY frames later, pause, fire again
            kind, d = int(rng.integers(1, N_TYPES + 1)), int(rng.integers(MIN_DELAY, MAX_DELAY + 1))
            x[t, :8] += self.protos[kind - 1]
            pending[t:t + d] = True
            end = min(T, t + d + 1)
            effect[t + 1:end] = kind + N_TYPES * mode[t + 1:end]
            age[t + 1:end] = np.arange(1, end - t)
            if t + d < T:
                x[t + d, :8] += self.protos[N_TYPES]
                impact[t + d] = True
            t += d + int(rng.geometric(1 / a.gap))
        y = {"effect": effect, "flags": np.stack([mode, pending], axis=1).astype(np.float32), "age": age,
             "impact": impact}
        return Sequence(name, x.astype(np.float32), y)

    def mode_ceiling(self, data: Dataset) -> float:
        """Accuracy of the Bayes-optimal online filter for the mode (it knows the shift and the switch rate)."""
        a, hits, total = self.args, 0, 0
        s = float(np.linalg.norm(self.shift))
        for seq in data.sequences:
            llr = 2 * s * (seq.x[:, 8:] @ (self.shift / s))  # log p(frame | mode 1) / p(frame | mode 0)
            p, q = 0.5, 1 / a.dwell
            for t, l in enumerate(llr):
                p = p * (1 - q) + (1 - p) * q
                p = 1 / (1 + (1 - p) / p * np.exp(-l))
                hits += (p > 0.5) == (seq.y["flags"][t, 0] > 0.5)
            total += len(llr)
        return hits / total

    def dataset(self, n: int, T: int, seed_tag: int) -> Dataset:
        rng = np.random.default_rng([self.args.seed, seed_tag])
        return Dataset([self.episode(rng, T, f"ep{i}") for i in range(n)], TARGETS, embed_dim=D, source="control")


def train_one(backbone: str, window: int, carried: bool, args, data: Dataset) -> tuple:
    batch = max(1, args.frames_per_step // window)
    torch.manual_seed(args.seed)
    model = build(backbone, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size,
                  max_len=window, seed=args.seed, embed_dim=D, targets=TARGETS)
    opt = optimizer(model, args.lr, args.weight_decay)
    cfg = TrainConfig(backbone=backbone, window_size=window, batch_size=batch, steps=args.steps, lr=args.lr,
                      lr_final=args.lr / 10, warmup=args.steps // 20 + 1, seed=args.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plans = window_plans([len(s) for s in data.sequences], window, window, batch, args.seed)
    state = model.init_state(batch)
    t0, losses = time.perf_counter(), []
    for _ in range(args.steps):
        plan = next(plans)
        if not carried:  # the same windows in the same order; only the start state differs
            plan = [(i, s, True) for i, s, _ in plan]
        loss, _, state = train_step(model, opt, data, make_batch(data, plan, window), state, cfg, CPU)
        sched.step()
        losses.append(loss)
    return model, time.perf_counter() - t0, float(np.mean(losses[-20:]))


@torch.no_grad()
def stream(model, x: torch.Tensor, window: int) -> dict:
    """Outputs ``{target: [B, T, size]}`` of the deployed model on frames ``x [B, T, D]``, one frame at a time."""
    model.eval()
    bb, (B, T, _) = model.backbone, x.shape
    if isinstance(bb, rt.RWKV):
        state, hs = bb.init_state(B), []
        for t in range(T):
            h, state = bb.step(x[:, t], state)
            hs.append(h)
        h = torch.stack(hs, dim=1)
    elif hasattr(bb, "lstm"):
        state, hs = bb.init_state(B), []
        for t in range(T):
            h, state = bb(x[:, t:t + 1], state, return_sequence=True, return_state=True)
            hs.append(h)
        h = torch.cat(hs, dim=1)
    else:  # transformer: the last `window` frames; the first ones see the growing prefix
        first = bb(x[:, :window], return_sequence=True)
        wins = x.unfold(1, window, 1).permute(0, 1, 3, 2)[:, 1:]  # [B, T - window, window, D]
        last = torch.cat([bb(w, return_sequence=False) for w in wins.reshape(-1, window, D).split(512)])
        h = torch.cat([first, last.view(B, T - window, -1)], dim=1)
    return {name: head(h) for name, head in model.heads.items()}


def score(outs: dict, test: Dataset) -> dict:
    """Accuracies of the streamed outputs on the test episodes (see the report text for each key)."""
    effect, flags, age, impact = (torch.from_numpy(np.stack([s.y[k] for s in test.sequences]))
                                  for k in ("effect", "flags", "age", "impact"))
    pred = outs["effect"].argmax(-1)
    same_type = (pred > 0) & ((pred - 1) % N_TYPES == (effect - 1) % N_TYPES)
    bits = (outs["flags"] > 0) == (flags > 0.5)

    def mean(t):
        return t.float().mean().item()

    return {"impact": mean((pred == effect)[impact]), "type_short": mean(same_type[(age > 0) & (age <= SHORT)]),
            "type_long": mean(same_type[age > LONG]), "mode": mean(bits[..., 0]), "pending": mean(bits[..., 1])}


def plot(results: list, windows: list, ceiling: float, path) -> None:
    plt = pyplot()
    panels = [("impact", "class at impact frames (event type + mode)"),
              ("type_long", f"type in flight, fired > {LONG} frames back"),
              ("mode", "hidden mode, every frame")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    colors = {"rwkv7": "C0", "rwkv6": "C1", "rwkv4": "C2", "transformer": "C3", "lstm": "C4"}
    for ax, (key, title) in zip(axes, panels):
        for model in dict.fromkeys(r["model"] for r in results):
            for carried, style in ((True, "o-"), (False, "s--")):
                rs = [r for r in results if r["model"] == model and r["carried"] == carried]
                if rs:
                    label = f"{LABELS[model]}, " + ("sliding window" if model == "transformer" else
                                                    "carried" if carried else "windowed")
                    ax.plot([r["window"] for r in rs], [r["acc"][key] for r in rs], style, color=colors[model],
                            label=label)
        if key == "mode":
            ax.axhline(ceiling, color="k", lw=0.8, ls=":", label="Bayes-optimal filter")
        ax.set_title(title)
        ax.set_xlabel("training window (frames)")
        ax.set_xticks(windows)
        ax.set_ylim((0.5, 1.0) if key == "mode" else (0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, streamed from a carried state")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--models", default="rwkv7,lstm,transformer")
    p.add_argument("--windows", default="30,60,120")
    p.add_argument("--steps", type=int, default=2000, help="AdamW steps per run (default 2000)")
    p.add_argument("--frames-per-step", type=int, default=240, help="batch = this // window (default 240)")
    p.add_argument("--train-episodes", type=int, default=192)
    p.add_argument("--episode-len", type=int, default=960)
    p.add_argument("--test-episodes", type=int, default=16)
    p.add_argument("--test-len", type=int, default=2000, help="frames per streamed test episode (default 2000)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gap", type=float, default=10.0, help="mean frames from an impact to the next event")
    p.add_argument("--event-scale", type=float, default=6.0)
    p.add_argument("--mode-shift", type=float, default=0.25)
    p.add_argument("--dwell", type=float, default=200.0, help="mean frames between mode switches")
    args = p.parse_args(argv)
    quick_defaults(p, args, steps=6, windows="30,60", frames_per_step=120, train_episodes=8, episode_len=240,
                   test_episodes=2, test_len=400, hidden=32)
    longest = max(int(w) for w in args.windows.split(","))
    if min(args.episode_len, args.test_len - 1) < longest:
        p.error(f"--episode-len {args.episode_len} and --test-len {args.test_len} must exceed the longest window "
                f"({longest})")
    return args


def main(argv=None) -> list:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = out_dir(args)
    t_start = time.perf_counter()
    world = World(args)
    data = world.dataset(args.train_episodes, args.episode_len, 1)
    test = world.dataset(args.test_episodes, args.test_len, 2)
    x_test = torch.from_numpy(np.stack([s.x for s in test.sequences]))
    ceiling = world.mode_ceiling(test)
    print(f"Bayes-optimal online mode filter: {ceiling:.3f}", flush=True)
    windows = [int(w) for w in args.windows.split(",")]
    results = []
    for backbone in args.models.split(","):
        for window in windows:
            for carried in (True, False) if backbone != "transformer" else (False,):
                model, train_s, loss = train_one(backbone, window, carried, args, data)
                acc = score(stream(model, x_test, window), test)
                r = dict(model=backbone, window=window, carried=carried, params=n_params(model),
                         width=width_of(model), train_s=train_s, loss=loss, acc=acc)
                results.append(r)
                how = "sliding" if backbone == "transformer" else "carried" if carried else "windowed"
                print(f"{LABELS[backbone]:12s} W={window:<4d} {how:9s} {r['params']:,} params, {train_s:.0f} s, "
                      f"loss {loss:.3f}: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    header = ["model", "params", "window", "training", "impact acc", f"type acc, age <= {SHORT}",
              f"type acc, age > {LONG}", "mode acc", "in-flight acc", "train loss", "train s"]
    rows = [[LABELS[r["model"]], f"{r['params']:,}", r["window"],
             "sliding window" if r["model"] == "transformer" else "carried" if r["carried"] else "windowed",
             *[f"{r['acc'][k]:.3f}" for k in ("impact", "type_short", "type_long", "mode", "pending")],
             f"{r['loss']:.3f}", f"{r['train_s']:.0f}"] for r in results]
    table = markdown_table(header, rows)
    print(table)
    body = (f"{args.steps} AdamW steps per run of {args.frames_per_step} frames (batch {args.frames_per_step} / "
            f"window), lr {args.lr:g} cosine to {args.lr / 10:g}, {args.layers} layers, RWKV width {args.hidden} "
            f"(head size {args.head_size}), seed {args.seed}; {args.train_episodes} training episodes of "
            f"{args.episode_len} frames, mean gap {args.gap:.0f} frames, event scale {args.event_scale}, mode shift "
            f"{args.mode_shift}, mode dwell {args.dwell:.0f} frames. Scored on {args.test_episodes} test episodes of "
            f"{args.test_len} frames streamed one frame at a time from the start, state carried throughout.\n\n"
            "*impact acc*: the 9-way class at impact frames (type of the event that fired 5-40 frames back and the "
            "current mode; chance 0.125). *type acc, age a*: the type of the event in flight right (mode ignored) on "
            "frames a frames after it fired (chance 0.25). *mode acc*, *in-flight acc*: the two bits on every frame "
            "(chance 0.5; an event is in flight about 70% of the time). The Bayes-optimal online filter for the mode "
            f"(it knows the task's parameters) scores {ceiling:.3f} on the same frames.\n\n{table}\n\n"
            "![control task](control.png)")
    seconds = time.perf_counter() - t_start
    write_report(out, "control", "Replay-style control: windowed vs state-carrying training",
                 command_line("control", argv), body, seconds)
    plot(results, windows, ceiling, out / "control.png")
    print(f"wrote {out / 'control.md'} and {out / 'control.png'} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
