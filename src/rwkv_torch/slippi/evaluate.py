"""Scoring a Melee run as a user would: ``rwkv-torch eval RUN [--data REPLAYS]`` plays held-out games through the
run's model as it is deployed, every game from its first frame with the recurrent state carried to its last, at the
run's action delay, and prints per controller component:

- ``nll``: negative log-likelihood of the human's input in bits per frame (the autoregressive head teacher-forced on
  the human's earlier components, so the components' terms add up to the joint NLL of the controller: the number
  that compares heads fairly); the ``all`` row is the sum;
- ``acc``: accuracy of the greedy controller (the policy's, decoded in the head's order) on all frames; buttons count
  as right when all 8 are;
- ``acc changes``: that accuracy on the frames where the human's input differs from the input being held when the
  model reads the frame (delay frames before), where keeping the current input is wrong;
- ``copy``: the accuracy of the copy rule, "keep holding the current input".

Frames are scored from the ``delay``-th on (before it the input held is unknown). The games: without ``--data``, the
sequences the run held out (recorded in its checkpoints: ``<file>:P<port>``); with ``--data``, every human player of
those ``.slp`` replays (or the episodes of those ``.npz`` files). A recurrent backbone runs each game in chunks with
its state carried, which equals stepping it frame by frame (the policy's step; tests check); the transformer baseline
sees windows of its training length.
"""

import math
from pathlib import Path

import numpy as np
import torch

from ..task import load_task_model
from ..task.model import frame_nll
from .policy import checkpoint_info
from .targets import HEAD_ORDER

CHUNK = 2048  # frames per forward pass of a recurrent backbone (the state is carried across chunks)


def _games(ckpt: dict, data, delay: int, max_games: int | None) -> list:
    """``[(name, episode)]`` to score."""
    from .replays import load_replay, load_replays

    if data is None:
        held = ckpt.get("held_out") or []
        if not held:
            raise ValueError("the run records no held-out games (trained with --val-fraction 0, or before runs "
                             "recorded them): give --data REPLAYS")
        out = []
        for name in held[:max_games]:
            file, _, port = name.rpartition(":P")
            file = Path(ckpt.get("run_cwd") or ".") / file  # relative to where the run was started
            if not file.is_file():
                raise ValueError(f"held-out game {file} is gone; give --data REPLAYS")
            out.append((name, load_replay(file, port=int(port), action_delay=delay)[0]))
        return out
    p = Path(data)
    if p.suffix == ".npz" or (p.is_dir() and next(p.rglob("*.npz"), None) is not None):
        files = [p] if p.is_file() else sorted(p.rglob("*.npz"))
        out = []
        for f in files[:max_games]:
            with np.load(f, allow_pickle=False) as z:
                out.append((str(f), {k: z[k] for k in z.files}))
        return out
    return [(name, ep) for name, ep, _ in load_replays(p, delay, progress=False)[:max_games]]


def _inputs(model, ep: dict) -> torch.Tensor:
    T = len(ep["frames"])
    cols = [ep["frames"].astype(np.float32)]
    cols += [np.asarray(ep[f"ids_{s.name}"]).reshape(T, -1).astype(np.float32) for s in model.id_specs]
    return torch.from_numpy(np.concatenate(cols, axis=1))[None]


@torch.no_grad()
def score_game(model, targets: list, ep: dict, delay: int, keep: bool = False) -> dict:
    """Sums over one game's scored frames: ``{component: {nll, hit, change, hit_change, copy}}`` and ``frames``;
    with ``keep`` also ``pred``: the greedy values of every frame, ``{component: array}``."""
    x = _inputs(model, ep)
    kinds = {t.name: t.kind for t in targets}
    ys = {n: torch.from_numpy(np.asarray(ep[f"target_{n}"]).astype(np.float32 if kinds[n] == "bernoulli"
                                                                    else np.int64))[None] for n in kinds}
    T = x.shape[1]
    chunk = min(CHUNK, getattr(model.backbone, "max_len", CHUNK))
    carried = not hasattr(model.backbone, "max_len")  # the transformer baseline: each window alone
    state = model.init_state(1, device="cpu")
    nll, pred = {n: [] for n in kinds}, {n: [] for n in kinds}
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        if not carried:
            state = model.init_state(1, device="cpu")
        h, state = model.backbone(model._join_ids(x[:, a:b]), state, return_sequence=True, return_state=True)
        y = {n: v[:, a:b] for n, v in ys.items()}
        forced, _ = model.decode_heads(h, targets=y)
        for n, v in frame_nll(forced, y, targets).items():
            nll[n].append(v[0])
        greedy, values = model.decode_heads(h)
        for n in kinds:
            pred[n].append((values[n] if n in values else model_greedy(kinds[n], greedy[n]))[0])
    out, lo = {"frames": max(0, T - delay)}, delay
    for n in kinds:
        y = ys[n][0]
        p = torch.cat(pred[n])
        same = (lambda u, v: (u == v).all(-1)) if kinds[n] == "bernoulli" else (lambda u, v: u == v)
        hit = same(p, y)[lo:]
        copy = same(y[:T - delay], y[delay:]) if delay > 0 else torch.ones(T, dtype=torch.bool)
        change = ~copy
        out[n] = dict(nll=float(torch.cat(nll[n])[lo:].sum()) / math.log(2), hit=int(hit.sum()),
                      change=int(change.sum()), hit_change=int((hit & change).sum()), copy=int(copy.sum()))
        if keep:
            out.setdefault("pred", {})[n] = p.numpy()
    return out


def model_greedy(kind: str, out: torch.Tensor) -> torch.Tensor:
    """The greedy value of an independent head's output."""
    if kind == "categorical":
        return out.argmax(-1)
    return (out > 0).to(out.dtype) if kind == "bernoulli" else out


def evaluate_run(run, data=None, *, max_games: int | None = None) -> dict:
    """Score ``run`` (a run folder or checkpoint) on its held-out games, or on ``data``; returns
    ``{"run", "backbone", "controller_head", "action_delay", "games", "frames", "components": {name: {nll_bits,
    acc, acc_changes, changes, copy_acc}}}`` with ``all`` (summed NLL, every component right)."""
    model, ckpt = load_task_model(run)
    info = checkpoint_info(ckpt)
    delay = int(info["action_delay"] if info["action_delay"] is not None else 1)
    names = [t["name"] for t in ckpt["targets"]]
    if not {*HEAD_ORDER} <= set(names):
        raise ValueError(f"{run}: a run with heads {sorted(names)}; eval scores Melee runs (.slp replays)")
    from ..task import Target

    targets = [Target(**t) for t in ckpt["targets"]]
    games = _games(ckpt, data, delay, max_games)
    if not games:
        raise ValueError(f"{data}: no games to score")
    totals = {n: dict(nll=0.0, hit=0, change=0, hit_change=0, copy=0) for n in HEAD_ORDER}
    frames = 0
    for _, ep in games:
        g = score_game(model, targets, ep, delay)
        frames += g["frames"]
        for n in HEAD_ORDER:
            for k, v in g[n].items():
                totals[n][k] += v
    rows = {n: dict(nll_bits=t["nll"] / max(frames, 1), acc=t["hit"] / max(frames, 1),
                    acc_changes=t["hit_change"] / max(t["change"], 1), changes=t["change"] / max(frames, 1),
                    copy_acc=t["copy"] / max(frames, 1)) for n, t in totals.items()}
    rows["all"] = dict(nll_bits=sum(r["nll_bits"] for r in rows.values()), acc=None, acc_changes=None, changes=None,
                       copy_acc=None)
    return dict(run=str(run), backbone=ckpt["config"].get("backbone"), controller_head=model.controller_head,
                action_delay=delay, feature_version=info["feature_version"], games=len(games), frames=frames,
                components=rows)


def format_table(result: dict) -> str:
    """The result of ``evaluate_run`` as a text table."""
    head = (f"{result['run']}: {result['backbone']}, {result['controller_head']} head, action delay "
            f"{result['action_delay']}; {result['games']} games, {result['frames']} frames scored")
    lines = [head, f"{'component':<10} {'NLL bits/frame':>14} {'acc':>7} {'acc changes':>12} {'changes':>8} "
                   f"{'copy rule':>9}"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for n, r in result["components"].items():
        lines.append(f"{n:<10} {r['nll_bits']:>14.3f} {pct(r['acc']):>7} {pct(r['acc_changes']):>12} "
                     f"{pct(r['changes']):>8} {pct(r['copy_acc']):>9}")
    return "\n".join(lines)


def eval_command(args) -> dict:
    result = evaluate_run(args.run, args.data, max_games=args.max_games)
    print(format_table(result))
    return result


def add_parser(sub):
    """The ``rwkv-torch eval`` subcommand (cli.COMMANDS)."""
    p = sub.add_parser("eval", help="score a Melee run on held-out games at its action delay (NLL, accuracy, copy "
                                    "rule)")
    p.add_argument("run", help="a training run on .slp replays (its folder or one of its ckpt-*.pt)")
    p.add_argument("--data", default=None, help=".slp replays (a file or folder) or .npz episodes to score "
                   "(default: the games the run held out)")
    p.add_argument("--max-games", type=int, default=None, help="score at most N games (default: all)")
    p.set_defaults(call=eval_command, ok=lambda r: True, errors=(ValueError, FileNotFoundError, ImportError))
