"""Reply time of the UMI bot (``rwkv_torch.slippi.bot``) for batches of games, as the Computer Melee Championship
asks for them (1, 8, 32, 64, 128, 256 games per reply; a p99 over 1000 ms is a strike).

    python benchmarks/bench_bot.py [--batches 1,8,32,64,128,256] [--models C128L2,C256L6] [--threads 1,2]
                                   [--steps 30] [--no-socket] [--no-lstm]

Per model and batch size N (untrained weights: the time does not depend on them), p50 / p99 in ms of:

- ``socket``: a whole reply through UMI: an ``obs`` message of N frames sent over a Unix socket pair to a
  ``umi.Bot`` (this package's ``RWKVBot``, in a thread) until its ``act`` arrives (msgpack, features, padding to the
  bucket, the step, the controller rows);
- ``act``: ``BatchPolicy.act`` (features of N UMI frames, the step, the controller rows);
- ``step``: the model alone, ``RWKV.step_`` on N rows plus the heads;
- ``floor``: the GEMM floor: the model's 2-D weight matrices as ``[N, in] @ [in, out]`` products timed with torch
  (about 2 x parameters x N FLOPs at the matrix-product rate of this machine for these shapes), and its GFLOP/s;
- ``lstm``: a PyTorch network of slippi-ai's default shape (3 residual LSTM layers of 512 with a feed-forward block
  each, x2 wide), one step of N rows, beside the RWKV rows (``lstm/step``: the ratio to the RWKV step).

Frames come from ``tests/data/slippi`` (each game of the batch at its own offset in a replay). The default run is
short (< 3 min on 2 cores); the full one is ``--steps 200 --threads 1,2``.
"""

import argparse
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import machine  # noqa: E402

import rwkv_torch as rt  # noqa: E402
from rwkv_torch.slippi import load_replay, replay_to_umi  # noqa: E402
from rwkv_torch.slippi.batch_policy import BatchPolicy  # noqa: E402
from rwkv_torch.train import TrainConfig, build_model  # noqa: E402
from rwkv_torch.train.data import episodes_dataset  # noqa: E402

REPLAY = ROOT / "tests" / "data" / "slippi" / "PuffVFalcon-Sing.slp"
SHAPES = {"C128L2": (128, 2, 32), "C256L6": (256, 6, 64)}


class ResLSTM(nn.Module):
    """slippi-ai's default network shape: an input layer to 512, then 3 x (residual LSTM cell, residual
    feed-forward 512 -> 1024 -> 512), with the controller heads."""

    def __init__(self, d_in: int, width: int = 512, layers: int = 3, ffw: int = 2, out: int = 8 + 4 * 17 + 5):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.cells = nn.ModuleList([nn.LSTMCell(width, width) for _ in range(layers)])
        self.ffs = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ffw * width), nn.GELU(),
                                                nn.Linear(ffw * width, width)) for _ in range(layers)])
        self.head = nn.Linear(width, out)

    def forward(self, x, state):
        h = self.inp(x)
        new = []
        for cell, ff, (hs, cs) in zip(self.cells, self.ffs, state):
            hs, cs = cell(h, (hs, cs))
            h = h + hs
            h = h + ff(h)
            new.append((hs, cs))
        return self.head(h), new


def pct(ms) -> str:
    return f"{np.median(ms):.2f} / {np.percentile(ms, 99):.2f}"


def timed(fn, steps: int, warm: int = 5) -> np.ndarray:
    out = []
    for i in range(steps + warm):
        t0 = time.perf_counter()
        fn(i)
        if i >= warm:
            out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def batch_frames(frames, n: int, t: int):
    return frames[(np.arange(n) * 37 + t) % len(frames)]


def gemm_floor(model, n: int, steps: int) -> tuple[np.ndarray, float]:
    """ms of one pass over the backbone's and heads' matrices as [n, in] @ [in, out], and its GFLOP/s."""
    mats = [p for name, p in model.named_parameters() if p.dim() == 2 and "emb" not in name]
    xs = [torch.randn(n, w.shape[1]) for w in mats]
    wt = [w.detach().t().contiguous() for w in mats]
    ms = timed(lambda i: [x @ w for x, w in zip(xs, wt)], steps)
    flops = 2 * n * sum(w.numel() for w in mats)
    return ms, flops / (np.median(ms) * 1e-3) / 1e9


def socket_bench(model, frames, n: int, steps: int) -> np.ndarray:
    """Reply times of a RWKVBot in a thread, over a Unix socket pair, playing n games."""
    from umi import protocol

    from rwkv_torch.slippi.bot import RWKVBot

    class Bench(RWKVBot):
        name = "bench"
        characters = "ALL"
        delay = 18

        def setup(self, session):
            self.policy = BatchPolicy(model)

    ours, theirs = socket.socketpair()
    bot = threading.Thread(target=Bench().run, args=(theirs,), daemon=True)
    bot.start()
    protocol.recv(ours)  # hello
    protocol.send(ours, {"t": "welcome", "delay": 18, "max_games": 256, "lanes": 1, "info_every": 6, "warmups": 0,
                         "buckets": [1, 8, 32, 64, 128, 256], "timeouts": {"ready_s": 300, "act_s": 10},
                         "rng_seed": 0})
    assert protocol.recv(ours)["t"] == "ready"
    games = np.arange(1, n + 1, dtype=np.uint32)
    protocol.send(ours, {"t": "new_games", "games": [dict(game=int(g), port=1, character="FOX", opp_character="FOX",
                                                          stage="BATTLEFIELD") for g in games]})

    def reply(i):
        protocol.send(ours, protocol.obs(i + 1, 0, games, np.full(n, i == 0), batch_frames(frames, n, i)))
        assert protocol.recv(ours)["t"] == "act"

    ms = timed(reply, steps)
    protocol.send(ours, {"t": "shutdown", "reason": "done"})
    bot.join(10)
    ours.close()
    return ms


def row(pol, model, lstm, frames, n: int, steps: int, sock: bool) -> str:
    """One table row: batch size n through the socket, act, step, the GEMM floor and the LSTM."""
    state, games = pol.initial_state(n), np.arange(n)
    acts = timed(lambda i: pol.act(batch_frames(frames, n, i), state, np.full(n, i == 0), games), steps)
    x, st = pol.inputs(batch_frames(frames, n, 0)), pol.initial_state(n)
    step = timed(lambda i: pol.step(x, st), steps)
    floor, rate = gemm_floor(model, n, steps)
    socket_ms = socket_bench(model, frames, n, steps) if sock else None
    out = (f"| {n} | {pct(socket_ms) if socket_ms is not None else '-'} | {pct(acts)} | {pct(step)} | "
           f"{pct(floor)} ({rate:.0f}) | {np.median(step) / np.median(floor):.2f} | ")
    if lstm is None:
        return out + "- | - |"
    xj = model.join_ids(x)
    hc = [(torch.zeros(n, 512), torch.zeros(n, 512)) for _ in range(3)]
    lt = timed(lambda i: lstm(xj, hc), steps)
    return out + f"{pct(lt)} | {np.median(step) / np.median(lt):.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--models", default="C128L2,C256L6", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="timed replies per cell (default 30)")
    ap.add_argument("--no-socket", dest="socket", action="store_false")
    ap.add_argument("--no-lstm", dest="lstm", action="store_false")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ep = load_replay(REPLAY, port=1)[0]
    frames = replay_to_umi(REPLAY, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = episodes_dataset([("ep", ep, None)], str(REPLAY))
    print(f"machine: {machine()}, torch {torch.__version__}, rwkv_torch {rt.__version__}")
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            lstm = ResLSTM(data.embed_dim + sum(i.columns * min(32, i.classes) for i in data.ids)).eval()
            lstm_params = sum(p.numel() for p in lstm.parameters())
            for key in args.models.split(","):
                C, L, H = SHAPES[key]
                model = build_model(TrainConfig(hidden_size=C, num_layers=L, head_size=H), data).eval()
                params = sum(p.numel() for p in model.parameters())
                pol = BatchPolicy(model)
                print(f"\nRWKV-7 {key} ({params:,} params; the LSTM {lstm_params:,}, {lstm_params / params:.1f}x), "
                      f"{threads} thread(s), p50 / p99 ms over {args.steps} replies")
                print("| N | socket | act | step | GEMM floor (GFLOP/s) | step / floor | LSTM step | step / LSTM |")
                print("|---|---|---|---|---|---|---|---|")
                for n in batches:
                    print(row(pol, model, lstm if args.lstm else None, frames, n, args.steps, args.socket))

if __name__ == "__main__":
    main()
