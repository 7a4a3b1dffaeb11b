"""The ``rwkv-torch`` command: thin subcommands over library functions."""

import argparse
import sys
import time

import torch


def demo(frames: int = 1000, embed_dim: int = 64, seed: int = 0, threads: int | None = None) -> dict:
    """Build the default backbone, stream ``frames`` frames through ``step`` and through the parallel forward,
    report whether they agree and the per-frame step latency."""
    import rwkv_torch as rt

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = rt.build(embed_dim=embed_dim, seed=seed).eval()
    c = model.config
    print(f"RWKV-{c.version} backbone: hidden_size={c.hidden_size} num_layers={c.num_layers} "
          f"head_size={c.head_size} embed_dim={embed_dim}, {model.param_count():,} parameters")
    x = torch.randn(1, frames, embed_dim)
    with torch.inference_mode():
        t0 = time.perf_counter()
        par = model(x, return_sequence=True)
        t_par = time.perf_counter() - t0
        state = model.init_state(1)
        lat, outs = [], []
        for t in range(frames):
            t0 = time.perf_counter()
            y, state = model.step(x[:, t], state)
            lat.append(time.perf_counter() - t0)
            outs.append(y)
        seq = torch.stack(outs, dim=1)
    err = ((seq - par).norm() / par.norm()).item()
    lat_ms = torch.tensor(lat) * 1e3
    p50, p99 = lat_ms.quantile(0.5).item(), lat_ms.quantile(0.99).item()
    ok = err < 1e-4
    print(f"parallel forward over {frames} frames: {t_par * 1e3:.1f} ms ({frames / t_par:,.0f} frames/s)")
    print(f"step-by-step vs parallel: relative error {err:.2e} -> {'agree' if ok else 'DISAGREE'}")
    print(f"step latency per frame: p50 {p50:.3f} ms, p99 {p99:.3f} ms (60 FPS budget: 16.7 ms)")
    return dict(rel_error=err, agree=ok, p50_ms=p50, p99_ms=p99)


def _add_demo(sub):
    p = sub.add_parser("demo", help="build the default backbone and check step == parallel forward on a stream")
    p.add_argument("--frames", type=int, default=1000, help="length of the stream (default 1000)")
    p.add_argument("--embed-dim", type=int, default=64, help="features per input frame (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=lambda a: 0 if demo(a.frames, a.embed_dim, a.seed, a.threads)["agree"] else 1)


COMMANDS = {"demo": _add_demo}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rwkv-torch", description="RWKV models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
