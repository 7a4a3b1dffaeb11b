"""Pure tensor functions: the WKV recurrences of each RWKV version and the token shift."""

from .packing import PackedOffsets, packed_offsets
from .token_shift import token_shift
from .wkv4 import wkv4
from .wkv6 import wkv6
from .wkv7 import wkv7

__all__ = ["wkv4", "wkv6", "wkv7", "token_shift", "PackedOffsets", "packed_offsets"]
