"""The RWKV World tokenizer (vocab 65536) and the byte tokenizer (vocab 256) as transformers ``PreTrainedTokenizer``s.

They wrap ``rwkv_torch.tokenizer`` (no second implementation). A token's string is its bytes read as Latin-1 (one
character per byte), so any token round-trips and ``convert_tokens_to_string`` is bytes -> UTF-8. World id 0 (the
end-of-text separator, no bytes) is ``<|endoftext|>``: bos, eos and pad.
"""

import filecmp
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizer

from ..tokenizer import WORLD_VOCAB, ByteTokenizer, WorldTokenizer

EOT = "<|endoftext|>"


class RWKVTokenizer(PreTrainedTokenizer):
    """``kind="world"`` (default; ``vocab_file`` overrides the vocabulary shipped with ``rwkv``) or ``kind="byte"``.

    ``save_pretrained`` writes the World vocabulary file beside ``tokenizer_config.json``; the byte tokenizer needs
    none."""

    vocab_files_names = {"vocab_file": WORLD_VOCAB}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, kind: str = "world", **kwargs):
        if kind not in ("world", "byte"):
            raise ValueError(f"RWKVTokenizer kind={kind!r}: must be 'world' or 'byte'")
        shipped = _shipped_vocab() if kind == "world" and vocab_file is not None else None
        if shipped is not None and filecmp.cmp(vocab_file, shipped, shallow=False):
            vocab_file = None  # the shipped vocabulary (a saved copy): its trie is built once per process
        self.kind, self.vocab_file = kind, vocab_file
        self.core = WorldTokenizer(vocab_file) if kind == "world" else ByteTokenizer()
        n = self.core.vocab_size
        self._id_to_str = {i: self.core.decode_bytes([i]).decode("latin-1") for i in range(n)}
        if kind == "world":
            self._id_to_str[0] = EOT
            for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                kwargs.setdefault(k, EOT)
        else:  # bytes have no special token; padding needs one (masked positions never reach the state): byte 0
            kwargs.setdefault("pad_token", self._id_to_str[0])
        self._str_to_id = {}
        for i, s in self._id_to_str.items():
            if s:  # the World's padding ids 65530.. have no bytes: decode only
                self._str_to_id.setdefault(s, i)
        kwargs.setdefault("padding_side", "left")  # what a recurrent model generates from exactly
        super().__init__(kind=kind, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._str_to_id)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_str[i] for i in self.core.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._str_to_id:
            return self._str_to_id[token]
        return self._str_to_id.get(self.unk_token, 0) if self.unk_token else 0

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_str[int(index)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(t for t in tokens if t != EOT).encode("latin-1").decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if self.kind == "byte":
            return ()
        src = self.vocab_file or _shipped_vocab()
        if src is None:
            raise ImportError("saving the World tokenizer needs its vocabulary: pip install rwkv>=0.8.32")
        dst = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + WORLD_VOCAB)
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return (str(dst),)


def _shipped_vocab() -> str | None:
    """The vocabulary file of the ``rwkv`` package, or None when it is not installed."""
    from importlib.resources import files

    try:
        return str(files("rwkv") / WORLD_VOCAB)
    except ModuleNotFoundError:
        return None
