"""Backend names shared by the WKV ops: the deprecated aliases and the error for an unknown name."""

import warnings

import pytest
import torch

from rwkv_torch.ops import _common, wkv4, wkv6, wkv7
from tests.ops import test_wkv4 as t4
from tests.ops import test_wkv6 as t6
from tests.ops import test_wkv7 as t7
from tests.utils import needs_c_kernel


def _call(op, backend):
    """The op on small CPU inputs (no grad, T > 1) with ``backend``: (out, final state tensors)."""
    if op == "wkv4":
        out, state = wkv4(*t4.make_inputs(2, 9, 6), t4.make_state(2, 6), backend=backend)
        return [out, *state]
    fn, mod = (wkv7, t7) if op == "wkv7" else (wkv6, t6)
    xs, h0 = mod.make_inputs(2, 9, 2, 8)
    return list(fn(*xs, h0, backend=backend))


ALIASES = [
    ("wkv7", "step", "naive"),
    ("wkv6", "step", "naive"),
    ("wkv4", "step", "naive"),
    pytest.param("wkv7", "cpu", "recurrent", marks=needs_c_kernel()),
    pytest.param("wkv6", "cpu", "recurrent", marks=needs_c_kernel()),
    # On CPU tensors without TRITON_INTERPRET the recurrent backend is the C kernel.
    pytest.param("wkv7", "triton", "recurrent", marks=needs_c_kernel()),
    pytest.param("wkv6", "triton", "recurrent", marks=needs_c_kernel()),
]


@pytest.mark.parametrize("op,alias,new", ALIASES)
def test_deprecated_alias_warns_and_runs_its_new_name(op, alias, new, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name itself does not warn
        want = _call(op, new)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=rf"backend={alias!r} is deprecated.*use backend={new!r}"):
        got = _call(op, alias)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert _common.DEPRECATED_BACKENDS[alias] == new


@pytest.mark.parametrize("op", ["wkv7", "wkv6", "wkv4"])
def test_unknown_backend_lists_the_four_valid_names(op):
    with pytest.raises(ValueError, match="backend must be one of") as err:
        _call(op, "fast")
    message = str(err.value)
    assert all(repr(name) in message for name in ("auto", "naive", "chunk", "recurrent")), message
    assert not any(repr(old) in message for old in _common.DEPRECATED_BACKENDS), message  # no deprecated names
