"""Every RWKV version through the same model API: parallel forward == step-by-step, shapes, counts, init."""

import math

import pytest
import torch

import rwkv_torch as rt
from tests.test_model import assert_states_close, perturbed, run_steps
from tests.utils import assert_close

VERSIONS = [4, 5, 6, 7]
DONE_WHEN = dict(embed_dim=20, hidden_size=64, num_layers=2, head_size=16)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_forward_equals_step_by_step(version, dtype, rtol):
    model = perturbed(rt.build(version=version, **DONE_WHEN)).to(dtype)
    x = torch.randn(2, 40, 20, dtype=dtype)
    seq, st = model(x, return_sequence=True, return_state=True)
    steps, st2 = run_steps(model, x, model.init_state(2, dtype=dtype))
    assert_close(f"v{version} outputs", seq, steps, rtol)
    assert_states_close(st, st2, rtol)


@pytest.mark.parametrize("version", VERSIONS)
def test_carried_state_and_backends(version):
    model = perturbed(rt.build(version=version, vocab_size=30, hidden_size=32, num_layers=2, head_size=8)).double()
    x = torch.randint(0, 30, (2, 50))
    full, st_full = model(x, return_state=True)
    a, st = model(x[:, :21], return_state=True)
    b, st = model(x[:, 21:], st, return_state=True)
    assert_close("split", full, torch.cat([a, b], 1), 1e-10)
    assert_states_close(st_full, st, 1e-10)
    assert_close("naive backend", full, model(x, backend="naive"), 1e-10)


@pytest.mark.parametrize("version", VERSIONS)
def test_param_count_shapes_and_state(version, tmp_path):
    for opts in (DONE_WHEN, dict(vocab_size=100, hidden_size=128, num_layers=3, head_size=32)):
        m = rt.build(version=version, **opts)
        assert rt.param_count(version=version, **opts) == m.param_count()
    m = rt.build(version=version, **DONE_WHEN).eval()
    y, st = m(torch.randn(3, 7, 20), return_state=True)
    assert y.shape == (3, 64)
    expect = (3, 3, 64) if version == 4 else (3, 4, 16, 16)
    assert st.wkv[0].shape == expect and st.wkv[0].dtype == torch.float32
    st.save(tmp_path / "s.safetensors")
    back = rt.RWKVState.load(tmp_path / "s.safetensors")
    assert_states_close(st, back, 0.0)
    other = rt.build(version=7 if version != 7 else 6, **DONE_WHEN)
    with pytest.raises(ValueError, match="belongs to a model"):
        other.step(torch.randn(3, 20), st)


def test_init_follows_the_spec_for_older_versions():
    C, L = 64, 2
    n = torch.arange(C, dtype=torch.float64)
    m6 = rt.build(version=6, **DONE_WHEN)
    att = m6.blocks[1].att
    torch.testing.assert_close(att.time_decay.double(), -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(att.time_maa_v.double(), 1 - ((n / C) ** 0.5 + 0.3), rtol=1e-6, atol=1e-6)
    assert torch.all(att.time_maa_w1 == 0) and att.time_maa_w2.abs().max() <= 0.01
    assert torch.all(att.output.weight == 0) and math.isclose(att.ln_x.weight[0].item(), 1.0)
    m4 = rt.build(version=4, **DONE_WHEN)
    att4 = m4.blocks[0].att
    torch.testing.assert_close(att4.time_decay.double(), -5 + 8 * (n / (C - 1)) ** 0.7, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(att4.time_first.double(), math.log(0.3) + 0.5 * ((n + 1) % 3 - 1), rtol=1e-6,
                               atol=1e-6)
    assert torch.all(att4.key.weight == 0) and m4.blocks[0].ffn.key.weight.shape == (4 * C, C)
    m5 = rt.build(version=5, **DONE_WHEN)
    assert m5.blocks[0].att.time_decay.shape == (4, 16) and m5.blocks[0].ffn.key.weight.shape == (224, C)
    assert m5.config.num_layers == L


def test_v4_long_sequence_stays_finite():
    m = perturbed(rt.build(version=4, embed_dim=8, hidden_size=32, num_layers=1, head_size=8), scale=1.0)
    with torch.no_grad():
        m.blocks[0].att.time_decay.fill_(3.0)  # decay e^{-e^3} per step: very strong
    y = m(torch.randn(1, 2000, 8) * 5, return_sequence=True)
    assert torch.isfinite(y).all()
