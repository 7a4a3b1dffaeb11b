"""ONNX export of the recurrent step, an onnxruntime runner with the model's step interface, and ``Stream``.

The exported graph computes one step of any version with the state as explicit inputs and outputs::

    inputs:  x_t, then per layer l = 0..L-1: shift_att_l, shift_ffn_l, wkv_l
    outputs: y_t, then per layer l = 0..L-1: shift_att_l_out, shift_ffn_l_out, wkv_l_out

``x_t`` is ``[B, embed_dim]`` float32 frames (continuous backbone) or ``[B]`` int64 token ids; the batch axis is
dynamic. The model's config travels in the ONNX metadata (key ``rwkv_torch_config``).
"""

import json
import warnings

import torch

from .checks import check_output_file
from .config import RWKVConfig
from .decode import StepGraph
from .model import RWKV
from .quantize import dequantized_state_dict
from .state import RWKVState, zero_state

META_KEY = "rwkv_torch_config"
MIN_OPSET = 12


def state_names(num_layers: int, suffix: str = "") -> list[str]:
    """The documented order of the state tensors in the ONNX graph."""
    return [f"{kind}_{l}{suffix}" for l in range(num_layers) for kind in ("shift_att", "shift_ffn", "wkv")]


def export_onnx(model: RWKV, path, *, batch_size: int | None = None, opset: int = 17, quantize_int8: bool = False):
    """Export ``model.step`` to ONNX at ``path`` (float32).

    Args:
        model: an ``RWKV`` model of any version (exported in float32, eval mode; the model itself is not changed).
        path: the ``.onnx`` file to write.
        batch_size: a fixed batch size, or None for a dynamic batch axis.
        opset: ONNX opset version.
        quantize_int8: also apply onnxruntime dynamic int8 quantization of the weights (written in place).

    Returns the path. Raises ImportError with the install hint when ``onnx`` is missing.
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("ONNX export needs the onnx extra: pip install 'rwkv-torch[onnx]'") from e
    if not isinstance(model, RWKV):
        raise TypeError(f"export_onnx expects an rwkv_torch.RWKV model, got {type(model).__name__}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (dynamic) or a positive int, got {batch_size!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (the step uses einsum), got {opset!r}")
    check_output_file(path, str(path))  # before the trace (seconds to a minute)
    c = model.config
    graph = StepGraph(_float32_copy(model)).eval()
    B = batch_size or 2
    x = torch.zeros(B, dtype=torch.long) if model.is_token_model else torch.zeros(B, c.embed_dim)
    state = graph.model.init_state(B, device="cpu", dtype=torch.float32)
    in_names = ["x_t", *state_names(c.num_layers)]
    out_names = ["y_t", *state_names(c.num_layers, "_out")]
    dyn = None if batch_size else {n: {0: "batch"} for n in in_names + out_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the op's input checks, evaluated once at trace time
        try:
            torch.onnx.export(graph, (x, *state.flat()), str(path), input_names=in_names,
                              output_names=out_names, dynamic_axes=dyn, opset_version=opset, dynamo=False)
        except Exception as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"ONNX export of the RWKV-{c.version} step (C={c.hidden_size}, L={c.num_layers}, "
                             f"opset {opset}) failed: {first}") from e
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(c.to_dict())
    onnx.save(proto, str(path))
    if quantize_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(path), weight_type=QuantType.QInt8)
    return path


def _float32_copy(model: RWKV) -> RWKV:
    """An fp32 copy (a quantized model's weights dequantized: the ONNX graph holds fp32 weights, ``--int8`` lets
    onnxruntime quantize them its own way)."""
    copy = RWKV(model.config)
    copy.load_state_dict({k: v.float().cpu() for k, v in dequantized_state_dict(model).items()})
    return copy.eval()


class OnnxStep:
    """Runs an exported step in onnxruntime with the model's ``init_state`` / ``step`` interface (torch in/out)."""

    def __init__(self, path, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover
            raise ImportError("OnnxStep needs the onnx extra: pip install 'rwkv-torch[onnx]'") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in meta:
            raise ValueError(f"{path} was not written by rwkv_torch.export.export_onnx (no {META_KEY} metadata)")
        self.config = RWKVConfig.from_dict(json.loads(meta[META_KEY]))

    @property
    def is_token_model(self) -> bool:
        return self.config.vocab_size is not None

    def init_state(self, batch_size: int = 1) -> RWKVState:
        return zero_state(self.config, batch_size)

    init_cache = init_state

    def step(self, x_t: torch.Tensor, state: RWKVState):
        """x_t: ``[B]`` ids or ``[B, embed_dim]`` frames -> ``(y_t [B, out], new state)``."""
        c = self.config
        if self.is_token_model:
            x = x_t.detach().cpu().long().numpy()
        else:
            if x_t.dim() != 2 or x_t.shape[-1] != c.embed_dim:
                raise ValueError(f"frames must be [B, embed_dim] with embed_dim={c.embed_dim}, got {tuple(x_t.shape)}")
            x = x_t.detach().cpu().float().numpy()
        feeds = {"x_t": x}
        for name, t in zip(state_names(c.num_layers), state.flat()):
            feeds[name] = t.detach().cpu().float().numpy()
        outs = self.session.run(None, feeds)
        y, flat = torch.from_numpy(outs[0]), [torch.from_numpy(o) for o in outs[1:]]
        return y, RWKVState.from_flat(flat, state.meta)

