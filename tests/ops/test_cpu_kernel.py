"""The C recurrence (backend="recurrent" on CPU tensors: ops/wkv7/recurrent_cpu.py, ops/wkv6/recurrent_cpu.py, built
by ops/cpu_lib.py) against independent float64 recurrences, the naive spec and the other backends; when ``auto``
picks it; its errors, fallback and build cache."""

import warnings

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch.ops import _common, cpu_lib, wkv6, wkv7
from tests.ops import test_wkv6 as t6
from tests.ops import test_wkv7 as t7
from tests.utils import (
    assert_all_close,
    assert_close,
    assert_varlen_matches,
    cu_seqlens_of,
    each_sequence,
    float64_leaves,
    grads_of,
    needs_c_kernel,
)

pytestmark = needs_c_kernel()


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """backend="recurrent" on CPU tensors is the C kernel here, also when the suite runs with TRITON_INTERPRET set."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def unloaded(monkeypatch):
    """The kernel as before its first use in this process: not loaded, no error or warning yet (restored after)."""
    for name, value in (("_lib", None), ("_error", None), ("_warned", False)):
        monkeypatch.setattr(cpu_lib, name, value)


SHAPES = [(1, 1, 1, 4), (2, 37, 3, 16), (1, 20, 2, 32), (3, 50, 2, 64), (1, 19, 5, 5)]  # N=16/32/64: the vector loops


@pytest.mark.parametrize("B,T,H,N", SHAPES, ids=str)
@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_matches_independent_recurrence_fp64(op, B, T, H, N):
    mod, fn = (t7, wkv7) if op == "wkv7" else (t6, wkv6)
    xs, h0 = mod.make_inputs(B, T, H, N)
    out, ht = fn(*xs, h0, backend="recurrent")
    ref_o, ref_h = mod.reference(*xs, h0)
    assert out.dtype == ht.dtype == torch.float64
    assert_close("o", ref_o, out, 1e-12)
    assert_close("ht", ref_h, ht, 1e-12)


@pytest.mark.parametrize("N", [16, 32, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-2)])
def test_low_precision_inputs_match_naive_fp64(N, dtype, tol):
    xs, h0 = t7.make_inputs(2, 130, 2, N)
    ref_o, ref_h = wkv7(*xs, h0, backend="naive")
    out, ht = wkv7(*(x.to(dtype) for x in xs), h0.float(), backend="recurrent")
    assert out.dtype == dtype and ht.dtype == torch.float32
    assert_close("o7", ref_o, out, tol)
    assert_close("ht7", ref_h, ht, tol)
    xs, h0 = t6.make_inputs(2, 130, 2, N)
    ref_o, ref_h = wkv6(*xs, h0, backend="naive")
    out, ht = wkv6(*(x.to(dtype) for x in xs[:4]), xs[4].float(), h0.float(), backend="recurrent")
    assert out.dtype == dtype and ht.dtype == torch.float32
    assert_close("o6", ref_o, out, tol)
    assert_close("ht6", ref_h, ht, tol)


def test_agrees_with_chunk_and_leaves_inputs_alone():
    xs, h0 = t7.make_inputs(2, 200, 4, 64, dtype=torch.float32)
    before = [x.clone() for x in (*xs, h0)]
    o_cpu, h_cpu = wkv7(*xs, h0, backend="recurrent")
    o_chunk, h_chunk = wkv7(*xs, h0, backend="chunk")
    assert_close("o", o_chunk, o_cpu, 1e-5)
    assert_close("ht", h_chunk, h_cpu, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, (*xs, h0)))  # the initial state is not overwritten


def test_results_do_not_depend_on_the_thread_count():
    xs, h0 = t7.make_inputs(3, 40, 5, 16, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 7):
            torch.set_num_threads(n)
            results.append(wkv7(*xs, h0, backend="recurrent"))
    finally:
        torch.set_num_threads(threads)
    for o, h in results[1:]:
        assert torch.equal(o, results[0][0]) and torch.equal(h, results[0][1])


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_varlen_equals_separate_calls(op):
    lens = [5, 1, 0, 40, 17]  # with an empty sequence
    cu = cu_seqlens_of(lens)
    mod, fn, n_seq = (t7, wkv7, 6) if op == "wkv7" else (t6, wkv6, 4)
    xs, h0 = mod.make_inputs(1, sum(lens), 2, 8, n_states=len(lens))
    packed = lambda *a: fn(*a, cu_seqlens=cu, backend="recurrent")  # noqa: E731
    assert_varlen_matches(packed, each_sequence(fn, cu, n_seq, backend="naive"), xs, h0, cu, 1e-12)


def test_auto_uses_it_for_sequences_with_and_without_autograd():
    cpu = torch.device("cpu")
    assert _common.resolve_backend("wkv7", "auto", cpu, 10, grad=False) == "c"
    assert _common.resolve_backend("wkv7", "auto", cpu, 10, grad=True) == "c"
    assert _common.resolve_backend("wkv7", "auto", cpu, 1, grad=False) == "naive"
    assert _common.resolve_backend("wkv7", "recurrent", cpu, 10, grad=True) == "c"
    assert _common.resolve_backend("wkv4", "auto", cpu, 10, grad=False, c_kernel=False, triton=False) == "chunk"
    # Through the op: with gradients the C kernel runs and differentiates (the same numbers as without).
    xs, h0 = t7.make_inputs(1, 30, 2, 8, requires_grad=True)
    out, _ = wkv7(*xs, h0)
    assert out.grad_fn is not None and "WKV7" in type(out.grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(wkv7(*xs, h0)[0], out.detach())


# T below, at and above the checkpoint interval, not a multiple of it; interval 1; N = 16, 32, 64 (the vector loops).
BACKWARD_CASES = [(1, 1, 1, 4, 32), (2, 37, 3, 16, 16), (1, 32, 2, 8, 32), (2, 70, 2, 64, 32), (1, 9, 2, 5, 1),
                  (2, 5, 1, 8, 32), (1, 45, 2, 32, 16)]


@pytest.mark.parametrize("B,T,H,N,every", BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_backward_matches_naive_fp64(op, B, T, H, N, every, with_state):
    """Values, final states and the gradients of every input and of the initial state, in float64."""
    mod, fn = (t7, wkv7) if op == "wkv7" else (t6, wkv6)
    xs, h0 = mod.make_inputs(B, T, H, N, requires_grad=True, with_state=with_state)
    ref = grads_of(lambda *a: fn(*a, backend="naive"), xs, h0)
    got = grads_of(lambda *a: fn(*a, backend="recurrent", chunk_size=every), xs, h0)
    assert_all_close(ref, got, 1e-12, mod.NAMES)


@pytest.mark.parametrize("N", [16, 32, 64])
@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_backward_fp32_matches_fp64(op, N):
    mod, fn = (t7, wkv7) if op == "wkv7" else (t6, wkv6)
    xs, h0 = mod.make_inputs(2, 150, 2, N, dtype=torch.float32, requires_grad=True)
    got = grads_of(lambda *a: fn(*a, backend="recurrent"), xs, h0)
    assert all(g.dtype == torch.float32 for g in got[2])
    ref = grads_of(lambda *a: fn(*a, backend="naive"), *float64_leaves(xs, h0), like=(torch.float32, torch.float32))
    assert_all_close(ref, got, 2e-5, mod.NAMES)


@pytest.mark.parametrize("N", [16, 32, 64])
def test_fp32_decay_over_its_whole_range(N):
    """The float32 vector loops (N = 16, 32, 64) compute exp(w) eight at a time (their own exp on AVX2): log-decays
    from 0 down past float32's exp underflow (-87.3) give the float64 naive results, forward and backward."""
    xs, h0 = t7.make_inputs(2, 40, 2, N, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        grid = torch.tensor([0.0, -1e-6, -0.3, -0.6065, -3.0, -20.0, -80.0, -87.0, -88.0, -100.0, -1e4])
        xs[1].copy_(grid[torch.randint(0, len(grid), xs[1].shape, generator=torch.Generator().manual_seed(2))])
    got = grads_of(lambda *a: wkv7(*a, backend="recurrent"), xs, h0)
    ref = grads_of(lambda *a: wkv7(*a, backend="naive"), *float64_leaves(xs, h0), like=(torch.float32, torch.float32))
    assert_all_close(ref, got, 2e-5, t7.NAMES)


def test_backward_low_precision_returns_input_dtypes():
    xs, h0 = t7.make_inputs(1, 40, 2, 16, dtype=torch.bfloat16, requires_grad=True)
    h0 = h0.detach().float().requires_grad_()
    got = grads_of(lambda *a: wkv7(*a, backend="recurrent"), xs, h0)
    assert [g.dtype for g in got[2]] == [torch.bfloat16] * 6 + [torch.float32]
    ref = grads_of(lambda *a: wkv7(*a, backend="naive"), *float64_leaves(xs, h0), like=(torch.bfloat16, torch.float32))
    assert_all_close(ref, got, 3e-2, t7.NAMES)


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_backward_varlen_equals_separate_calls(op):
    lens = [5, 1, 0, 40, 17]  # with an empty sequence
    cu = cu_seqlens_of(lens)
    mod, fn, n_seq = (t7, wkv7, 6) if op == "wkv7" else (t6, wkv6, 4)
    xs, h0 = mod.make_inputs(1, sum(lens), 2, 8, requires_grad=True, n_states=len(lens))
    packed = lambda *a: fn(*a, cu_seqlens=cu, backend="recurrent", chunk_size=16)  # noqa: E731
    assert_varlen_matches(packed, each_sequence(fn, cu, n_seq, backend="naive"), xs, h0, cu, 1e-12,
                          grad_names=mod.NAMES)


def test_backward_gradcheck_tiny():
    xs, h0 = t7.make_inputs(1, 6, 1, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: wkv7(*a, backend="recurrent", chunk_size=4), (*xs, h0))
    xs, h0 = t6.make_inputs(1, 6, 1, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: wkv6(*a, backend="recurrent", chunk_size=4), (*xs, h0))


def test_backward_does_not_depend_on_the_thread_count():
    xs, h0 = t7.make_inputs(3, 40, 5, 16, dtype=torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 7):
            torch.set_num_threads(n)
            results.append(grads_of(lambda *a: wkv7(*a, backend="recurrent"), xs, h0)[2])
    finally:
        torch.set_num_threads(threads)
    for gs in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(gs, results[0]))


def test_backward_saves_inputs_and_checkpoints_only():
    """What autograd keeps for the C backward: the six inputs and one state per 32 tokens (no pair matrices)."""
    B, T, H, N = 2, 256, 2, 16
    xs, h0 = t7.make_inputs(B, T, H, N, dtype=torch.float32, requires_grad=True)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, ht = wkv7(*xs, h0, backend="recurrent")
    inputs = 6 * B * T * H * N * 4
    checkpoints = B * H * (T // 32) * N * N * 4
    assert sum(saved.values()) <= inputs + checkpoints + 64  # (+ a few scalars)
    (out.sum() + ht.sum()).backward()
    assert all(x.grad is not None for x in xs) and h0.grad is not None


def test_model_prefill_uses_it_and_matches_the_step():
    model = rt.build(version=7, vocab_size=40, hidden_size=32, num_layers=2, head_size=16, seed=0).double().eval()
    x = torch.randint(0, 40, (2, 25))
    with torch.no_grad():
        fast = model(x, return_sequence=True)
        chunked = model(x, return_sequence=True, backend="chunk")
        state, outs = model.init_state(2, dtype=torch.float64), []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            outs.append(y)
    assert_close("auto vs chunk", chunked, fast, 1e-10)
    assert_close("auto vs step", torch.stack(outs, 1), fast, 1e-10)


def test_compiled_model_keeps_one_graph_with_the_kernel():
    import torch._dynamo as dynamo

    model = rt.build(version=7, vocab_size=50, hidden_size=32, num_layers=2, head_size=16, seed=0).eval()
    x = torch.randint(0, 50, (2, 70))
    with torch.no_grad():
        dynamo.reset()
        explained = dynamo.explain(model)(x, return_sequence=True)
        assert explained.graph_break_count == 0, explained.break_reasons
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert any("wkv7_recurrent_fwd" in o for o in ops), sorted(ops)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_close("compiled", model(x, return_sequence=True), compiled(x, return_sequence=True), 1e-6)
    dynamo.reset()


def test_clear_errors():
    with pytest.raises(ValueError, match="no CPU kernel for wkv5"):
        _common.resolve_backend("wkv5", "recurrent", torch.device("cpu"), 4, grad=False, c_kernel=False)
    with pytest.raises(ValueError, match=r"runs on CPU \(C\) or CUDA \(Triton\) tensors, got meta"):
        _common.resolve_backend("wkv7", "recurrent", torch.device("meta"), 4, grad=False)


def test_without_a_compiler_auto_falls_back_and_recurrent_explains(monkeypatch, unloaded):
    monkeypatch.setattr(cpu_lib, "_compiler", lambda: None)
    xs, h0 = t7.make_inputs(1, 20, 2, 8)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        out, ht = wkv7(*xs, h0)
    ref_o, ref_h = t7.reference(*xs, h0)
    assert_close("o", ref_o, out, 1e-10)
    with pytest.raises(RuntimeError, match="C compiler"):
        wkv7(*xs, h0, backend="recurrent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        wkv7(*xs, h0)


def test_turned_off_by_environment(monkeypatch, unloaded):
    monkeypatch.setenv("RWKV_TORCH_CPU_KERNEL", "0")
    assert not cpu_lib.available()
    assert _common.resolve_backend("wkv7", "auto", torch.device("cpu"), 10, grad=False) == "chunk"
    with pytest.raises(RuntimeError, match="RWKV_TORCH_CPU_KERNEL=0"):
        _common.resolve_backend("wkv7", "recurrent", torch.device("cpu"), 10, grad=False)


def test_build_cache_is_keyed_and_leaves_no_temporary_files(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKV_TORCH_CACHE", str(tmp_path))
    first = cpu_lib._build(cpu_lib._compiler())
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert cpu_lib._build(cpu_lib._compiler()) == first and first.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]
