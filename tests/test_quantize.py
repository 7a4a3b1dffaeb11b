"""Weight-only int8 / bf16 (rwkv_torch.quantize): accuracy against fp32 within the documented bound for every
version, every path over the quantized weights agreeing with each other (forward, step, the C step, the C
matrix-vector product, generate, Stream), and the quantized native format (save, load, convert, errors)."""

import copy
import json

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli, decode
from rwkv_torch.checkpoints import describe, save_official
from rwkv_torch.generate import generate
from rwkv_torch.ops import cpu_lib
from rwkv_torch.quantize import ERROR_BOUNDS, QuantLinear, quantize_int8
from tests.test_model import perturbed, run_steps
from tests.utils import assert_close, rel_rms

needs_c = pytest.mark.skipif(not cpu_lib.available(), reason="no C compiler for the CPU kernels here")
FORMATS = ["bf16", "int8"]


def lm(version: int, seed: int = 0, **opts):
    """A random official-format token model: the official init plus noise (the init zeroes some matrices)."""
    opts = dict(vocab_size=97, hidden_size=64, num_layers=2, head_size=16, version=version, seed=seed) | opts
    return perturbed(rt.build(**opts), scale=0.05, seed=seed)


def quantized(model, fmt):
    model.clear_decode_weights()  # their ctypes table does not deep-copy
    return rt.quantize(copy.deepcopy(model), fmt).eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_logits_within_the_documented_bound(version, fmt):
    model = lm(version)
    x = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    q = quantized(model, fmt)
    with torch.no_grad():
        ref, out = model(x), q(x)
    err = rel_rms(ref, out)
    assert 0 < err <= ERROR_BOUNDS[fmt], f"RWKV-{version} {fmt}: rel-RMS logit error {err:.2e}"
    assert rt.weight_format(q) == fmt and q.blocks[0].att.key.weight.dtype == {"bf16": torch.bfloat16,
                                                                                 "int8": torch.int8}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_step_equals_forward_on_quantized_weights(version, fmt):
    """The one-token paths (C step for v7, the C matrix-vector product elsewhere) read the same rounded weights as
    the sequence path (dequantize + GEMM): they agree to fp32 rounding."""
    q = quantized(lm(version), fmt)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q(x)
        out, _ = run_steps(q, x, q.init_state(2))
    assert_close(f"RWKV-{version} {fmt} step vs forward", ref, out, 1e-5)


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
def test_c_step_reads_quantized_weights(fmt, monkeypatch):
    q = quantized(lm(7, num_layers=3), fmt)
    ran = []
    real = decode.blocks_step
    monkeypatch.setattr(decode, "blocks_step", lambda *a, **k: ran.append(real(*a, **k) is not None) or real(*a, **k))
    x = torch.randint(0, 97, (3,))
    state = q.init_state(3)
    with torch.no_grad():
        c_out, c_state = q.step(x, state)
        monkeypatch.setattr(decode, "applies", lambda *a: False)
        spec_out, spec_state = q.step(x, state)
    assert ran and all(ran), "the C step did not run on the quantized weights"
    assert_close(f"{fmt} C step vs spec form", spec_out, c_out, 1e-5)
    for a, b in zip(spec_state.flat(), c_state.flat()):
        assert_close(f"{fmt} C step state", a, b, 1e-5)


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_c_matvec_equals_dequantized_linear(fmt, rows):
    """Odd sizes: output rows not a multiple of 4, input not a multiple of 16 (the vector loops' tails)."""
    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(53, 23)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(23, 53, generator=g))
        linear.bias.copy_(torch.randn(23, generator=g))
    layer = QuantLinear.from_linear(linear, fmt)
    x = torch.randn(rows, 53, generator=g)
    with torch.no_grad():
        out = layer(x)  # the C path (rows <= C_ROWS)
        ref = torch.nn.functional.linear(x.double(), layer.dequantized(torch.float64), layer.bias.double())
    assert_close(f"{fmt} C matvec", ref.float(), out, 1e-6)


def test_int8_rounding_is_per_row_symmetric():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3e-3, -1e-3, 0.0]])
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.tolist() == pytest.approx([2 / 127, 1.0, 3e-3 / 127])
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2, 0] == 127


@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_and_stream_on_quantized_weights(fmt):
    q = quantized(lm(7), fmt)
    out = generate(q, [3, 5, 8], max_tokens=6, temperature=0)
    assert len(out.tokens[0]) == 6
    stream = rt.Stream(q)
    with torch.no_grad():
        ys = [stream.push(torch.tensor([t])) for t in (3, 5, 8)]
        ref = q(torch.tensor([[3, 5, 8]]))[0]
    assert_close(f"{fmt} Stream vs forward", ref, torch.cat(ys), 1e-5)


def test_quantizing_twice_or_across_formats(tmp_path):
    model = lm(7)
    q = rt.quantize(model, "int8")
    assert rt.quantize(q, "int8") is q and rt.weight_format(q) == "int8"
    with pytest.raises(ValueError, match="already int8"):
        rt.quantize(q, "bf16")
    with pytest.raises(ValueError, match="must be one of"):
        rt.quantize(lm(7), "int4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_native_round_trip_loads_without_requantizing(fmt, tmp_path, monkeypatch):
    q = quantized(lm(6), fmt)
    rt.save(q, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["weights"] == fmt and meta["format_version"] == 2
    monkeypatch.setattr(QuantLinear, "from_linear", None)  # loading must not quantize again
    back = rt.load(tmp_path / "m")
    assert rt.weight_format(back) == fmt
    for (k, a), (k2, b) in zip(q.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert rt.load(tmp_path / "m", weights=fmt).blocks[0].att.key.weight.dtype == back.blocks[0].att.key.weight.dtype
    with pytest.raises(ValueError, match="fp32 original"):
        rt.load(tmp_path / "m", weights="fp32")


def test_load_quantizes_an_official_checkpoint_and_refuses_wrong_shapes(tmp_path):
    model = lm(7)
    path = save_official(model, tmp_path / "m.pth")
    q = rt.load(path, weights="int8")
    assert rt.weight_format(q) == "int8" and describe(q)["weights"] == "int8"
    with pytest.raises(ValueError, match="dtype"):
        rt.load(path, weights="int8", dtype=torch.bfloat16)
    rt.save(q, tmp_path / "q")
    cfg = tmp_path / "q" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["config"]["hidden_size"] = 128  # another shape: every matrix and scale is the wrong size
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has shape .* config expects .*\(int8 weights\)"):
        rt.load(tmp_path / "q")
    meta["config"]["hidden_size"] = 64
    meta.pop("weights")  # int8 tensors, the config says fp32
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown keys"):
        rt.load(tmp_path / "q")


def test_cli_convert_and_generate_with_int8(tmp_path, capsys):
    model = rt.build(vocab_size=256, hidden_size=64, num_layers=2, head_size=16, seed=0)
    src = save_official(perturbed(model, scale=0.05), tmp_path / "m.pth")
    assert cli.main(["convert", "--weights", "int8", str(src), str(tmp_path / "q")]) == 0
    assert "int8" in capsys.readouterr().out
    assert rt.weight_format(rt.load(tmp_path / "q")) == "int8"
    assert cli.main(["convert", "--weights", "int8", str(src), str(tmp_path / "q.pth")]) == 2
    assert cli.main(["generate", "--model", str(src), "--weights", "int8", "--prompt", "ab", "--max-tokens", "3",
                     "--temperature", "0"]) == 0
    assert cli.main(["generate", "--model", str(tmp_path / "q"), "--prompt", "ab", "--max-tokens", "3",
                     "--temperature", "0"]) == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_onnx_export_of_a_quantized_model(fmt, tmp_path):
    """The graph holds the dequantized weights: onnxruntime's step equals the quantized model's."""
    pytest.importorskip("onnxruntime")
    from rwkv_torch.export import OnnxStep, export_onnx

    q = quantized(lm(7), fmt)
    step = OnnxStep(export_onnx(q, tmp_path / "q.onnx"))
    x = torch.tensor([3, 9])
    with torch.no_grad():
        ref, _ = q.step(x, q.init_state(2))
    out, _ = step.step(x, step.init_state(2))
    assert_close(f"{fmt} ONNX step", ref, out, 1e-5)
