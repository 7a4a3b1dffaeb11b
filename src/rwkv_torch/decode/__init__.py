"""The fast one-token path: typed decode weights, the C step, the traceable step graph and the compiled step."""

from .c_step import applies, blocks_step
from .compiled import CompiledStep
from .graph import StepGraph
from .weights import DecodeWeights, RWKV7LayerWeights

__all__ = ["CompiledStep", "DecodeWeights", "RWKV7LayerWeights", "StepGraph", "applies", "blocks_step"]
