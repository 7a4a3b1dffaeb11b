"""``rwkv-torch serve``: load a language model and serve it over the OpenAI API (``cli.COMMANDS`` entry).

The ASGI stack (FastAPI/Starlette and uvicorn) is the ``serve`` extra, imported only when the command runs.
``--check`` loads the model, binds the port and exits: what a server that blocks can show in a test.
"""

import contextlib
import json
import socket
import sys
from pathlib import Path

MISSING = "rwkv-torch serve needs the serve extra: pip install 'rwkv-torch[serve]'  (fastapi, uvicorn)"


def make_server(model, tokenizer, *, model_name: str = "rwkv", api_key: str | None = None, max_streams: int = 16,
                max_queue: int = 0, cache_mb: float = 512, prefill_chunk: int = 256, max_prompt_tokens: int = 16384,
                chat_template=None, eos_tokens=None):
    """``(app, scheduler)`` over ``model`` (a token model) and ``tokenizer``; ``eos_tokens`` None: ``(0,)`` for World
    models (0 ends a text), none for byte models."""
    from .app import create_app
    from .scheduler import Scheduler

    if not model.is_token_model:
        raise ValueError("serve needs a language model (a token model), not a backbone with continuous input")
    model.eval()
    if eos_tokens is None:
        eos_tokens = (0,) if model.config.vocab_size == 65536 else ()
    sched = Scheduler(model, tokenizer, max_streams=max_streams, max_queue=max_queue,
                      cache_bytes=int(cache_mb * (1 << 20)), prefill_chunk=prefill_chunk)
    app = create_app(sched, model_name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     chat_template=chat_template, eos_tokens=eos_tokens)
    return app, sched


def uvicorn_server(app, host: str, port: int):
    """A ``uvicorn.Server`` for ``app``: SIGTERM/SIGINT stop accepting, in-flight requests get 5 s to finish (then
    they are cancelled) and the engine stops; ``server.signalled`` then lists the signals (uvicorn itself would raise
    them again once shut down, killing the process before the CLI's exit code)."""
    import uvicorn

    class Server(uvicorn.Server):
        signalled: list = []

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", [])
                self.signalled = list(captured)
                captured.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    return Server(config)


def _template(text: str | None):
    from .protocol import ChatTemplate

    if text is None:
        return None
    if Path(text).is_file():
        text = Path(text).read_text()
    try:
        spec = json.loads(text)
        return ChatTemplate(**spec)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--chat-template: a JSON object of ChatTemplate fields (roles, sep, prompt, stop) or a file "
                         f"holding one: {e}") from None


def serve_command(a) -> dict:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None
    from ..checkpoints import load
    from ..checks import check_threads
    from ..tokenizer import get_tokenizer

    for name, lo in (("max_streams", 1), ("prefill_chunk", 1), ("max_prompt_tokens", 1), ("port", 0),
                     ("max_queue", 0), ("cache_mb", 0)):
        if getattr(a, name) < lo:
            raise ValueError(f"{name}={getattr(a, name)}: must be >= {lo}")
    if a.threads is not None:
        check_threads(a.threads)
        import torch
        torch.set_num_threads(a.threads)
    template = _template(a.chat_template)
    model = load(a.model, weights=a.weights)
    if not model.is_token_model:
        raise ValueError(f"{a.model} is a backbone with continuous input, not a language model")
    tok = get_tokenizer(a.tokenizer or model.config.vocab_size)
    name = a.model_name or Path(a.model.rstrip("/")).name.removesuffix(".pth")
    app, sched = make_server(model, tok, model_name=name, api_key=a.api_key, max_streams=a.max_streams,
                             max_queue=a.max_queue, cache_mb=a.cache_mb, max_prompt_tokens=a.max_prompt_tokens,
                             prefill_chunk=a.prefill_chunk, chat_template=template)
    server = uvicorn_server(app, a.host, a.port)
    if a.check:
        with socket.create_server((a.host, a.port)) as s:
            host, port = s.getsockname()[:2]
        sched.close()
        print(f"rwkv-torch serve: {name} ({model.param_count() / 1e6:.1f}M parameters, {a.weights or 'stored'} "
              f"weights, tokenizer {tok.name}) loads and {host}:{port} binds; --check: not serving")
        return {"checked": True, "port": port}
    print(f"rwkv-torch serve: {name} on http://{a.host}:{a.port}/v1 (max {a.max_streams} streams, cache "
          f"{a.cache_mb:g} MB)", file=sys.stderr, flush=True)
    server.run()
    sched.close()
    sig = int(server.signalled[-1]) if server.signalled else None
    print(f"rwkv-torch serve: stopped{f' (signal {sig})' if sig else ''}", file=sys.stderr, flush=True)
    return {"checked": False, "interrupted": sig is not None, "signal": sig}


def add_parser(sub):
    """The ``rwkv-torch serve`` subcommand (cli.COMMANDS)."""
    p = sub.add_parser("serve", help="serve a language model over the OpenAI API (continuous batching, state cache)")
    a = p.add_argument
    a("--model", required=True, help="an official .pth checkpoint or a directory written by rt.save")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    a("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: no key)")
    a("--max-streams", type=int, default=16, help="requests decoded together, one batch row each (default 16)")
    a("--max-queue", type=int, default=0, help="requests waiting for a row beyond them; more get 429 (default 0)")
    a("--cache-mb", type=float, default=512, help="prefix state cache budget in MB; 0 is off (default 512)")
    a("--max-prompt-tokens", type=int, default=16384, help="longer prompts get 400 (default 16384)")
    a("--prefill-chunk", type=int, default=256,
      help="prompt tokens prefilled between two decode steps, all new prompts together (default 256)")
    a("--weights", choices=["fp32", "bf16", "int8"], default=None,
      help="weight format: int8 (per-row scales) or bf16 quantize as the model loads (default: the file's)")
    a("--tokenizer", choices=["byte", "world"], default=None, help="default: by vocab size (256 byte, 65536 world)")
    a("--model-name", default=None, help="the id in /v1/models and requests (default: the file or folder name)")
    a("--chat-template", default=None,
      help='JSON (or a file of it) of ChatTemplate fields, e.g. \'{"prompt": "Bot:", "stop": ["\\n\\nUser:"]}\'')
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--check", action="store_true", help="load the model, bind the port, exit (no serving)")
    flags = {x.dest: x.option_strings[0] for x in p._actions if x.option_strings[:1] and x.dest != "help"}
    p.set_defaults(call=serve_command, ok=lambda r: True, errors=(ValueError, FileNotFoundError, ImportError, OSError),
                   flags=flags)
