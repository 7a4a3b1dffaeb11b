"""Tokenizers: byte-level (vocab 256) and the RWKV World tokenizer (vocab 65536), with incremental decoding.

Both map text to token ids through its UTF-8 bytes and back. ``decoder()`` returns an ``IncrementalDecoder`` that
emits text only once the bytes form complete UTF-8 characters, so streamed output never shows half a character.

>>> tok = get_tokenizer("byte")
>>> tok.encode("hé")
[104, 195, 169]
>>> d = tok.decoder(); [d.push(i) for i in tok.encode("hé")]
['h', '', 'é']
"""

import codecs
import functools
from collections.abc import Iterable

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
_INSTALL_HINT = "pip install rwkv-torch[lm]  (or: pip install rwkv>=0.8.32)"


class IncrementalDecoder:
    """Token ids in, text out as soon as the bytes seen so far end on a UTF-8 character boundary.

    ``push(ids)`` returns the newly completed text ('' while a character is incomplete); ``flush()`` returns what is
    left, with an unfinished character replaced by U+FFFD. Invalid bytes become U+FFFD as soon as they are known bad.
    """

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0 else list(ids)  # one id or many
        return self._utf8.decode(self._token_bytes(ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """One token per UTF-8 byte: id = byte value, vocab 256 (the default for ``rwkv-torch train`` on text)."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in [0, 256), got {bad[:8]}")
        return bytes(ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self.decode_bytes)


@functools.lru_cache(maxsize=4)
def _trie_tokenizer(vocab_file: str | None):
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError as e:
        raise ImportError(f"the RWKV World tokenizer needs the `rwkv` package: {_INSTALL_HINT}") from e
    if vocab_file is None:
        from importlib.resources import files

        vocab_file = str(files("rwkv") / WORLD_VOCAB)
    return TRIE_TOKENIZER(vocab_file)  # builds a 256-ary trie over 65529 entries: ~2 s, hence the cache


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest match over ``rwkv_vocab_v20230424`` (spec section 8), as shipped
    and implemented by the ``rwkv`` package (``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``), which is imported lazily.

    Ids 1..256 are the single bytes 0x00..0xFF, so every text is encodable; id 0 (the end-of-text separator) and the
    padding ids 65530..65535 decode to no bytes. ``vocab_file`` overrides the vocabulary shipped with ``rwkv``.
    """

    name = "world"
    vocab_size = 65536

    def __init__(self, vocab_file: str | None = None):
        self._trie = _trie_tokenizer(None if vocab_file is None else str(vocab_file))
        self._bytes = self._trie.idx2token

    def encode(self, text: str) -> list[int]:
        return self._trie.encode(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes, valid UTF-8 or not (single bytes are tokens 1..256)."""
        return self._trie.encodeBytes(bytes(data))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"World tokenizer ids must be in [0, {self.vocab_size}), got {i}")
            out.append(self._bytes.get(i, b""))
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self.decode_bytes)


TOKENIZERS = {"byte": ByteTokenizer, "world": WorldTokenizer}
TOKENIZER_BY_VOCAB = {256: "byte", 65536: "world"}


def get_tokenizer(name_or_vocab_size: str | int) -> ByteTokenizer | WorldTokenizer:
    """``"byte"`` or ``256`` -> ``ByteTokenizer``; ``"world"`` or ``65536`` -> ``WorldTokenizer``."""
    key = name_or_vocab_size
    if isinstance(key, int) and not isinstance(key, bool):
        if key not in TOKENIZER_BY_VOCAB:
            raise ValueError(f"no tokenizer known for vocab_size {key}; known: {sorted(TOKENIZER_BY_VOCAB)} "
                             f"({', '.join(TOKENIZER_BY_VOCAB.values())}); pick one by name")
        key = TOKENIZER_BY_VOCAB[key]
    if key not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name_or_vocab_size!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[key]()
