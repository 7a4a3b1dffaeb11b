"""Official BlinkDL checkpoints (RWKV-4/5/6/7): key maps, strict loading, errors, fla names, and parity with the
official ``rwkv`` pip package on random checkpoints in the official format."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import checkpoints as ck
from tests.test_model import perturbed
from tests.utils import assert_close

VERSIONS = [4, 5, 6, 7]
SMALL = dict(vocab_size=50, hidden_size=64, num_layers=2, head_size=16)


def token_model(version, **over):
    return perturbed(rt.build(version=version, **{**SMALL, **over}))


def same_sizes(a, b) -> bool:
    """Same resolved sizes (hidden, layers, heads, vocab, FFN, LoRA ranks, parameter count): a loaded config
    spells out every size, while a built one may leave ranks at None (= the default for hidden_size)."""
    return ck.describe(a) == ck.describe(b)


def assert_same_weights(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert_close(k, sa[k], sb[k], 1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_official_round_trip_and_layout(version, tmp_path):
    # non-default LoRA ranks and FFN size: every size must be read back from the tensor shapes
    over = {4: dict(ffn_size=96), 5: dict(ffn_size=96), 6: dict(ffn_size=96, decay_lora=8, mix_lora=5),
            7: dict(ffn_size=96, decay_lora=8, gate_lora=12, a_lora=4, v_lora=6)}[version]
    m = token_model(version, num_layers=3, **over)
    path = ck.save_official(m, tmp_path / "m.pth")
    sd = torch.load(path, weights_only=True)
    assert ck.detect_version(sd) == version
    if version == 7:
        assert sd["blocks.0.att.x_r"].shape == (1, 1, 64) and sd["blocks.1.att.w1"].shape == (64, 8)
        assert sd["blocks.0.att.v1"].shape == (64, 6) and torch.all(sd["blocks.0.att.v1"] == 0)
        assert sd["blocks.0.att.r_k"].shape == (4, 16) and "blocks.0.ln0.weight" in sd
    if version == 6:
        assert sd["blocks.0.att.time_maa_w1"].shape == (64, 5 * 5) and sd["blocks.0.att.time_faaaa"].shape == (4, 16)
    back = rt.load(path)
    assert same_sizes(back, m)
    assert_same_weights(m, back)
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(x, return_sequence=True), back(x, return_sequence=True))
    assert same_sizes(rt.load(tmp_path / "m"), m)  # the pip package's convention: path without .pth
    b16 = rt.load(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())


def test_file_dtype_is_kept_and_native_format_loads(tmp_path):
    m = token_model(7).to(torch.bfloat16)
    ck.save_official(m, tmp_path / "m.pth")
    back = rt.load(tmp_path / "m.pth")
    assert next(back.parameters()).dtype == torch.bfloat16
    assert_same_weights(m, back)
    rt.save(back, tmp_path / "native")
    assert_same_weights(m, rt.load(tmp_path / "native"))
    assert_same_weights(m, rt.load(tmp_path / "native" / "model.safetensors"))


def _save(sd, path):
    torch.save(sd, path)
    return path


def test_strict_accounting_errors(tmp_path):
    sd = ck.to_official_state_dict(token_model(7))
    sd = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"unknown keys blocks\.1\.att\.extra"):
        rt.load(_save({**sd, "blocks.1.att.extra": torch.zeros(3)}, tmp_path / "a.pth"))
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    with pytest.raises(ValueError, match=r"missing keys blocks\.1\.att\.k_a"):
        rt.load(_save(missing, tmp_path / "b.pth"))
    bad = {**sd, "blocks.1.att.key.weight": torch.zeros(64, 63)}
    with pytest.raises(ValueError, match=r"blocks\.1\.att\.key\.weight has shape \(64, 63\), expected \(64, 64\)"):
        rt.load(_save(bad, tmp_path / "c.pth"))
    extra_layer = {**sd, "blocks.2.ln1.weight": torch.ones(64)}  # a stray key of a third block
    with pytest.raises(ValueError, match="missing keys"):
        rt.load(_save(extra_layer, tmp_path / "d.pth"))
    with pytest.raises(ValueError, match="state-tuned"):
        rt.load(_save({**sd, "blocks.0.att.time_state": torch.zeros(4, 16, 16)}, tmp_path / "e.pth"))


def test_not_a_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not an RWKV checkpoint"):
        rt.load(_save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "a.pth"))
    with pytest.raises(ValueError, match="not an RWKV checkpoint: expected a dict"):
        rt.load(_save([torch.zeros(2)], tmp_path / "b.pth"))
    with pytest.raises(ValueError, match="int64 tensor"):
        rt.load(_save({"emb.weight": torch.zeros(2, 2, dtype=torch.long)}, tmp_path / "c.pth"))
    (tmp_path / "d.pth").write_text("hello")
    with pytest.raises(ValueError, match="cannot read as a PyTorch checkpoint"):
        rt.load(tmp_path / "d.pth")
    good = ck.save_official(token_model(6), tmp_path / "e.pth")
    data = good.read_bytes()
    (tmp_path / "f.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        rt.load(tmp_path / "f.pth")
    with pytest.raises(FileNotFoundError):
        rt.load(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="fla state dict"):
        rt.load(_save({"model.layers.0.attn.r_k": torch.zeros(2, 2)}, tmp_path / "g.pth"))


def test_pickled_objects_are_refused(tmp_path):
    """torch.load(weights_only=True) always: a file carrying arbitrary pickled objects is not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "obj": zipfile.ZipInfo("x")}, path)
    with pytest.raises(ValueError, match="cannot read"):
        rt.load(path)


def test_rwkv5_0_is_refused(tmp_path):
    sd = {k: v.clone() for k, v in ck.to_official_state_dict(token_model(5)).items()}
    sd["blocks.0.att.time_decay"] = torch.zeros(64)
    with pytest.raises(ValueError, match="5.0/5.1"):
        rt.load(_save(sd, tmp_path / "m.pth"))


def test_continuous_model_cannot_be_written_as_official():
    with pytest.raises(ValueError, match="token models"):
        ck.to_official_state_dict(rt.build(embed_dim=8, hidden_size=32, num_layers=1, head_size=8))


def test_fla_round_trip():
    m = token_model(7, a_lora=4, gate_lora=12)
    fla = ck.to_fla_state_dict(m)
    assert fla["model.layers.1.attn.w_lora.lora.0.weight"].shape == (m.config.decay_lora_dim, 64)
    assert fla["model.layers.1.attn.g_lora.lora.2.weight"].shape == (64, 12)
    assert fla["model.layers.0.attn.x_r"].shape == (1, 1, 64) and fla["model.layers.0.attn.k_k"].shape == (64,)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in fla and "lm_head.weight" in fla
    back = ck.from_fla_state_dict({k: v.clone() for k, v in fla.items()})
    assert same_sizes(back, m)
    assert_same_weights(m, back)
    with pytest.raises(ValueError, match="unknown fla RWKV-7 keys model.layers.0.attn.bogus"):
        ck.from_fla_state_dict({**fla, "model.layers.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="RWKV-6 and RWKV-7"):
        ck.to_fla_state_dict(token_model(5))


def test_fla_rwkv6_round_trip_and_token_shift_lora_layout():
    m = token_model(6)
    official, fla = ck.to_official_state_dict(m), ck.to_fla_state_dict(m)
    C, D = official["blocks.0.att.time_maa_w1"].shape[0], official["blocks.0.att.time_maa_w1"].shape[1] // 5
    assert fla["model.layers.1.attn.x_bias"].shape == (5, C) and fla["model.layers.0.attn.x_proj.0.mu"].shape == (C,)
    assert fla["model.layers.1.attn.x_proj.0.linear.weight"].shape == (5 * D, C)
    assert fla["model.layers.1.attn.x_proj.2.weight"].shape == (C, 5 * D)
    decay_w1 = official["blocks.0.att.time_decay_w1"]
    assert torch.equal(fla["model.layers.0.attn.w_proj.linear.lora.0.weight"], decay_w1.t())
    assert "model.layers.0.pre_norm.weight" in fla and "lm_head.weight" in fla
    # The five token-shift mixes computed the fla way (order r, w, k, v, g; x_proj read as [C, 5, D]) equal the
    # official ones (order w, k, v, r, g), so the blocks were regrouped, not only renamed.
    g = torch.Generator().manual_seed(0)
    x, prev = torch.randn(3, C, generator=g), torch.randn(3, C, generator=g)
    xx = prev - x
    for i in range(m.config.num_layers):
        o = {k.split(".", 3)[3]: v.double() for k, v in official.items() if k.startswith(f"blocks.{i}.att.")}
        f = {k.split(".", 4)[4]: v.double() for k, v in fla.items() if k.startswith(f"model.layers.{i}.attn.")}
        x64, xx64 = x.double(), xx.double()
        z = torch.tanh((x64 + xx64 * o["time_maa_x"].view(C)) @ o["time_maa_w1"]).view(3, 5, D)
        lora = torch.einsum("bnd,ndc->nbc", z, o["time_maa_w2"])
        want = {c: x64 + xx64 * (o[f"time_maa_{c}"].view(C) + lora[n]) for n, c in enumerate("wkvrg")}
        z = torch.tanh((x64 + xx64 * f["x_proj.0.mu"]) @ f["x_proj.0.linear.weight"].t()).view(3, 5, D)
        lora = torch.einsum("bnd,cnd->nbc", z, f["x_proj.2.weight"].view(C, 5, D))
        got = {c: x64 + xx64 * (f["x_bias"][n] + lora[n]) for n, c in enumerate("rwkvg")}
        for c in "wkvrg":
            assert torch.allclose(want[c], got[c], rtol=1e-12, atol=1e-12), (i, c)
    back = ck.from_fla_state_dict({k: v.clone() for k, v in fla.items()})
    assert back.config.version == 6 and same_sizes(back, m)
    assert_same_weights(m, back)
    with pytest.raises(ValueError, match="unknown fla RWKV-6 keys model.layers.0.attn.bogus"):
        ck.from_fla_state_dict({**fla, "model.layers.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks attn.x_bias"):
        ck.from_fla_state_dict({k: v for k, v in fla.items() if k != "model.layers.1.attn.x_bias"})


def test_state_list_round_trip():
    for version in VERSIONS:
        m = token_model(version)
        _, st = m(torch.randint(0, 50, (1, 5)), return_state=True)
        pip = ck.state_to_official(st)
        assert len(pip) == (5 if version == 4 else 3) * 2
        back = ck.state_from_official(pip, m.config)
        for a, b in zip(st.tensors().values(), back.tensors().values()):
            assert torch.equal(a, b)


# Parity with the official runtime (the rwkv pip package), in a subprocess because it reads RWKV_V7_ON at import.

RUNNER = Path(__file__).with_name("_official_runner.py")


def run_official(path, tokens, state=None):
    pytest.importorskip("rwkv", reason="the official rwkv package is a dev dependency")
    inp = {"tokens": tokens} if state is None else {"tokens": tokens, "state": state}
    torch.save(inp, path.with_suffix(".in.pt"))
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", OMP_NUM_THREADS="1")
    if "blocks.0.att.r_k" in torch.load(path, weights_only=True, mmap=True):
        env["RWKV_V7_ON"] = "1"
    else:
        env.pop("RWKV_V7_ON", None)
    proc = subprocess.run([sys.executable, str(RUNNER), str(path), str(path.with_suffix(".in.pt")),
                           str(path.with_suffix(".out.pt"))], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path.with_suffix(".out.pt"), weights_only=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_parity_with_official_package(version, tmp_path):
    """Logits at every position (sequence call and token by token) and final states equal the official package's
    to 1e-5 relative, from a zero state and from a non-zero carried state."""
    m = token_model(version).float()
    path = ck.save_official(m, tmp_path / f"v{version}.pth")
    ours = rt.load(path)
    g = torch.Generator().manual_seed(version)
    warm, a, b = (torch.randint(0, 50, (n,), generator=g) for n in (7, 13, 5))
    with torch.no_grad():
        _, carried = ours(warm[None], return_state=True)
        ya, st = ours(a[None], carried, return_sequence=True, return_state=True)
        yb, st = ours(b[None], st, return_sequence=True, return_state=True)
    assert carried.wkv[0].abs().max() > 0
    off = run_official(path, [a.tolist(), b.tolist()], ck.state_to_official(carried))
    for name in ("seq", "loop"):
        assert_close(f"v{version} {name} segment 1", off[name][0], ya[0], 1e-5)
        assert_close(f"v{version} {name} segment 2", off[name][1], yb[0], 1e-5)
        ref_state = ck.state_from_official(off[f"{name}_state"], ours.config)
        for (k, x), y in zip(ref_state.tensors().items(), st.tensors().values()):
            assert_close(f"v{version} {name} state {k}", x, y, 1e-5)
    # our token-by-token step path against the official sequence call
    state, rows = carried, []
    with torch.no_grad():
        for t in a.tolist():
            y, state = ours.step(torch.tensor([t]), state)
            rows.append(y[0])
    assert_close(f"v{version} step", off["seq"][0], torch.stack(rows), 1e-5)


def test_hf_round_trip_and_parity_with_transformers():
    """RWKV-4 under transformers' names: strict round trip, and the same logits as ``RwkvForCausalLM`` (rescaling
    off), over a prompt and a continuation that carries transformers' own state."""
    m = token_model(4).float()
    hf_sd = ck.to_hf_state_dict(m)
    assert "rwkv.blocks.0.pre_ln.weight" in hf_sd and "rwkv.blocks.1.feed_forward.time_mix_key" in hf_sd
    back = ck.from_hf_state_dict({k: v.clone() for k, v in hf_sd.items()})
    assert_same_weights(m, back)
    with pytest.raises(ValueError, match="unknown transformers RWKV-4 keys rwkv.bogus"):
        ck.from_hf_state_dict({**hf_sd, "rwkv.bogus": torch.zeros(1)})
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    c = m.config
    cfg = transformers.RwkvConfig(vocab_size=c.vocab_size, context_length=128, hidden_size=c.hidden_size,
                                  num_hidden_layers=c.num_layers, attention_hidden_size=c.hidden_size,
                                  intermediate_size=c.ffn_dim, rescale_every=0)
    hf = transformers.RwkvForCausalLM(cfg).eval()
    hf.load_state_dict(hf_sd, strict=True)
    x = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        first = hf(input_ids=x[:, :6], use_cache=True)
        second = hf(input_ids=x[:, 6:], state=first.state, use_cache=True)
        ours = m(x, return_sequence=True)
    assert_close("transformers vs ours", torch.cat([first.logits, second.logits], 1), ours, 1e-5)
