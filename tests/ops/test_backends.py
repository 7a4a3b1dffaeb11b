"""Backend names shared by the WKV ops: the four valid names, and a clear error for any other (the old aliases
"step", "cpu" and "triton" included)."""

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch.ops import _common, wkv4, wkv6, wkv7
from tests.ops import test_wkv4 as t4
from tests.ops import test_wkv6 as t6
from tests.ops import test_wkv7 as t7


def _call(op, backend):
    """The op on small CPU inputs (no grad, T > 1) with ``backend``: (out, final state tensors)."""
    if op == "wkv4":
        out, state = wkv4(*t4.make_inputs(2, 9, 6), t4.make_state(2, 6), backend=backend)
        return [out, *state]
    fn, mod = (wkv7, t7) if op == "wkv7" else (wkv6, t6)
    xs, h0 = mod.make_inputs(2, 9, 2, 8)
    return list(fn(*xs, h0, backend=backend))


def test_the_valid_names():
    assert _common.BACKENDS == ("auto", "naive", "chunk", "recurrent")


@pytest.mark.parametrize("op", ["wkv7", "wkv6", "wkv4"])
@pytest.mark.parametrize("name", ["fast", "step", "cpu", "triton", "Naive", ""])
def test_unknown_backend_lists_the_four_valid_names(op, name):
    with pytest.raises(ValueError, match="backend must be one of") as err:
        _call(op, name)
    message = str(err.value)
    assert all(repr(valid) in message for valid in _common.BACKENDS), message
    assert message.endswith(f"got {name!r}"), message


def test_the_model_rejects_an_unknown_backend_too():
    model = rt.build(embed_dim=4, hidden_size=32, num_layers=1, head_size=16)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'naive', 'chunk', 'recurrent'; got 'cpu'"):
        model(torch.randn(1, 5, 4), backend="cpu")
