"""``rwkv-torch serve``: an OpenAI-compatible server on CPU with continuous batching and a prefix state cache.

``scheduler.Scheduler`` (the engine thread: one batched step per token for every stream), ``cache.PrefixCache``
(states keyed by token prefix), ``app.create_app`` (the ASGI front; needs the ``serve`` extra), ``command``
(the CLI entry). Nothing here imports fastapi until ``make_server``/``create_app`` runs.
"""

from .cache import PrefixCache
from .command import make_server
from .protocol import APIError, ChatTemplate
from .scheduler import QueueFull, Request, Scheduler

__all__ = ["APIError", "ChatTemplate", "PrefixCache", "QueueFull", "Request", "Scheduler", "make_server"]
