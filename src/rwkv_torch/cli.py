"""The ``rwkv-torch`` command: thin subcommands over library functions."""

import argparse
import math
import sys
import time

import torch

DEMO_PROMPT = "class Parser:\n    def __init__(self"


def demo(seconds: float = 60.0, out: str | None = None, prompt: str = DEMO_PROMPT, max_tokens: int = 300,
         seed: int = 0, threads: int | None = None, progress: bool = True, temperature: float = 1.0,
         top_p: float = 0.85) -> dict:
    """The main job: train a small RWKV-7 byte-level language model on the embedded corpus (the Python standard
    library's sources) for ``seconds``, stream a sample from it, and measure the one-token step against the parallel
    forward (agreement and per-token latency)."""
    import tempfile

    import rwkv_torch as rt
    from rwkv_torch.generate import stream_text
    from rwkv_torch.tokenizer import ByteTokenizer
    from rwkv_torch.train import train

    if threads:
        torch.set_num_threads(threads)
    out = out or tempfile.mkdtemp(prefix="rwkv-demo-")
    print(f"training a small RWKV-7 language model on the Python standard library's sources for {seconds:g} s "
          f"(run directory {out})", flush=True)
    model_cfg = dict(hidden_size=128, num_layers=2, head_size=32, window_size=128, batch_size=16)
    steps = _demo_steps(seconds, model_cfg, seed)
    res = train(dict(model_cfg, lr=4e-3, lr_final=1e-4, warmup=min(50, steps // 10 + 1), steps=steps,
                     time_limit=seconds * 1.25, eval_every=max(1, steps // 4), eval_batches=8, save_every=10**9,
                     log_every=10, max_bytes=4_000_000, seed=seed, out=out, progress=progress))
    val = f", validation {res['val_loss'] / math.log(2):.2f} bits/byte" if res["val_loss"] is not None else ""
    print(f"{res['step']} steps: loss {res['loss'] / math.log(2):.2f} bits/byte{val}")
    model = rt.load(res["model_dir"]).eval()
    tok = ByteTokenizer()
    print(f"\n--- sample (temperature {temperature:g}, top-p {top_p:g}) ---\n{prompt}", end="", flush=True)
    gen = stream_text(model, tok, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    text = ""
    for piece in gen:
        text += piece
        print(piece, end="", flush=True)
    print("\n--- end of sample ---\n")
    ids = torch.tensor([tok.encode(prompt + text)[:256]])
    err, p50, p99, _ = _step_vs_parallel(model, ids, warmup=8)
    ok = err < 1e-4
    print(f"step-by-step vs parallel forward over {ids.shape[1]} tokens: relative error {err:.2e} -> "
          f"{'agree' if ok else 'DISAGREE'}")
    print(f"one-token step latency: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({torch.get_num_threads()} threads); "
          f"model saved in {res['model_dir']}")
    return dict(rel_error=err, agree=ok, p50_ms=p50, p99_ms=p99, sample=text, **res)


def _demo_steps(seconds: float, cfg: dict, seed: int) -> int:
    """How many optimizer steps of the demo's model fit in ``seconds`` on this machine (timed on random bytes), so
    the cosine schedule ends when the time is up."""
    import rwkv_torch as rt

    model = rt.build(version=7, vocab_size=256, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                     head_size=cfg["head_size"], seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


def _add_demo(sub):
    p = sub.add_parser("demo", help="train a small RWKV-7 LM for a minute, stream a sample, time the step")
    p.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    p.add_argument("--out", default=None, help="run directory (default: a temporary directory)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="start of the sample")
    p.add_argument("--max-tokens", type=int, default=300, help="bytes to generate (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and sampling")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass (default 0.85)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=lambda a: 0 if demo(a.seconds, a.out, a.prompt, a.max_tokens, a.seed, a.threads,
                                            a.progress, a.temperature, a.top_p)["agree"] else 1)


def _step_vs_parallel(model, x, warmup: int = 0) -> tuple:
    """Run ``x`` ([1, T] ids or [1, T, D] frames) through the parallel forward and one position at a time through
    ``step``: (relative error of the step outputs, step latency p50 and p99 in ms after ``warmup`` steps, seconds of
    the parallel forward)."""
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
    return err, lat_ms.quantile(0.5).item(), lat_ms.quantile(0.99).item(), t_par


def check(frames: int = 1000, embed_dim: int = 64, seed: int = 0, threads: int | None = None) -> dict:
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
    err, p50, p99, t_par = _step_vs_parallel(model, torch.randn(1, frames, embed_dim))
    ok = err < 1e-4
    print(f"parallel forward over {frames} frames: {t_par * 1e3:.1f} ms ({frames / t_par:,.0f} frames/s)")
    print(f"step-by-step vs parallel: relative error {err:.2e} -> {'agree' if ok else 'DISAGREE'}")
    print(f"step latency per frame: p50 {p50:.3f} ms, p99 {p99:.3f} ms (60 FPS budget: 16.7 ms)")
    return dict(rel_error=err, agree=ok, p50_ms=p50, p99_ms=p99)


def _add_check(sub):
    p = sub.add_parser("check", help="build the default backbone and check step == parallel forward on a stream")
    p.add_argument("--frames", type=int, default=1000, help="length of the stream (default 1000)")
    p.add_argument("--embed-dim", type=int, default=64, help="features per input frame (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=lambda a: 0 if check(a.frames, a.embed_dim, a.seed, a.threads)["agree"] else 1)


def stream_bench(frames: int = 10_000, embed_dim: int = 288, hidden_size: int = 256, num_layers: int = 6,
                 version: int = 7, onnx: bool = True, threads: int | None = None) -> list[dict]:
    """Per-frame latency p50/p99 of the streaming step in PyTorch and onnxruntime against the 60 FPS budget."""
    import tempfile
    from pathlib import Path

    import rwkv_torch as rt
    from rwkv_torch.stream import bench_stream

    if threads:
        torch.set_num_threads(threads)
    model = rt.build(embed_dim=embed_dim, hidden_size=hidden_size, num_layers=num_layers, version=version,
                     seed=0).eval()
    runners = [("pytorch", model)]
    if onnx:
        from rwkv_torch.export import OnnxStep, export_onnx

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


def _add_stream_bench(sub):
    p = sub.add_parser("stream-bench", help="per-frame streaming latency (PyTorch and onnxruntime)")
    p.add_argument("--frames", type=int, default=10_000, help="frames to stream (default 10000)")
    p.add_argument("--embed-dim", type=int, default=288, help="features per frame (default 288)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width (default 256)")
    p.add_argument("--num-layers", type=int, default=6, help="layers (default 6)")
    p.add_argument("--version", type=int, default=7, choices=[4, 5, 6, 7], help="RWKV version (default 7)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime row")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both runtimes")
    p.set_defaults(func=lambda a: stream_bench(a.frames, a.embed_dim, a.hidden_size, a.num_layers, a.version,
                                               not a.no_onnx, a.threads) and 0)


def export(out: str, model: str | None = None, embed_dim: int = 64, batch_size: int | None = None,
           int8: bool = False) -> str:
    """Export the one-step function of a saved model (or of the default backbone) to ONNX."""
    import rwkv_torch as rt
    from rwkv_torch.export import export_onnx, state_names

    m = rt.load(model) if model else rt.build(embed_dim=embed_dim, seed=0)
    export_onnx(m.eval(), out, batch_size=batch_size, quantize_int8=int8)
    c = m.config
    print(f"wrote {out}: RWKV-{c.version} step, inputs x_t + {len(state_names(c.num_layers))} state tensors "
          f"({', '.join(state_names(c.num_layers)[:3])}, ...), batch {'dynamic' if batch_size is None else batch_size}"
          f"{', int8 weights' if int8 else ''}")
    return out


def _add_export(sub):
    p = sub.add_parser("export", help="export the recurrent step to ONNX (state as explicit inputs/outputs)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--model", default=None, help="a model directory written by rt.save (default: a fresh backbone)")
    p.add_argument("--embed-dim", type=int, default=64, help="embed_dim of the fresh backbone when --model is absent")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 weight quantization (onnxruntime)")
    p.set_defaults(func=lambda a: export(a.out, a.model, a.embed_dim, a.batch_size, a.int8) and 0)


def _add_train(sub):
    from rwkv_torch.train import BACKBONES

    p = sub.add_parser("train", help="train a model on episodes (.npz), text, or the built-in default corpus")
    a = p.add_argument
    a("--temporal", action="store_true", default=None,
      help="accepted for ExPhil command lines: every backbone here is temporal (trained on windows of frames)")
    a("--backbone", choices=BACKBONES, default=None, help="rwkv7 (default), rwkv6/5/4, or a same-budget baseline")
    a("--hidden-size", type=int, default=None, help="model width (default 256)")
    a("--num-layers", type=int, default=None, help="layers (default 6)")
    a("--head-size", type=int, default=None, help="head size (default 64)")
    a("--window-size", type=int, default=None, help="positions per training window (default 256)")
    a("--stride", type=int, default=None,
      help="window start spacing (default: window size, which carries the state across consecutive windows)")
    a("--dropout", type=float, default=None, help="dropout (default 0)")
    a("--precision", choices=["fp32", "bf16"], default=None, help="fp32 (default) or bf16 autocast")
    a("--truncate-bptt", type=int, default=None, help="back-propagate through at most N positions (default: window)")
    a("--gradient-checkpoint", action="store_true", default=None,
      help="recompute each block in the backward pass: less memory, ~1.3x the compute (RWKV backbones)")
    a("--compile", action="store_true", default=None,
      help="torch.compile the model (RWKV-7: one graph; ~1.4x faster CPU training after 1-2 minutes of compiling)")
    a("--data", default=None,
      help=".npz episode file or directory, or a text file/directory (default: the Python stdlib sources)")
    a("--max-bytes", type=int, default=None, help="read at most this many bytes of text (default corpus: 8 MB)")
    a("--tokenizer", choices=["byte", "world"], default=None,
      help="text as bytes (vocab 256, default) or RWKV World tokens (vocab 65536; needs the rwkv package)")
    a("--val-fraction", type=float, default=None, help="fraction of episodes/documents held out (default 0.05)")
    a("--out", default=None, help="run directory (default runs/<date-time>)")
    a("--steps", type=int, default=None, help="total optimizer steps (default 1000)")
    a("--epochs", type=float, default=None,
      help="train for N passes over the training windows instead of --steps (steps = ceil(N * windows / batch))")
    a("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps of this invocation")
    a("--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many seconds of training")
    a("--batch-size", type=int, default=None, help="windows per step (default 16)")
    a("--lr", type=float, default=None, help="peak learning rate (default 6e-4)")
    a("--lr-final", type=float, default=None, help="learning rate at the end of the cosine (default 1e-5)")
    a("--warmup", type=int, default=None, help="warm-up steps (default 50)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay on 2-D weights (default 0)")
    a("--adam-eps", type=float, default=None, help="Adam epsilon (default 1e-18, the official recipe)")
    a("--seed", type=int, default=None, help="seed for weights, data order and dropout (default 0)")
    a("--resume", default=None, help="run directory or checkpoint to continue from")
    a("--eval-every", type=int, default=None, help="validate every N steps (default 200)")
    a("--eval-batches", type=int, default=None, help="batches per validation (default 8)")
    a("--save-every", type=int, default=None, help="checkpoint every N steps (default 500)")
    a("--keep-checkpoints", type=int, default=None, help="checkpoints kept (default 3)")
    a("--log-every", type=int, default=None, help="write metrics.jsonl every N steps (default 10)")
    a("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")

    def run(args):
        from rwkv_torch.train import train

        try:
            res = train(args)
        except ValueError as e:  # bad data or options: the message names the file or flag
            print(f"rwkv-torch train: error: {e}", file=sys.stderr)
            return 2
        if res["rank"] != 0:  # under torchrun, rank 0 reports
            return 0
        val = f", val_loss {res['val_loss']:.4f}" if res["val_loss"] is not None else ""
        print(f"step {res['step']}: loss {res['loss']:.4f}{val}; checkpoint {res['checkpoint']}")
        return 0

    p.set_defaults(func=run)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _error(command: str, e: Exception) -> int:
    print(f"rwkv-torch {command}: error: {e}", file=sys.stderr)
    return 2


def generate(model: str, prompt: str, max_tokens: int = 200, temperature: float = 1.0, top_p: float = 0.85,
             top_k: int = 0, presence_penalty: float = 0.2, frequency_penalty: float = 0.2,
             penalty_decay: float = 0.996, stop_tokens=(), seed: int | None = None, tokenizer: str | None = None,
             state_in: str | None = None, state_out: str | None = None, device: str = "cpu"):
    """Stream a continuation of ``prompt`` to stdout; ``state_in``/``state_out`` continue from / save the state
    after every token (prompt and generated). Returns the ``generate.Generation``."""
    import rwkv_torch as rt
    from rwkv_torch.generate import full_state, stream_text
    from rwkv_torch.tokenizer import get_tokenizer

    m = rt.load(model, device=device)
    V = m.config.vocab_size
    if V is None:
        raise ValueError(f"{model} is a backbone with continuous input (embed_dim={m.config.embed_dim}), not an LM")
    try:
        tok = get_tokenizer(tokenizer or V)  # by default the tokenizer of the model's vocab size
    except ValueError as e:
        raise ValueError(f"{e} with --tokenizer byte|world") from None
    if tok.vocab_size < V:
        raise ValueError(f"the model's vocab_size {V} is larger than the {tok.name} tokenizer's {tok.vocab_size}")
    state = None
    if state_in:
        state = rt.RWKVState.load(state_in, device=device).to(dtype=next(m.parameters()).dtype)
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


def _add_generate(sub):
    p = sub.add_parser("generate", help="stream text from a language model (official .pth or rt.save directory)")
    a = p.add_argument
    a("--model", required=True, help="an official .pth checkpoint or a directory written by rt.save")
    a("--prompt", required=True, help="the text to continue")
    a("--max-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    a("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (default 1.0)")
    a("--top-p", type=float, default=0.85, help="nucleus sampling mass; 1 is off (default 0.85, as the rwkv package)")
    a("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off (default 0)")
    a("--presence-penalty", type=float, default=0.2, help="logit penalty once a token was generated (default 0.2)")
    a("--frequency-penalty", type=float, default=0.2, help="logit penalty per (decayed) occurrence (default 0.2)")
    a("--penalty-decay", type=float, default=0.996, help="per-token decay of the occurrence counts (default 0.996)")
    a("--stop-token", type=int, action="append", default=[], help="a token id that ends generation (repeatable)")
    a("--seed", type=int, default=None, help="seed for sampling (default: torch's global RNG)")
    a("--tokenizer", choices=["byte", "world"], default=None,
      help="default: byte for vocab 256, world for vocab 65536 (needs the rwkv package)")
    a("--state-in", default=None, help="continue from a state file written by --state-out")
    a("--state-out", default=None, help="save the state after the prompt and the generated text (safetensors)")
    a("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")

    def run(args):
        try:
            generate(args.model, args.prompt, args.max_tokens, args.temperature, args.top_p, args.top_k,
                     args.presence_penalty, args.frequency_penalty, args.penalty_decay, args.stop_token, args.seed,
                     args.tokenizer, args.state_in, args.state_out, args.device)
        except (ValueError, FileNotFoundError, ImportError) as e:
            return _error("generate", e)
        return 0

    p.set_defaults(func=run)


def info(path: str) -> dict:
    """Print and return the version, sizes, parameter count and dtype of a checkpoint."""
    import rwkv_torch as rt
    from rwkv_torch.checkpoints import describe

    d = describe(rt.load(path))
    print(f"{path}: RWKV-{d['version']}")
    for k, v in d.items():
        print(f"  {k}: {v:,}" if k == "params" else f"  {k}: {v}")
    return d


def _add_info(sub):
    p = sub.add_parser("info", help="print a checkpoint's version, sizes, parameter count and dtype")
    p.add_argument("path", help="an official .pth checkpoint or a directory written by rt.save")

    def run(args):
        try:
            info(args.path)
        except (ValueError, FileNotFoundError) as e:
            return _error("info", e)
        return 0

    p.set_defaults(func=run)


def convert(src: str, dst: str, dtype: str | None = None) -> str:
    """Official ``.pth`` (or native directory) ``src`` -> native directory ``dst``, or official ``.pth`` when
    ``dst`` ends in ``.pth``."""
    import rwkv_torch as rt
    from rwkv_torch.checkpoints import save_official

    m = rt.load(src, dtype=_DTYPES[dtype] if dtype else None)
    out = save_official(m, dst) if dst.endswith(".pth") else rt.save(m, dst)
    c = m.config
    print(f"wrote {out} ({'official .pth' if dst.endswith('.pth') else 'model.safetensors + config.json'}): "
          f"RWKV-{c.version}, {c.num_layers} layers, hidden {c.hidden_size}, {m.param_count():,} parameters, "
          f"{str(next(m.parameters()).dtype).replace('torch.', '')}")
    return str(out)


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert official .pth <-> rwkv-torch directory (safetensors + config.json)")
    p.add_argument("src", help="an official .pth checkpoint or a directory written by rt.save")
    p.add_argument("dst", help="output directory, or a file ending in .pth for the official format")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights (default: keep)")

    def run(args):
        try:
            convert(args.src, args.dst, args.dtype)
        except (ValueError, FileNotFoundError) as e:
            return _error("convert", e)
        return 0

    p.set_defaults(func=run)


COMMANDS = {"demo": _add_demo, "check": _add_check, "stream-bench": _add_stream_bench, "export": _add_export,
            "train": _add_train, "generate": _add_generate, "info": _add_info, "convert": _add_convert}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rwkv-torch", description="RWKV models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
