"""Training cost on CPU: RWKV-4/6/7 against an equal-parameter transformer and LSTM, side by side in one process.

    python benchmarks/bench_train.py [--threads 1 2] [--rounds 3] [--versions 7 6 4] [--quick] [--profile]

One training step is forward + backward + AdamW. Workloads (fp32, 6 layers, width 256, head size 64):

* ``game-AI``: 288 continuous features per frame, batch 16, window 60, a linear head on every frame (MSE), the
  seed project's shape;
* ``byte LM T=512`` and ``byte LM T=2048``: vocab 256, batch 2, cross-entropy on every token.

The baselines are ``rwkv_torch.task.baselines`` with the width ``matched_width`` picks for RWKV-7's parameter count
(pre-LN transformer with SDPA and learned positions; a stacked ``nn.LSTM``). Each model is timed in interleaved
rounds (every model once per round, ``--rounds`` rounds, the median per model), so a slow spell of a shared machine
touches every model alike; the ratios are what to read. "saved MB" is what autograd keeps for the backward (each
storage counted once, ``saved_tensors_hooks``): the activation memory of one step.

A first table gives each model's parameter count and the FLOPs of one step that ``torch.utils.flop_counter``
counts (matrix products and attention; elementwise work, the WKV recurrences and ``nn.LSTM``'s fused op are not
counted): the arithmetic a step cannot avoid, to read the timings against. ``--profile`` prints ``torch.profiler``'s
top ops of one RWKV-7 step per workload. Nothing is written or installed.
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_cpu import machine  # this folder is on sys.path when a script here runs
from bench_scaling import saved_bytes

import rwkv_torch as rt
from rwkv_torch.config import param_count
from rwkv_torch.task.baselines import build_baseline, matched_width
from rwkv_torch.train import adamw

WIDTH, LAYERS, HEAD = 256, 6, 64
WORKLOADS = {  # name: (batch, T, features or None for bytes)
    "game-AI (288 features, batch 16, window 60)": (16, 60, 288),
    "byte LM, batch 2, T=512": (2, 512, None),
    "byte LM, batch 2, T=2048": (2, 2048, None),
}
QUICK = {  # the same shapes, shorter: a smoke run of the script
    "game-AI (288 features, batch 16, window 60)": (4, 60, 288),
    "byte LM, batch 2, T=512": (1, 128, None),
}


class Task(nn.Module):
    """A backbone and the loss of its workload: a linear head on every frame (MSE), or next-byte cross-entropy."""

    def __init__(self, backbone: nn.Module, width: int, features: int | None):
        super().__init__()
        self.backbone, self.features = backbone, features
        self.head = nn.Linear(width, 20) if features else None

    def loss(self, x, y):
        h = self.backbone(x, return_sequence=True)
        if self.head is not None:
            return F.mse_loss(self.head(h), y)
        return F.cross_entropy(h.flatten(0, 1), y.flatten())


def build(kind: str, T: int, features: int | None) -> Task:
    io = dict(embed_dim=features) if features else dict(vocab_size=256)
    torch.manual_seed(0)
    if kind.startswith("rwkv"):
        backbone = rt.build(version=int(kind[4:]), hidden_size=WIDTH, num_layers=LAYERS, head_size=HEAD, seed=0,
                            dropout=0.0, **io)
        return Task(backbone, WIDTH, features)
    budget = param_count(version=7, hidden_size=WIDTH, num_layers=LAYERS, head_size=HEAD, **io)
    opts = dict(num_layers=LAYERS, head_size=HEAD, max_len=T, **io)
    width = matched_width(kind, budget, **opts)
    return Task(build_baseline(kind, width=width, **opts), width, features)


def batch(B: int, T: int, features: int | None):
    g = torch.Generator().manual_seed(1)
    if features:
        return torch.randn(B, T, features, generator=g), torch.randn(B, T, 20, generator=g)
    tokens = torch.randint(0, 256, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def step_fn(task: Task, x, y):
    opt = adamw(task.parameters(), lr=1e-4)  # the trainer's optimizer

    def step():
        task.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_table(threads: int, rounds: int, versions: list, workloads: dict) -> None:
    torch.set_num_threads(threads)
    kinds = [f"rwkv{v}" for v in versions] + ["transformer", "lstm"]
    cols = " | ".join(f"{k} ms" for k in kinds)
    ratios = " | ".join(f"RWKV-{v} / transformer | RWKV-{v} / LSTM" for v in versions)
    print(f"\n## {threads} thread{'s' if threads > 1 else ''}: training step (forward + backward + AdamW), median of "
          f"{rounds} interleaved rounds\n")
    print(f"| workload | {cols} | {ratios} | saved MB {' / '.join(kinds)} |")
    print("|---|" + "---|" * (len(kinds) + 2 * len(versions) + 1))
    for name, (B, T, features) in workloads.items():
        x, y = batch(B, T, features)
        tasks = {k: build(k, T, features) for k in kinds}
        steps = {k: step_fn(t, x, y) for k, t in tasks.items()}
        for s in steps.values():  # warm-up: first-call allocations, the C kernel's build
            s()
        times = {k: [] for k in kinds}
        for _ in range(rounds):
            for k in kinds:
                times[k].append(timed(steps[k]))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        saved = {k: saved_bytes(lambda t=t, x=x, y=y: t.loss(x, y)) / 2**20 for k, t in tasks.items()}
        for t in tasks.values():
            t.zero_grad(set_to_none=True)
        ms = " | ".join(f"{med[k]:.0f}" for k in kinds)
        rs = " | ".join(f"{med[f'rwkv{v}'] / med['transformer']:.2f}x | {med[f'rwkv{v}'] / med['lstm']:.2f}x"
                        for v in versions)
        mb = " / ".join(f"{saved[k]:.0f}" for k in kinds)
        print(f"| {name} | {ms} | {rs} | {mb} |", flush=True)


def flop_table(versions: list, workloads: dict) -> None:
    """Parameters and counted FLOPs (forward + backward) of one step per model and workload."""
    from torch.utils.flop_counter import FlopCounterMode

    kinds = [f"rwkv{v}" for v in versions] + ["transformer", "lstm"]
    print("\n## Parameters (M) and matrix FLOPs of one step (G; forward + backward, `torch.utils.flop_counter`)\n")
    print(f"| workload | {' | '.join(kinds)} | {' | '.join(f'RWKV-{v} / transformer FLOPs' for v in versions)} |")
    print("|---|" + "---|" * (len(kinds) + len(versions)))
    for name, (B, T, features) in workloads.items():
        x, y = batch(B, T, features)
        flops, cells = {}, []
        for k in kinds:
            task = build(k, T, features)
            with FlopCounterMode(display=False) as counter:
                task.loss(x, y).backward()
            flops[k] = counter.get_total_flops()
            counted = f"{flops[k] / 1e9:.1f} G" if k != "lstm" else "(its fused op is not counted)"
            cells.append(f"{sum(p.numel() for p in task.parameters()) / 1e6:.2f}M, {counted}")
        rs = " | ".join(f"{flops[f'rwkv{v}'] / flops['transformer']:.2f}x" for v in versions)
        print(f"| {name} | {' | '.join(cells)} | {rs} |", flush=True)


def profile(workloads: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for name, (B, T, features) in workloads.items():
        x, y = batch(B, T, features)
        task = build("rwkv7", T, features)
        step = step_fn(task, x, y)
        step()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        print(f"\n## Profile of one RWKV-7 step: {name}\n")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--versions", type=int, nargs="+", default=[7], choices=[4, 5, 6, 7])
    ap.add_argument("--quick", action="store_true", help="small shapes, one round: checks that the script runs")
    ap.add_argument("--only", nargs="+", default=None, help="workload name prefixes to run (e.g. game byte)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one RWKV-7 step per workload")
    args = ap.parse_args()
    workloads = QUICK if args.quick else WORKLOADS
    if args.only:
        workloads = {k: v for k, v in workloads.items() if any(k.startswith(p) for p in args.only)}
    print(f"machine: {machine()} ({platform.machine()}), torch {torch.__version__}, rwkv_torch {rt.__version__}, "
          f"python {platform.python_version()}")
    if args.profile:
        torch.set_num_threads(args.threads[0])
        profile(workloads)
        return
    flop_table(args.versions, workloads)
    for threads in args.threads:
        run_table(threads, 1 if args.quick else args.rounds, args.versions, workloads)


if __name__ == "__main__":
    main()
