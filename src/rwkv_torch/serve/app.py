"""The HTTP front: an ASGI app (Starlette, through FastAPI) over a ``Scheduler``, in the OpenAI API's shapes.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``:
server-sent events of OpenAI chunks ending in ``data: [DONE]``; ``stream_options.include_usage`` adds a usage
chunk). ``usage.prompt_tokens_details.cached_tokens`` is how many prompt tokens came from the prefix cache. A
client that goes away cancels its request (its row leaves the batch at the next round).
"""

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .protocol import (
    APIError,
    ChatTemplate,
    chat_messages,
    chunk,
    completion,
    completion_prompt,
    new_id,
    sampling_options,
)
from .scheduler import QueueFull
from .scheduler import Request as Job


def create_app(scheduler, model_name: str, *, api_key: str | None = None, max_prompt_tokens: int = 16384,
               chat_template: ChatTemplate | None = None, eos_tokens=()) -> FastAPI:
    """The app; ``scheduler.close()`` runs at its shutdown (uvicorn's, after SIGTERM and the in-flight requests)."""
    template = chat_template or ChatTemplate()
    tok, V = scheduler.tokenizer, scheduler.model.config.vocab_size
    app = FastAPI(title="rwkv-torch serve", docs_url=None, redoc_url=None, openapi_url=None,
                  on_shutdown=[scheduler.close])
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def _method(request, e):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided" if auth else "Missing API key (Authorization: Bearer)",
                           code="invalid_api_key")

    async def body_of(request: Request) -> dict:
        check_key(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{model_name}`)", "model",
                           "model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = dict(id=model_name, object="model", created=int(app.state.started), owned_by="rwkv-torch")
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        opts = sampling_options(body, default_max_tokens=16)
        ids = completion_prompt(body, tok, V)
        return await run(request, body, ids, opts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        opts = sampling_options(body, default_max_tokens=256)
        opts["stop"] = opts["stop"] + [s for s in template.stop if s not in opts["stop"]]
        msgs = chat_messages(body)
        ids = tok.encode(template.render(msgs))
        return await run(request, body, ids, opts, chat=True, marks=template.marks(msgs, tok.encode, ids))

    async def run(request: Request, body: dict, ids: list[int], opts: dict, chat: bool, marks=()):
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt_tokens}",
                           "messages" if chat else "prompt", "context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt=ids, emit=emit, stop_tokens=tuple(eos_tokens), marks=marks, **opts)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.get("stream"):
            so = body.get("stream_options") or {}
            if not isinstance(so, dict):
                raise APIError(400, "stream_options must be an object", "stream_options")
            usage_chunk = bool(so.get("include_usage"))
            return StreamingResponse(sse(job, events, rid, chat, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "text":
                    pieces.append(ev[1])
                elif ev[0] == "done":
                    return completion(rid, model_name, "".join(pieces), ev[1], ev[2], chat)
                else:
                    raise APIError(503, ev[1])
        finally:
            job.cancel()  # a no-op once done; the row leaves if the handler itself was cancelled

    async def sse(job, events, rid, chat, usage_chunk):
        def line(obj):
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            first = True
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    if ev[1] or first:
                        yield line(chunk(rid, model_name, ev[1], None, chat, first))
                        first = False
                elif ev[0] == "done":
                    yield line(chunk(rid, model_name, "", ev[1], chat, first))
                    if usage_chunk:
                        yield line(chunk(rid, model_name, "", None, chat, usage=ev[2]))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield line(APIError(503, ev[1]).body())
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (the generator is closed) or the stream ended: free the row
            job.cancel()

    app.state.started = time.time()
    return app
