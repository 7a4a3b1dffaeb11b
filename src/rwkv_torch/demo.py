"""The main job (``rwkv-torch demo``), the self-checks and benchmarks behind ``check`` and ``stream-bench``, and the
printing front ends of ``generate``, ``info``, ``convert``, ``export`` and ``train`` that ``cli`` calls.

Every function here prints its report to stdout (progress and timings of ``generate`` to stderr) and returns what it
printed as data, so the CLI is a table of argument parsers over these calls and tests can check the values.
"""

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoints import describe, load, save, save_official
from .checks import check_device, check_output_file, check_threads
from .export import OnnxStep, export_onnx, state_names
from .generate import check_limits, full_state, stream_text
from .model import build
from .quantize import weight_format
from .slippi import DATA_SOURCES
from .state import RWKVState
from .stream import Stream
from .tokenizer import TOKENIZER_BY_VOCAB, ByteTokenizer, get_tokenizer
from .train import adamw, train
from .train.units import summary_line

DEMO_PROMPT = "class Parser:\n    def __init__(self"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _positive(**flags) -> None:
    """ValueError naming the first flag (``embed_dim`` -> ``--embed-dim``) whose value is not > 0."""
    for name, value in flags.items():
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")


def demo(seconds: float = 60.0, out: str | None = None, prompt: str = DEMO_PROMPT, max_tokens: int = 300,
         seed: int = 0, threads: int | None = None, progress: bool = True, temperature: float = 1.0,
         top_p: float = 0.85, steps: int | None = None) -> dict:
    """The main job: train a small RWKV-7 byte-level language model on the embedded corpus (the Python standard
    library's sources) for ``seconds``, stream a sample from it, and measure the one-token step against the parallel
    forward (agreement and per-token latency).

    ``steps`` trains exactly that many optimizer steps instead (no time limit), so the run does not depend on the
    machine's speed. Returns the trainer's summary (``step``, ``loss``, ``val_loss``, ``model_dir``, ...) plus
    ``rel_error``, ``agree``, ``p50_ms``, ``p99_ms``, ``timed_steps`` (the one-token steps timed) and ``sample``.
    """
    if steps is None:
        _positive(seconds=seconds)
    _positive(steps=steps)
    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {max_tokens}")
    if check_threads(threads):
        torch.set_num_threads(threads)
    out = out or tempfile.mkdtemp(prefix="rwkv-demo-")
    budget = f"{seconds:g} s" if steps is None else f"{steps} steps"
    print(f"training a small RWKV-7 language model on the Python standard library's sources for {budget} "
          f"(run directory {out})", flush=True)
    model_cfg = dict(hidden_size=128, num_layers=2, head_size=32, window_size=128, batch_size=16)
    time_limit = None if steps is not None else seconds * 1.25
    steps = steps if steps is not None else _demo_steps(seconds, model_cfg, seed)
    res = train(dict(model_cfg, lr=4e-3, lr_final=1e-4, warmup=min(50, steps // 10 + 1), steps=steps,
                     time_limit=time_limit, eval_every=max(1, steps // 4), eval_batches=8, save_every=10**9,
                     log_every=10, max_bytes=4_000_000, seed=seed, out=out, progress=progress))
    val = f", validation {res['val_loss'] / math.log(2):.2f} bits/byte" if res["val_loss"] is not None else ""
    stopped = f" (the time limit stopped it at {res['step']} of {steps} planned steps)" if res["step"] < steps else ""
    print(f"{res['step']} steps: loss {res['loss'] / math.log(2):.2f} bits/byte{val}{stopped}")
    model = load(res["model_dir"]).eval()
    tok = ByteTokenizer()
    print(f"\n--- sample (temperature {temperature:g}, top-p {top_p:g}) ---\n{prompt}", end="", flush=True)
    gen = stream_text(model, tok, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    text = ""
    for piece in gen:
        text += piece
        print(piece, end="", flush=True)
    print("\n--- end of sample ---\n")
    ids = torch.tensor([tok.encode(prompt + text)[:256]])
    r = _step_vs_parallel(model, ids, warmup=8)
    ok = r["rel_error"] < 1e-4
    print(f"step-by-step vs parallel forward over {ids.shape[1]} tokens: relative error {r['rel_error']:.2e} -> "
          f"{'agree' if ok else 'DISAGREE'}")
    print(f"one-token step latency: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms ({torch.get_num_threads()} "
          f"threads); model saved in {res['model_dir']}")
    return dict(rel_error=r["rel_error"], agree=ok, p50_ms=r["p50_ms"], p99_ms=r["p99_ms"],
                timed_steps=r["timed_steps"], sample=text, planned_steps=steps, **res)


def _demo_steps(seconds: float, cfg: dict, seed: int) -> int:
    """How many optimizer steps of the demo's model fit in ``seconds`` on this machine (timed on random bytes), so
    the cosine schedule ends when the time is up."""
    model = build(version=7, vocab_size=256, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                  head_size=cfg["head_size"], seed=seed)
    opt = adamw(model.parameters(), lr=1e-4)  # the trainer's optimizer
    x = torch.randint(0, 256, (cfg["batch_size"], cfg["window_size"] + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        logits = model(x[:, :-1], return_sequence=True)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    per_step = sorted(times[2:])[1] * 1.1  # median of the warm steps, plus the trainer's own overhead
    return max(20, int(seconds / per_step))


def _step_vs_parallel(model, x, warmup: int = 0) -> dict:
    """Run ``x`` ([1, T] ids or [1, T, D] frames) through the parallel forward and one position at a time through
    ``step``: the relative error of the step outputs (``rel_error``), the step latency p50 and p99 in ms over the
    ``timed_steps`` steps after ``warmup`` (all T when T <= warmup), and the seconds of the parallel forward
    (``parallel_s``)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        par = model(x, return_sequence=True)
        t_par = time.perf_counter() - t0
        state, outs, lat = model.init_state(1), [], []
        for t in range(x.shape[1]):
            t0 = time.perf_counter()
            y, state = model.step(x[:, t], state)
            lat.append(time.perf_counter() - t0)
            outs.append(y)
    err = ((torch.stack(outs, 1) - par).norm() / par.norm()).item()
    lat_ms = torch.tensor(lat[warmup:] or lat) * 1e3
    return dict(rel_error=err, p50_ms=lat_ms.quantile(0.5).item(), p99_ms=lat_ms.quantile(0.99).item(),
                timed_steps=len(lat_ms), parallel_s=t_par)


def check(frames: int = 1000, embed_dim: int = 64, seed: int = 0, threads: int | None = None) -> dict:
    """Build the default backbone, stream ``frames`` frames through ``step`` and through the parallel forward,
    report whether they agree and the per-frame step latency. Returns ``rel_error``, ``agree``, ``p50_ms``,
    ``p99_ms`` and ``frames`` (the frames stepped and timed)."""
    _positive(frames=frames, embed_dim=embed_dim)
    if check_threads(threads):
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build(embed_dim=embed_dim, seed=seed).eval()
    c = model.config
    print(f"RWKV-{c.version} backbone: hidden_size={c.hidden_size} num_layers={c.num_layers} "
          f"head_size={c.head_size} embed_dim={embed_dim}, {model.param_count():,} parameters")
    r = _step_vs_parallel(model, torch.randn(1, frames, embed_dim))
    err, p50, p99, t_par = r["rel_error"], r["p50_ms"], r["p99_ms"], r["parallel_s"]
    ok = err < 1e-4
    print(f"parallel forward over {frames} frames: {t_par * 1e3:.1f} ms ({frames / t_par:,.0f} frames/s)")
    print(f"step-by-step vs parallel: relative error {err:.2e} -> {'agree' if ok else 'DISAGREE'}")
    print(f"step latency per frame: p50 {p50:.3f} ms, p99 {p99:.3f} ms (60 FPS budget: 16.7 ms)")
    return dict(rel_error=err, agree=ok, p50_ms=p50, p99_ms=p99, frames=r["timed_steps"])


def bench_stream(model, frames: int = 10_000, *, warmup: int = 100, seed: int = 0) -> dict:
    """Per-frame latency of ``Stream(model).push`` over ``frames`` random frames (or tokens), batch 1.

    Returns ``{"p50_ms", "p99_ms", "mean_ms", "frames"}``, ``frames`` the count of pushes timed."""
    g = torch.Generator().manual_seed(seed)
    s = Stream(model)
    c = model.config
    if c.vocab_size is not None:
        xs = torch.randint(0, c.vocab_size, (warmup + frames,), generator=g)
    else:
        xs = torch.randn(warmup + frames, c.embed_dim, generator=g)
    lat = []
    for i, x in enumerate(xs):
        t0 = time.perf_counter()
        s.push(x)
        if i >= warmup:
            lat.append(time.perf_counter() - t0)
    ms = torch.tensor(lat, dtype=torch.float64) * 1e3
    return dict(p50_ms=ms.quantile(0.5).item(), p99_ms=ms.quantile(0.99).item(), mean_ms=ms.mean().item(),
                frames=len(lat))


def stream_bench(frames: int = 10_000, embed_dim: int = 288, hidden_size: int = 256, num_layers: int = 6,
                 version: int = 7, onnx: bool = True, threads: int | None = None) -> list[dict]:
    """Per-frame latency p50/p99 of the streaming step in PyTorch and onnxruntime against the 60 FPS budget: one
    row per runtime, ``runtime`` plus the keys of ``bench_stream``."""
    _positive(frames=frames, embed_dim=embed_dim, hidden_size=hidden_size, num_layers=num_layers)
    if check_threads(threads):
        torch.set_num_threads(threads)
    model = build(embed_dim=embed_dim, hidden_size=hidden_size, num_layers=num_layers, version=version,
                  seed=0).eval()
    runners = [("pytorch", model)]
    if onnx:
        tmp = Path(tempfile.mkdtemp()) / "step.onnx"
        runners.append(("onnxruntime", OnnxStep(export_onnx(model, tmp), threads=threads)))
    print(f"RWKV-{version} C={hidden_size} L={num_layers} embed_dim={embed_dim}, batch 1, {frames} frames, "
          f"{torch.get_num_threads()} threads")
    print("| runtime | p50 ms | p99 ms | mean ms | within 16.7 ms |")
    print("|---|---|---|---|---|")
    rows = []
    for name, runner in runners:
        r = bench_stream(runner, frames)
        rows.append(dict(runtime=name, **r))
        print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | "
              f"{'yes' if r['p99_ms'] < 16.7 else 'NO'} |")
    return rows


def export(out: str, model: str | None = None, embed_dim: int | None = None, batch_size: int | None = None,
           int8: bool = False) -> str:
    """Export the one-step function of a saved model (or of the default backbone, ``embed_dim`` features per frame,
    default 64) to ONNX. ``embed_dim`` with ``model`` is refused: the model's own sizes are exported."""
    if model and embed_dim is not None:
        raise ValueError(f"--embed-dim is for the fresh backbone; --model {model} is exported at its own sizes "
                         f"(drop --embed-dim)")
    check_output_file(out, f"--out {out}")
    _positive(embed_dim=embed_dim, batch_size=batch_size)
    m = load(model) if model else build(embed_dim=64 if embed_dim is None else embed_dim, seed=0)
    export_onnx(m.eval(), out, batch_size=batch_size, quantize_int8=int8)
    c = m.config
    print(f"wrote {out}: RWKV-{c.version} step, inputs x_t + {len(state_names(c.num_layers))} state tensors "
          f"({', '.join(state_names(c.num_layers)[:3])}, ...), batch {'dynamic' if batch_size is None else batch_size}"
          f"{', int8 weights' if int8 else ''}")
    return out


def train_and_report(args) -> dict:
    """``train(args)`` (a dict, TrainConfig or argparse Namespace), then rank 0 prints the final step, loss,
    validation loss and checkpoint; ``.slp`` data is read by ``rwkv_torch.slippi``. Returns the trainer's summary."""
    given = args if isinstance(args, dict) else getattr(args, "__dict__", {})
    _positive(max_bytes=given.get("max_bytes"))  # before the data loads: 0 would read as "no sources found"
    res = train(args, sources=DATA_SOURCES)
    if res["rank"] == 0:  # under torchrun, rank 0 reports
        print(summary_line(res))
    return res


def generate(model: str, prompt: str, max_tokens: int = 200, temperature: float = 1.0, top_p: float = 0.85,
             top_k: int = 0, presence_penalty: float = 0.2, frequency_penalty: float = 0.2,
             penalty_decay: float = 0.996, stop_tokens=(), seed: int | None = None, tokenizer: str | None = None,
             state_in: str | None = None, state_out: str | None = None, device: str = "cpu",
             weights: str | None = None):
    """Stream a continuation of ``prompt`` to stdout; ``state_in``/``state_out`` continue from / save the state
    after every token (prompt and generated); ``weights`` ("int8", "bf16") quantizes the model as it loads (see
    ``rt.load``). Returns the ``generate.Generation``."""
    check_device(device)
    check_limits(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 penalty_decay=penalty_decay)  # before the model loads (seconds for a large one)
    if state_out:
        check_output_file(state_out, f"--state-out {state_out}")
    m = load(model, device=device, weights=weights)
    V = m.config.vocab_size
    if V is None:
        raise ValueError(f"{model} is a backbone with continuous input (embed_dim={m.config.embed_dim}), not an LM")
    known = {name: vocab for vocab, name in TOKENIZER_BY_VOCAB.items()}.get(tokenizer)
    if known is not None and known != V:  # before loading the tokenizer (World: seconds)
        raise _vocab_mismatch(V, tokenizer, known)
    try:
        tok = get_tokenizer(tokenizer or V)  # by default the tokenizer of the model's vocab size
    except ValueError as e:
        raise ValueError(f"{e} with --tokenizer byte|world") from None
    if tok.vocab_size != V:
        raise _vocab_mismatch(V, tok.name, tok.vocab_size)
    state = None
    if state_in:
        state = RWKVState.load(state_in, device=device).to(dtype=next(m.parameters()).dtype)
    t0 = time.perf_counter()
    it = stream_text(m, tok, prompt, state=state, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     penalty_decay=penalty_decay, stop_tokens=stop_tokens, seed=seed)
    while True:
        try:
            print(next(it), end="", flush=True)
        except StopIteration as e:
            res = e.value
            break
    print()
    dt = time.perf_counter() - t0
    n = len(res.tokens[0])
    print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s{', stopped' if res.stopped[0] else ''}]",
          file=sys.stderr)
    if state_out:
        full_state(m, res).save(state_out)
        print(f"[state saved to {state_out}]", file=sys.stderr)
    return res


def _vocab_mismatch(model_vocab: int, name: str, vocab: int) -> ValueError:
    size = "smaller" if model_vocab < vocab else "larger"
    return ValueError(f"the model's vocab_size {model_vocab} is {size} than the {name} "
                      f"tokenizer's {vocab}; they must match (--tokenizer byte|world)")


def info(path: str) -> dict:
    """Print and return the version, sizes, parameter count and dtype of a checkpoint."""
    d = describe(load(path))
    print(f"{path}: RWKV-{d['version']}")
    for k, v in d.items():
        print(f"  {k}: {v:,}" if k == "params" else f"  {k}: {v}")
    return d


def _refuse_taken(dst: str, overwrite: bool) -> None:
    """Refuse a ``dst`` that holds a model (a ``.pth`` file, or a directory's config.json / model.safetensors)
    unless ``overwrite``."""
    d = Path(dst)
    taken = [d] if dst.endswith(".pth") and d.exists() else [d / n for n in ("config.json", "model.safetensors")
                                                            if (d / n).exists()]
    if taken and not overwrite:
        raise ValueError(f"{dst} already holds a model ({', '.join(p.name for p in taken)}); pass --overwrite to "
                         f"replace it, or choose another destination")


def merge(run: str, dst: str, overwrite: bool = False) -> str:
    """The language model of training run ``run`` (a fine-tune's LoRA merged into plain weights) -> native directory
    ``dst``, or official ``.pth`` when ``dst`` ends in ``.pth``."""
    from .train import load_task_model

    _refuse_taken(dst, overwrite)
    r = Path(run)
    if r.is_dir() and next(r.glob("ckpt-*.pt"), None) is None:
        raise ValueError(f"{run}: no training run here (no ckpt-*.pt checkpoint); merge takes the folder of a "
                         f"run written by rwkv-torch train (its --out)")
    if not r.exists():
        raise ValueError(f"{run}: no such run folder or checkpoint file")
    model, ckpt = load_task_model(run)
    if not model.lm or not ckpt["config"]["backbone"].startswith("rwkv"):
        raise ValueError(f"{run}: a {ckpt['config']['backbone']} model with task heads "
                         f"({', '.join(model.target_names)}); merge writes RWKV language models (load a task model "
                         f"with rwkv_torch.train.load_task_model, which merges LoRA as it loads)")
    if model.state0 is not None:
        raise ValueError(f"{run}: a state-tuning run: its weights are its base's ({ckpt['config']['init_from']}); "
                         f"the learned state is {Path(run) / 'state.safetensors'} (generate --state-in)")
    if ckpt["config"].get("lora_rank") is None:
        raise ValueError(f"{run}: not a LoRA run (trained without --lora-rank): there is nothing to merge; its model "
                         f"is {Path(run) / 'model'} (rwkv-torch convert copies it, to a .pth too)")
    m = model.backbone
    out = save_official(m, dst) if dst.endswith(".pth") else save(m, dst)
    c = m.config
    print(f"wrote {out} ({'official .pth' if dst.endswith('.pth') else 'model.safetensors + config.json'}): "
          f"RWKV-{c.version}, {c.num_layers} layers, hidden {c.hidden_size}, {m.param_count():,} parameters, from "
          f"step {ckpt['step']} of {run}")
    return str(out)


def convert(src: str, dst: str, dtype: str | None = None, overwrite: bool = False, weights: str | None = None,
            format: str | None = None) -> str:
    """Official ``.pth`` (or native directory) ``src`` -> native directory ``dst``, or official ``.pth`` when
    ``dst`` ends in ``.pth``; ``dtype`` (a key of ``DTYPES``) casts the weights; ``weights`` ("int8", "bf16")
    writes a quantized native directory that loads without re-quantizing. An existing model at ``dst``
    (the ``.pth`` file, or a directory's ``config.json``/``model.safetensors``) is replaced only with ``overwrite``.
    ``format="hf"`` writes a transformers directory instead (``rwkv_torch.hf.save_hf``)."""
    _refuse_taken(dst, overwrite)
    if format == "hf":
        return _convert_hf(src, dst, dtype, weights)
    if weights not in (None, "fp32") and dst.endswith(".pth"):
        raise ValueError(f"--weights {weights} writes the native format (a directory); official .pth files hold "
                         f"float weights, so choose a destination that does not end in .pth")
    m = load(src, dtype=DTYPES[dtype] if dtype else None, weights=weights)
    if dst.endswith(".pth") and weight_format(m) != "fp32":
        raise ValueError(f"{src} holds {weight_format(m)} weights; official .pth files hold float weights (convert "
                         "the fp32 original instead)")
    out = save_official(m, dst) if dst.endswith(".pth") else save(m, dst)
    c = m.config
    kind = weight_format(m) + " weights" if weight_format(m) != "fp32" else str(next(m.parameters()).dtype)
    print(f"wrote {out} ({'official .pth' if dst.endswith('.pth') else 'model.safetensors + config.json'}): "
          f"RWKV-{c.version}, {c.num_layers} layers, hidden {c.hidden_size}, {m.param_count():,} parameters, "
          f"{kind.replace('torch.', '')}")
    return str(out)


def _convert_hf(src: str, dst: str, dtype: str | None, weights: str | None) -> str:
    from .hf import save_hf

    if weights not in (None, "fp32"):
        raise ValueError(f"--weights {weights} writes the native format; --format hf writes float weights")
    m = load(src, dtype=DTYPES[dtype] if dtype else None)
    out = save_hf(m, dst)
    c = m.config
    print(f"wrote {out} (transformers: rwkv_torch.hf.register(), then AutoModelForCausalLM.from_pretrained): "
          f"RWKV-{c.version}, {c.num_layers} layers, hidden {c.hidden_size}, {m.param_count():,} parameters, "
          f"{str(next(m.parameters()).dtype).replace('torch.', '')}")
    return str(out)
