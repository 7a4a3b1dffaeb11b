"""The prefix state cache: RWKV states keyed by the token prefix they have seen, an LRU under a byte budget.

An RWKV state is small and fixed in size (0.1B: ~2.4 MB fp32) whatever the prefix length, so the server keeps the
state at the end of every prompt (and every chunk of a long one) and a request resumes from the longest cached
prefix of its own tokens, prefilling only the rest. The entries are one-row ``RWKVState`` copies owned by the cache
(the engine never writes into them).
"""

import threading
from collections import OrderedDict

from ..state import RWKVState


def state_bytes(state: RWKVState) -> int:
    return sum(t.numel() * t.element_size() for t in state.flat())


class PrefixCache:
    """``put(tokens, state)`` / ``longest(tokens) -> (n, state)``: LRU under ``budget_bytes`` (0: off).

    Lookup tries the distinct cached lengths, longest first, each a dict lookup of the tuple of that many tokens.
    Thread-safe (the engine thread writes, ``/health`` reads the counters).
    """

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[tuple, tuple[RWKVState, int]] = OrderedDict()
        self._lengths: dict[int, int] = {}  # cached prefix length -> how many entries have it
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens, state: RWKVState) -> bool:
        """Keep a copy of the one-row ``state`` after ``tokens``; False where it does not fit the budget."""
        key = tuple(tokens)
        if not key:
            return False
        size = state_bytes(state)
        if size > self.budget:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            while self.bytes + size > self.budget and self._entries:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = (state.clone(), size)
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self.bytes += size
        return True

    def _drop(self, key) -> None:
        _, size = self._entries.pop(key)
        self.bytes -= size
        n = self._lengths[len(key)] - 1
        if n:
            self._lengths[len(key)] = n
        else:
            del self._lengths[len(key)]

    def longest(self, tokens, limit: int | None = None) -> tuple[int, RWKVState | None]:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens long): ``(length, state)``, the state
        the cache's own (do not write into it), or ``(0, None)``."""
        tokens = list(tokens)
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        with self._lock:
            for n in sorted((n for n in self._lengths if n <= limit), reverse=True):
                hit = self._entries.get(tuple(tokens[:n]))
                if hit is not None:
                    self._entries.move_to_end(tuple(tokens[:n]))
                    self.hits += 1
                    return n, hit[0]
            self.misses += 1
        return 0, None

    def stats(self) -> dict:
        with self._lock:
            return dict(entries=len(self._entries), bytes=self.bytes, budget_bytes=self.budget, hits=self.hits,
                        misses=self.misses, evictions=self.evictions)
