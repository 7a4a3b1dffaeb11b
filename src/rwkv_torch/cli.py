"""The ``rwkv-torch`` command: a table of subcommands, each an argument parser over one call into the library
(``demo.py`` holds the calls). Exit codes: 0 done, 1 a self-check (``demo``, ``check``) failed, 2 an error the user
can fix (a missing file, a bad option), printed as ``rwkv-torch COMMAND: error: ...``."""

import argparse
import re
import sys

from .demo import (  # noqa: F401  (bench_stream, DEMO_PROMPT: re-exported for scripts written against cli)
    DEMO_PROMPT,
    DTYPES,
    bench_stream,
    check,
    convert,
    demo,
    export,
    generate,
    info,
    merge,
    stream_bench,
    train_and_report,
)
from .serve.command import add_parser as _add_serve
from .slippi.bot import add_parser as _add_bot
from .slippi.evaluate import add_parser as _add_eval
from .slippi.prepare import add_parser as _add_prepare_replays
from .train import BACKBONES


def _command(p, call, ok=lambda result: True, errors=()):
    """``call(args)`` runs subcommand ``p``; ``ok(result)`` False exits 1; an exception in ``errors`` exits 2."""
    p.set_defaults(call=call, ok=ok, errors=errors, flags=_flags(p))


# Library names that are not a flag's dest but stand for one (generate's stop_tokens list is --stop-token).
FLAG_ALIASES = {"stop_tokens": "--stop-token"}


def _flags(p) -> dict:
    """``{config field: flag}`` of parser ``p``: each option's dest (``lora_rank``) -> its long flag
    (``--lora-rank``)."""
    out = dict(FLAG_ALIASES)
    for action in p._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            out[action.dest] = longs[0]
    return out


def flag_message(message: str, flags: dict) -> str:
    """An error message of the library in the terms of the command line: ``lora_rank=0: must be None or >= 1`` ->
    ``--lora-rank 0: must be >= 1`` (also ``RWKVConfig.hidden_size=0``), for every ``field=value`` whose field is
    one of ``flags`` (``{config field: flag}``); anything else is left as it is."""
    def flag(m):
        return f"{flags[m.group(1)]} " if m.group(1) in flags else m.group(0)

    out = re.sub(r"(?<![\w.-])(?:RWKVConfig\.|TrainConfig\.)?([a-z][a-z0-9_]*)=(?!=)", flag, message)
    return out.replace("must be None or ", "must be ") if out != message else out


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
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps (no time limit) instead of as many as fit in --seconds")
    _command(p, lambda a: demo(a.seconds, a.out, a.prompt, a.max_tokens, a.seed, a.threads, a.progress,
                               a.temperature, a.top_p, a.steps), ok=lambda r: r["agree"], errors=(ValueError,))


def _add_check(sub):
    p = sub.add_parser("check", help="build the default backbone and check step == parallel forward on a stream")
    p.add_argument("--frames", type=int, default=1000, help="length of the stream (default 1000)")
    p.add_argument("--embed-dim", type=int, default=64, help="features per input frame (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _command(p, lambda a: check(a.frames, a.embed_dim, a.seed, a.threads), ok=lambda r: r["agree"],
             errors=(ValueError,))


def _add_stream_bench(sub):
    p = sub.add_parser("stream-bench", help="per-frame streaming latency (PyTorch and onnxruntime)")
    p.add_argument("--frames", type=int, default=10_000, help="frames to stream (default 10000)")
    p.add_argument("--embed-dim", type=int, default=288, help="features per frame (default 288)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width (default 256)")
    p.add_argument("--num-layers", type=int, default=6, help="layers (default 6)")
    p.add_argument("--version", type=int, default=7, choices=[4, 5, 6, 7], help="RWKV version (default 7)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime row")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both runtimes")
    _command(p, lambda a: stream_bench(a.frames, a.embed_dim, a.hidden_size, a.num_layers, a.version, not a.no_onnx,
                                       a.threads), errors=(ValueError, ImportError))


def _add_export(sub):
    p = sub.add_parser("export", help="export the recurrent step to ONNX (state as explicit inputs/outputs)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--model", default=None, help="a model directory written by rt.save (default: a fresh backbone)")
    p.add_argument("--embed-dim", type=int, default=None,
                   help="embed_dim of the fresh backbone (default 64); not with --model, which has its own")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 weight quantization (onnxruntime)")
    _command(p, lambda a: export(a.out, a.model, a.embed_dim, a.batch_size, a.int8),
             errors=(ValueError, FileNotFoundError, ImportError))


def _add_train(sub):
    p = sub.add_parser("train", help="train a model on episodes (.npz), text, or the built-in default corpus")
    a = p.add_argument
    a("--temporal", action="store_true", default=None,
      help="accepted for ExPhil command lines: every backbone here is temporal (trained on windows of frames)")
    a("--backbone", choices=BACKBONES, default=None, help="rwkv7 (default), rwkv6/5/4, or a same-budget baseline")
    a("--hidden-size", type=int, default=None, help="model width (default 256)")
    a("--num-layers", type=int, default=None, help="layers (default 6)")
    a("--head-size", type=int, default=None, help="head size (default 64)")
    a("--window-size", "--ctx-len", dest="window_size", type=int, default=None,
      help="positions per training window (default 256)")
    a("--stride", type=int, default=None,
      help="window start spacing (default: window size, which carries the state across consecutive windows)")
    a("--dropout", type=float, default=None, help="dropout (default 0)")
    a("--precision", choices=["fp32", "bf16"], default=None, help="fp32 (default) or bf16 autocast")
    a("--truncate-bptt", "--chunk-len", dest="truncate_bptt", type=int, default=None,
      help="run each window in chunks of N positions (default: the window in one piece)")
    a("--bptt", choices=["chunk", "full"], default=None,
      help="across chunks: chunk cuts the gradient (default), full carries it (activation memory of one chunk)")
    a("--gradient-checkpoint", action="store_true", default=None,
      help="recompute each block in the backward pass: less memory, ~1.3x the compute (RWKV backbones)")
    a("--compile", action="store_true", default=None,
      help="torch.compile the model (RWKV-7: one graph; 5-10%% faster CPU training after 1-2 minutes of compiling)")
    a("--data", default=None,
      help=".npz episode file or directory, or a text file/directory (default: the Python stdlib sources)")
    a("--max-bytes", type=int, default=None, help="read at most this many bytes of text (default corpus: 8 MB)")
    a("--tokenizer", choices=["byte", "world"], default=None,
      help="text as bytes (vocab 256, default) or RWKV World tokens (vocab 65536; needs the rwkv package)")
    a("--controller-head", choices=["autoregressive", "independent"], default=None,
      help="episode heads: autoregressive (buttons, main stick, C-stick, shoulder, each seeing the ones before; "
           "the default for .slp replays) or independent (the default for .npz)")
    a("--action-delay", type=int, default=None,
      help=".slp replays: predict the controller K frames after the observed state (default 1, the least a bot has)")
    a("--val-fraction", type=float, default=None, help="fraction of episodes/documents held out (default 0.05)")
    a("--out", default=None, help="run directory (default runs/<date-time>)")
    a("--overwrite", action="store_true", default=None,
      help="--out holds another run: delete its checkpoints, metrics and model first")
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
    f = p.add_argument_group("fine-tuning").add_argument
    f("--init-from", default=None,
      help="start from these weights: a model directory (rt.save), an official .pth or a training run; the "
           "architecture comes from them")
    f("--lora-rank", type=int, default=None, help="train LoRA factors of this rank; the weights stay frozen")
    f("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    f("--lora-targets", default=None,
      help="comma-separated linear layers for LoRA (default: att.receptance,att.key,att.value,att.gate,att.output,"
           "ffn.key,ffn.value,ffn.receptance: every large projection)")
    f("--train-also", default=None, help="comma-separated name parts also trained in a LoRA/state run (e.g. ln,head)")
    f("--train-state", action="store_true", default=None,
      help="learn the initial wkv state of every layer (weights frozen); saved as RUN/state.safetensors")

    _command(p, train_and_report, errors=(ValueError,))  # bad data or options: the message names the file or flag


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
    a("--weights", choices=["fp32", "bf16", "int8"], default=None,
      help="weight format: int8 (per-row scales) or bf16 quantize as the model loads (default: the file's)")

    _command(p, lambda a: generate(a.model, a.prompt, a.max_tokens, a.temperature, a.top_p, a.top_k,
                                   a.presence_penalty, a.frequency_penalty, a.penalty_decay, a.stop_token, a.seed,
                                   a.tokenizer, a.state_in, a.state_out, a.device, a.weights),
             errors=(ValueError, FileNotFoundError, ImportError))


def _add_info(sub):
    p = sub.add_parser("info", help="print a checkpoint's version, sizes, parameter count and dtype")
    p.add_argument("path", help="an official .pth checkpoint or a directory written by rt.save")

    _command(p, lambda a: info(a.path), errors=(ValueError, FileNotFoundError))


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert official .pth <-> rwkv-torch directory (safetensors + config.json)")
    p.add_argument("src", help="an official .pth checkpoint or a directory written by rt.save")
    p.add_argument("dst", help="output directory, or a file ending in .pth for the official format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at dst (default: refuse)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default=None,
                   help="write a quantized native directory: int8 (per-row scales) or bf16 (default: keep)")
    p.add_argument("--format", choices=["hf"], default=None,
                   help="hf: a transformers directory (rwkv_torch.hf; default: native, or official for .pth)")

    _command(p, lambda a: convert(a.src, a.dst, a.dtype, a.overwrite, a.weights, a.format),
             errors=(ValueError, FileNotFoundError))


def _add_merge(sub):
    p = sub.add_parser("merge", help="a training run's language model with its LoRA merged -> a plain model")
    p.add_argument("run", help="a training run directory (or one of its ckpt-*.pt)")
    p.add_argument("dst", help="output directory, or a file ending in .pth for the official format")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at dst (default: refuse)")

    _command(p, lambda a: merge(a.run, a.dst, a.overwrite), errors=(ValueError, FileNotFoundError))


COMMANDS = {"demo": _add_demo, "check": _add_check, "stream-bench": _add_stream_bench, "export": _add_export,
            "train": _add_train, "generate": _add_generate, "info": _add_info, "convert": _add_convert,
            "merge": _add_merge, "bot": _add_bot, "prepare-replays": _add_prepare_replays, "eval": _add_eval,
            "serve": _add_serve}


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rwkv-torch", description="RWKV models in PyTorch")
    parser.add_argument("--version", action="version", version=f"rwkv-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        result = args.call(args)
    except args.errors as e:  # a bad file or option: the message names it (the flag, where the library names a field)
        print(f"rwkv-torch {args.command}: error: {flag_message(str(e), getattr(args, 'flags', {}))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (loading data, a benchmark): one line, 130
        print(f"rwkv-torch {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    if isinstance(result, dict) and result.get("interrupted"):  # the shell's convention: 130 for Ctrl-C, 143 TERM
        return 128 + int(result.get("signal") or 2)  # (no signal here: another torchrun rank's; SIGINT's code)
    return 0 if args.ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
