import importlib.util
import os
import sys

import pytest
import torch
import torch.utils._device as torch_device_module

_HAS_CUDA = torch.cuda.is_available()
# torch's `with torch.device(...)` context intercepts the factory functions it lists once, in a cached set. Fill that
# cache now with the real torch.empty*, before _poison_empty swaps them: otherwise a test that first enters a device
# context (torch.compile does) while they are swapped leaves the cache holding the wrappers, and every later
# `with torch.device("meta")` builds real tensors.
torch_device_module._device_constructors()


def _import_triton_for_this_machine() -> None:
    """Import Triton now, before any test: interpreted (TRITON_INTERPRET=1) without CUDA, compiled with it.

    Triton decorates its own library once, when first imported, and a process then runs kernels only that way. Left
    to chance, the first import comes from whatever test runs first (torch.compile imports Triton too) and, on a
    machine without CUDA, the interpreter tests of tests/ops/test_triton.py would all skip. The variable is restored
    at once: backend='recurrent' reads it at call time, so on CPU tensors other tests still get the C kernel (the
    interpreter tests set it while they call the op).
    """
    if importlib.util.find_spec("triton") is None or "triton" in sys.modules:
        return
    prior = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if prior is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prior


_import_triton_for_this_machine()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _nan_filled(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True)
def _poison_empty(request, monkeypatch):
    """Inside tests/ops, torch.empty* return NaN-filled tensors, so unwritten memory fails loudly."""
    if f"{os.sep}ops{os.sep}" not in str(request.node.fspath):
        yield
        return
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
    yield
