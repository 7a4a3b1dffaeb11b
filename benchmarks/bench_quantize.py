"""Accuracy of the int8 and bf16 weight formats (``rt.quantize``) against fp32.

    python benchmarks/bench_quantize.py [--quick] [--tokens 1000] [--threads 2] [--model RUN_DIR/model]

1. Random official-format RWKV-7 checkpoints (``bench_cpu.random_checkpoint``: the official init plus N(0, 0.02)
   noise) at C256-L6 (vocab 256) and the 0.1B shape (C768-L12, vocab 65536; skipped with ``--quick``): the fp32
   model generates ``--tokens`` greedy tokens from token 7 (``step``, the C step); then over that sequence
   (teacher-forced, every model sees the same tokens) the per-position relative logit error
   ``||q - f|| / ||f||`` (max and mean over positions), the greedy-token agreement (share of positions where the
   quantized model's argmax equals fp32's), and the first position where free-running greedy generation from the
   quantized model departs from fp32's.
2. A byte-level model trained here (``rwkv-torch train`` on the default corpus, the Python standard library, unless
   ``--model`` names a saved one): bits per byte on a text it never saw (this repository's ``model.py``) in every
   format, and the delta to fp32.

Prints tables; installs nothing.
"""

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import SHAPES, machine, random_checkpoint  # noqa: E402

import rwkv_torch as rt  # noqa: E402
from rwkv_torch.generate import generate  # noqa: E402

FORMATS = ("bf16", "int8")
TEXT = Path(__file__).resolve().parents[1] / "src" / "rwkv_torch" / "model.py"


def logit_agreement(path: Path, tokens: int) -> dict:
    ref = rt.load(path)
    seq = [7] + generate(ref, [7], max_tokens=tokens, temperature=0).tokens[0]
    x = torch.tensor([seq[:-1]])
    out = {}
    with torch.inference_mode():
        f = ref(x)[0]  # [T, V]
    for fmt in FORMATS:
        q_model = rt.load(path, weights=fmt)  # not under inference_mode: the decode weights track versions
        with torch.inference_mode():
            q = q_model(x)[0]
            rel = (q - f).norm(dim=-1) / f.norm(dim=-1)
            agree = (q.argmax(-1) == f.argmax(-1)).float().mean().item()
        free = [7] + generate(q_model, [7], max_tokens=tokens, temperature=0).tokens[0]
        first = next((i for i, (a, b) in enumerate(zip(seq, free)) if a != b), None)
        out[fmt] = dict(max=rel.max().item(), mean=rel.mean().item(), agree=agree, first=first)
    return out


def bits_per_byte(model, data: bytes, window: int = 512) -> float:
    ids = torch.tensor(list(data))
    state, total = None, 0.0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, window):
            x, y = ids[i:i + window][None], ids[i + 1:i + window + 1]
            x = x[:, :len(y)]
            logits, state = model(x, state, return_state=True)
            total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
    return total / (len(ids) - 1) / math.log(2)


def trained_model(tmp: Path) -> Path:
    from rwkv_torch import cli

    out = tmp / "run"
    t0 = time.perf_counter()
    code = cli.main(["train", "--hidden-size", "128", "--num-layers", "4", "--head-size", "32", "--window-size", "128",
                     "--batch-size", "8", "--steps", "300", "--lr", "3e-3", "--max-bytes", "2000000",
                     "--eval-every", "1000", "--save-every", "1000", "--out", str(out), "--no-progress"])
    if code:
        raise SystemExit(f"training failed with exit code {code}")
    print(f"# trained a byte-level RWKV-7 (C128, L4, 300 steps of 8 x 128 bytes) in {time.perf_counter() - t0:.0f} s")
    return out / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the 0.1B shape")
    p.add_argument("--tokens", type=int, default=1000, help="greedy tokens generated per shape (default 1000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--model", default=None, help="a saved byte-level model for the perplexity rows (default: train)")
    p.add_argument("--text-only", action="store_true", help="only the perplexity rows")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {machine()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in [] if a.text_only else ["C256-L6"] if a.quick else list(SHAPES):
            path = random_checkpoint(rt, SHAPES[name], Path(tmp))
            rows.append((name, logit_agreement(path, a.tokens)))
        if rows:
            print(f"\n| shape | weights | max rel. logit error | mean rel. logit error | greedy agreement over "
                  f"{a.tokens} tokens | first free-running difference |")
            print("|---|---|---|---|---|---|")
        for name, res in rows:
            for fmt, r in res.items():
                first = "none" if r["first"] is None else f"token {r['first']}"
                print(f"| {name} | {fmt} | {r['max']:.2e} | {r['mean']:.2e} | {100 * r['agree']:.1f}% | {first} |")
        model_dir = Path(a.model) if a.model else trained_model(Path(tmp))
        data = TEXT.read_bytes()
        fp32 = rt.load(model_dir)
        base = bits_per_byte(fp32, data)
        print(f"\n| weights | bits per byte on {TEXT.name} ({len(data):,} bytes, unseen) | delta vs fp32 |")
        print("|---|---|---|")
        print(f"| fp32 | {base:.4f} | - |")
        for fmt in FORMATS:
            bpb = bits_per_byte(rt.load(model_dir, weights=fmt), data)
            print(f"| {fmt} | {bpb:.4f} | {bpb - base:+.4f} ({100 * (2 ** (bpb - base) - 1):+.2f}% perplexity) |")


if __name__ == "__main__":
    main()
