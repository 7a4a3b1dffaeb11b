"""The RWKV-7 step in C (decode/c_step.py, ops/csrc/rwkv7_step.c) over the typed decode weights (decode/weights.py):
against the float64 parallel forward, the spec form at T = 1 and itself across thread counts; when it runs and when
the spec form runs instead; the decode weights' invalidation rule and the C table's field order."""

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import decode
from rwkv_torch.decode import c_step
from rwkv_torch.ops import cpu_lib
from tests.test_model import assert_states_close, perturbed, run_steps
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="no C compiler for the CPU kernels here")


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

    def c_and_spec():
        with torch.no_grad():
            c, _ = run_steps(model, x, model.init_state(3))
        spec, _ = run_steps(model, x, model.init_state(3))  # grad enabled: the spec form
        return spec, c

    c_and_spec()
    first = model.decode_weights()
    assert model.decode_weights() is first and first.is_current()  # reused while nothing changed
    with torch.no_grad():  # directly read (receptance) and derived (w1, x_g) parameters, updated in place
        model.blocks[1].att.receptance.weight.mul_(-1)
        model.blocks[2].att.w1.add_(0.3)
        model.blocks[0].att.x_g.mul_(-1)
    assert not first.is_current()
    assert_close("after in-place updates", *c_and_spec(), 1e-5)
    model.load_state_dict(perturbed(build("tokens", 16, seed=3)[0], seed=3).state_dict())
    assert_close("after load_state_dict", *c_and_spec(), 1e-5)
    current = model.decode_weights()
    model.blocks[1].att.a0 = torch.nn.Parameter(model.blocks[1].att.a0.detach() + 0.5)  # a replaced parameter
    assert not current.is_current()
    assert_close("after replacing a parameter", *c_and_spec(), 1e-5)
    model.load_state_dict(perturbed(build("tokens", 16, seed=4)[0], seed=4).state_dict(), assign=True)
    assert_close("after load_state_dict(assign=True)", *c_and_spec(), 1e-5)
    model.double().float()  # moved/cast: dropped at once
    assert model._decode_weights is None
    assert_close("after .double().float()", *c_and_spec(), 1e-5)
    with torch.no_grad():
        model.blocks[2].att.a1.data.add_(0.5)  # through .data: invisible to the version counter
    model.clear_decode_weights()
    assert_close("after a .data update and clear_decode_weights", *c_and_spec(), 1e-5)
    assert calls and all(calls)


def test_decode_weights_are_typed_and_named_like_the_c_table():
    model, _ = build("frames", 16)
    weights = model.decode_weights()
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
