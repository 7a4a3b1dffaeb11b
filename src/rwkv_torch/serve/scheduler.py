"""Continuous batching: one engine thread steps every active stream together, their states rows of one batch.

Each round of the loop (1) admits new requests up to ``max_streams`` rows, each resuming from the longest prefix of
its prompt in the ``PrefixCache``; (2) prefills up to ``prefill_chunk`` prompt tokens of the requests still reading
their prompts, several prompts packed into one parallel forward (``cu_seqlens``), so a long prompt arrives a chunk
per round while the running streams keep their pace (a chunk also ends at each of a request's ``marks``, e.g. where
a chat message ends, and every chunk's end state is cached); (3) runs one batched ``model.step`` for every decoding
row and samples each row with its own options (``generate.sample_rows``: a seeded request draws what it would alone).
Requests join and leave the batch between rounds; a cancelled request (its client gone) leaves at the next round.

As in ``generate``, a prompt's tokens but the last go through the parallel form and the last through the step, so a
prompt seen before (the state after all but its last token is cached) resumes bit for bit as its cold run.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import count_sampled, penalize, prefill_rows, sample_rows
from ..state import RWKVState
from .cache import PrefixCache


class QueueFull(RuntimeError):
    """Every row and waiting place is taken (HTTP 429)."""


@dataclass
class Request:
    """One generation: ``prompt`` token ids (at least one), its options, and ``emit(event)``, called from the engine
    thread with ``("text", piece)``, ``("done", finish_reason, usage)`` or ``("error", message)``."""

    prompt: list[int]
    emit: Callable[[tuple], None]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_tokens: tuple = ()
    seed: int | None = None
    marks: tuple = ()  # prompt positions whose state is worth caching (chat: where each message ends)
    # engine-side
    cancelled: bool = False
    cached_tokens: int = 0
    pos: int = 0
    state: RWKVState | None = None
    pending: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    decoder: object = None  # the tokenizer's IncrementalDecoder
    generator: torch.Generator | None = None
    fresh: bool = False  # joined the batch, its first step not yet taken

    def cancel(self) -> None:
        self.cancelled = True

    def usage(self) -> dict:
        n = len(self.prompt)
        return dict(prompt_tokens=n, completion_tokens=len(self.generated), total_tokens=n + len(self.generated),
                    prompt_tokens_details=dict(cached_tokens=self.cached_tokens))


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (they wait for the next token)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Scheduler:
    """The engine thread over ``model`` (a token model in eval mode) and ``tokenizer``; ``submit(request)`` queues a
    request (``QueueFull`` beyond ``max_streams + max_queue``), ``close()`` cancels what runs and stops the thread."""

    def __init__(self, model, tokenizer, *, max_streams: int = 16, max_queue: int = 0, cache_bytes: int = 512 << 20,
                 prefill_chunk: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_streams, self.max_queue, self.prefill_chunk = max_streams, max_queue, prefill_chunk
        self.cache = PrefixCache(cache_bytes)
        self.weights = model.decode_weights()
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._incoming: list[Request] = []
        self._waiting: list[Request] = []
        self._prefilling: list[Request] = []
        self._rows: list[Request] = []
        self._state = self._seen = self._counts = None
        self._closing = False
        self.counters = dict(requests=0, finished=0, cancelled=0, steps=0, tokens=0, prefill_tokens=0,
                             peak_rows=0)
        self._thread = threading.Thread(target=self._run, name="rwkv-serve-engine", daemon=True)
        self._thread.start()

    # ---- the front's side (any thread) ----
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self._load() >= self.max_streams + self.max_queue:
                raise QueueFull(f"all {self.max_streams} streams are busy (and {self.max_queue} waiting); retry later")
            self._incoming.append(req)
            self.counters["requests"] += 1
            self._cv.notify()

    def _load(self) -> int:
        return len(self._incoming) + len(self._waiting) + len(self._prefilling) + len(self._rows)

    def stats(self) -> dict:
        with self._cv:
            out = dict(rows=len(self._rows), prefilling=len(self._prefilling),
                       waiting=len(self._waiting) + len(self._incoming), max_streams=self.max_streams,
                       **self.counters)
        out["cache"] = self.cache.stats()
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every request (each gets ``("error", ...)``) and stop the engine thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread ----
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # per thread: model.step takes the C step only without autograd
        while True:
            with self._cv:
                while not self._closing and not self._load():
                    self._cv.wait()
                if self._closing:
                    for r in self._incoming + self._waiting + self._prefilling + self._rows:
                        r.emit(("error", "the server is shutting down"))
                    self._incoming, self._waiting, self._prefilling, self._rows = [], [], [], []
                    return
                self._waiting += self._incoming
                self._incoming = []
            try:
                self._round()
            except Exception as e:  # a failed round fails its requests, not the server
                with self._cv:
                    failed = self._prefilling + self._rows
                    self._prefilling, self._rows = [], []
                    self._state = self._seen = self._counts = None
                for r in failed:
                    r.emit(("error", f"{type(e).__name__}: {e}"))

    def _round(self) -> None:
        self._drop_cancelled()
        while self._waiting and len(self._prefilling) + len(self._rows) < self.max_streams:
            self._admit(self._waiting.pop(0))
        if self._prefilling:
            self._prefill()
        if self._rows:
            self._step()

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting + self._prefilling if r.cancelled]
            self._waiting = [r for r in self._waiting if not r.cancelled]
            self._prefilling = [r for r in self._prefilling if not r.cancelled]
        self.counters["cancelled"] += len(gone)
        keep = [i for i, r in enumerate(self._rows) if not r.cancelled]
        if len(keep) < len(self._rows):
            self.counters["cancelled"] += len(self._rows) - len(keep)
            self._leave(keep)

    def _admit(self, req: Request) -> None:
        n, state = self.cache.longest(req.prompt, limit=len(req.prompt) - 1)
        req.cached_tokens, req.pos = n, n
        req.state = state.clone() if state is not None else self.model.init_state(1, device=self.device)
        req.decoder = self.tokenizer.decoder()
        seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        req.generator = torch.Generator(self.device).manual_seed(seed)
        with self._cv:
            self._prefilling.append(req)

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens, the oldest prompts first, packed into one forward."""
        budget, batch, pieces = self.prefill_chunk, [], []
        for r in self._prefilling:
            need = len(r.prompt) - 1 - r.pos
            if need <= 0 or budget <= 0:
                continue
            take = min(need, budget, *(m - r.pos for m in r.marks if r.pos < m < len(r.prompt) - 1))
            batch.append(r)
            pieces.append(r.prompt[r.pos:r.pos + take])
            budget -= take
        if batch:
            state = prefill_rows(self.model, pieces, RWKVState.cat([r.state for r in batch]))
            for i, (r, p) in enumerate(zip(batch, pieces)):
                r.state = state.select(i)
                r.pos += len(p)
                self.cache.put(r.prompt[:r.pos], r.state)  # every chunk's end, the prompt's (but its last) included
            self.counters["prefill_tokens"] += sum(map(len, pieces))
        ready = [r for r in self._prefilling if r.pos >= len(r.prompt) - 1]
        with self._cv:
            self._prefilling = [r for r in self._prefilling if r.pos < len(r.prompt) - 1]
        for r in ready:
            self._join(r)

    def _join(self, req: Request) -> None:
        V = self.model.config.vocab_size
        req.pending, req.fresh = req.prompt[-1], True
        seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
        counts = torch.zeros(1, V, device=self.device)
        if self._state is None:
            self._state, self._seen, self._counts = req.state, seen, counts
        else:
            self._state = RWKVState.cat([self._state, req.state])
            self._seen, self._counts = torch.cat([self._seen, seen]), torch.cat([self._counts, counts])
        req.state = None
        with self._cv:
            self._rows.append(req)

    def _leave(self, keep: list[int]) -> None:
        with self._cv:
            self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._state = self._seen = self._counts = None
            return
        idx = torch.tensor(keep, device=self.device)
        self._state = self._state.select(idx)
        self._seen, self._counts = self._seen[idx], self._counts[idx]

    def _step(self) -> None:
        rows = self._rows
        tokens = torch.tensor([r.pending for r in rows], device=self.device)
        logits, self._state = self.model.step(tokens, self._state, weights=self.weights)
        if any(r.presence_penalty or r.frequency_penalty for r in rows):
            pres = torch.tensor([[r.presence_penalty] for r in rows], device=self.device)
            freq = torch.tensor([[r.frequency_penalty] for r in rows], device=self.device)
            logits = penalize(logits, self._seen, self._counts, pres, freq)
        opts = [dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p) for r in rows]
        nxt = sample_rows(logits, opts, [r.generator for r in rows])
        count_sampled(self._seen, self._counts, nxt)
        self.counters["steps"] += 1
        self.counters["tokens"] += len(rows)
        self.counters["peak_rows"] = max(self.counters["peak_rows"], len(rows))
        keep = []
        for i, (r, t) in enumerate(zip(rows, nxt.tolist())):
            if r.fresh:  # the state after the whole prompt: where a longer prompt (the next chat turn) resumes
                r.fresh = False
                self.cache.put(r.prompt, self._state.select(i))
            if r.cancelled:
                self.counters["cancelled"] += 1
                continue
            finish = self._advance(r, t)
            if finish is None:
                keep.append(i)
                continue
            self.cache.put(r.prompt + r.generated[:-1], self._state.select(i))
            r.emit(("done", finish, r.usage()))
            self.counters["finished"] += 1
        if len(keep) < len(rows):
            self._leave(keep)

    def _advance(self, r: Request, token: int) -> str | None:
        """Record ``token`` for ``r``, emit the text that can no longer be part of a stop string; the finish reason
        once the request is done ("stop" or "length"), else None."""
        r.generated.append(token)
        r.pending = token
        if token in r.stop_tokens:
            r.emit(("text", r.text[r.sent:]))
            return "stop"
        r.text += r.decoder.push(token)
        last = len(r.generated) >= r.max_tokens
        if last:
            r.text += r.decoder.flush()
        cut = -1
        if r.stop:
            start = max(0, r.sent - max(len(s) for s in r.stop))
            hits = [i for i in (r.text.find(s, start) for s in r.stop) if i >= 0]
            cut = min(hits) if hits else -1
        if cut >= 0:
            r.text = r.text[:cut]
        end = len(r.text) if cut >= 0 or last else len(r.text) - _held_back(r.text, r.stop)
        if end > r.sent:
            r.emit(("text", r.text[r.sent:end]))
            r.sent = end
        if cut >= 0:
            return "stop"
        return "length" if last else None
