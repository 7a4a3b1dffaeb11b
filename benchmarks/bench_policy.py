"""Per-frame latency of the Melee policy (``rwkv_torch.slippi.Policy.act``: a frame's features and ids in, a
controller out), against the 16.7 ms of a 60 FPS frame.

    python benchmarks/bench_policy.py [--run RUN_DIR] [--data DIR_OR_SLP] [--frames 3000] [--threads 1]

Without ``--run``, untrained models of two shapes (latency does not depend on the weights): the quality benchmark's
(RWKV-7 C128, 2 layers) and ExPhil's (C256, 6 layers, head size 64), with the heads and id embeddings of a replay run.
Frames come from a real replay (features parsed once, before timing): ``--replay``, else the longest file of ``--data``
(default ``../shared/data/slippi`` where it exists, else the repository's ``tests/data/slippi``). Prints p50, p99
and max per frame in ms, and the same for ``Policy.logits`` alone (no decoding).
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_cpu import machine

import rwkv_torch as rt
from rwkv_torch.slippi import Policy, load_replay
from rwkv_torch.train import TrainConfig, build_model
from rwkv_torch.train.data import episodes_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "slippi"
DEFAULT_DATA = SHARED if SHARED.is_dir() else REPO / "tests" / "data" / "slippi"


def pick_replay(data: str) -> str:
    """``data`` itself (a ``.slp`` file), or the largest ``.slp`` of the folder (the longest game, roughly)."""
    path = Path(data)
    if path.is_file():
        return str(path)
    files = sorted(path.rglob("*.slp"), key=lambda f: (-f.stat().st_size, f.name))
    if not files:
        raise SystemExit(f"--data {data}: no .slp replays")
    return str(files[0])


def timed(fn, rows, warm: int = 50) -> np.ndarray:
    out = []
    for i, (frame, ids) in enumerate(rows):
        t0 = time.perf_counter()
        fn(frame, ids)
        if i >= warm:
            out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a training run on .slp replays (default: untrained models)")
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="a .slp replay or a folder (the largest file is used; default ../shared/data/slippi where it "
                         "exists, else tests/data/slippi)")
    ap.add_argument("--replay", default=None, help="the replay to take frames from (default: from --data; "
                                                   "../shared/data/slippi/facingDirection.slp is the 3000-frame one)")
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.replay is None:
        args.replay = str(SHARED / "facingDirection.slp") if Path(args.data) == SHARED else pick_replay(args.data)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch {torch.__version__}, rwkv_torch {rt.__version__}, {args.threads} thread(s)")
    ep = load_replay(args.replay)[0]
    names = sorted(k[4:] for k in ep if k.startswith("ids_"))
    T = min(args.frames, len(ep["frames"]))
    rows = [(ep["frames"][t], {n: ep[f"ids_{n}"][t] for n in names}) for t in range(T)]
    if args.run:
        policies = {args.run: Policy.from_run(args.run)}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = episodes_dataset([("ep", ep, None)], args.replay)
        policies = {}
        for label, (C, L, N) in {"RWKV-7 C128 L2 (quality benchmark)": (128, 2, 32),
                                 "RWKV-7 C256 L6 (ExPhil's shape)": (256, 6, 64)}.items():
            model = build_model(TrainConfig(hidden_size=C, num_layers=L, head_size=N), data)
            policies[f"{label}, {sum(p.numel() for p in model.parameters()):,} params"] = Policy(model)
    print(f"\n{len(rows) - 50} frames of {Path(args.replay).name} (after 50 warm-up frames), one at a time\n")
    print("| model | act p50 ms | act p99 ms | act max ms | logits only p50 ms | budget (60 FPS) |")
    print("|---|---|---|---|---|---|")
    for label, pol in policies.items():
        act = timed(pol.act, rows)
        pol.reset()
        raw = timed(pol.logits, rows)
        print(f"| {label} | {np.median(act):.3f} | {np.percentile(act, 99):.3f} | {act.max():.3f} | "
              f"{np.median(raw):.3f} | 16.7 |")


if __name__ == "__main__":
    main()
