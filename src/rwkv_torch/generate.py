"""Sampling and streaming generation for token models (the shape of gpt-fast's generate.py).

A prompt's tokens except the last go through the parallel form (``prefill_rows``: a batch's prompts packed into
one forward); every later token, the prompt's last included, goes through the one-token ``model.step``
(``decode_one_token``). A generation can therefore stop after any token and resume bit for bit: the returned
``state`` has seen everything except ``pending`` (per row, the last token, sampled or the prompt's own), and
``generate(model, pending, state=state)`` carries on exactly as an uninterrupted run would (pass the same
``torch.Generator`` to continue its random stream too).

>>> import rwkv_torch as rt
>>> m = rt.build(vocab_size=256, hidden_size=64, num_layers=2, head_size=16, seed=0).eval()
>>> out = generate(m, [72, 105], max_tokens=5, temperature=0)
>>> len(out.tokens[0]), out.state.batch_size
(5, 1)
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model import RWKV
from .state import RWKVState


@dataclass
class Generation:
    """``tokens``: per row, the sampled ids (a stop token excluded). ``state``: after the prompt and every sampled
    token except ``pending``. ``pending``: per row, ``[t]`` with t the one token not yet fed to the model (the last
    sampled, a stop token included, or the prompt's last when nothing was sampled), so ``pending`` is the prompt that
    continues the generation, and ``[p + more for p in pending]`` one that adds text. ``stopped``: per row, ended by
    a stop token.
    """

    tokens: list[list[int]]
    state: RWKVState
    pending: list[list[int]]
    stopped: list[bool]


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """``[B, V]`` logits -> ``[B, V]`` float32 probabilities: temperature, then top-k (0: off), then top-p (1: off)."""
    logits = logits.float() / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first is always kept).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` token ids; ``temperature=0`` is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return (probs / exp_noise(probs.shape, generator, probs.device)).argmax(-1)


def exp_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Exp(1) draws as ``-log(U)``: argmax(p / Exp(1)) draws from p without a host sync (the Gumbel-style trick of
    gpt-fast's multinomial_sample_one); ~5x faster on CPU than ``exponential_``, which dominated sampling a 65536
    vocabulary."""
    return torch.rand(shape, generator=generator, device=device).log_().neg_()


def penalize(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """``[B, V]`` logits less the penalties: ``presence`` where a token was seen (``seen [B, V]`` bool) plus
    ``frequency * counts [B, V]``; ``presence``/``frequency`` floats or per-row ``[B, 1]`` tensors."""
    return logits.float() - presence * seen - frequency * counts


def count_sampled(seen: torch.Tensor, counts: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None,
                  decay: float = 1.0) -> None:
    """Record ``tokens [B]`` in ``seen``/``counts`` (in place): every count decays by ``decay``, then the sampled
    token's count grows by 1, in the rows where ``rows [B]`` (bool) is true (None: all)."""
    if decay != 1.0:
        counts.mul_(decay)
    idx = torch.arange(tokens.shape[0], device=tokens.device) if rows is None else rows.nonzero()[:, 0]
    counts[idx, tokens[idx]] += 1
    seen[idx, tokens[idx]] = True


def sample_rows(logits: torch.Tensor, options: list[dict], generators: list) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` ids, row b drawn as ``sample(logits[b:b+1], generator=generators[b],
    **options[b])`` draws it (options: temperature, top_k, top_p): a seeded request samples the same tokens whatever
    else shares its batch. The work is batched: one argmax for the greedy rows, one ``logits_to_probs`` per group of
    rows with the same top_k and top_p (each row's own temperature); only the noise is drawn row by row, each from
    its own generator."""
    groups: dict[tuple, list[int]] = {}
    for b, o in enumerate(options):
        if o.get("temperature", 1.0) != 0:
            groups.setdefault((o.get("top_k", 0), o.get("top_p", 1.0)), []).append(b)
    everyone = len(groups) == 1 and len(next(iter(groups.values()))) == len(options)  # no gather, no greedy rows
    out = None if everyone else logits.argmax(-1)
    device, V = logits.device, logits.shape[-1]
    for (top_k, top_p), rows in groups.items():
        idx = torch.tensor(rows, device=device)
        temps = torch.tensor([[max(options[b].get("temperature", 1.0), 1e-5)] for b in rows], device=device)
        probs = logits_to_probs((logits if everyone else logits.index_select(0, idx)).float() / temps, 1.0, top_k,
                                top_p)  # / 1.0: exact
        picked = (probs / torch.cat([exp_noise((1, V), generators[b], device) for b in rows])).argmax(-1)
        if everyone:
            return picked
        out[idx] = picked
    return out


def prefill(model: RWKV, tokens: torch.Tensor, state: RWKVState | None = None, chunk_len: int = 512) -> RWKVState:
    """Feed ``tokens [B, T]`` through the parallel form in chunks of ``chunk_len`` (bounding the ``[B, T, V]``
    logits) and return the state after them."""
    for i in range(0, tokens.shape[1], chunk_len):
        _, state = model(tokens[:, i:i + chunk_len], state, return_sequence=False, return_state=True)
    return state


def prefill_rows(model: RWKV, pieces: list[list[int]], state: RWKVState) -> RWKVState:
    """S token lists (each non-empty) from the S rows of ``state``, back to back in one parallel forward
    (``cu_seqlens`` packing: no padding, each row as if alone): the state after each, one row per piece. The
    prefill of ``generate``'s batches and of ``serve``'s chunks."""
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    device = state.wkv[0].device
    x = torch.tensor([[t for p in pieces for t in p]], device=device)
    _, state = model(x, state, cu_seqlens=torch.tensor(offsets, device=device), return_sequence=False,
                     return_state=True)
    return state


def decode_one_token(model: RWKV, token: torch.Tensor, state: RWKVState, weights=None
                     ) -> tuple[torch.Tensor, RWKVState]:
    """One token per row ``[B]`` -> ``(logits [B, V], state)``; ``weights``: the caller's decode-weights handle
    (``model.decode_weights()``), or None for the model's own."""
    return model.step(token, state, weights=weights)


def _rows(prompt) -> list[list[int]]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() not in (1, 2):
            raise ValueError(f"prompt must be token ids [T] or [B, T], got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, list | tuple) or not prompt:
        raise ValueError("prompt must be a non-empty list of token ids (or a list of such lists for a batch)")
    rows = [list(r) for r in prompt] if isinstance(prompt[0], list | tuple) else [list(prompt)]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt row needs at least one token (World models: 0 is the end-of-text token)")
    return rows


def _where(keep: torch.Tensor, old: RWKVState, new: RWKVState) -> RWKVState:
    """Rows where ``keep [B]`` is true from ``old``, the others from ``new``."""
    def pick(o, n):
        return torch.where(keep.view(-1, *([1] * (o.dim() - 1))), o, n)

    fields = ("shift_att", "shift_ffn", "wkv")
    return RWKVState(*([pick(o, n) for o, n in zip(getattr(old, f), getattr(new, f))] for f in fields), dict(new.meta))


# Each sampling option's limit: (test, what it must be). One message per option (``name=value: must be ...``).
LIMITS = {
    "max_tokens": (lambda v: v >= 0, "must be >= 0"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 is off)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 is off)"),
    "penalty_decay": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def check_limits(**values) -> None:
    """ValueError for the first option of ``values`` outside its ``LIMITS``, naming it and its limit."""
    for name, v in values.items():
        ok, rule = LIMITS[name]
        if not ok(v):
            raise ValueError(f"{name}={v!r}: {rule}")


def stream(model: RWKV, prompt, *, state: RWKVState | None = None, max_tokens: int = 256, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
           penalty_decay: float = 1.0, stop_tokens=(), seed: int | torch.Generator | None = None,
           ) -> Iterator[list[int | None]]:
    """Generate token by token; yields, per step, each row's new token (None for a row that has stopped or just
    sampled a stop token). The generator's return value (``StopIteration.value``) is the ``Generation``.

    Args:
        prompt: token ids ``[T]`` (one row) or ``[B][T_b]`` (a batch; lengths may differ), a list or a tensor.
        state: the state to continue from (batch size B), e.g. ``Generation.state`` or ``RWKVState.load(path)``.
        temperature: 0 is greedy; top_k (0: off) and top_p (1: off) truncate the distribution.
        presence_penalty, frequency_penalty, penalty_decay: the ``rwkv`` package's ``alpha_presence``,
            ``alpha_frequency``, ``alpha_decay``: a sampled token's count grows by 1 and every count decays by
            ``penalty_decay`` each step; logits drop by ``presence`` (once seen) ``+ frequency * count``.
        stop_tokens: ids that end a row (the stop token is not in ``tokens``; it is the row's ``pending``).
        seed: an int or a ``torch.Generator`` for reproducible sampling (None: torch's global RNG).
    """
    if not isinstance(model, RWKV) or not model.is_token_model:
        raise TypeError("generation needs a token model (rt.build(vocab_size=...) or rt.load(...))")
    rows = _rows(prompt)
    check_limits(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  penalty_decay=penalty_decay)
    V, stop_tokens = model.config.vocab_size, [int(t) for t in stop_tokens]
    bad = [t for r in rows for t in r if not 0 <= t < V]
    if bad:
        raise ValueError(f"token ids must be in [0, {V}), got {bad[:8]}")
    bad = [t for t in stop_tokens if not 0 <= t < V]
    if bad:
        raise ValueError(f"stop_tokens={bad[:8]}: token ids must be in [0, {V}) (the model's vocabulary)")
    if state is not None:
        model._check_state(state, len(rows))
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    penalty = (presence_penalty, frequency_penalty, penalty_decay)
    return _decode(model, rows, state, max_tokens, opts, penalty, sorted(set(stop_tokens)), seed)


@torch.no_grad()
def _decode(model, rows, state, max_tokens, opts, penalty, stop_tokens, seed):
    device = next(model.parameters()).device
    B, V = len(rows), model.config.vocab_size
    state = state if state is not None else model.init_state(B)
    # The rows with more than one token are prefilled together, packed (different lengths need no padding).
    long = [b for b, r in enumerate(rows) if len(r) > 1]
    if long:
        done = prefill_rows(model, [rows[b][:-1] for b in long], state.select(long))
        states = [state.select(b) for b in range(B)]
        for i, b in enumerate(long):
            states[b] = done.select(i)
        state = RWKVState.cat(states)
    pending = torch.tensor([r[-1] for r in rows], device=device)
    gen = seed if isinstance(seed, torch.Generator) or seed is None else torch.Generator(device).manual_seed(seed)
    presence, frequency, decay = penalty
    counts = torch.zeros(B, V, device=device)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    tokens = [[] for _ in range(B)]
    weights = model.decode_weights()  # this generation's own handle: rebuilt only if the model's weights change
    for _ in range(max_tokens):
        logits, new_state = decode_one_token(model, pending, state, weights)
        state = _where(done, state, new_state) if bool(done.any()) else new_state
        logits = penalize(logits, seen, counts, presence, frequency)
        nxt = torch.where(done, pending, sample(logits, generator=gen, **opts))
        count_sampled(seen, counts, nxt, ~done, decay)
        stopped = torch.isin(nxt, stop) & ~done
        out = [None if d or s else t for t, d, s in zip(nxt.tolist(), done.tolist(), stopped.tolist())]
        for b, t in enumerate(out):
            if t is not None:
                tokens[b].append(t)
        pending, done = nxt, done | stopped
        yield out
        if bool(done.all()):
            break
    return Generation(tokens, state, [[t] for t in pending.tolist()], done.tolist())


def generate(model: RWKV, prompt, *, callback: Callable[[list[int | None]], None] | None = None,
             **options) -> Generation:
    """Run ``stream(model, prompt, **options)`` to the end, calling ``callback(step_tokens)`` after each step."""
    it = stream(model, prompt, **options)
    while True:
        try:
            step = next(it)
        except StopIteration as e:
            return e.value
        if callback is not None:
            callback(step)


def stream_text(model: RWKV, tokenizer, text: str, **options) -> Iterator[str]:
    """Text in, text pieces out (one row), each piece complete UTF-8; returns the ``Generation`` when exhausted."""
    decoder = tokenizer.decoder()
    it = stream(model, tokenizer.encode(text), **options)
    while True:
        try:
            (token,) = next(it)
        except StopIteration as e:
            tail = decoder.flush()
            if tail:
                yield tail
            return e.value
        piece = decoder.push(token) if token is not None else ""
        if piece:
            yield piece


def full_state(model: RWKV, result: Generation) -> RWKVState:
    """The state after every token, ``pending`` included: where a new, separate prompt should start from (chat)."""
    with torch.no_grad():
        device = next(model.parameters()).device
        return model.step(torch.tensor([p for (p,) in result.pending], device=device), result.state)[1]
