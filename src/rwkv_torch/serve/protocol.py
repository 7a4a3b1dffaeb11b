"""The OpenAI request and response shapes: parameter checks (``APIError``: OpenAI's JSON error body and its HTTP
status), the chat template, and the completion / chat objects and stream chunks."""

import time
import uuid
from dataclasses import dataclass, field

# The RWKV World chat format: "User: hi\n\nAssistant: Hello!\n\nUser: ...\n\nAssistant:". A message's own blank
# lines become single newlines (a blank line ends a turn), and "\n\nUser:" stops the reply. Override with
# ``ChatTemplate(...)`` (or ``rwkv-torch serve --chat-template '{"roles": {...}, ...}'``).
DEFAULT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "developer": "System", "tool": "Tool"}


@dataclass
class ChatTemplate:
    """``messages`` -> prompt: each message ``f"{roles[role]}: {content}"``, joined by ``sep``, then ``sep +
    prompt`` (the reply's cue); ``stop``: strings that end the reply (added to the request's own)."""

    roles: dict = field(default_factory=lambda: dict(DEFAULT_ROLES))
    sep: str = "\n\n"
    prompt: str = "Assistant:"
    stop: list = field(default_factory=lambda: ["\n\nUser:"])
    squash_blank_lines: bool = True

    def render(self, messages: list[dict]) -> str:
        return self.sep.join([*self.turns(messages), self.prompt])

    def turns(self, messages: list[dict]) -> list[str]:
        turns = []
        for m in messages:
            role, content = m["role"], m["content"]
            if self.squash_blank_lines:
                content = "\n".join(ln for ln in content.strip().replace("\r\n", "\n").split("\n") if ln.strip())
            turns.append(f"{self.roles.get(role, role.capitalize())}: {content}")
        return turns

    def marks(self, messages: list[dict], encode, ids: list[int]) -> tuple:
        """Where each message ends in the prompt's tokens ``ids`` (after its ``sep``): the positions whose states the
        cache keeps, so that the next request with the same first messages (a system prompt, a conversation so far)
        resumes there. A boundary whose tokens differ from the whole prompt's (a token across it) is left out."""
        out, text = [], ""
        for t in self.turns(messages):
            text += t + self.sep
            part = encode(text)
            if ids[:len(part)] == part:
                out.append(len(part))
        return tuple(out)


class APIError(Exception):
    """An error the client made (or a full queue): ``status`` and OpenAI's ``{"error": {...}}`` body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise APIError(400, f"{name}={v!r}: must be in {left}{lo}, {hi if hi is not None else 'inf'}]", name,
                       "invalid_value")
    return v


def sampling_options(body: dict, default_max_tokens: int) -> dict:
    """The generation options of a request body, checked (400 naming the parameter)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "n must be 1", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise APIError(400, f"stop must be a non-empty string or a list of at most 16 of them, got {stop!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", "seed")
    opts = dict(max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, None, True),
                temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
                top_k=_number(body, "top_k", 0, 0, None, integer=True),
                presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
                frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
                stop=stop, seed=None if seed is None else seed % (2**63))
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "stream must be true or false", "stream")
    return opts


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """``prompt``: a string, a list of token ids, or a list holding one of them."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    if isinstance(p, str):
        ids = tokenizer.encode(p)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < vocab_size for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        ids = list(p)
    else:
        raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise APIError(400, "prompt is empty", "prompt")
    return ids


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message needs a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise APIError(400, "a message's content must be a string (or text parts)", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(rid, model, text, finish, usage, chat: bool) -> dict:
    choice = dict(index=0, finish_reason=finish, logprobs=None)
    if chat:
        choice["message"] = dict(role="assistant", content=text)
    else:
        choice["text"] = text
    return dict(id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
                model=model, choices=[choice], usage=usage)


def chunk(rid, model, text, finish, chat: bool, first: bool = False, usage=None) -> dict:
    if chat:
        delta = {} if finish is not None and not text else {"content": text}
        if first:
            delta = {"role": "assistant", "content": text}
        choice = dict(index=0, delta=delta, finish_reason=finish, logprobs=None)
    else:
        choice = dict(index=0, text=text, finish_reason=finish, logprobs=None)
    out = dict(id=rid, object="chat.completion.chunk" if chat else "text_completion", created=int(time.time()),
               model=model, choices=[choice] if usage is None else [])
    if usage is not None:
        out["usage"] = usage
    return out
