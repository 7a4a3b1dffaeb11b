"""The RWKV-7 step in C (layers/cpu_step.py, ops/csrc/rwkv7_step.c) against the float64 parallel forward, the eager
fused step and itself across thread counts; when it runs and when the eager step runs instead."""

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch.layers import cpu_step
from rwkv_torch.ops import cpu_kernel
from tests.test_model import assert_states_close, perturbed, run_steps
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler for the CPU kernels here")


@pytest.fixture
def calls(monkeypatch):
    """Counts the steps that ran in C."""
    count = []
    real = cpu_step.blocks_step

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        count.append(out is not None)
        return out

    monkeypatch.setattr(cpu_step, "blocks_step", spy)
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


def test_agrees_with_the_eager_fused_step_and_is_used_only_where_it_applies(monkeypatch, calls):
    model, x = build("frames", 64)
    with torch.no_grad():
        fast, fast_state = run_steps(model, x, model.init_state(3))
        assert len(calls) == x.shape[1]
        monkeypatch.setattr(cpu_step, "applies", lambda *a: False)
        eager, eager_state = run_steps(model, x, model.init_state(3))
    assert_close("C vs eager step", eager, fast, 1e-5)
    assert_states_close(eager_state, fast_state, 1e-5)
    monkeypatch.undo()
    calls.clear()
    with torch.no_grad():
        run_steps(model.double(), x.double(), model.init_state(3, dtype=torch.float64))  # fp64: the eager step
        run_steps(perturbed(rt.build(embed_dim=20, hidden_size=64, num_layers=2, head_size=16, version=6)), x,
                  None)  # other versions: the eager step
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


def test_sees_parameter_changes(calls):
    model, x = build("tokens", 16)

    def c_and_generic():
        with torch.no_grad():
            c, _ = run_steps(model, x, model.init_state(3))
        generic, _ = run_steps(model, x, model.init_state(3))  # grad enabled: the differentiable path
        return generic, c

    c_and_generic()
    with torch.no_grad():  # directly read (receptance) and stacked (w1) parameters, updated in place
        model.blocks[1].att.receptance.weight.mul_(-1)
        model.blocks[2].att.w1.add_(0.3)
    assert_close("after in-place updates", *c_and_generic(), 1e-5)
    model.load_state_dict(perturbed(build("tokens", 16, seed=3)[0], seed=3).state_dict())
    assert_close("after load_state_dict", *c_and_generic(), 1e-5)
    assert calls and all(calls)


def test_turned_off_by_environment(monkeypatch, calls):
    monkeypatch.setenv("RWKV_TORCH_CPU_KERNEL", "0")
    model, x = build("tokens", 16)
    with torch.no_grad():
        run_steps(model, x, model.init_state(3))
    assert not calls
