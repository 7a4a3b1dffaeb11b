"""``PackedOffsets``: cu_seqlens read back once and handed to every op. Each op gives the same bits with it as with the
tensor, and reads nothing back for it; a public op given the tensor reads the offsets back once (not once per use)."""

import importlib
from dataclasses import FrozenInstanceError

import pytest
import torch

from rwkv_torch.ops import token_shift, wkv6, wkv7
from rwkv_torch.ops.mix import shift_mix_linear
from rwkv_torch.ops.packing import (
    PackedOffsets,
    check_cu_seqlens,
    chunk_layout,
    from_chunk_rows,
    offsets_list,
    offsets_tensor,
    packed_offsets,
    to_chunk_rows,
)
from rwkv_torch.ops.token_shift import last_token
from tests.ops import test_wkv6 as t6
from tests.ops import test_wkv7 as t7
from tests.utils import ReadBacks, assert_varlen_matches, cu_seqlens_of, each_sequence, needs_c_kernel

LENS = [5, 0, 9, 3]


def test_packed_offsets_holds_the_tensor_and_its_host_copy(monkeypatch):
    cu = cu_seqlens_of(LENS, dtype=torch.int32)
    reads = ReadBacks(monkeypatch, ("tolist", "item"))
    p = packed_offsets(cu)
    assert reads.count == 1
    assert p.offsets == (0, 5, 5, 14, 17) and p.num_sequences == 4 and p.tolist() == [0, 5, 5, 14, 17]
    assert p.tensor.dtype == torch.int64 and torch.equal(p.tensor, cu.long())
    assert packed_offsets(p) is p and offsets_tensor(p) is p.tensor and offsets_tensor(cu) is cu
    assert offsets_list(p) == [0, 5, 5, 14, 17] and check_cu_seqlens(p, 1, 17) is p
    assert reads.count == 1  # nothing more read back from p
    with pytest.raises(FrozenInstanceError):
        p.offsets = (0, 17)


def test_check_cu_seqlens_checks_packed_offsets_without_reading_back(monkeypatch):
    reads = ReadBacks(monkeypatch, ("tolist", "item"))
    with pytest.raises(ValueError, match="end at T=16"):
        check_cu_seqlens(PackedOffsets(torch.tensor([0, 17]), (0, 17)), 1, 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(PackedOffsets(torch.tensor([0, 9, 4, 17]), (0, 9, 4, 17)), 1, 17)
    with pytest.raises(ValueError, match="holds 2 offsets for a tensor of 3"):
        check_cu_seqlens(PackedOffsets(torch.tensor([0, 9, 17]), (0, 17)), 1, 17)
    with pytest.raises(TypeError, match="int32 or int64"):
        check_cu_seqlens(PackedOffsets(torch.tensor([0.0, 17.0]), (0, 17)), 1, 17)
    assert reads.count == 0


def _ops():
    """(name, fn(cu_seqlens) -> tensors) of every op that takes cu_seqlens, on one packing of LENS (T = 17)."""
    g = torch.Generator().manual_seed(0)
    xs7, h7 = t7.make_inputs(1, 17, 2, 8)
    xs6, h6 = t6.make_inputs(1, 17, 2, 8)
    h7, h6 = (torch.cat([h] * len(LENS)) for h in (h7, h6))
    x = torch.randn(1, 17, 6, generator=g, dtype=torch.float64)
    shift = torch.randn(len(LENS), 6, generator=g, dtype=torch.float64)
    # requires_grad: the hand-written backward's path, which saves the offsets' tensor
    mus, weights = [torch.rand(6, dtype=torch.float64, requires_grad=True)], [torch.randn(4, 6, dtype=torch.float64)]
    ops = [("token_shift", lambda cu: [token_shift(x, shift, cu_seqlens=cu), last_token(x, shift, cu_seqlens=cu)]),
           ("shift_mix_linear", lambda cu: list(shift_mix_linear(x, shift, mus, weights, cu_seqlens=cu)))]
    for backend in ("naive", "chunk", pytest.param("recurrent", marks=needs_c_kernel())):
        name = backend if isinstance(backend, str) else backend.values[0]
        marks = () if isinstance(backend, str) else backend.marks
        ops.append(pytest.param(f"wkv7-{name}", lambda cu, b=name: list(wkv7(*xs7, h7, cu_seqlens=cu, backend=b)),
                                marks=marks, id=f"wkv7-{name}"))
        ops.append(pytest.param(f"wkv6-{name}", lambda cu, b=name: list(wkv6(*xs6, h6, cu_seqlens=cu, backend=b)),
                                marks=marks, id=f"wkv6-{name}"))
    return ops


@pytest.mark.parametrize("name,op", _ops())
def test_every_op_takes_packed_offsets_and_reads_them_back_at_most_once(name, op, monkeypatch):
    cu = cu_seqlens_of(LENS)
    want = op(cu)
    packed = packed_offsets(cu)
    reads = ReadBacks(monkeypatch, ("tolist", "item"))
    got = op(packed)
    from_packed, reads.count = reads.count, 0
    op(cu)
    from_tensor = reads.count
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # wkv6 and wkv7 read back their decays once (the public op's check); the chunked form (without w_min) its span
    # once more.
    other = 0 if name in ("token_shift", "shift_mix_linear") else 1 + name.endswith("-chunk")
    assert from_packed == other, from_packed
    assert from_tensor == other + (name.startswith("wkv")), from_tensor  # token shift and mix: no read-back at all


def test_chunk_layout_starts_every_sequence_on_a_chunk():
    layout = chunk_layout([0, 5, 5, 14, 17], 4, "cpu")
    assert layout.n_chunks == 2 + 0 + 3 + 1 and layout.num_sequences == 4
    assert layout.dest.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22]
    assert [(c.tolist(), s.tolist()) for c, s in layout.steps] == [([0, 2, 5], [0, 2, 3]), ([1, 3], [0, 2]), ([4], [2])]
    x = torch.arange(17.0).view(1, 17, 1)
    (rows,) = to_chunk_rows(layout, x)
    assert rows.shape == (1, 24, 1) and rows[0, 5:8].eq(0).all() and torch.equal(from_chunk_rows(layout, rows), x)


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_chunk_runs_varlen_on_the_packed_row(op, monkeypatch):
    """backend="chunk" with cu_seqlens: the packed row as it is (no padding of the sequences into a batch), each
    sequence from its own state, equal to the spec loop on each sequence in float64 (values and every gradient),
    for chunks shorter and longer than the sequences; WKV-6 also with decays strong enough to halve the chunk."""
    w6, w7 = (importlib.import_module(f"rwkv_torch.ops.{name}") for name in ("wkv6", "wkv7"))  # the packages

    def no_batch(*args):
        raise AssertionError("the chunked form padded the sequences into a batch")

    lens = [20, 0, 64, 1, 37]
    cu = cu_seqlens_of(lens)
    fn, mod = (wkv7, t7) if op == "wkv7" else (wkv6, t6)
    for L, kw in ((16, {}), (128, {}), (32, {"decay_max": 6.0} if op == "wkv6" else {})):
        xs, h0 = mod.make_inputs(1, sum(lens), 2, 8, requires_grad=True, **kw)
        h0 = torch.cat([h0] * len(lens)).detach().requires_grad_()
        packed = lambda *a, L=L: fn(*a, cu_seqlens=cu, backend="chunk", chunk_size=L)  # noqa: E731
        separate = each_sequence(lambda *a: fn(*a, backend="naive"), cu, 6 if op == "wkv7" else 4)
        with monkeypatch.context() as m:
            m.setattr(w7, "pack_to_batch", no_batch)
            m.setattr(w6, "pack_to_batch", no_batch)
            assert_varlen_matches(packed, separate, xs, h0, cu, 1e-11, grad_names=[*"rwkvab"[:len(xs)], "h0"])
