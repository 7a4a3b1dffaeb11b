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
reads a sliding window of its training length. ``score_sequence`` and ``summarise`` are the same scoring for
``benchmarks/quality/melee.py``.
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
    return torch.from_numpy(np.concatenate(cols, axis=1))


@torch.no_grad()
def hidden(model, x: torch.Tensor) -> torch.Tensor:
    """The backbone's outputs ``[T, width]`` over one whole game ``x [T, columns]`` as it is played: a recurrent
    backbone from a fresh state carried to the end (in chunks of ``CHUNK``), the transformer baseline on a sliding
    window of its training length (each frame sees the frames before it up to that length)."""
    model.eval()
    bb, T = model.backbone, x.shape[0]
    h = model.join_ids(x[None])
    if hasattr(bb, "max_len"):
        w = bb.max_len
        first = bb(h[:, :w], return_sequence=True)[0]
        wins = h.unfold(1, w, 1).permute(0, 1, 3, 2)[0, 1:]  # [T - w, w, C]
        return torch.cat([first, *[bb(c, return_sequence=False) for c in wins.split(256)]])[:T]
    state, outs = model.init_state(1, device="cpu"), []
    for a in range(0, T, CHUNK):
        o, state = bb(h[:, a:a + CHUNK], state, return_sequence=True, return_state=True)
        outs.append(o[0])
    return torch.cat(outs)


@torch.no_grad()
def score_sequence(model, targets: list, x, ys: dict, delay: int, keep: bool = False) -> dict:
    """Sums over one game's scored frames (``x [T, columns]`` the model's input rows, ``ys`` ``{target: [T] class
    ids or [T, K] bits}``): ``{component: {nll (bits), hit, change, hit_change, copy}}`` and ``frames``; with
    ``keep`` also ``pred``, the greedy values of every frame ``{component: array}``."""
    kinds = {t.name: t.kind for t in targets if t.kind in ("categorical", "bernoulli")}
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    ys = {n: torch.as_tensor(np.asarray(ys[n]).astype(np.float32 if k == "bernoulli" else np.int64))
          for n, k in kinds.items()}
    T = x.shape[0]
    h = hidden(model, x)
    forced, _ = model.decode_heads(h, targets=ys)
    nll = frame_nll(forced, ys, targets)
    greedy, values = model.decode_heads(h)
    out = {"frames": max(0, T - delay)}
    for n, kind in kinds.items():
        y = ys[n]
        p = values[n] if n in values else model_greedy(kind, greedy[n])
        same = (lambda u, v: (u == v).all(-1)) if kind == "bernoulli" else (lambda u, v: u == v)
        hit = same(p, y)[delay:]
        copy = same(y[:T - delay], y[delay:]) if delay > 0 else torch.ones(T, dtype=torch.bool)
        change = ~copy
        out[n] = dict(nll=float(nll[n][delay:].sum()) / math.log(2), hit=int(hit.sum()), change=int(change.sum()),
                      hit_change=int((hit & change).sum()), copy=int(copy.sum()))
        if keep:
            out.setdefault("pred", {})[n] = p.numpy()
    return out


def score_game(model, targets: list, ep: dict, delay: int, keep: bool = False) -> dict:
    """``score_sequence`` of one episode dict (``load_replay``'s)."""
    return score_sequence(model, targets, _inputs(model, ep), {t.name: ep[f"target_{t.name}"] for t in targets},
                          delay, keep)


def summarise(games: list) -> dict:
    """The per-game sums of ``score_sequence`` -> ``{component: {nll_bits, acc, acc_changes, changes, copy_acc}}``
    per scored frame, with ``all`` (the summed NLL: the joint NLL of the controller)."""
    frames = sum(g["frames"] for g in games)
    totals = {n: {k: sum(g[n][k] for g in games) for k in games[0][n]} for n in HEAD_ORDER}
    f = max(frames, 1)
    rows = {n: dict(nll_bits=t["nll"] / f, acc=t["hit"] / f, acc_changes=t["hit_change"] / max(t["change"], 1),
                    changes=t["change"] / f, copy_acc=t["copy"] / f) for n, t in totals.items()}
    rows["all"] = dict(nll_bits=sum(r["nll_bits"] for r in rows.values()), acc=None, acc_changes=None, changes=None,
                       copy_acc=None)
    return rows


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
    scored = [score_game(model, targets, ep, delay) for _, ep in games]
    rows = summarise(scored)
    frames = sum(g["frames"] for g in scored)
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
