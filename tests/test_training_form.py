"""The training forms: RWKV-7's time mix (layers/rwkv7.py's forward_train through ops/wkv7/fused_mix.py and
fused_inputs.py; fp32, bf16 autocast and LoRA projections), the RWKV-5/6/7 output stage (ops/gated_output.py) and the
channel mixes through ops.mix, against the spec form in float64 (outputs, carried
states, every gradient), and that they keep fewer tensors."""

import copy

import pytest
import torch
import torch.nn as nn

from rwkv_torch.config import RWKVConfig
from rwkv_torch.layers.rwkv7 import TimeMix
from rwkv_torch.ops import cpu_lib, mix_cpu, time_mix_cpu
from rwkv_torch.ops.mix import shift_mix_linear
from rwkv_torch.ops.token_shift import token_shift, token_shift_backward
from tests.utils import assert_close, rel_rms

C, H = 32, 4


def perturbed_layer(layer_id: int, seed: int = 0) -> TimeMix:
    """A layer with every parameter away from its init (which zeroes several matrices), so every path carries signal."""
    cfg = RWKVConfig(version=7, hidden_size=C, num_layers=3, head_size=C // H, embed_dim=C)
    layer = TimeMix(cfg, layer_id).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.reset_parameters(3, g)
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def run(layer, fused: bool, inputs: dict, backend: str, cu_seqlens=None):
    """Forward through one form, then the gradients of a random projection of every output."""
    form = layer.forward_train if fused else layer.forward_spec
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, shift, state, v_first = form(leaves["x"], leaves["shift"], leaves["state"], leaves.get("v_first"),
                                       backend=backend, cu_seqlens=cu_seqlens)
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum()
               for t in (out, shift, state, v_first))
    params = {k: p for k, p in layer.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [*leaves.values(), *params.values()], allow_unused=True)
    names = [f"d{k}" for k in leaves] + [f"d{k}" for k in params]
    return {"out": out, "shift": shift, "state": state, "v_first": v_first, **dict(zip(names, grads))}


@pytest.mark.parametrize("layer_id", [0, 2])
@pytest.mark.parametrize("backend", ["recurrent", "naive"])
@pytest.mark.parametrize("packed", [False, True])
def test_training_form_equals_spec_form_in_float64(layer_id, backend, packed):
    g = torch.Generator().manual_seed(1)
    B, T = (1, 13) if packed else (2, 11)
    S = 3 if packed else B
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(x=rand(B, T, C), shift=rand(S, C), state=0.3 * rand(S, H, C // H, C // H),
                  v_first=rand(B, T, C) if layer_id else None)
    cu = torch.tensor([0, 4, 4, T]) if packed else None  # an empty sequence in the middle
    layer = perturbed_layer(layer_id)
    ref = run(layer, False, inputs, backend, cu)
    got = run(layer, True, inputs, backend, cu)
    assert set(ref) == set(got)
    for name, r in ref.items():
        if r is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, f"{name}: no gradient in the training form"
        assert_close(name, r, got[name], 1e-12)


def test_forward_is_the_training_form_under_autograd_and_the_spec_form_otherwise(monkeypatch):
    layer = perturbed_layer(0).float()
    x, shift, state = torch.randn(1, 4, C), torch.zeros(1, C), torch.zeros(1, H, C // H, C // H)
    calls = []
    for name in ("forward_train", "forward_spec"):
        real = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))

    def form():
        calls.clear()
        layer(x, shift, state, None)
        return calls[-1]

    assert form() == "forward_train"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert form() == "forward_train"
    layer.receptance = nn.Sequential(layer.receptance)  # a wrapped projection (LoRA, quantized): the training form
    assert form() == "forward_train"
    with torch.no_grad():
        assert form() == "forward_spec"


def saved_storage_bytes(fn, params) -> int:
    """Bytes of the activations autograd keeps for fn's backward (each storage once; the weights not counted)."""
    seen, weights = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_training_form_keeps_fewer_tensors():
    """The training form keeps about 0.6x the spec form's activation bytes in float32, and no more than that under
    bf16 autocast or with LoRA-wrapped projections (whose inputs are rebuilt, not kept)."""
    if not cpu_lib.available():
        pytest.skip("no C compiler here: the WKV op would be the chunk form, which keeps its own intermediates")
    layer = perturbed_layer(1).float()
    B, T = 4, 32
    x, v_first = torch.randn(B, T, C, requires_grad=True), torch.randn(B, T, C)
    shift, state = torch.zeros(B, C), torch.zeros(B, H, C // H, C // H)

    def saved(layer, fused, autocast=False):
        form = layer.forward_train if fused else layer.forward_spec
        vf = v_first.bfloat16() if autocast else v_first
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return saved_storage_bytes(lambda: form(x, shift, state, vf)[0].float().sum(), layer.parameters())

    fused, spec = saved(layer, True), saved(layer, False)
    assert fused < 0.65 * spec, (fused, spec)  # 18.5 against 31.9 [B, T, C] tensors here
    lora = with_lora(layer)
    rank = lora.key.rank
    allowance = 4 * 2 * B * T * rank * 4  # a LoRA's own [B, T, rank] tensors, two per projection, were they kept
    auto, auto_spec = saved(layer, True, autocast=True), saved(layer, False, autocast=True)
    assert auto <= fused and auto < 0.7 * auto_spec, (auto, fused, auto_spec)
    lora_fused, lora_spec = saved(lora, True), saved(lora, False)
    assert lora_fused <= fused + allowance and lora_fused < 0.6 * lora_spec, (lora_fused, fused, lora_spec)
    assert saved(lora, True, autocast=True) <= auto + allowance


def with_lora(layer: TimeMix, seed: int = 5) -> TimeMix:
    """``layer`` with its four projections LoRA-wrapped as fine-tuning does (``train.finetune.LoRALinear``, the base
    frozen), B away from its zero init so the low-rank update carries signal."""
    from rwkv_torch.train.finetune import LoRALinear

    layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(seed)
    for name in ("receptance", "key", "value", "output"):
        lora = LoRALinear(getattr(layer, name), rank=3, alpha=6.0)
        with torch.no_grad():
            lora.lora_B.copy_(0.2 * torch.randn(lora.lora_B.shape, generator=g, dtype=lora.lora_B.dtype))
        setattr(layer, name, lora)
    return layer


@pytest.mark.parametrize("layer_id", [0, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_lora_training_form_equals_spec_form_in_float64(layer_id, packed):
    """LoRA-wrapped projections through the training form (called, and called again in the backward) against the
    spec form: outputs, states and every gradient (the LoRA factors' and the layer's own; the bases are frozen)."""
    g = torch.Generator().manual_seed(11)
    B, T = (1, 13) if packed else (2, 11)
    S = 3 if packed else B
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(x=rand(B, T, C), shift=rand(S, C), state=0.3 * rand(S, H, C // H, C // H),
                  v_first=rand(B, T, C) if layer_id else None)
    cu = torch.tensor([0, 4, 4, T]) if packed else None
    layer = with_lora(perturbed_layer(layer_id))
    backend = "recurrent" if cpu_lib.available() else "naive"
    ref, got = run(layer, False, inputs, backend, cu), run(layer, True, inputs, backend, cu)
    assert {"dreceptance.lora_A", "doutput.lora_B", "dx_r"} <= set(ref) and "dkey.base.weight" not in ref
    for name, r in ref.items():
        if r is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, f"{name}: no gradient in the training form"
        assert_close(name, r, got[name], 1e-12)


def test_quantized_projections_train_through_the_training_form():
    """Frozen int8 projections (``quantize.QuantLinear``, with the layer's vectors or a state training on top): the
    training form calls them as modules; values and gradients as the spec form's, in float32."""
    from rwkv_torch.quantize import QuantLinear

    layer = perturbed_layer(1).float()
    for name in ("receptance", "key", "value", "output"):
        setattr(layer, name, QuantLinear.from_linear(getattr(layer, name), "int8"))
    g = torch.Generator().manual_seed(12)
    inputs = dict(x=torch.randn(2, 9, C, generator=g), shift=torch.randn(2, C, generator=g),
                  state=0.3 * torch.randn(2, H, C // H, C // H, generator=g), v_first=torch.randn(2, 9, C, generator=g))
    ref, got = run(layer, False, inputs, "naive"), run(layer, True, inputs, "naive")
    assert "dreceptance.weight" not in ref and ref["dx_k"] is not None
    for name, r in ref.items():
        if r is not None:
            assert_close(name, r, got[name], 1e-5)


@pytest.mark.parametrize("layer_id", [0, 2])
def test_bf16_autocast_training_form_matches_the_spec_form(layer_id):
    """Under bf16 autocast both forms run the projections in bf16 and the elementwise terms in float32 (the training
    form widens its bf16 inputs to float32). Against the float64 spec form, every output and gradient of the training
    form is within bf16 tolerances (3%) and no worse than the spec form's own autocast error (1.5x, plus 1e-3)."""
    g = torch.Generator().manual_seed(13)
    B, T = 2, 24
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(x=rand(B, T, C), shift=rand(B, C), state=0.3 * rand(B, H, C // H, C // H),
                  v_first=rand(B, T, C) if layer_id else None)
    layer = perturbed_layer(layer_id)
    exact = run(layer, False, inputs, "naive")
    layer = layer.float()
    f32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    if layer_id:  # layer 0's value, made under autocast: bf16
        f32["v_first"] = f32["v_first"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec, train = run(layer, False, f32, "naive"), run(layer, True, f32, "naive")
    assert train["out"].dtype == spec["out"].dtype == torch.bfloat16
    for name, t in train.items():  # every gradient in its leaf's dtype, as autograd of the spec form gives
        if t is not None and name.startswith("d"):
            assert t.dtype == spec[name].dtype, name
    for name, r in exact.items():
        if r is None:
            continue
        e_spec, e_train = rel_rms(r, spec[name]), rel_rms(r, train[name])
        assert e_train < 0.03 and e_train <= 1.5 * e_spec + 1e-3, (name, e_train, e_spec)


@pytest.mark.parametrize("one_pass", [True, False], ids=["C-pass", "torch-ops"])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)], ids=["all-outputs", "one-unused"])
def test_shift_mix_linear_equals_the_lerps_then_the_projections(one_pass, used, monkeypatch):
    """Both backwards (the C pass over the reductions and its torch fallback) against autograd of the lerps; 140 rows
    span several of the C pass's row blocks."""
    if not one_pass:
        monkeypatch.setattr(cpu_lib, "available", lambda: False)
    elif not cpu_lib.available():
        pytest.skip("no C compiler here: the one-pass backward cannot be built")
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, shift = rand(2, 70, 6), rand(2, 6)
    mu0, mu1 = rand(6), rand(6)
    mus, weights = [mu0, mu1, mu0], [rand(3, 6), rand(6, 4).t(), rand(2, 6)]  # one vector feeding two projections

    def spec():
        xx = torch.cat([shift.unsqueeze(1), x[:, :-1]], 1) - x
        return [(x + xx * mu) @ w.t() for mu, w in zip(mus, weights)]

    leaves = [x, shift, mu0, mu1]
    outs = shift_mix_linear(x, shift, mus, weights)
    ref = spec()
    for o, r in zip(outs, ref):
        assert_close("out", r, o, 1e-14)
    proj = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref]
    loss = lambda ys: sum((ys[i] * proj[i]).sum() for i in used)  # noqa: E731
    gr = torch.autograd.grad(loss(ref), leaves + weights, allow_unused=True)
    go = torch.autograd.grad(loss(outs), leaves + weights, allow_unused=True)
    for leaf, a, b in zip(leaves + weights, gr, go):  # unreached in the reference: autograd gives zeros or None
        a = torch.zeros_like(leaf) if a is None else a
        assert_close("grad", a, torch.zeros_like(leaf) if b is None else b, 1e-13)
    with pytest.raises(ValueError, match="one weight per mixing vector"):
        shift_mix_linear(x, shift, mus, weights[:1])


def test_mix_backward_pass_in_float32_is_exact_and_thread_independent():
    """The C pass in float32 against float64 sums, and bit-equal for 1, 2 and 3 threads."""
    if not cpu_lib.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(4)
    d = [torch.randn(3, 100, 40, generator=g) for _ in range(3)]
    mus = [torch.rand(40, generator=g) for _ in range(3)]
    xx = torch.randn(3, 100, 40, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(mix_cpu.mix_backward(d, mus, xx))
    finally:
        torch.set_num_threads(threads)
    for run_ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run_))
    d64, mus64, xx64 = [t.double() for t in d], [m.double() for m in mus], xx.double()
    dxx = sum(t * m for t, m in zip(d64, mus64))
    dmu = torch.stack([(t * xx64).sum((0, 1)) for t in d64])
    for name, want, got in zip(("dx", "dxx", "dmu"), (sum(d64) - dxx, dxx, dmu), runs[0]):
        assert got.dtype == torch.float32
        assert_close(name, want, got.double(), 1e-5)
    with pytest.raises(TypeError, match="one dtype"):
        mix_cpu.mix_backward(d, mus64, xx)
    with pytest.raises(ValueError, match="shaped like xx"):
        mix_cpu.mix_backward(d, mus[:2], xx)


def test_data_mix_backward_pass_in_float32_is_exact_and_thread_independent():
    """RWKV-6's data-dependent mix pass in float32 against float64 torch ops (every output, both overwritten inputs),
    and bit-equal for 1, 2 and 3 threads; 150 rows span several row blocks."""
    if not cpu_lib.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(6)
    J, shape = 3, (3, 50, 40)
    d, m = torch.randn(J, *shape, generator=g), torch.randn(J, *shape, generator=g)
    mus = [torch.rand(40, generator=g) for _ in range(J)]
    x, xx = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            dn, mn = d.clone(), m.clone()
            out = mix_cpu.data_mix_backward(dn, mn, mus, x, xx)
            assert out[3] is dn and out[4] is mn  # eager: in place
            runs.append(out)
    finally:
        torch.set_num_threads(threads)
    for run_ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run_))
    d64, m64, x64, xx64 = d.double(), m.double(), x.double(), xx.double()
    mm = torch.stack([mu.double() + m64[j] for j, mu in enumerate(mus)])
    dxx = (d64 * mm).sum(0)
    want = [d64.sum(0) - dxx, dxx, (d64 * xx64).sum((1, 2)), d64 * xx64, x64 + xx64 * mm]
    for name, w, got in zip(("dx", "dxx", "dmu", "d_j xx over d", "lerp over m"), want, runs[0]):
        assert got.dtype == torch.float32
        assert_close(name, w, got.double(), 1e-5)
    with pytest.raises(TypeError, match="one dtype"):
        mix_cpu.data_mix_backward(d, m, mus, x.double(), xx)
    with pytest.raises(ValueError, match="contiguous gradients"):
        mix_cpu.data_mix_backward(d.transpose(2, 3).contiguous().transpose(2, 3), m, mus, x, xx)
    with pytest.raises(ValueError, match="contiguous gradients"):
        mix_cpu.data_mix_backward(d, m, mus[:2], x, xx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_relu_linear_c_pass_gives_the_torch_ops_bits(dtype, monkeypatch):
    """The C passes (forward, and backward with the square recomputed) against the torch-op form: the same bits for
    outputs and both gradients, NaN propagating, over more elements than one of the C pass's blocks."""
    if not cpu_lib.available():
        pytest.skip("no C compiler here")
    from rwkv_torch.ops.mix import squared_relu_linear

    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 50, 160, generator=g, dtype=dtype)
    z[0, 0, :3] = torch.tensor([float("nan"), 0.0, -0.0], dtype=dtype)
    w = torch.randn(24, 160, generator=g, dtype=dtype)
    proj = torch.randn(3, 50, 24, generator=g, dtype=dtype)

    def run():
        zs, ws = z.clone().requires_grad_(), w.clone().requires_grad_()
        out = squared_relu_linear(zs, ws)
        ws_only = w.clone().requires_grad_()  # z without a gradient: the backward makes dw alone
        (dw_only,) = torch.autograd.grad((squared_relu_linear(z, ws_only).nan_to_num() * proj).sum(), [ws_only])
        return [out, *torch.autograd.grad((out.nan_to_num() * proj).sum(), [zs, ws]), dw_only]

    got = run()
    monkeypatch.setattr(cpu_lib, "available", lambda: False)
    want = run()
    for name, a, b in zip(("out", "dz", "dw", "dw alone"), want, got):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
    assert got[1][0, 0, 0].isnan() and not got[1][0, 0, 1:3].isnan().any()
    with pytest.raises(TypeError, match="one dtype"):
        mix_cpu.squared_relu_backward(z, z.float() if dtype == torch.float64 else z.double())
    with pytest.raises(ValueError, match="contiguous CPU tensors of one shape"):
        mix_cpu.squared_relu(z.transpose(1, 2))


def _time_mix_case(name: str, g: torch.Generator):
    """(function of the leaves, the leaves in float64) for one of the time mix's training-form groups (RWKV-7's
    gated_output and wkv_inputs, RWKV-5/6's gated_output without the bonus): 3 x 50 rows of 2 heads of 16, several
    of the C passes' row blocks."""
    from rwkv_torch.ops.gated_output import gated_output
    from rwkv_torch.ops.wkv7 import fused_inputs

    B, T, Hh, N = 3, 50, 2, 16
    Cg = Hh * N
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if name == "gated_output":
        ins = [rand(B, T, Cg) * 2 + 0.5, *(rand(B, T, Cg) for _ in range(4)), rand(Hh, N), rand(Cg), rand(Cg),
               rand(Cg, Cg)]
        return lambda *xs: [gated_output(*xs, Hh, 64e-5)], ins
    if name == "gated_output_no_bonus":
        ins = [rand(B, T, Cg) * 2 + 0.5, rand(B, T, Cg), rand(Cg), rand(Cg), rand(Cg, Cg)]
        return lambda y, g_, *rest: [gated_output(y, None, None, None, g_, None, *rest, Hh, 64e-5)], ins
    k0 = rand(B, T, Cg)
    k0[0, 0, :N] = 0  # a head whose norm is below eps: normalize's clamp, no projection term
    ins = [k0, rand(B, T, Cg), rand(B, T, Cg), rand(Cg), rand(Cg)]
    return lambda *xs: list(fused_inputs.wkv_inputs(*xs, Hh)), ins


@pytest.mark.parametrize("name", ["gated_output", "gated_output_no_bonus", "wkv_inputs"])
def test_time_mix_c_backward_equals_the_torch_ops(name):
    """The time mix's training-form groups: the C backward pass against its torch-op form in float64 (every
    gradient), float32 against float64, and bit-equal for 1, 2 and 3 threads."""
    if not cpu_lib.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(8)
    fn, ins = _time_mix_case(name, g)

    def grads(dtype, threads=None):
        leaves = [t.to(dtype).requires_grad_() for t in ins]
        outs = fn(*leaves)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                    .to(dtype)).sum() for i, o in enumerate(outs))
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(threads or n)
            return [*outs, *torch.autograd.grad(loss, leaves)]
        finally:
            torch.set_num_threads(n)

    c64 = grads(torch.float64)
    runs = [grads(torch.float32, n) for n in (1, 2, 3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_lib, "available", lambda: False)
        ops64 = grads(torch.float64)
    for i, (want, got) in enumerate(zip(ops64, c64)):
        assert_close(f"float64 result {i}", want, got, 1e-12)
    for run_ in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run_))
    for i, (want, got) in enumerate(zip(c64, runs[0])):
        assert_close(f"float32 result {i}", want, got.double(), 2e-5)


def test_time_mix_c_backward_errors():
    if not cpu_lib.available():
        pytest.skip("no C compiler here")
    x, c = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(TypeError, match="one dtype"):
        time_mix_cpu.gated_output_backward(x, x, x, x, x, x, c, c, c.float(), 2, 1e-5)
    with pytest.raises(ValueError, match="heads dividing"):
        time_mix_cpu.gated_output_backward(x, x, x, x, x, x, c, c, c, 3, 1e-5)
    with pytest.raises(ValueError, match="heads dividing"):
        time_mix_cpu.gated_output_backward(x, x, None, None, None, x[:1], None, c, c, 2, 1e-5)
    with pytest.raises(ValueError, match="all given .* or all None"):
        time_mix_cpu.gated_output_backward(x, x, x, x, None, x, c, c, c, 2, 1e-5)
    norm = torch.ones(2, 5, 2, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="one dtype"):
        time_mix_cpu.wkv_inputs_backward(x, x, x, x, x, x, norm.float(), x, x, c, c, 0.6, 1e-12)
    with pytest.raises(ValueError, match="H dividing"):
        time_mix_cpu.wkv_inputs_backward(x, x, x, x, x, x, norm[..., :1, :], x, x, c, c[:4], 0.6, 1e-12)


@pytest.mark.parametrize("cu", [None, [0, 3, 3, 7, 9], [0, 0, 9]])
def test_token_shift_backward_equals_autograd(cu):
    g = torch.Generator().manual_seed(5)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    B, S = (2, 2) if cu is None else (1, len(cu) - 1)
    x = torch.randn(B, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(S, 4, generator=g, dtype=torch.float64, requires_grad=True)
    d_prev = torch.randn(B, 9, 4, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(token_shift(x, shift, cu_seqlens=cu_seqlens), (x, shift), d_prev)
    got = token_shift_backward(d_prev, cu_seqlens=cu_seqlens)
    for name, r, o in zip(("dx", "dshift"), ref, got):
        assert torch.equal(r, o), name


@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_channel_mix_through_the_recomputing_ops_equals_the_modules(version, packed):
    # Plain projections run through shift_mix_linear + squared_relu_linear; wrapped ones (LoRA, quantized) through
    # the modules one op at a time. Same values, same gradients, in float64.
    from rwkv_torch.layers import rwkv4, rwkv5, rwkv6, rwkv7

    cfg = RWKVConfig(version=version, hidden_size=C, num_layers=2, head_size=C // H, embed_dim=C)
    plain = {4: rwkv4, 5: rwkv5, 6: rwkv6, 7: rwkv7}[version].ChannelMix(cfg, 1).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    wrapped = copy.deepcopy(plain)
    for name in ("key", "value", "receptance"):
        if hasattr(wrapped, name):
            setattr(wrapped, name, nn.Sequential(getattr(wrapped, name)))
    B, T = (1, 12) if packed else (2, 9)
    cu = torch.tensor([0, 5, 5, 12]) if packed else None
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    shift = torch.randn(3 if packed else B, C, generator=g, dtype=torch.float64)
    proj = torch.randn(B, T, C, generator=g, dtype=torch.float64)

    def run(mod):
        xs, ss = x.clone().requires_grad_(), shift.clone().requires_grad_()
        out, last = mod(xs, ss, cu_seqlens=cu)
        loss = (out * proj).sum() + (last * 0.5).sum()
        return [out, last, *torch.autograd.grad(loss, [xs, ss, *mod.parameters()])]

    for i, (a, b) in enumerate(zip(run(wrapped), run(plain))):
        assert_close(f"result {i}", a, b, 1e-12)


@pytest.mark.parametrize("version", [4, 5, 6])
@pytest.mark.parametrize("packed", [False, True])
def test_time_mix_through_the_recomputing_ops_equals_the_modules(version, packed):
    # RWKV-4/5's lerps x mu + prev (1 - mu) and RWKV-6's data-dependent lerps x + xx (mu + m) with their projections
    # through ops.mix when training with plain projections; wrapped ones (and inference) one op at a time. Same
    # values, states and gradients; the same bits forward (LoRA at B = 0 is the base model exactly).
    from rwkv_torch.layers import rwkv4, rwkv5, rwkv6

    cfg = RWKVConfig(version=version, hidden_size=C, num_layers=2, head_size=C // H, embed_dim=C)
    plain = {4: rwkv4, 5: rwkv5, 6: rwkv6}[version].TimeMix(cfg, 1).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        plain.reset_parameters(2, g)
        for p in plain.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    wrapped = copy.deepcopy(plain)
    for name in ("key", "value", "receptance", "gate", "output"):  # RWKV-5/6's output stage: ops/gated_output.py
        if hasattr(wrapped, name):
            setattr(wrapped, name, nn.Sequential(getattr(wrapped, name)))
    B, T = (1, 12) if packed else (2, 9)
    S = 3 if packed else B
    cu = torch.tensor([0, 5, 5, 12]) if packed else None
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, shift, proj = rand(B, T, C), rand(S, C), rand(B, T, C)
    if version == 4:
        state = torch.stack([0.3 * rand(S, C), rand(S, C).exp(), rand(S, C)], dim=1)  # aa, bb > 0, pp
    else:
        state = 0.3 * rand(S, H, C // H, C // H)

    def run(mod):
        xs, ss, st = (t.clone().requires_grad_() for t in (x, shift, state))
        out, last, new_state, _ = mod(xs, ss, st, cu_seqlens=cu)
        loss = (out * proj).sum() + (last * 0.5).sum() + (new_state * 0.25).sum()
        return [out, last, new_state, *torch.autograd.grad(loss, [xs, ss, st, *mod.parameters()])]

    ref, got = run(wrapped), run(plain)
    assert torch.equal(ref[0], got[0])
    for i, (a, b) in enumerate(zip(ref, got)):
        assert_close(f"result {i}", a, b, 1e-12)
    with torch.no_grad():  # inference: the same ops in both
        assert torch.equal(wrapped(x, shift, state, cu_seqlens=cu)[0], plain(x, shift, state, cu_seqlens=cu)[0])


@pytest.mark.parametrize("used", [(0, 1, 2), (1,)], ids=["all-outputs", "one-used"])
def test_data_lerp_linear_equals_the_lerps_then_the_projections(used):
    from rwkv_torch.ops.mix import data_lerp_linear

    g = torch.Generator().manual_seed(4)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B, T, J, D, O = 2, 7, 3, 4, 5
    leaves = [rand(B, T, C), rand(B, C), rand(B, T, J, D), rand(J, D, C), *(rand(C) for _ in range(J)),
              *(rand(O, C) for _ in range(J))]
    leaves = [t.requires_grad_() for t in leaves]
    x, shift, z, w2, mus, ws = leaves[0], leaves[1], leaves[2], leaves[3], leaves[4:4 + J], leaves[4 + J:]
    proj = [rand(B, T, O) for _ in range(J)]

    def plain():
        xx = token_shift(x, shift) - x
        m = torch.einsum("btjd,jdc->jbtc", z, w2)
        return [(x + xx * (mus[j] + m[j])) @ ws[j].t() for j in range(J)]

    def loss(outs):
        return sum((outs[j] * proj[j]).sum() for j in used)

    ref = torch.autograd.grad(loss(plain()), leaves, allow_unused=True)
    got = torch.autograd.grad(loss(data_lerp_linear(x, shift, z, w2, mus, ws)), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(ref, got)):
        if a is None:  # an unused projection's weight
            assert b is None or not b.abs().any(), i
            continue
        assert_close(f"grad {i}", a, b, 1e-12)
