"""rwkv-torch serve under load: streaming ``openai`` clients against a live server in its own process.

Per model shape (random weights in the official layout, World vocab 65536): aggregate tok/s and per-stream p50/p95
time between streamed chunks at 1, 4, 8, 16 concurrent streaming chat clients; time to first token of a chat with a
2,000-token system prompt cold, and of the next chat with the same system prompt (cached). With ``--rwkvserve``
(default: on when it imports; ``pip install --no-deps rwkvserve``: its other requirements are ours) the same model,
prompts and clients against rwkvserve (PyPI) side by side, on its chat endpoint (its /v1/completions stream is not
server-sent events), with fewer tokens per stream (``--rwkvserve-tokens``): it is ~20x slower here. The default run
(C256 L6 and the 0.1B shape, 2 threads) takes about two minutes here.

    python benchmarks/bench_serve.py                      # both shapes, both servers
    python benchmarks/bench_serve.py --shapes c256 --streams 1,8 --tokens 32 --no-rwkvserve   # ~20 s

The server runs in a subprocess (``--worker``) so the clients' Python does not share its interpreter.
"""

import argparse
import importlib.util
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {"c256": dict(hidden_size=256, num_layers=6), "0.1b": dict(hidden_size=768, num_layers=12)}
WORDS = ("the of and to in is that for it as was with on be by at this from have or an are not but which one "
              "all were when there can more their if has will what about time would so other into like only its "
              "them some state model token stream server batch prefix cache river mountain city night music")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def build(shape: str):
    import rwkv_torch as rt

    return rt.build(version=7, vocab_size=65536, head_size=64, seed=0, **SHAPES[shape]).eval()


def worker(args) -> None:
    """Serve the shape with rwkv-torch (``--worker rwkv-torch``) or rwkvserve (``--worker rwkvserve --dir D``)."""
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "rwkvserve":
        sys.argv = ["rwkvserve", "--model-path", args.dir, "--device", "cpu", "--max-batch-size", "16",
                    "--port", str(args.port), "--host", "127.0.0.1", "--model-name", "bench"]
        from rwkvserve.cli.serve import main

        main()
        return
    from rwkv_torch.serve import make_server
    from rwkv_torch.serve.command import uvicorn_server
    from rwkv_torch.tokenizer import get_tokenizer

    app, _ = make_server(build(args.shape), get_tokenizer("world"), model_name="bench", max_streams=16,
                         eos_tokens=())
    uvicorn_server(app, "127.0.0.1", args.port).run()


def rwkvserve_dir(shape: str, root: Path) -> Path:
    """The same weights as rwkvserve reads them: an official model.pth, its config.json and the World vocab."""
    import rwkvserve

    from rwkv_torch.checkpoints import save_official

    m = build(shape)
    d = root / f"rwkvserve-{shape}"
    d.mkdir(parents=True, exist_ok=True)
    save_official(m, d / "model.pth")
    c = m.config
    assert c.decay_lora_dim == c.a_lora_dim, "rwkvserve has one rank for the decay and a LoRAs"
    (d / "config.json").write_text(json.dumps(dict(
        model_type="rwkv7", n_layer=c.num_layers, n_embd=c.hidden_size, vocab_size=65536, head_size_a=64,
        dim_att_lora=c.decay_lora_dim, dim_gate_lora=c.gate_lora_dim, dim_mv_lora=c.v_lora_dim)))
    shutil.copy(Path(rwkvserve.__file__).parent / "data/tokenizers/vocab/rwkv_vocab_v20230424.txt", d)
    return d


class Server:
    def __init__(self, kind: str, shape: str, threads: int, root: Path):
        self.port = free_port()
        cmd = [sys.executable, __file__, "--worker", kind, "--shape", shape, "--threads", str(threads),
               "--port", str(self.port)]
        if kind == "rwkvserve":
            cmd += ["--dir", str(rwkvserve_dir(shape, root))]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = open(root / f"{kind}-{shape}.log", "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0,
                                    timeout=600)
        t0 = time.time()
        while True:
            try:
                self.client.models.list()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() - t0 > 180:
                    raise RuntimeError(f"{kind} did not start: see {self.log.name}") from None
                time.sleep(0.3)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def stream(self, messages: list[dict], max_tokens: int, seed: int) -> dict:
        """One streaming chat completion (rwkvserve's /v1/completions stream is not server-sent events; its chat
        one is): its chunk times and token count."""
        t0, times, usage = time.perf_counter(), [], None
        chunks = self.client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                     stream=True, temperature=1.0, top_p=1.0, seed=seed,
                                                     stream_options={"include_usage": True})
        for c in chunks:
            if c.choices and c.choices[0].delta.content:
                times.append(time.perf_counter())
            if getattr(c, "usage", None):
                usage = c.usage.completion_tokens
        return dict(t0=t0, times=times, tokens=usage if usage else len(times))


def load_run(server: Server, n: int, tokens: int) -> dict:
    results = [None] * n

    def one(i):
        text = f"Stream {i}: " + " ".join(random.Random(i).choices(WORDS.split(), k=12))
        results[i] = server.stream([{"role": "user", "content": text}], tokens, i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    q = statistics.quantiles(gaps, n=20) if len(gaps) >= 2 else [float("nan")] * 19
    return dict(streams=n, tok_s=sum(r["tokens"] for r in results) / wall, p50_ms=1e3 * statistics.median(gaps),
                p95_ms=1e3 * q[18], wall_s=wall)


def ttft(server: Server, prefix: str) -> dict:
    """First-token time of a chat whose system prompt is ``prefix``: cold, then another question after it."""
    def first(question):
        r = server.stream([{"role": "system", "content": prefix}, {"role": "user", "content": question}], 2, 0)
        return (r["times"][0] if r["times"] else time.perf_counter()) - r["t0"]

    cold = first("What is the first word?")
    cached = first("What is the next word?")
    return dict(cold_s=cold, cached_s=cached, ratio=cached / cold)


def prefix_text(n_tokens: int) -> str:
    from rwkv_torch.tokenizer import get_tokenizer

    tok, rng = get_tokenizer("world"), random.Random(0)
    text = ""
    while len(tok.encode(text)) < n_tokens:
        text += " ".join(rng.choices(WORDS.split(), k=200)) + ".\n"
    words = text.split(" ")
    while len(tok.encode(" ".join(words))) > n_tokens - 2:
        words = words[:-10]
    return " ".join(words) + "\n\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="c256,0.1b")
    p.add_argument("--streams", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    p.add_argument("--prefix", type=int, default=2000, help="shared prefix tokens for the first-token times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rwkvserve", action=argparse.BooleanOptionalAction, default=None,
                   help="also run rwkvserve (default: when it is installed)")
    p.add_argument("--rwkvserve-tokens", type=int, default=8, help="tokens per stream for rwkvserve (default 8)")
    p.add_argument("--rwkvserve-streams", default="1,8", help="concurrent streams for rwkvserve (default 1,8)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    kinds = ["rwkv-torch"]
    if args.rwkvserve is not False and importlib.util.find_spec("rwkvserve") is not None:
        kinds.append("rwkvserve")
    elif args.rwkvserve:
        sys.exit("rwkvserve is not installed: pip install --no-deps rwkvserve")
    streams = [int(s) for s in args.streams.split(",")]
    prefix = prefix_text(args.prefix)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for kind in kinds:
                tokens = args.tokens if kind == "rwkv-torch" else args.rwkvserve_tokens
                counts = streams if kind == "rwkv-torch" else [int(n) for n in args.rwkvserve_streams.split(",")]
                t0 = time.time()
                try:
                    srv = Server(kind, shape, args.threads, Path(tmp))
                except Exception as e:
                    log = (Path(tmp) / f"{kind}-{shape}.log").read_text()[-2000:]
                    print(f"{kind} {shape}: could not start ({e}):\n{log}", file=sys.stderr)
                    continue
                try:
                    srv.stream([{"role": "user", "content": "warm up"}], 4, 0)
                    for n in counts:
                        r = dict(server=kind, shape=shape, tokens=tokens, **load_run(srv, n, tokens))
                        rows.append(r)
                        print(f"{kind:10s} {shape:5s} {n:2d} streams: {r['tok_s']:7.1f} tok/s aggregate, between "
                              f"tokens p50 {r['p50_ms']:6.1f} ms p95 {r['p95_ms']:6.1f} ms", flush=True)
                    t = ttft(srv, prefix)
                    rows.append(dict(server=kind, shape=shape, prefix_tokens=args.prefix, **t))
                    print(f"{kind:10s} {shape:5s} first token, {args.prefix}-token prefix: cold {t['cold_s']:.2f} s,"
                          f" cached {t['cached_s']:.3f} s ({100 * t['ratio']:.1f}% of cold)"
                          f"  [{time.time() - t0:.0f} s]", flush=True)
                except Exception as e:
                    print(f"{kind} {shape}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                finally:
                    srv.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
