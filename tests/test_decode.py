"""The RWKV-7 step in C (decode/c_step.py, ops/csrc/rwkv7_step.c) over the typed decode weights (decode/weights.py):
against the float64 parallel forward, the spec form at T = 1 and itself across thread counts; when it runs and when
the spec form runs instead; the decode weights' invalidation rule and the C table's field order."""

import copy

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import decode
from rwkv_torch.decode import batched, c_step
from rwkv_torch.generate import generate
from rwkv_torch.ops import cpu_lib
from tests.test_model import assert_states_close, perturbed
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="no C compiler for the CPU kernels here")


def run_steps(model, xs, state, weights=None):
    """``model.step`` over ``xs [B, T, ...]`` from ``state`` (with the decode-weights handle ``weights``)."""
    outs = []
    for t in range(xs.shape[1]):
        y, state = model.step(xs[:, t], state, weights=weights)
        outs.append(y)
    return torch.stack(outs, 1), state


@pytest.fixture
def calls(monkeypatch):
    """Counts the steps that ran in C."""
    count = []
    real = decode.blocks_step

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        count.append(out is not None)
        return out

    monkeypatch.setattr(decode, "blocks_step", spy)
    return count


def build(kind: str, head_size: int, seed: int = 0):
    opts = dict(hidden_size=64, num_layers=3, head_size=head_size, seed=seed)
    model = rt.build(embed_dim=20, **opts) if kind == "frames" else rt.build(vocab_size=50, **opts)
    model = perturbed(model, seed=seed)
    x = torch.randn(3, 24, 20) if kind == "frames" else torch.randint(0, 50, (3, 24))
    return model, x


def random_state(model, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(batch)
    for t in state.tensors().values():
        t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return state


@pytest.mark.parametrize("head_size", [16, 64])
@pytest.mark.parametrize("kind", ["frames", "tokens"])
def test_matches_the_float64_forward_from_a_carried_state(kind, head_size, calls):
    model, x = build(kind, head_size)
    start = random_state(model, 3)
    ref, ref_state = model.double()(x.double() if kind == "frames" else x, start.to(dtype=torch.float64),
                                    return_sequence=True, return_state=True)
    model.float()
    with torch.no_grad():
        out, state = run_steps(model, x, start)
        again = start.clone()
        inplace = torch.stack([model.step_(x[:, t], again) for t in range(x.shape[1])], 1)
    assert calls and all(calls), "the C step did not run"
    assert_close("step outputs", ref, out, 1e-5)
    assert_states_close(ref_state, state, 1e-5)
    assert torch.equal(out, inplace)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), again.tensors().values()))


def test_step_leaves_the_given_state_alone():
    model, x = build("tokens", 16)
    start = random_state(model, 3)
    before = start.clone()
    with torch.no_grad():
        model.step(x[:, 0], start)
    assert all(torch.equal(a, b) for a, b in zip(before.tensors().values(), start.tensors().values()))


def test_agrees_with_the_spec_form_and_is_used_only_where_it_applies(monkeypatch, calls):
    model, x = build("frames", 64)
    with torch.no_grad():
        fast, fast_state = run_steps(model, x, model.init_state(3))
        assert len(calls) == x.shape[1]
        monkeypatch.setattr(decode, "applies", lambda *a: False)
        spec, spec_state = run_steps(model, x, model.init_state(3))  # the spec form at T = 1
    assert len(calls) == x.shape[1]
    assert_close("C vs spec-form step", spec, fast, 1e-5)
    assert_states_close(spec_state, fast_state, 1e-5)
    monkeypatch.undo()
    calls.clear()
    with torch.no_grad():
        run_steps(model.double(), x.double(), model.init_state(3, dtype=torch.float64))  # fp64: the spec form
        run_steps(perturbed(rt.build(embed_dim=20, hidden_size=64, num_layers=2, head_size=16, version=6)), x,
                  None)  # other versions: the spec form
        model.float().train()  # dropout active in training: the spec form
        run_steps(model, x, None)
    assert not calls
    model.eval()
    run_steps(model, x, None)  # autograd on: the spec form
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run_steps(model, x, None)  # autocast: the spec form
    assert not calls


def test_results_do_not_depend_on_the_thread_count():
    model, x = build("tokens", 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(run_steps(model, x, model.init_state(3))[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_decode_weights_follow_the_invalidation_rule(calls):
    model, x = build("tokens", 16)
    dw = model.decode_weights()

    def c_and_spec():
        with torch.no_grad():
            c, _ = run_steps(model, x, model.init_state(3), weights=dw)
        spec, _ = run_steps(model, x, model.init_state(3))  # grad enabled: the spec form
        return spec, c

    def rebuilt(change) -> int:
        before = dw.rebuilds
        change()
        assert_close("C step vs spec form", *c_and_spec(), 1e-5)
        return dw.rebuilds - before

    c_and_spec()
    assert dw.current() is dw and dw.is_current() and dw.rebuilds == 0  # reused while nothing changed
    layers = dw.layers

    def in_place():  # directly read (receptance) and derived (w1, x_g) parameters, updated in place
        with torch.no_grad():
            model.blocks[1].att.receptance.weight.mul_(-1)
            model.blocks[2].att.w1.add_(0.3)
            model.blocks[0].att.x_g.mul_(-1)
        assert not dw.is_current()

    assert rebuilt(in_place) == 1 and dw.layers is not layers  # once, not once per step
    assert rebuilt(lambda: model.load_state_dict(perturbed(build("tokens", 16, seed=3)[0], seed=3).state_dict())) == 1

    def replace():
        model.blocks[1].att.a0 = torch.nn.Parameter(model.blocks[1].att.a0.detach() + 0.5)  # a replaced parameter
        assert not dw.is_current()

    assert rebuilt(replace) == 1
    assert rebuilt(lambda: model.blocks[2].att.__setattr__("receptance", torch.nn.Linear(64, 64, bias=False))) == 1
    assert rebuilt(lambda: model.load_state_dict(perturbed(build("tokens", 16, seed=4)[0], seed=4).state_dict(),
                                                 assign=True)) == 1
    assert rebuilt(lambda: model.double().float()) == 1  # moved/cast: the model's epoch

    def through_data():
        with torch.no_grad():
            model.blocks[2].att.a1.data.add_(0.5)  # through .data: invisible to the version counter
        model.clear_decode_weights()

    assert rebuilt(through_data) == 1
    assert rebuilt(lambda: None) == 0
    assert calls and all(calls)


def test_building_other_modules_between_steps_rebuilds_nothing(calls):
    model, x = build("frames", 16)
    other, _ = build("frames", 16, seed=5)
    dw, other_dw = model.decode_weights(), other.decode_weights()
    with torch.no_grad():
        ref, ref_state = run_steps(model, x, model.init_state(3), weights=dw)
        outs, state = [], model.init_state(3)
        for t in range(x.shape[1]):
            torch.nn.Linear(2, 2)  # an unrelated module built ...
            torch.nn.LayerNorm(4).weight = torch.nn.Parameter(torch.ones(4))  # ... and one with a parameter replaced
            with torch.no_grad():
                other.blocks[0].att.receptance.weight.mul_(1.5)  # another model's weights changed in place
            other.blocks[1].att.a0 = torch.nn.Parameter(other.blocks[1].att.a0.detach())  # ... and replaced
            other.step(x[:, t], other.init_state(3), weights=other_dw)
            y, state = model.step(x[:, t], state, weights=dw)
            outs.append(y)
    assert dw.rebuilds == 0 and model._decode_weights.rebuilds == 0
    assert other_dw.rebuilds == x.shape[1] - 1  # the first build is no rebuild
    assert calls and all(calls)
    assert torch.equal(ref, torch.stack(outs, 1))
    assert all(torch.equal(a, b) for a, b in zip(ref_state.tensors().values(), state.tensors().values()))
    spec = model.double()(x.double(), return_sequence=True)  # the float64 parallel form
    assert_close("held weights vs float64 forward", spec, ref, 1e-5)


def test_step_without_weights_and_foreign_weights(calls):
    model, x = build("tokens", 16)
    other, _ = build("tokens", 16, seed=2)
    with torch.no_grad():
        held, _ = run_steps(model, x, model.init_state(3), weights=model.decode_weights())
        plain, _ = run_steps(model, x, model.init_state(3))  # the model's own handle
        assert torch.equal(held, plain)
        with pytest.raises(ValueError, match="handle of this model"):
            model.step(x[:, 0], weights=other.decode_weights())


def test_stream_generate_and_copies_hold_their_own_weights(calls):
    model, x = build("tokens", 16)
    stream = rt.Stream(model, batch_size=3)
    with torch.no_grad():
        ys = torch.stack([stream.push(x[:, t]) for t in range(x.shape[1])], 1)
        ref, _ = run_steps(model, x, model.init_state(3))
    assert torch.equal(ys, ref) and stream.decode_weights.rebuilds == 0 and stream.decode_weights.layers
    twin = copy.deepcopy(model)  # the model's handle copies unbuilt, for the copy
    assert twin._decode_weights.model is twin and twin._decode_weights.layers is None
    with torch.no_grad():
        assert torch.equal(run_steps(twin, x, twin.init_state(3))[0], ref)
    assert generate(model, [[1, 2], [3]], max_tokens=4, seed=0).tokens == generate(twin, [[1, 2], [3]], max_tokens=4,
                                                                             seed=0).tokens


def test_decode_weights_are_typed_and_named_like_the_c_table():
    model, _ = build("frames", 16)
    weights = model.decode_weights().current()
    assert [type(w) for w in weights.layers] == [decode.RWKV7LayerWeights] * len(model.blocks)
    layer0, layer1 = weights.layers[0], weights.layers[1]
    assert (layer0.n_lora, layer1.n_lora) == (3, 4)  # layer 0 has no value-residual LoRA
    assert layer1.w_r.data_ptr() == model.blocks[1].att.receptance.weight.data_ptr()  # a view, not a copy
    assert torch.equal(layer1.one_minus_k_a, 1 - model.blocks[1].att.k_a)
    c_fields = cpu_lib.library().rwkv7_step_fields().decode().split(",")
    assert c_fields == decode.RWKV7LayerWeights.tensor_fields() == [f for f in c_fields if hasattr(layer0, f)]


def test_a_field_order_mismatch_is_refused(monkeypatch):
    fields = decode.RWKV7LayerWeights.tensor_fields()
    monkeypatch.setattr(c_step, "_checked", [])
    monkeypatch.setattr(decode.RWKV7LayerWeights, "tensor_fields", classmethod(lambda cls: fields[::-1]))
    with pytest.raises(RuntimeError, match="same names in the same order"):
        c_step._library()


def test_turned_off_by_environment(monkeypatch, calls):
    monkeypatch.setenv("RWKV_TORCH_CPU_KERNEL", "0")
    model, x = build("tokens", 16)
    with torch.no_grad():
        run_steps(model, x, model.init_state(3))
    assert not calls


def test_importing_the_package_registers_no_global_hook():
    import torch.nn.modules.module as module

    hooks = [getattr(module, n) for n in dir(module) if n.startswith("_global_") and n.endswith("_hooks")]
    assert hooks and all(not h for h in hooks if isinstance(h, dict))


@pytest.fixture
def engine(monkeypatch):
    """Counts the steps that ran in the batched engine; every format takes it from 2 rows on, bf16 matrix units or
    not (elsewhere the engine's bf16 GEMMs are only slow, not wrong)."""
    count = []
    real = batched.blocks_step
    monkeypatch.setattr(batched, "blocks_step", lambda *a: count.append(a[3].shape[0]) or real(*a))
    monkeypatch.setattr(batched, "MIN_ROWS", dict.fromkeys(batched.MIN_ROWS, 2))
    monkeypatch.setattr(batched, "bf16_matmul", lambda: True)
    return count


def quantized(model, fmt: str):
    return model if fmt == "fp32" else rt.quantize(copy.deepcopy(model), fmt).eval()


def rows_one_by_one(model, x, start):
    """Each row of ``x [B, T, ...]`` stepped alone (batch 1: the fused C step) from its row of ``start``."""
    outs, states = [], []
    for b in range(x.shape[0]):
        y, s = run_steps(model, x[b:b + 1], start.select(slice(b, b + 1)).clone())
        outs.append(y)
        states.append(s)
    return torch.cat(outs), rt.RWKVState.cat(states)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("head_size", [16, 64])
def test_batched_step_equals_single_steps(fmt, head_size, engine):
    """N streams in one batched step (GEMMs over the rows) equal the N streams stepped one by one (fp32 to fp32
    rounding; bf16/int8, whose engine rounds the GEMMs' inputs and outputs to bf16, to bf16 rounding) and, fp32, the
    float64 parallel form."""
    model, x = build("frames", head_size)
    x = torch.cat([x, -x, 2 * x])  # 9 streams
    model = quantized(model, fmt)
    start = random_state(model, 9)
    with torch.no_grad():
        out, state = run_steps(model, x, start)
        assert engine == [9] * x.shape[1]
        ref, ref_state = rows_one_by_one(model, x, start)
        again = start.clone()
        inplace = torch.stack([model.step_(x[:, t], again) for t in range(x.shape[1])], 1)
    rtol = 1e-5 if fmt == "fp32" else 2e-2
    assert_close(f"{fmt} batched vs one by one", ref, out, rtol)
    assert_states_close(ref_state, state, rtol)
    assert torch.equal(out, inplace)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), again.tensors().values()))
    if fmt == "fp32":
        spec, spec_state = model.double()(x.double(), start.to(dtype=torch.float64), return_sequence=True,
                                          return_state=True)
        assert_close("batched vs float64 forward", spec, out, 1e-5)
        assert_states_close(spec_state, state, 1e-5)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_batched_step_follows_weight_changes(fmt, engine):
    """The engine's own derived forms (int8: bf16 copies of the integers) follow in-place weight changes."""
    model, x = build("tokens", 16)
    model = quantized(model, fmt)
    dw = model.decode_weights()
    with torch.no_grad():
        run_steps(model, x, model.init_state(3), weights=dw)
        w = model.blocks[1].ffn.key.weight
        w.copy_(-w)  # int8 stays int8
        out, _ = run_steps(model, x, model.init_state(3), weights=dw)
        ref, _ = rows_one_by_one(model, x, model.init_state(3))
    assert dw.rebuilds == (fmt == "int8")  # fp32 reads the matrix live; int8 rebuilds its bf16 copies, once
    assert_close("after an in-place change", ref, out, 1e-5 if fmt == "fp32" else 2e-2)


def test_batched_engine_picks_by_rows_and_format(monkeypatch):
    model, _ = build("tokens", 16)
    dw = model.decode_weights().current()
    monkeypatch.setattr(batched, "bf16_matmul", lambda: False)
    assert not batched.applies(dw, batched.MIN_ROWS[torch.float32] - 1)
    assert batched.applies(dw, batched.MIN_ROWS[torch.float32])
    q = quantized(model, "bf16").decode_weights().current()
    assert not batched.applies(q, 256)  # no bf16 matrix units: the fused step reads bf16 faster than a slow GEMM
    monkeypatch.setattr(batched, "bf16_matmul", lambda: True)
    assert batched.applies(q, batched.MIN_ROWS[torch.bfloat16])


class _Adapter(torch.nn.Module):
    """A projection that computes more than x @ Wᵀ (as a LoRA adapter does): the C step must not read its base."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(0.3 * torch.randn(rank, base.in_features))
        self.up = torch.nn.Parameter(0.3 * torch.randn(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.down.t() @ self.up.t()


def test_wrapped_projections_step_through_the_forward_and_a_merge_rebuilds(calls):
    model, x = build("frames", 16)
    att = model.blocks[1].att
    att.key = _Adapter(att.key)
    dw = model.decode_weights()
    with torch.no_grad():
        full = model(x, return_sequence=True)
        steps, _ = run_steps(model, x, model.init_state(3), weights=dw)
    assert_close("wrapped projection: step vs forward", full, steps, 1e-5)
    assert calls and not any(calls)  # every step declined the C path (it would have ignored the adapter)
    with torch.no_grad():
        merged = torch.nn.Linear(64, 64, bias=False)
        merged.weight.copy_(att.key.base.weight + att.key.up @ att.key.down)
    att.key = merged  # the adapter merged into a plain projection: the C path again, same outputs
    calls.clear()
    with torch.no_grad():
        again, _ = run_steps(model, x, model.init_state(3), weights=dw)
    assert all(calls) and dw.rebuilds == 1
    assert_close("merged projection: C step vs the wrapped one", steps, again, 1e-5)
