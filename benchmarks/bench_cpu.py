"""CPU speed of rwkv_torch against the official ``rwkv`` package (RWKV-7, fp32): step, prefill, training, and our
int8/bf16 weight formats (``rt.load(path, weights=...)``) with their resident memory.

    python benchmarks/bench_cpu.py [--quick] [--threads 2] [--rounds 5] [--compile-prefill small] [--weights int8]

For each shape (RWKV-7 C=256 L=6 vocab 256; the 0.1B shape C=768 L=12 vocab 65536 unless --quick) it builds one
random official-format checkpoint, loads it in both runtimes (ours with ``rt.load``; the official package as
``RWKV(path, "cpu fp32")`` with ``RWKV_V7_ON=1``, ``RWKV_JIT_ON=1``), checks that their logits agree, then
measures in the same process, alternating the runtimes round by round:

* step latency, batch 1: p50 over all rounds of ``model.step`` (new state per token), ``model.step_`` (state
  updated in place, as the official ``forward`` does), ``model.compile_step()`` (AOTInductor; C256 only unless
  ``--compile all``) and the official ``forward(token, state)``;
* prefill of 1024 tokens from a fresh state (ours: the parallel chunked forward, fp32 and under bf16 autocast,
  with the bf16 error stated; official: ``forward(tokens, None)``, its per-token loop);
* training forward+backward of the C=256 model (cross-entropy, batch 1): chunked vs the naive loop at T=512,
  and the chunked cost from T=512 to T=4096;
* for each weight format in ``--weights`` (default bf16 and int8): ``step``/``step_`` latency and fp32-activation
  prefill in the same alternating rounds, and the resident memory of the loaded model in every format (RSS of a
  fresh process after ``rt.load`` and one step minus that after the imports).

The official package is imported only if installed; otherwise only our columns are printed. Ratios are ours over
theirs measured in the same run (step: lower is better; prefill: higher is better). Installs nothing.
"""

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"C256-L6": dict(hidden_size=256, num_layers=6, vocab_size=256),
          "0.1B": dict(hidden_size=768, num_layers=12, vocab_size=65536)}
PREFILL_T = 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def official_version() -> str | None:
    if importlib.util.find_spec("rwkv") is None:
        return None
    from importlib.metadata import version

    return version("rwkv")


def random_checkpoint(rt, opts: dict, directory: Path) -> Path:
    """The official init plus N(0, 0.02) noise on every parameter (the init zeroes some matrices)."""
    from rwkv_torch.checkpoints import save_official

    model = rt.build(seed=0, **opts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return save_official(model, directory / f"rwkv7-{opts['hidden_size']}-{opts['num_layers']}.pth")


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_steps(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _step_runs(model, suffix: str = "") -> dict:
    """``step`` (new state per token) and ``step_`` (in place) of one model, batch 1."""
    tok = torch.tensor([7])
    state = [model.init_state(1)]
    inplace_state = model.init_state(1)

    def step():
        state[0] = model.step(tok, state[0])[1]

    def step_():
        model.step_(tok, inplace_state)

    return {"step" + suffix: step, "step_" + suffix: step_}


def bench_step(ours, theirs, compiled, rounds: int, n: int, formats: dict | None = None) -> dict:
    """Per-token latency samples, batch 1, alternating the runtimes round by round. ``formats``: name -> model in
    another weight format, timed as ``step <name>`` / ``step_ <name>``."""
    compiled_state = [ours.init_state(1)]
    their_state = [None]

    def compiled_step():
        compiled_state[0] = compiled.step(torch.tensor([7]), compiled_state[0])[1]

    def theirs_step():
        their_state[0] = theirs.forward(7, their_state[0])[1]

    runs = _step_runs(ours)
    for name, model in (formats or {}).items():
        runs |= _step_runs(model, f" {name}")
    if compiled is not None:
        runs["compiled"] = compiled_step
    if theirs is not None:
        runs["official"] = theirs_step
    samples = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            time_steps(fn, 30)  # warm-up
        for _ in range(rounds):
            for k, fn in runs.items():
                samples[k] += time_steps(fn, n)
    return {k: p50_ms(v) for k, v in samples.items()}


def bench_prefill(ours, theirs, rounds: int, compiled=None, formats: dict | None = None) -> dict:
    """Seconds for PREFILL_T tokens from a fresh state (median over rounds), and the bf16 error vs fp32.
    ``compiled``: ``torch.compile(ours)``, timed as well (fp32) and checked against the eager forward. ``formats``:
    name -> model in another weight format (fp32 activations), timed and checked against fp32 as well."""
    V = ours.config.vocab_size
    tokens = torch.randint(0, V, (1, PREFILL_T), generator=torch.Generator().manual_seed(1))

    def fp32():
        return ours(tokens, return_sequence=False)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(tokens, return_sequence=False)

    runs = {"fp32": fp32, "bf16": bf16}
    if compiled is not None:
        runs["compiled"] = lambda: compiled(tokens, return_sequence=False)
    for name, model in (formats or {}).items():
        runs[f"weights {name}"] = lambda model=model: model(tokens, return_sequence=False)
    if theirs is not None:
        ids = tokens[0].tolist()
        runs["official"] = lambda: theirs.forward(ids, None)[0]
    samples = {k: [] for k in runs}
    with torch.inference_mode():
        ref, low = fp32(), bf16().float()
        for fn in runs.values():
            fn()
        for _ in range(rounds):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in samples.items()}
    out["bf16_err"] = ((low - ref).norm() / ref.norm()).item()
    out["bf16_maxabs"] = (low - ref).abs().max().item()
    if compiled is not None:
        with torch.inference_mode():
            out["compiled_err"] = ((runs["compiled"]() - ref).norm() / ref.norm()).item()
    for name in formats or {}:
        with torch.inference_mode():
            out[f"weights {name}_err"] = ((runs[f"weights {name}"]() - ref).norm() / ref.norm()).item()
    return out


def resident_mb(path: Path, weights: str | None) -> tuple[float, float]:
    """(MB of resident memory that loading ``path`` in ``weights`` format and one step add to a fresh process whose
    imports and C kernels are already loaded, MB of the model's tensors). The pages of a memory-mapped ``.pth`` that
    were read count as well; what quantizing frees may stay in the allocator's heap."""
    code = ("import resource, sys, torch, rwkv_torch as rt\n"
            "from rwkv_torch.ops import cpu_lib\n"
            "from rwkv_torch.checkpoints import official, native\n"
            "cpu_lib.available()\n"
            "def rss():\n"
            "    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
            "base = rss()\n"
            f"m = rt.load({str(path)!r}, weights={weights!r})\n"
            "import gc; gc.collect()\n"
            "with torch.inference_mode():\n"
            "    m.step(torch.tensor([7]))\n"
            "size = sum(t.numel() * t.element_size() for t in m.state_dict().values())\n"
            "print((rss() - base) / 2**20, size / 2**20)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    rss, size = proc.stdout.split()[-2:]
    return float(rss), float(size)


def check_parity(ours, theirs, n: int = 16) -> float:
    """Max abs difference of the logits over n tokens fed one by one."""
    ids = torch.randint(0, ours.config.vocab_size, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    state, their_state, diff = ours.init_state(1), None, 0.0
    with torch.inference_mode():
        for t in ids:
            y, state = ours.step(torch.tensor([t]), state)
            z, their_state = theirs.forward(t, their_state)
            diff = max(diff, (y[0] - z.float()).abs().max().item())
    return diff


def bench_training(rt, rounds: int) -> dict:
    """Forward+backward seconds of the C=256 token model (cross-entropy, batch 1) per backend and length."""
    model = rt.build(seed=0, **SHAPES["C256-L6"]).train()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    cases = {("chunk", 512), ("naive", 512), ("chunk", 4096)}
    out = {}
    for backend, T in sorted(cases):
        x = torch.randint(0, V, (1, T + 1), generator=g)

        def fwd_bwd(x=x, backend=backend):
            logits = model(x[:, :-1], backend=backend)
            F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
            model.zero_grad(set_to_none=True)

        fwd_bwd()
        reps = 3 if backend == "naive" else rounds
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fwd_bwd()
            ts.append(time.perf_counter() - t0)
        out[(backend, T)] = statistics.median(ts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the 0.1B shape")
    p.add_argument("--threads", type=int, default=2, help="torch threads (both runtimes)")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--steps", type=int, default=200, help="tokens per step-latency round (C256; 0.1B uses 1/5)")
    p.add_argument("--skip-training", action="store_true", help="skip the training rows")
    p.add_argument("--compile", choices=["none", "small", "all"], default="small",
                   help="also time model.compile_step() (AOTInductor): for no shape, C256 only, or every shape")
    p.add_argument("--compile-prefill", choices=["none", "small", "all"], default="none",
                   help="also time prefill through torch.compile(model) (fp32): no shape, C256 only, or every shape")
    p.add_argument("--weights", default="bf16,int8",
                   help="comma-separated weight formats timed besides fp32 (bf16, int8; '' for none)")
    p.add_argument("--no-memory", action="store_true", help="skip the resident-memory rows")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    their_version = official_version()
    if their_version is not None:
        os.environ["RWKV_V7_ON"] = "1"  # read by the rwkv package at import
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
        from rwkv.model import RWKV as Official
    import rwkv_torch as rt

    print(f"# {machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"# torch {torch.__version__}, rwkv {their_version or 'not installed'}, rwkv_torch {rt.__version__}, "
          f"python {platform.python_version()}")
    shapes = ["C256-L6"] if a.quick else list(SHAPES)
    # Training first, while the process is fresh (the big checkpoints below leave a fragmented heap behind).
    tr = None if a.skip_training else bench_training(rt, a.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            path = random_checkpoint(rt, SHAPES[name], Path(tmp))
            ours = rt.load(path)
            theirs = Official(str(path)[: -len(".pth")], "cpu fp32") if their_version else None
            if theirs is not None:
                print(f"# {name}: max |logit difference| ours vs official over 16 tokens: "
                      f"{check_parity(ours, theirs):.1e}")
            n = a.steps if name == "C256-L6" else max(a.steps // 5, 10)
            compiled = None
            if a.compile == "all" or (a.compile == "small" and name == "C256-L6"):
                t0 = time.perf_counter()
                compiled = ours.compile_step(batch_size=1)
                print(f"# {name}: compile_step took {time.perf_counter() - t0:.0f} s")
            formats = {fmt: rt.load(path, weights=fmt) for fmt in filter(None, a.weights.split(","))}
            step = bench_step(ours, theirs, compiled, a.rounds, n, formats)
            fwd = None
            if a.compile_prefill == "all" or (a.compile_prefill == "small" and name == "C256-L6"):
                t0 = time.perf_counter()
                fwd = torch.compile(ours)
                with torch.inference_mode():
                    fwd(torch.zeros(1, PREFILL_T, dtype=torch.long), return_sequence=False)
                print(f"# {name}: torch.compile of the forward took {time.perf_counter() - t0:.0f} s")
            pre = bench_prefill(ours, theirs, max(a.rounds // 2, 2), fwd, formats)
            mem = {}
            for fmt, model in ({} if a.no_memory else {"fp32": ours, **formats}).items():
                native = rt.save(model, Path(tmp) / f"native-{fmt}")  # what `convert --weights` writes
                mem[fmt] = (resident_mb(path, fmt)[0], *resident_mb(native, None))
            rows.append((name, step, pre, mem))
            del ours, theirs, compiled, fwd, formats
            path.unlink()

    has_official = their_version is not None
    print("\n| shape | measure | ours | official | ours / official |")
    print("|---|---|---|---|---|")
    for name, step, pre, mem in rows:
        off = step.get("official")
        fmts = [k[len("step "):] for k in step if k.startswith("step ")]
        labels = (("step", "step p50 ms (`step`)"), ("step_", "step p50 ms (`step_`, in place)"),
                  ("compiled", "step p50 ms (`compile_step()`)"),
                  *((f"step {f}", f"step p50 ms (`step`, {f} weights)") for f in fmts),
                  *((f"step_ {f}", f"step p50 ms (`step_`, {f} weights)") for f in fmts))
        for k, label in labels:
            if k not in step:
                continue
            ratio = f"{step[k] / off:.2f}x" if has_official else "-"
            print(f"| {name} | {label} | {step[k]:.3f} | {off if off is None else f'{off:.3f}'} | {ratio} |")
        off_tps = PREFILL_T / pre["official"] if has_official else None
        for k, label in (("fp32", "prefill 1024 tok/s fp32"), ("bf16", "prefill 1024 tok/s bf16 autocast"),
                         ("compiled", "prefill 1024 tok/s fp32, `torch.compile(model)`"),
                         *((f"weights {f}", f"prefill 1024 tok/s, {f} weights") for f in fmts)):
            if k not in pre:
                continue
            tps = PREFILL_T / pre[k]
            ratio = f"{tps / off_tps:.2f}x" if has_official else "-"
            off_txt = f"{off_tps:,.0f} (fp32)" if has_official else "-"
            print(f"| {name} | {label} | {tps:,.0f} | {off_txt} | {ratio} |")
        print(f"| {name} | bf16 vs fp32 last logits | rel. error {pre['bf16_err']:.1e}, "
              f"max abs {pre['bf16_maxabs']:.1e} | | |")
        if "compiled_err" in pre:
            print(f"| {name} | compiled vs eager last logits | rel. error {pre['compiled_err']:.1e} | | |")
        for f in fmts:
            err = pre[f"weights {f}_err"]
            print(f"| {name} | {f} weights vs fp32, last logits after prefill | rel. error {err:.1e} | | |")
        for f, (from_pth, from_dir, size) in mem.items():
            print(f"| {name} | loaded model, {f} weights: resident MB from the .pth / from the native directory "
                  f"(tensor MB) | {from_pth:,.0f} / {from_dir:,.0f} ({size:,.0f}) | | |")
    if tr is not None:
        c512, n512, c4096 = tr[("chunk", 512)], tr[("naive", 512)], tr[("chunk", 4096)]
        print("\n| training fwd+bwd, C256-L6, batch 1 | tok/s | ratio |")
        print("|---|---|---|")
        print(f"| naive loop, T=512 | {512 / n512:,.0f} | 1.00x |")
        print(f"| chunked, T=512 | {512 / c512:,.0f} | {n512 / c512:.1f}x vs naive |")
        print(f"| chunked, T=4096 | {4096 / c4096:,.0f} | time x{c4096 / c512:.2f} for 8x the tokens |")


if __name__ == "__main__":
    main()
