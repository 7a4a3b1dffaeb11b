"""The model: parallel forward == step-by-step, carried state, shapes, parameter counts, init, input checks."""

import math
import shutil

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch.ops import cpu_lib
from tests.utils import ReadBacks, assert_close

SMALL = dict(hidden_size=64, num_layers=2, head_size=16)


def perturbed(model, scale=0.2, seed=0):
    """The official init zeroes several matrices (att.output, ffn.value); perturb every parameter so that every
    path of the layer carries signal in the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def run_steps(model, xs, state):
    outs = []
    for t in range(xs.shape[1]):
        y, state = model.step(xs[:, t], state)
        outs.append(y)
    return torch.stack(outs, 1), state


def assert_states_close(ref, out, rtol):
    for l in range(ref.num_layers):
        assert_close(f"shift_att[{l}]", ref.shift_att[l], out.shift_att[l], rtol)
        assert_close(f"shift_ffn[{l}]", ref.shift_ffn[l], out.shift_ffn[l], rtol)
        assert_close(f"wkv[{l}]", ref.wkv[l], out.wkv[l], rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["frames", "tokens"])
def test_forward_equals_step_by_step(kind, dtype, rtol):
    if kind == "frames":
        model = perturbed(rt.build(embed_dim=20, **SMALL)).to(dtype)
        x = torch.randn(3, 45, 20, dtype=dtype)
    else:
        model = perturbed(rt.build(vocab_size=50, **SMALL)).to(dtype)
        x = torch.randint(0, 50, (3, 45))
    seq, st = model(x, return_sequence=True, return_state=True)
    steps, st2 = run_steps(model, x, model.init_state(3, dtype=dtype))
    assert_close("outputs", seq, steps, rtol)
    assert_states_close(st, st2, rtol)


def test_continuing_from_carried_state():
    model = perturbed(rt.build(embed_dim=20, **SMALL)).double()
    x = torch.randn(2, 70, 20, dtype=torch.float64)
    full, st_full = model(x, return_sequence=True, return_state=True)
    a, st = model(x[:, :33], return_sequence=True, return_state=True)
    b, st = model(x[:, 33:50], st, return_sequence=True, return_state=True)
    c, st = run_steps(model, x[:, 50:], st)
    assert_close("split", full, torch.cat([a, b, c], 1), 1e-10)
    assert_states_close(st_full, st, 1e-10)


def test_forward_does_not_modify_the_given_state():
    model = perturbed(rt.build(embed_dim=8, **SMALL))
    st = model(torch.randn(1, 5, 8), return_state=True)[1]
    before = st.clone()
    model(torch.randn(1, 5, 8), st)
    model.step(torch.randn(1, 8), st)
    assert_states_close(before, st, 0.0)


def test_backends_agree_at_model_level():
    model = perturbed(rt.build(vocab_size=40, **SMALL)).double()
    x = torch.randint(0, 40, (2, 50))
    ref = model(x, backend="naive")
    assert_close("chunk", ref, model(x, backend="chunk"), 1e-10)


def test_build_shapes_and_defaults():
    m = rt.build(embed_dim=287)
    c = m.config
    assert (c.hidden_size, c.num_layers, c.head_size, c.dropout, c.window_size, c.version) == (256, 6, 64, 0.1, 60, 7)
    assert m(torch.randn(2, 60, 287)).shape == (2, 256)
    m = rt.build(embed_dim=20, **SMALL).eval()
    x = torch.randn(2, 9, 20)
    seq, st = m(x, return_sequence=True, return_state=True)
    assert seq.shape == (2, 9, 64) and st.batch_size == 2 and st.wkv[0].shape == (2, 4, 16, 16)
    assert st.wkv[0].dtype == torch.float32
    assert torch.equal(seq[:, -1], m(x))
    y, st = m.step(x[:, 0], m.init_cache(2))
    assert y.shape == (2, 64)
    head = rt.build(embed_dim=20, output_dim=7, **SMALL)
    assert head(x).shape == (2, 7) and rt.output_size(embed_dim=20, output_dim=7) == 7
    lm = rt.build(vocab_size=33, **SMALL)
    assert lm(torch.randint(0, 33, (2, 5))).shape == (2, 5, 33)
    assert lm.step(torch.tensor([1, 2]), lm.init_state(2))[0].shape == (2, 33)
    assert rt.output_size(vocab_size=33) == 33 and rt.output_size(embed_dim=3) == 256
    assert rt.recommended_defaults()["hidden_size"] == 256


@pytest.mark.parametrize(
    "opts",
    [dict(embed_dim=287), dict(embed_dim=20, output_dim=5, **SMALL), dict(vocab_size=300, hidden_size=128,
     num_layers=3, head_size=32), dict(embed_dim=10, hidden_size=96, num_layers=1, head_size=32, decay_lora=8,
     a_lora=16, v_lora=4, gate_lora=12, ffn_size=100)],
    ids=["default", "output-head", "token", "custom-ranks"],
)
def test_param_count_is_exact(opts):
    assert rt.param_count(**opts) == rt.build(**opts).param_count()


def test_lora_defaults_follow_the_training_code():
    # RWKV-7 0.1B (C=768) ships with decay/a/v/gate ranks 64/64/32/128 (spec 4.1).
    c = rt.config_for(vocab_size=65536, hidden_size=768, num_layers=12)
    assert (c.decay_lora_dim, c.a_lora_dim, c.v_lora_dim, c.gate_lora_dim, c.ffn_dim) == (64, 64, 32, 128, 3072)


def test_init_is_deterministic_and_follows_the_spec():
    a, b = rt.build(embed_dim=8, seed=3, **SMALL), rt.build(embed_dim=8, seed=3, **SMALL)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.blocks[0].att.receptance.weight, rt.build(embed_dim=8, seed=4, **SMALL).blocks[0]
                           .att.receptance.weight)
    C, N, L = 64, 16, 2
    att = a.blocks[1].att
    n = torch.arange(C, dtype=torch.float64)
    r0, r1 = 1 / (L - 1), 1 - 1 / L
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag, linear = z * z.abs(), n / (C - 1) - 0.5
    www = -6 + 6 * (n / (C - 1)) ** (1 + r0**0.3)
    torch.testing.assert_close(att.w0.double(), www + 0.5 + 2.5 * zigzag, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(att.x_r.double(), 1 - (n / C) ** (0.2 * r1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(att.a0.double(), -0.19 + 0.3 * zigzag + 0.4 * linear, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(att.v0.double(), 0.73 - 0.4 * linear, rtol=1e-6, atol=1e-6)
    assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04) and torch.all(att.w1 == 0)
    assert torch.all(att.output.weight == 0) and torch.all(a.blocks[1].ffn.value.weight == 0)
    assert math.isclose(att.ln_x.weight[0].item(), 1.0) and math.isclose(a.blocks[0].att.ln_x.weight[0].item(),
                                                                         0.5**0.7, rel_tol=1e-6)
    W = att.receptance.weight.double()
    torch.testing.assert_close(W @ W.T, torch.eye(C, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    K = att.key.weight.double()
    torch.testing.assert_close(K @ K.T, 0.01 * torch.eye(C, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert not hasattr(a.blocks[0].att, "v0")  # layer 0 defines v_first and has no value-residual LoRA


def test_dropout_active_only_in_training():
    m = perturbed(rt.build(embed_dim=8, **SMALL | {"dropout": 0.5}))
    x = torch.randn(2, 6, 8)
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_state_select_detach_clone_to_and_file_round_trip(tmp_path):
    m = perturbed(rt.build(embed_dim=8, **SMALL))
    x = torch.randn(3, 10, 8)
    _, st = m(x, return_state=True)
    one = st.select(1)
    assert one.batch_size == 1
    _, st1 = m(x[1:2], return_state=True)
    assert_states_close(st1, one, 1e-6)
    assert st.select([0, 2]).batch_size == 2
    c = st.clone()
    c.wkv[0].add_(1)
    assert not torch.equal(c.wkv[0], st.wkv[0])
    d = st.to(dtype=torch.float64)
    assert d.shift_att[0].dtype == torch.float64 and d.wkv[0].dtype == torch.float32
    assert not st.detach().wkv[0].requires_grad
    path = tmp_path / "s.safetensors"
    st.save(path)
    back = rt.RWKVState.load(path)
    assert back.meta == st.meta
    assert_states_close(st, back, 0.0)
    y1, _ = m.step(x[:, 0], st)
    y2, _ = m.step(x[:, 0], back)
    assert torch.equal(y1, y2)
    # The shift states are views of the last position of [B, T, C] activations: the file holds their bytes only.
    held = sum(t.numel() * t.element_size() for t in st.flat())
    assert path.stat().st_size <= 1.1 * held + 4096, (path.stat().st_size, held)


def test_state_errors(tmp_path):
    m = rt.build(embed_dim=8, **SMALL)
    other = rt.build(embed_dim=8, hidden_size=32, num_layers=2, head_size=16)
    with pytest.raises(ValueError, match="batch size 2"):
        m(torch.randn(3, 4, 8), m.init_state(2))
    with pytest.raises(ValueError, match="belongs to a model"):
        m.step(torch.randn(1, 8), other.init_state(1))
    with pytest.raises(TypeError, match="RWKVState"):
        m(torch.randn(1, 4, 8), state=[torch.zeros(1)])
    bad = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not an rwkv-torch state"):
        rt.RWKVState.load(bad)


def test_bad_inputs_raise_value_errors():
    m = rt.build(embed_dim=8, **SMALL)
    with pytest.raises(ValueError, match=r"\[B, T, embed_dim\]"):
        m(torch.randn(4, 8))
    with pytest.raises(ValueError, match="embed_dim=8"):
        m(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="NaN or inf"):
        m(torch.full((1, 3, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[B, embed_dim\]"):
        m.step(torch.randn(1, 1, 8), m.init_state(1))
    with pytest.raises(ValueError, match="empty"):
        m(torch.randn(1, 0, 8))
    lm = rt.build(vocab_size=10, **SMALL)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        lm(torch.tensor([[1, 10]]))
    with pytest.raises(TypeError, match="integer"):
        lm(torch.randn(1, 3))
    with pytest.raises(ValueError, match="head_size"):
        rt.build(embed_dim=8, hidden_size=64, head_size=24)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        rt.build(embed_dim=8, vocab_size=10)
    with pytest.raises(ValueError, match="num_layers"):
        rt.build(embed_dim=8, num_layers=0)
    with pytest.raises(TypeError, match="unknown build option"):
        rt.build(embed_dim=8, hiden_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        m.init_state(0)


def test_config_round_trip_and_frozen():
    c = rt.config_for(embed_dim=8, **SMALL)
    assert rt.RWKVConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):  # noqa: B017  frozen dataclass
        c.hidden_size = 3
    with pytest.raises(ValueError, match="unknown RWKVConfig fields"):
        rt.RWKVConfig.from_dict({"hidden": 3})


def test_backprop_through_model_and_initial_state():
    m = perturbed(rt.build(embed_dim=8, **SMALL)).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    st = m.init_state(2)
    st.wkv[1].normal_()
    st.wkv[1].requires_grad_(True)
    out = m(x, st, return_sequence=True)
    out.square().sum().backward()
    assert st.wkv[1].grad is not None and torch.isfinite(st.wkv[1].grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_bf16_autocast_forward_is_close_to_fp32():
    m = perturbed(rt.build(embed_dim=8, **SMALL))
    x = torch.randn(2, 30, 8)
    ref = m(x, return_sequence=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, return_sequence=True)
    assert out.dtype == torch.bfloat16
    assert_close("bf16", ref, out.float(), 5e-2)


STEP_VERSIONS = [4, 5, 6, 7]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["frames", "tokens"])
@pytest.mark.parametrize("version", STEP_VERSIONS)
def test_no_grad_step_equals_forward(version, kind, dtype, rtol):
    # Under no_grad, fp32 RWKV-7 steps in C (tests/test_decode.py), the rest through the spec form at T = 1;
    # step_ also overwrites the state.
    opts = dict(SMALL, version=version)
    if kind == "frames":
        model = perturbed(rt.build(embed_dim=20, **opts)).to(dtype)
        x = torch.randn(3, 30, 20, dtype=dtype)
    else:
        model = perturbed(rt.build(vocab_size=50, **opts)).to(dtype)
        x = torch.randint(0, 50, (3, 30))
    seq, st = model(x, return_sequence=True, return_state=True)
    start = model.init_state(3, dtype=dtype)
    with torch.no_grad():
        steps, st2 = run_steps(model, x, start)
        inplace = torch.stack([model.step_(x[:, t], start) for t in range(x.shape[1])], 1)
    assert_close("no-grad step outputs", seq, steps, rtol)
    assert_states_close(st, st2, rtol)
    assert_close("step_ outputs", seq, inplace, rtol)
    assert_states_close(st, start, rtol)


def test_step_inplace_with_grad_falls_back_and_still_updates():
    model = perturbed(rt.build(embed_dim=8, **SMALL))
    x = torch.randn(2, 6, 8)
    ref, st_ref = run_steps(model, x, model.init_state(2))
    st = model.init_state(2)
    outs = torch.stack([model.step_(x[:, t], st) for t in range(6)], 1)  # grad enabled: the generic path
    assert_close("outputs", ref, outs, 1e-6)
    assert_states_close(st_ref, st, 1e-6)


@pytest.mark.parametrize("version", [4, 6, 7])
def test_gradient_checkpointing_gives_the_same_gradients(version):
    model = perturbed(rt.build(embed_dim=8, version=version, **SMALL | {"dropout": 0.2})).double().train()
    x = torch.randn(2, 40, 8, dtype=torch.float64, requires_grad=True)
    h0 = model.init_state(2)
    h0.wkv[1].normal_()
    h0.wkv[1].requires_grad_(True)

    def grads(checkpointing: bool):
        assert model.set_gradient_checkpointing(checkpointing) is model
        for t in [x, h0.wkv[1], *model.parameters()]:
            t.grad = None
        torch.manual_seed(1)  # the same dropout masks in both runs (checkpoint replays the RNG state)
        out, st = model(x, h0, return_sequence=True, return_state=True)
        (out.square().sum() + st.wkv[0].sum() + st.shift_att[1].sum()).backward()
        return [x.grad, h0.wkv[1].grad] + [p.grad for p in model.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert model.gradient_checkpointing
    for i, (a, b) in enumerate(zip(plain, checkpointed)):
        assert_close(f"grad {i}", a, b, 1e-12)

    def saved_tensors(checkpointing: bool) -> int:
        model.set_gradient_checkpointing(checkpointing)
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, h0, return_sequence=True)
        return count[0]

    assert saved_tensors(True) < saved_tensors(False) / 4  # only the block inputs are kept
    for i, (a, b) in enumerate(zip(plain, checkpointed)):
        assert_close(f"grad {i}", a, b, 1e-12)
    with pytest.raises(TypeError, match="bool"):
        model.set_gradient_checkpointing("yes")


@pytest.mark.slow
@pytest.mark.parametrize("version", [4, 7])
def test_compiled_step_matches_step(version):
    pytest.importorskip("torch._inductor")
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        pytest.skip("AOTInductor needs torch >= 2.6")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("AOTInductor needs a C++ compiler")
    lm = perturbed(rt.build(vocab_size=40, version=version, **SMALL))
    compiled = lm.compile_step(batch_size=2)
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        ref, st_ref = run_steps(lm, x, lm.init_state(2))
        out, st = run_steps(compiled, x, compiled.init_state())
    assert_close("compiled outputs", ref, out, 1e-5)
    assert_states_close(st_ref, st, 1e-5)
    s = rt.Stream(compiled, batch_size=2)
    assert_close("stream", ref[:, 0], s.push(x[:, 0]), 1e-5)
    with pytest.raises(ValueError, match="batch size 2"):
        compiled.step(torch.tensor([1]), compiled.init_state(1))


@pytest.mark.parametrize("return_sequence", [True, False])
def test_segmented_forward_equals_one_piece(monkeypatch, return_sequence):
    # Long sequences run in pieces of CPU_SEGMENT_LEN tokens on CPU; the pieces must not change the function.
    import rwkv_torch.model as model_module

    model = perturbed(rt.build(vocab_size=30, **SMALL)).double()
    x = torch.randint(0, 30, (2, 50))

    def run(segment_len):
        monkeypatch.setattr(model_module, "CPU_SEGMENT_LEN", segment_len)
        model.zero_grad()
        out, st = model(x, return_sequence=return_sequence, return_state=True)
        out.square().sum().backward()
        return out, st, [p.grad.clone() for p in model.parameters()]

    (o1, s1, g1), (o2, s2, g2) = run(1000), run(16)
    assert_close("outputs", o1, o2, 1e-10)
    assert_states_close(s1, s2, 1e-10)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(f"grad {i}", a, b, 1e-10)


@pytest.mark.parametrize("kind", ["tokens", "frames"])
def test_rwkv7_forward_traces_into_one_graph(kind):
    # torch.compile(model) must see the whole RWKV-7 forward as one graph: input checks and the WKV op's numerics
    # choice must not read tensors back (a graph break per layer made compiled prefill ~1.25x slower).
    import torch._dynamo as dynamo

    opts = dict(vocab_size=50) if kind == "tokens" else dict(embed_dim=6)
    model = perturbed(rt.build(version=7, hidden_size=32, num_layers=2, head_size=16, seed=0, **opts)).eval()
    x = torch.randint(0, 50, (2, 70)) if kind == "tokens" else torch.randn(2, 70, 6)
    dynamo.reset()
    explained = dynamo.explain(model)(x, return_sequence=True)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert_compiled_training_matches(model, torch.compile(model, backend="aot_eager", fullgraph=True), x)
    dynamo.reset()


def assert_compiled_training_matches(model, compiled, x):
    """Values and parameter gradients of ``compiled`` (training through the compiled graph) against ``model``."""
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(x, return_sequence=True)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert_close("compiled", grads[0][0], grads[1][0], 1e-6)
    for i, (a, b) in enumerate(zip(grads[0][1], grads[1][1])):
        assert_close(f"grad {i}", a, b, 1e-5)


def test_rwkv6_training_through_torch_compile_matches_eager():
    # The training form's C passes as custom ops inside a compiled graph: the RWKV-5/6 output stage's backward (no
    # bonus: None inputs) and RWKV-6's mix backward (in place when eager, new tensors inside the graph).
    import torch._dynamo as dynamo

    model = perturbed(rt.build(version=6, hidden_size=32, num_layers=2, head_size=16, seed=0, embed_dim=6))
    x = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    assert_compiled_training_matches(model, torch.compile(model, backend="aot_eager"), x)
    dynamo.reset()


def test_wkv7_w_min_is_checked():
    from rwkv_torch.ops import wkv7

    r, k, v, a, b = (torch.randn(1, 5, 1, 4) for _ in range(5))
    w = -torch.rand(1, 5, 1, 4)
    w[0, 2, 0, 0] = -0.9
    with pytest.raises(ValueError, match="w_min"):
        wkv7(r, w, k, v, a, b, w_min=-0.61)
    with pytest.raises(ValueError, match="w_min"):
        wkv7(r, w, k, v, a, b, w_min=0.5)
    ref = wkv7(r, w, k, v, a, b, backend="naive")
    got = wkv7(r, w, k, v, a, b, backend="chunk", w_min=-1.0)
    for x, y in zip(ref, got):
        assert_close("w_min", x, y, 1e-5)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("kind", ["frames", "tokens"])
def test_no_value_read_back_per_layer_or_per_token(version, kind, monkeypatch):
    """The input checks read one value back per call at the model's edge (none with check_inputs off); no layer
    and no op reads one back, in training (forward + backward) or in decoding (step), whatever the depth. ``auto``
    trains on the recurrence (C on CPU, Triton on CUDA), which reads nothing. The one exception, RWKV-5/6 on the
    chunked form (a CPU without a C compiler): WKV-6's decay is unbounded, so the chunk length that keeps its
    factorised form exact is read from the data once per layer."""
    def reads(num_layers: int, checks: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        opts = dict(hidden_size=32, num_layers=num_layers, head_size=16, version=version)
        model = rt.build(embed_dim=8, **opts) if kind == "frames" else rt.build(vocab_size=20, **opts)
        model.set_input_checks(checks)
        x = torch.randn(2, 20, 8) if kind == "frames" else torch.randint(0, 20, (2, 20))
        counter = ReadBacks(monkeypatch)
        model(x, return_sequence=True).sum().backward()
        train_reads, counter.count = counter.count, 0
        state = model.init_state(2)
        with torch.no_grad():
            for t in range(5):
                _, state = model.step(x[:, t], state)
        monkeypatch.undo()
        return train_reads, counter.count

    per_layer = 1 if version in (5, 6) and not cpu_lib.available() else 0
    assert reads(1, checks=False) == (per_layer, 0)
    assert reads(3, checks=False) == (3 * per_layer, 0)
    train_reads, step_reads = reads(3, checks=True)
    assert train_reads <= 1 + 3 * per_layer and step_reads <= 5, (train_reads, step_reads)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("backend", ["auto", "chunk"])
def test_one_read_back_per_packed_forward(version, backend, monkeypatch):
    """With cu_seqlens the offsets are read back once, at the model's edge (``PackedOffsets``), and every layer and
    op gets them from there: one read-back for a packed training step (forward + backward) whatever the depth, also
    past ``CPU_SEGMENT_LEN`` (the pieces' local offsets are made from the host copy); none when the caller passes
    ``PackedOffsets``. The one exception is the chunked WKV-6 (RWKV-5/6 on ``chunk``), which reads its decays' span
    once per layer (see above)."""
    from rwkv_torch.model import CPU_SEGMENT_LEN
    from rwkv_torch.ops.packing import packed_offsets

    def reads(num_layers: int, T: int = 20, packed: bool = False) -> int:
        torch.manual_seed(0)
        model = rt.build(embed_dim=8, hidden_size=32, num_layers=num_layers, head_size=16, version=version)
        model.set_input_checks(False)
        x = torch.randn(1, T, 8)
        cu = torch.tensor([0, 7, 12, T - 3, T])
        cu = packed_offsets(cu) if packed else cu
        counter = ReadBacks(monkeypatch)
        model(x, cu_seqlens=cu, return_sequence=True, backend=backend).sum().backward()
        monkeypatch.undo()
        return counter.count

    per_layer = 1 if version in (5, 6) and (backend == "chunk" or not cpu_lib.available()) else 0
    assert reads(1) == 1 + per_layer
    assert reads(4) == 1 + 4 * per_layer
    assert reads(2, packed=True) == 2 * per_layer
    if backend == "auto":
        assert reads(2, T=CPU_SEGMENT_LEN + 40) == 1 + 2 * 2 * per_layer  # two pieces


def test_input_checks_can_be_turned_off():
    model = rt.build(embed_dim=4, **SMALL)
    bad = torch.full((1, 3, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with pytest.raises(TypeError, match="bool"):
        model.set_input_checks("no")
    assert model.set_input_checks(False) is model
    assert torch.isnan(model(bad)).all()  # unchecked: the caller's promise, NaN propagates
    with pytest.raises(ValueError, match="embed_dim"):  # shape checks stay on
        model(torch.zeros(1, 3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("version", [4, 7])
def test_no_device_sync_on_cuda(version):
    """On CUDA, training (forward + backward) and decoding (step) make no device-to-host sync at all, input checks
    included (they are queued with torch._assert_async): torch's sync debug mode raises on any."""
    torch.manual_seed(0)
    model = rt.build(vocab_size=50, hidden_size=64, num_layers=3, head_size=16, version=version).cuda()
    x = torch.randint(0, 50, (2, 40), device="cuda")
    model(x, return_sequence=True).float().sum().backward()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x, return_sequence=True).float().sum().backward()
        state = model.init_state(2)
        with torch.no_grad():
            for t in range(4):
                _, state = model.step(x[:, t], state)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_huge_frames_that_overflow_the_input_projection_are_refused():
    model = rt.build(embed_dim=8, hidden_size=32, num_layers=1, head_size=16, seed=0).eval()
    x = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="frames too large: the input projection overflows"):
        model(x * 1e30)
    with pytest.raises(ValueError, match="frames too large: the input projection overflows"):
        model.step(x[:, 0] * 1e30, model.init_state(1))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.masked_fill(x > 1, float("nan")))
    assert torch.isfinite(model(x * 1e10)).all()  # large but representable: accepted
