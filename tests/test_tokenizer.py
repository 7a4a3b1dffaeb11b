import pytest

from rwkv_torch.tokenizer import ByteTokenizer, WorldTokenizer, get_tokenizer

MIXED = "Hello, world! café naïve\n\tØresund — 你好，世界。日本語のテキスト 🙂👍🏽🇫🇷 مرحبا بالعالم Привет ∑x²\r\n"


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("rwkv")
    return get_tokenizer("world")


def _stream(tok, ids) -> list[str]:
    d = tok.decoder()
    return [d.push(i) for i in ids] + [d.flush()]


def test_byte_round_trip_and_ids():
    tok = get_tokenizer(256)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    ids = tok.encode(MIXED)
    assert ids == list(MIXED.encode("utf-8")) and max(ids) > 127
    assert tok.decode(ids) == MIXED


def test_byte_streaming_waits_for_complete_characters():
    tok = get_tokenizer("byte")
    pieces = _stream(tok, tok.encode("a🙂b"))
    assert pieces == ["a", "", "", "", "🙂", "b", ""]
    assert "".join(_stream(tok, tok.encode(MIXED))) == MIXED
    # A cut-off character is reported as U+FFFD at the end, never as a half character.
    assert _stream(tok, tok.encode("é")[:1]) == ["", "\ufffd"]
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([256])


def test_world_round_trip(world):
    assert isinstance(world, WorldTokenizer) and world.vocab_size == 65536
    ids = world.encode(MIXED)
    assert world.decode(ids) == MIXED
    assert all(1 <= i <= 65529 for i in ids)
    assert len(ids) < len(MIXED.encode("utf-8")) / 2  # greedy longest match merges bytes into words
    pieces = _stream(world, ids)
    assert "".join(pieces) == MIXED and "\ufffd" not in "".join(pieces)


def test_world_vocab_facts(world):
    # Spec section 8: ids 1..256 are the single bytes 0x00..0xFF; 0 (end of text) and padding decode to nothing.
    assert world.decode_bytes([b + 1 for b in (0, 65, 0xC3, 0xFF)]) == bytes([0, 65, 0xC3, 0xFF])
    assert world.decode_bytes([0, 65535]) == b""
    assert world.encode("Hello") == [33155] and world.encode(" world") != world.encode("world")
    # Splitting an emoji across tokens: the stream emits it whole once its last byte arrives.
    ids = [b + 1 for b in "🙂".encode()]
    assert _stream(world, ids) == ["", "", "", "🙂", ""]
    with pytest.raises(ValueError, match="65536"):
        world.decode([65536])


def test_get_tokenizer_errors():
    assert get_tokenizer("byte").name == "byte"
    with pytest.raises(ValueError, match="no tokenizer known for vocab_size 50277"):
        get_tokenizer(50277)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        get_tokenizer("gpt2")


def test_world_missing_package_hint(monkeypatch):
    import sys

    from rwkv_torch import tokenizer

    tokenizer._trie_tokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "rwkv.rwkv_tokenizer", None)
    with pytest.raises(ImportError, match=r"pip install rwkv-torch\[lm\]"):
        WorldTokenizer()
    tokenizer._trie_tokenizer.cache_clear()
