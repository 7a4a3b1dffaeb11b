"""Packed sequences at the model level: ``model(x [1, T, ...], cu_seqlens=...)`` equals one call per sequence
(outputs, final states, gradients), equals padded training with a mask, and rejects bad packings clearly."""

import pytest
import torch

import rwkv_torch as rt
import rwkv_torch.model as rt_model
from rwkv_torch.ops.token_shift import last_token, token_shift
from rwkv_torch.train.data import Target
from rwkv_torch.train.model import TaskModel
from tests.utils import assert_close

D = 5
LENS = [3, 1, 6, 2]
SMALL = dict(embed_dim=D, hidden_size=32, num_layers=2, head_size=16, dropout=0.0)


def model(version, seed=0, **kw):
    """A tiny float64 model, every parameter perturbed (the official init zeroes several matrices)."""
    m = rt.build(version=version, seed=seed, **{**SMALL, **kw}).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def offsets(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


def random_state(m, n, seed=3):
    """A nonzero state per sequence, as leaves that require grad (v4: a valid (aa, bb, pp) with bb > 0)."""
    g = torch.Generator().manual_seed(seed)
    s = m.init_state(n, dtype=torch.float64)
    rnd = lambda t: 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    shift_att = [rnd(t).requires_grad_() for t in s.shift_att]
    shift_ffn = [rnd(t).requires_grad_() for t in s.shift_ffn]
    if m.config.version == 4:
        wkv = [torch.stack([rnd(t[:, 0]), rnd(t[:, 1]).abs() + 0.5, rnd(t[:, 2])], 1).requires_grad_() for t in s.wkv]
    else:
        wkv = [rnd(t).requires_grad_() for t in s.wkv]
    return rt.RWKVState(shift_att, shift_ffn, wkv, s.meta)


def loss_of(outs, states, seed=7):
    """A random linear loss of every output and every state tensor, so that every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in [outs] + [t for s in states for t in s.flat()]:
        total = total + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    return total


def packed_vs_separate(m, x, lens, state, backend, return_sequence=True):
    """(packed outputs, packed state, separate outputs, separate state, grads packed, grads separate)."""
    cu = offsets(lens)
    leaves = [x] + list(m.parameters()) + ([] if state is None else state.flat())
    y, s = m(x, state, cu_seqlens=cu, return_sequence=return_sequence, return_state=True, backend=backend)
    g_packed = torch.autograd.grad(loss_of(y, [s]), leaves)
    ys, ss = [], []
    for i in range(len(lens)):
        si = None if state is None else state.select(i)
        yi, si = m(x[:, cu[i] : cu[i + 1]], si, return_sequence=return_sequence, return_state=True, backend=backend)
        ys.append(yi)
        ss.append(si)
    y_ref = torch.cat(ys, 1) if return_sequence else torch.cat(ys, 0)
    s_ref = rt.RWKVState.cat(ss)
    g_sep = torch.autograd.grad(loss_of(y_ref, [s_ref]), leaves)
    return y, s, y_ref, s_ref, g_packed, g_sep


def assert_all_close(y, s, y_ref, s_ref, g, g_ref, names, rtol=1e-10):
    assert_close("out", y_ref, y, rtol)
    assert s.batch_size == s_ref.batch_size
    for i, (a, b) in enumerate(zip(s_ref.flat(), s.flat())):
        assert_close(f"state[{i}]", a, b, rtol)
    for name, a, b in zip(names, g_ref, g):
        assert_close(f"grad {name}", a, b, rtol)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("backend", ["chunk", "naive"])
@pytest.mark.parametrize("version", [4, 5, 6, 7], ids=lambda v: f"v{v}")
def test_packed_equals_separate(version, backend, with_state):
    m = model(version)
    x = torch.randn(1, sum(LENS), D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    state = random_state(m, len(LENS)) if with_state else None
    y, s, y_ref, s_ref, g, g_ref = packed_vs_separate(m, x, LENS, state, backend)
    assert y.shape == (1, sum(LENS), 32) and s.batch_size == len(LENS)
    names = ["x"] + [n for n, _ in m.named_parameters()] + ["input state"] * (0 if state is None else 6)
    assert_all_close(y, s, y_ref, s_ref, g, g_ref, names)


@pytest.mark.parametrize("version", [4, 7], ids=lambda v: f"v{v}")
def test_packed_last_position_and_token_model(version):
    """return_sequence=False gives [S, out], each sequence's last position; token models pack the same way."""
    m = model(version)
    x = torch.randn(1, sum(LENS), D, dtype=torch.float64, requires_grad=True)
    y, s, y_ref, s_ref, g, g_ref = packed_vs_separate(m, x, LENS, random_state(m, len(LENS)), "auto",
                                                      return_sequence=False)
    assert y.shape == (len(LENS), 32)
    assert_all_close(y, s, y_ref, s_ref, g, g_ref, ["x"] + [n for n, _ in m.named_parameters()])

    lm = model(version, embed_dim=None, vocab_size=50)
    tokens = torch.randint(0, 50, (1, sum(LENS)))
    cu = offsets(LENS)
    with torch.no_grad():  # auto: the C recurrence where it builds (v7), else chunk
        logits, st = lm(tokens, cu_seqlens=cu, return_state=True)
        ref = torch.cat([lm(tokens[:, cu[i] : cu[i + 1]]) for i in range(len(LENS))], 1)
        last = lm(tokens, cu_seqlens=cu.int(), return_sequence=False)
    assert logits.shape == (1, sum(LENS), 50) and st.batch_size == len(LENS)
    assert_close("logits", ref, logits, 1e-10)
    assert_close("last logits", ref[0, cu[1:] - 1], last, 1e-10)


@pytest.mark.parametrize("version", [5, 7], ids=lambda v: f"v{v}")
def test_packed_cpu_pieces_and_checkpointing(version, monkeypatch):
    """Sequences cut by the CPU piece edges (CPU_SEGMENT_LEN) carry their state across; gradient checkpointing
    gives the same values and gradients (against the one-piece packed run, itself tested against separate runs)."""
    m = model(version)
    lens = [5, 1, 2, 4, 3]  # pieces of 3 tokens cut sequences 0, 3 and 4 and hold several whole ones
    cu = offsets(lens)
    x = torch.randn(1, sum(lens), D, dtype=torch.float64, requires_grad=True)
    state = random_state(m, len(lens))
    leaves = [x] + list(m.parameters()) + state.flat()

    def run():
        y, s = m(x, state, cu_seqlens=cu, return_sequence=True, return_state=True, backend="naive")
        return y, s, torch.autograd.grad(loss_of(y, [s]), leaves)

    y_ref, s_ref, g_ref = run()
    names = ["x"] + [n for n, _ in m.named_parameters()] + ["input state"] * 6
    monkeypatch.setattr(rt_model, "CPU_SEGMENT_LEN", 3)
    y, s, g = run()
    assert_all_close(y, s, y_ref, s_ref, g, g_ref, names)
    m.set_gradient_checkpointing(True)
    y, s, g = run()
    assert_all_close(y, s, y_ref, s_ref, g, g_ref, names)


@pytest.mark.parametrize("version", [4, 5, 6, 7], ids=lambda v: f"v{v}")
def test_packed_training_equals_padded(version):
    """A TaskModel step on packed episodes: the mean loss over real frames and its parameter gradients equal those
    of the right-padded batch with the padded frames masked out."""
    torch.manual_seed(0)
    net = TaskModel(model(version), [Target("y", "regression", 3)], 32, lm=False).double()
    lens = [5, 2, 8]
    S, T_max = len(lens), max(lens)
    cu = offsets(lens)
    x = torch.randn(1, sum(lens), D, dtype=torch.float64)
    target = torch.randn(1, sum(lens), 3, dtype=torch.float64)

    out, state = net(x, None, cu_seqlens=cu)
    packed_loss = (out["y"] - target).pow(2).mean(-1).mean()
    packed_grads = torch.autograd.grad(packed_loss, list(net.parameters()))
    assert state.batch_size == S

    x_pad = torch.zeros(S, T_max, D, dtype=torch.float64)
    t_pad = torch.zeros(S, T_max, 3, dtype=torch.float64)
    mask = torch.zeros(S, T_max, dtype=torch.float64)
    for i, n in enumerate(lens):
        x_pad[i, :n], t_pad[i, :n], mask[i, :n] = x[0, cu[i] : cu[i + 1]], target[0, cu[i] : cu[i + 1]], 1
    out_pad, _ = net(x_pad, None)
    padded_loss = ((out_pad["y"] - t_pad).pow(2).mean(-1) * mask).sum() / mask.sum()
    padded_grads = torch.autograd.grad(padded_loss, list(net.parameters()))

    assert_close("loss", padded_loss, packed_loss, 1e-10)
    for (name, _), a, b in zip(net.named_parameters(), padded_grads, packed_grads):
        assert_close(f"grad {name}", a, b, 1e-10)


def test_packed_errors():
    m = model(7)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    cases = [
        (torch.randn(2, 6, D, dtype=torch.float64), torch.tensor([0, 6]), "batch size must be 1"),
        (x, torch.tensor([0.0, 6.0]), "int32 or int64"),
        (x, torch.tensor([[0, 6]]), "1-D"),
        (x, torch.tensor([6]), "at least 2"),
        (x, torch.tensor([1, 6]), "start at 0 and end at T=6"),
        (x, torch.tensor([0, 5]), "start at 0 and end at T=6"),
        (x, torch.tensor([0, 4, 2, 6]), "non-decreasing"),
        (x, torch.tensor([0, 2, 2, 6]), r"empty sequence \(sequence 1"),
    ]
    for xs, cu, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            m(xs, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"one row per sequence \(2\), got batch size 3"):
        m(x, m.init_state(3, dtype=torch.float64), cu_seqlens=torch.tensor([0, 2, 6]))


def test_token_shift_op_with_empty_sequences():
    """The op restarts at every offset, and an empty sequence keeps its shift row (the model rejects them)."""
    g = torch.Generator().manual_seed(0)
    lens = [2, 0, 3, 0, 1, 0]
    cu = offsets(lens)
    x = torch.randn(1, sum(lens), 4, generator=g)
    shift = torch.randn(len(lens), 4, generator=g)
    prev, last = token_shift(x, shift, cu_seqlens=cu), last_token(x, shift, cu_seqlens=cu)
    for i, n in enumerate(lens):
        xi = x[:, cu[i] : cu[i + 1]]
        if n:
            assert torch.equal(prev[:, cu[i] : cu[i + 1]], token_shift(xi, shift[i : i + 1]))
            assert torch.equal(last[i], xi[0, -1])
        else:
            assert torch.equal(last[i], shift[i])
    assert torch.equal(last_token(x, None, cu_seqlens=cu)[1], torch.zeros(4))
