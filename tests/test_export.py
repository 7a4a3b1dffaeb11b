"""ONNX step export vs the PyTorch step; the streaming runner's rollback exactness."""

import pytest
import torch

import rwkv_torch as rt
from tests.test_model import perturbed
from tests.utils import assert_close

onnx = pytest.importorskip("onnx", reason="needs the onnx extra")
pytest.importorskip("onnxruntime", reason="needs the onnx extra")

from rwkv_torch.export import OnnxStep, export_onnx, state_names  # noqa: E402

SMALL = dict(hidden_size=64, num_layers=2, head_size=16)
VERSIONS = [4, 5, 6, 7]


def stream_both(model, onnx_step, xs):
    s1, s2 = model.init_state(xs.shape[1]), onnx_step.init_state(xs.shape[1])
    for t, x in enumerate(xs):
        y1, s1 = model.step(x, s1)
        y2, s2 = onnx_step.step(x, s2)
        assert_close(f"y[{t}]", y1, y2, 1e-4)
    for name, a, b in zip(state_names(model.config.num_layers), s1.tensors().values(), s2.tensors().values()):
        assert_close(name, a, b, 1e-4)


@pytest.mark.parametrize("version", VERSIONS)
def test_onnx_step_matches_model_over_50_frames(version, tmp_path):
    model = perturbed(rt.build(embed_dim=12, version=version, **SMALL))
    path = export_onnx(model, tmp_path / "step.onnx")
    step = OnnxStep(path)
    assert step.config == model.config
    stream_both(model, step, torch.randn(50, 3, 12))  # dynamic batch: exported with 2, run with 3


def test_onnx_token_model_and_fixed_batch(tmp_path):
    lm = perturbed(rt.build(vocab_size=40, **SMALL))
    step = OnnxStep(export_onnx(lm, tmp_path / "lm.onnx", batch_size=2))
    stream_both(lm, step, torch.randint(0, 40, (20, 2)))
    names = [i.name for i in onnx.load(str(tmp_path / "lm.onnx")).graph.input]
    assert names == ["x_t", *state_names(2)]


def test_int8_quantized_export_stays_close(tmp_path):
    model = perturbed(rt.build(embed_dim=12, **SMALL))
    step = OnnxStep(export_onnx(model, tmp_path / "q.onnx", quantize_int8=True))
    s1, s2 = model.init_state(1), step.init_state(1)
    for x in torch.randn(30, 1, 12):
        y1, s1 = model.step(x, s1)
        y2, s2 = step.step(x, s2)
    err = ((y1 - y2).norm() / y1.norm()).item()
    assert err < 0.1, f"int8 relative error {err:.3g} after 30 frames"


def test_export_errors(tmp_path):
    with pytest.raises(TypeError, match="RWKV model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(rt.build(embed_dim=4, **SMALL), tmp_path / "x.onnx", batch_size=0)
    with pytest.raises(ValueError, match="opset must be"):
        export_onnx(rt.build(embed_dim=4, **SMALL), tmp_path / "x.onnx", opset=11)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(plain), dynamo=False)
    with pytest.raises(ValueError, match="not written by"):
        OnnxStep(plain)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_stream_rollback_is_bit_exact(kind, tmp_path):
    model = perturbed(rt.build(embed_dim=6, **SMALL))
    runner = model if kind == "torch" else OnnxStep(export_onnx(model, tmp_path / "s.onnx"))
    s = rt.Stream(runner)
    frames = torch.randn(40, 6)
    for f in frames[:15]:
        s.push(f)
    snap = s.snapshot()
    first = torch.stack([s.push(f) for f in frames[15:]])
    s.restore(snap)
    assert s.position == 15
    again = torch.stack([s.push(f) for f in frames[15:]])
    assert torch.equal(first, again)
    assert s.state_bytes() == sum(t.numel() * 4 for t in model.init_state(1).tensors().values())
    s.reset()
    assert s.position == 0 and torch.equal(s.push(frames[0]), rt.Stream(runner).push(frames[0]))


def test_save_load_and_export_cli(tmp_path):
    from rwkv_torch import cli

    model = perturbed(rt.build(embed_dim=5, version=6, **SMALL))
    rt.save(model, tmp_path / "m")
    back = rt.load(tmp_path / "m")
    x = torch.randn(2, 9, 5)
    assert torch.equal(model(x), back(x)) and back.config == model.config
    out = tmp_path / "step.onnx"
    assert cli.main(["export", "--model", str(tmp_path / "m"), "--out", str(out)]) == 0
    stream_both(model, OnnxStep(out), torch.randn(10, 2, 5))
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="format"):
        rt.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such file"):
        rt.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected a directory with config.json"):
        rt.load(tmp_path / "empty")


def test_export_cli_mistakes_are_one_line_before_the_export(tmp_path, capsys):
    from rwkv_torch import cli

    assert cli.main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "nope: no such file" in capsys.readouterr().err
    missing = tmp_path / "missing" / "x.onnx"
    assert cli.main(["export", "--out", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkv-torch export: error: --out") and "does not exist" in err and not missing.exists()
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(rt.build(embed_dim=4, **SMALL), missing)
