"""How cost grows with length, RWKV-7 against an equal-parameter transformer, and the seed project's table (CPU).

    python benchmarks/bench_scaling.py [--quick] [--threads 2] [--tokens 1000000]

Three tables, each printed with the machine and versions (no files written, nothing installed):

1. **The seed's table**: a training step (forward + backward + AdamW, batch 64, 288 features per frame, C=256,
   head size 64, a linear head on every frame) of the 2- and 6-layer RWKV-7 at windows of 30, 60 and 120 frames,
   and the per-frame streaming latency (``model.step_``, batch 1) p50/p99 over 2,000 frames.
2. **RWKV-7 vs a transformer** with about the same parameter count (``rwkv_torch.task.baselines``: pre-LN, SDPA,
   learned positions; width chosen by ``matched_width``), both token models (vocab 256, 6 layers, RWKV width 256):
   training forward+backward time and the bytes autograd saves for the backward (the activation memory, summed
   with ``torch.autograd.graph.saved_tensors_hooks``) at T = 256 ... 4096 (batch 1), with the crossover length;
   then generation cost per token against the position: RWKV-7's ``step_`` against the transformer with a KV
   cache (each new token attends over all earlier ones; written here, the baseline itself has no cache).
3. **Recurrent inference memory** from 1k to ``--tokens`` tokens: a stream fed in 4,096-token pieces through the
   parallel form with the state carried (``return_sequence=False``), run first in the process; its resident and
   peak resident memory after each decade must stay flat.
"""

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from bench_cpu import machine  # this folder is on sys.path when a script here runs


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model, head, opt, x, y) -> None:
    F.mse_loss(head(model(x, return_sequence=True)), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_loss(model, x) -> torch.Tensor:
    logits = model(x[:, :-1], return_sequence=True)
    return F.cross_entropy(logits.flatten(0, 1), x[0, 1:])


def seed_table(rt, quick: bool) -> None:
    print("\n## Training step and streaming latency (RWKV-7, C=256, head size 64, 288 features, fp32)\n")
    print("| layers | batch | window 30 ms | window 60 ms | window 120 ms | step p50 ms | step p99 ms |")
    print("|---|---|---|---|---|---|---|")
    batch, frames = (8, 200) if quick else (64, 2000)
    for layers in (2, 6):
        model = rt.build(embed_dim=288, hidden_size=256, num_layers=layers, head_size=64, dropout=0.0, seed=0)
        head = torch.nn.Linear(256, 20)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
        cells = []
        for window in (30, 60, 120):
            x, y = torch.randn(batch, window, 288), torch.randn(batch, window, 20)
            step = lambda x=x, y=y, model=model, head=head, opt=opt: train_step(model, head, opt, x, y)  # noqa: E731
            cells.append(median_time(step, 3 if quick else 5) * 1e3)
        model.eval()
        state, lat = model.init_state(1), []
        xs = torch.randn(frames + 100, 1, 288)
        with torch.inference_mode():
            for i, x_t in enumerate(xs):
                t0 = time.perf_counter()
                model.step_(x_t, state)
                if i >= 100:
                    lat.append(time.perf_counter() - t0)
        lat_ms = torch.tensor(lat) * 1e3
        p50, p99 = lat_ms.quantile(0.5).item(), lat_ms.quantile(0.99).item()
        print(f"| {layers} | {batch} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {p50:.3f} | {p99:.3f} |")


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``fn`` runs (each storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


class CachedTransformer:
    """Token-by-token decoding of ``rwkv_torch.task.baselines.Transformer`` with a KV cache (same math as its
    forward)."""

    def __init__(self, model):
        self.m = model
        self.k, self.v = [[] for _ in model.blocks], [[] for _ in model.blocks]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        m, pos = self.m, len(self.k[0])
        h = m.inp(torch.tensor([[token]])) + m.pos[pos]
        for i, blk in enumerate(m.blocks):
            C, H = h.shape[-1], blk.num_heads
            q, k, v = blk.qkv(blk.ln1(h)).view(1, 1, 3, H, C // H).permute(2, 0, 3, 1, 4)
            self.k[i].append(k)
            self.v[i].append(v)
            y = F.scaled_dot_product_attention(q, torch.cat(self.k[i], 2), torch.cat(self.v[i], 2))
            h = h + blk.proj(y.transpose(1, 2).reshape(1, 1, C))
            h = h + blk.mlp(blk.ln2(h))
        return m.out(h)


def transformer_table(rt, quick: bool) -> None:
    from rwkv_torch.task.baselines import build_baseline, matched_width

    lengths = [256, 512, 1024] if quick else [256, 512, 1024, 2048, 4096]
    opts = dict(num_layers=6, head_size=64, vocab_size=256)
    rwkv = rt.build(version=7, hidden_size=256, seed=0, **opts)
    budget = sum(p.numel() for p in rwkv.parameters())
    width = matched_width("transformer", budget, max_len=max(lengths), **opts)
    torch.manual_seed(0)
    tf = build_baseline("transformer", width=width, max_len=max(lengths), **opts)
    n_tf = sum(p.numel() for p in tf.parameters())
    print(f"\n## RWKV-7 ({budget:,} params, width 256) vs transformer ({n_tf:,} params, width {width}, learned "
          f"positions up to {max(lengths)}), 6 layers, vocab 256, batch 1, fp32\n")
    print("| T | RWKV-7 fwd+bwd ms | transformer fwd+bwd ms | RWKV-7 saved MB | transformer saved MB |")
    print("|---|---|---|---|---|")
    crossover = None
    for T in lengths:
        x = torch.randint(0, 256, (1, T + 1))
        row = []
        for model in (rwkv, tf):
            ms = median_time(lambda m=model, x=x: (lm_loss(m, x).backward(), m.zero_grad(set_to_none=True)), 3) * 1e3
            mb = saved_bytes(lambda m=model, x=x: lm_loss(m, x)) / 2**20
            model.zero_grad(set_to_none=True)
            row.append((ms, mb))
        (r_ms, r_mb), (t_ms, t_mb) = row
        if crossover is None and r_ms < t_ms:
            crossover = T
        print(f"| {T} | {r_ms:.0f} | {t_ms:.0f} | {r_mb:.0f} | {t_mb:.0f} |")
    print(f"\nRWKV-7 training is faster from T = {crossover} on." if crossover else
          f"\nNo crossover up to T = {max(lengths)}: the transformer trains faster at every length measured.")

    print("\n| position | RWKV-7 `step_` ms/token | transformer with KV cache ms/token |")
    print("|---|---|---|")
    rwkv.eval()
    tf.eval()
    marks = [m for m in (1, 64, 256, 1024, 2048) if m + 8 <= tf.max_len] + [tf.max_len - 8]
    state, cached = rwkv.init_state(1), CachedTransformer(tf)
    tokens = torch.randint(0, 256, (max(marks) + 8,)).tolist()
    per = {"rwkv": {}, "tf": {}}
    steps = {"rwkv": lambda tok: rwkv.step_(torch.tensor([tok]), state), "tf": cached.step}
    with torch.inference_mode():
        for name, step in steps.items():  # one model at a time, so neither evicts the other's cache lines
            for pos, tok in enumerate(tokens):
                t0 = time.perf_counter()
                step(tok)
                dt = time.perf_counter() - t0
                for lo in marks:  # the 8 positions from each mark
                    if lo <= pos < lo + 8:
                        per[name].setdefault(lo, []).append(dt)
    for lo in marks:
        if lo in per["tf"]:
            print(f"| {lo} | {statistics.median(per['rwkv'][lo]) * 1e3:.2f} | "
                  f"{statistics.median(per['tf'][lo]) * 1e3:.2f} |")


def rss_mb() -> tuple:
    """(current, peak) resident memory of this process in MB (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def memory_table(rt, total: int) -> None:
    model = rt.build(version=7, hidden_size=256, num_layers=6, vocab_size=256, seed=0).eval()
    piece = 4096
    x = torch.randint(0, 256, (1, piece))
    print(f"\n## Recurrent inference memory, RWKV-7 C=256 L=6, {piece}-token pieces, state carried\n")
    print("| tokens fed | resident MB | peak resident MB | tok/s |")
    print("|---|---|---|---|")
    state, fed = model.init_state(1), 0
    marks = [10**e for e in range(3, int(math.log10(total)) + 1)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for mark in marks:
            while fed < mark:
                n = min(piece, mark - fed)
                _, state = model(x[:, :n], state, return_sequence=False, return_state=True)
                fed += n
            now, peak = rss_mb()
            print(f"| {fed:,} | {now:.0f} | {peak:.0f} | {fed / (time.perf_counter() - t0):,.0f} |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings (about a minute)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1_000_000, help="length of the memory run (default 1M)")
    p.add_argument("--only", choices=["seed", "transformer", "memory"], default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import rwkv_torch as rt

    print(f"# {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"rwkv_torch {rt.__version__}, python {platform.python_version()}")
    if a.only in (None, "memory"):  # first, so the peak it reports is its own
        memory_table(rt, 20_000 if a.quick else a.tokens)
    if a.only in (None, "seed"):
        seed_table(rt, a.quick)
    if a.only in (None, "transformer"):
        transformer_table(rt, a.quick)


if __name__ == "__main__":
    main()
