"""rwkv_torch.hf against rwkv7-hf 0.9.0 (pure-PyTorch transformers RWKV-7), same weights, same prompts, one run.

Measures ``generate`` (greedy, batch of prompts, tokens/s including the prefill) and one ``transformers.Trainer``
step (forward + backward + AdamW on a [B, T] batch, median seconds). The model is a random RWKV-7 saved in the
official .pth format and converted by each package's own converter (ours: ``to_hf``; theirs: ``rwkv7_hf.converter``);
their logits are checked against ours first.

    python benchmarks/bench_hf.py                    # short default run, 2 threads
    python benchmarks/bench_hf.py --hidden-size 768 --num-layers 12 --new-tokens 64
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4, help="prompts per generate call")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=2, help="Trainer steps timed (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def their_model(pth: Path, out: Path):
    from rwkv7_hf import RWKV7ForCausalLM
    from rwkv7_hf.converter import build_parser, convert

    convert(build_parser().parse_args(["--input", str(pth), "--output", str(out), "--precision", "fp32"]))
    return RWKV7ForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()


def time_generate(model, ids, mask, new_tokens):
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    lengths = []  # tokens per forward call: a reused cache shows [prompt, 1, 1, ...]

    def count(mod, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        lengths.append(None if x is None else x.shape[1])

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    dt = time.perf_counter() - t0
    hook.remove()
    return out, ids.shape[0] * new_tokens / dt, lengths


def time_trainer(model, batch, length, steps, seed):
    import transformers

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 256, (length,), generator=g) for _ in range(batch * (steps + 1))]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as d:
        args = transformers.TrainingArguments(output_dir=d, max_steps=steps + 1, per_device_train_batch_size=batch,
                                              learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                                              disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=DS(), callbacks=[Clock()])
        transformers.utils.logging.disable_progress_bar()
        trainer.train()
    model.eval()
    return statistics.median(times[1:])


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    import transformers

    import rwkv_torch as rt
    from rwkv_torch.checkpoints import save_official
    from rwkv_torch.hf import to_hf

    m = rt.build(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.num_layers, head_size=64,
                 version=7, seed=0).eval()
    ours = to_hf(m).eval()
    try:
        import rwkv7_hf
    except ImportError:
        sys.exit("rwkv7-hf is not installed: pip install rwkv7-hf==0.9.0")
    with tempfile.TemporaryDirectory() as d:
        save_official(m, Path(d) / "m.pth")
        theirs = their_model(Path(d) / "m.pth", Path(d) / "hf")

    g = torch.Generator().manual_seed(1)
    lens = [a.prompt_len - 7 * i for i in range(a.batch)]  # different lengths, left padded
    ids = torch.zeros(a.batch, a.prompt_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, a.prompt_len - n:] = torch.randint(1, a.vocab_size, (n,), generator=g)
        mask[i, a.prompt_len - n:] = 1
    with torch.no_grad():
        x = ids[:1, -lens[0]:]
        lo, lt = ours(x).logits, theirs(x).logits
    agree = ((lo - lt).abs().max() / lo.abs().max()).item()
    print(f"RWKV-7 hidden {a.hidden_size}, {a.num_layers} layers, vocab {a.vocab_size}, {m.param_count():,} params, "
          f"{a.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}, rwkv7-hf "
          f"{rwkv7_hf.__version__}; logits max rel diff {agree:.2e}")

    rows = []
    gens = {}
    for name, model in (("rwkv_torch.hf", ours), ("rwkv7-hf", theirs)):
        with torch.no_grad():
            gens[name], tps, lengths = time_generate(model, ids, mask, a.new_tokens)
        step = time_trainer(model, a.train_batch, a.train_len, a.train_steps, seed=2)
        rows.append((name, tps, step))
        print(f"{name}: tokens per forward call in generate {lengths[:4]}{' ...' if len(lengths) > 4 else ''} "
              f"({'state reused' if lengths[1:] == [1] * (len(lengths) - 1) else 'whole sequence re-run'})")
    same = torch.equal(gens["rwkv_torch.hf"], gens["rwkv7-hf"])
    print(f"\ngenerate: batch {a.batch}, prompts {lens} left padded, {a.new_tokens} new tokens (greedy; same tokens: "
          f"{same}); Trainer step: batch {a.train_batch} x {a.train_len} tokens, AdamW\n")
    print(f"| {'implementation':<14} | generate tok/s | Trainer step (s) |")
    print(f"|{'-' * 16}|---------------:|-----------------:|")
    for name, tps, step in rows:
        print(f"| {name:<14} | {tps:14.1f} | {step:16.3f} |")
    (_, t0, s0), (_, t1, s1) = rows
    print(f"\nrwkv_torch.hf vs rwkv7-hf: generate {t0 / t1:.2f}x, Trainer step {s1 / s0:.2f}x")


if __name__ == "__main__":
    main()
