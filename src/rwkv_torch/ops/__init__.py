"""Pure tensor functions: the WKV recurrences of each RWKV version and the token shift."""

from .token_shift import token_shift
from .wkv7 import wkv7

__all__ = ["wkv7", "token_shift"]
