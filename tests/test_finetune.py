"""Fine-tuning: --init-from, LoRA (merged = unmerged, every version), state tuning (weights bit-identical), full BPTT
across chunks (= one long forward), the merge command and the errors."""

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.demo import merge
from rwkv_torch.state import RWKVState
from rwkv_torch.train import TrainConfig, build_model, load_task_model, train, train_step
from rwkv_torch.train.data import Dataset, Sequence, Target
from rwkv_torch.train.finetune import LoRALinear, apply_lora, merge_lora
from tests.utils import torchrun_train

TINY = dict(hidden_size=32, num_layers=2, head_size=16)
RUN = dict(window_size=32, batch_size=8, eval_every=4, eval_batches=2, progress=False, lr=3e-3, warmup=1)


def _quiet_train(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(kw)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two text corpora (Python-like and SQL-like) and a model pre-trained on the first."""
    root = tmp_path_factory.mktemp("ft")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(6):
        (root / "a" / f"d{i}.txt").write_text("def f(x):\n    return x + 1\n" * 30)
        for j in range(20):  # short documents: every window starts a sequence (where a learned state acts)
            (root / "b" / f"d{i}_{j}.txt").write_text(f"SELECT name FROM t WHERE id = {j};\n")
    _quiet_train(data=str(root / "a"), steps=30, out=str(root / "pre"), **TINY, **{**RUN, "lr": 1e-2})
    return root


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_lora_merged_equals_unmerged_and_starts_at_the_base(version):
    m = rt.build(version=version, vocab_size=64, hidden_size=32, num_layers=2, head_size=16, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 64, (2, 12))
    base = m(x)
    lora = copy.deepcopy(m)
    names = apply_lora(lora, rank=4, alpha=8.0)
    assert len(names) >= 6 * 1 and all(isinstance(lora.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(lora(x), base, rtol=0, atol=0)  # B = 0: exactly the base model at step 0
    with torch.no_grad():
        for n in names:
            lora.get_submodule(n).lora_B.normal_(0, 0.1)
    unmerged = lora(x)
    assert (unmerged - base).abs().max() > 1e-3  # the update does something
    merged = merge_lora(copy.deepcopy(lora))
    assert not any(isinstance(mod, LoRALinear) for mod in merged.modules())
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_run_trains_factors_only_saves_small_and_merges(corpora, tmp_path, capsys):
    pre = rt.load(corpora / "pre" / "model")
    out = tmp_path / "lora"
    res = _quiet_train(data=str(corpora / "b"), steps=6, out=str(out), init_from=str(corpora / "pre" / "model"),
                       lora_rank=4, **RUN)
    assert np.isfinite(res["loss"]) and res["val_loss"] is not None
    ckpt = torch.load(res["checkpoint"], weights_only=True)
    assert ckpt["partial"] and all(".lora_" in k for k in ckpt["model"])
    assert Path(res["checkpoint"]).stat().st_size < 0.5 * next((corpora / "pre").glob("ckpt-*.pt")).stat().st_size
    model, _ = load_task_model(out)  # base weights from init_from, LoRA merged on load
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, pre.state_dict()[k])]
    assert changed and all(any(t in k for t in ("att.", "ffn.")) and k.endswith(".weight") for k in changed)
    x = torch.randint(0, 256, (1, 20))
    saved = rt.load(out / "model")  # the run's model/ is the merged model
    torch.testing.assert_close(saved(x), model.backbone(x), rtol=1e-5, atol=1e-5)
    for dst in ("merged", "merged.pth"):
        assert cli.main(["merge", str(out), str(tmp_path / dst)]) == 0
        torch.testing.assert_close(rt.load(tmp_path / dst)(x), model.backbone(x), rtol=1e-5, atol=1e-5)
    assert cli.main(["merge", str(out), str(tmp_path / "merged")]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    # resume continues a LoRA run from its partial checkpoint
    res2 = _quiet_train(resume=str(out), steps=8)
    assert res2["step"] == 8 and np.isfinite(res2["loss"])


def test_state_tuning_learns_with_every_weight_bit_identical(corpora, tmp_path):
    out = tmp_path / "state"
    kw = dict(data=str(corpora / "b"), out=str(out), init_from=str(corpora / "pre" / "model"), train_state=True,
              **{**RUN, "lr": 0.2, "warmup": 0, "eval_every": 40, "log_every": 1})
    res = _quiet_train(steps=40, **kw)
    import json

    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses  # the learned start state alone fits the new corpus better
    pre = rt.load(corpora / "pre" / "model")
    model, ckpt = load_task_model(out)
    assert list(ckpt["model"]) == [f"state0.wkv.{i}" for i in range(2)]
    for k, v in pre.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k  # bit-identical weights
    state = RWKVState.load(out / "state.safetensors")
    assert state.batch_size == 1 and state.meta == pre.state_meta()
    assert any(t.abs().max() > 0 for t in state.wkv)
    torch.testing.assert_close(state.wkv[0][0], model.state0.wkv[0].detach())
    # generate starts from it; a state for another architecture is refused
    assert cli.main(["generate", "--model", str(corpora / "pre" / "model"), "--prompt", "SELECT", "--max-tokens",
                     "4", "--state-in", str(out / "state.safetensors"), "--seed", "0"]) == 0
    other = rt.build(version=7, vocab_size=256, hidden_size=64, num_layers=2, head_size=16)
    with pytest.raises(ValueError, match="state"):
        other(torch.zeros(1, 3, dtype=torch.long), state)
    assert res["model_dir"] is None  # nothing but the state changed: no second copy of the weights


def test_full_bptt_over_chunks_equals_one_long_forward():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    seqs = [Sequence(f"s{i}", rng.standard_normal((64, 5)).astype(np.float32), {"y": rng.integers(0, 3, 64)})
            for i in range(2)]
    data = Dataset(seqs, [Target("y", "categorical", 3)], embed_dim=5)
    for backbone in ("rwkv7", "rwkv6", "rwkv4"):
        base = dict(backbone=backbone, **TINY, window_size=48, grad_clip=0)
        m0 = build_model(TrainConfig(**base), data).double()
        with torch.no_grad():  # away from the init's zero output projections, so the state carries gradient
            for p in m0.parameters():
                p.add_(0.1 * torch.randn_like(p))
        batch = (np.stack([s.x[:48] for s in seqs]).astype(np.float64),
                 {"y": np.stack([s.y["y"][:48] for s in seqs])}, np.array([True, True]))
        grads = {}
        for name, extra in (("one", {}), ("full", dict(truncate_bptt=16, bptt="full")),
                            ("chunk", dict(truncate_bptt=16, bptt="chunk"))):
            m = copy.deepcopy(m0)
            train_step(m, torch.optim.SGD(m.parameters(), lr=0), data, batch, m.init_state(2),
                       TrainConfig(**base, **extra), torch.device("cpu"))
            grads[name] = [p.grad for p in m.parameters()]
        diff = {k: max((a - b).abs().max().item() for a, b in zip(grads["one"], grads[k])) for k in ("full", "chunk")}
        assert diff["full"] < 1e-12, (backbone, diff)
        assert diff["chunk"] > 1e-4, (backbone, diff)  # cutting the gradient between chunks changes it


def test_finetune_errors(corpora, tmp_path):
    model = str(corpora / "pre" / "model")
    data = str(corpora / "b")
    with pytest.raises(ValueError, match="RWKV backbones, not lstm"):
        TrainConfig(backbone="lstm", init_from=model, lora_rank=4)
    with pytest.raises(ValueError, match="give --init-from"):
        TrainConfig(train_state=True)
    with pytest.raises(ValueError, match="need lora_rank"):
        TrainConfig(init_from=model, lora_alpha=4.0)
    with pytest.raises(ValueError, match="--hidden-size 64 contradicts --init-from .* hidden size 32"):
        _quiet_train(data=data, init_from=model, hidden_size=64, steps=1, out=str(tmp_path / "x"), **RUN)
    with pytest.raises(ValueError, match="--tokenizer world contradicts --init-from .* tokenizer byte"):
        _quiet_train(data=data, init_from=model, tokenizer="world", steps=1, out=str(tmp_path / "t"), **RUN)
    with pytest.raises(ValueError, match="no such file"):
        _quiet_train(data=data, init_from=str(tmp_path / "nope"), steps=1, out=str(tmp_path / "y"), **RUN)
    with pytest.raises(ValueError, match="no linear layer of the model matches"):
        _quiet_train(data=data, init_from=model, lora_rank=2, lora_targets="att.nothing", steps=1,
                     out=str(tmp_path / "z"), **RUN)
    with pytest.raises(ValueError, match=r"not a LoRA run \(trained without --lora-rank\): there is nothing to merge"):
        merge(str(corpora / "pre"), str(tmp_path / "m"))
    assert cli.main(["merge", str(corpora / "pre"), str(tmp_path / "m")]) == 2 and not (tmp_path / "m").exists()
    assert cli.main(["train", "--data", data, "--init-from", model, "--lora-rank", "0", "--out",
                     str(tmp_path / "w")]) == 2


def test_full_finetune_from_a_run_keeps_its_weights_at_step_zero(corpora, tmp_path):
    res = _quiet_train(data=str(corpora / "b"), steps=2, out=str(tmp_path / "full"), init_from=str(corpora / "pre"),
                       **{**RUN, "lr": 1e-9})
    pre = rt.load(corpora / "pre" / "model")
    after = rt.load(Path(res["model_dir"]))
    for k, v in pre.state_dict().items():
        torch.testing.assert_close(after.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_ddp_finetune_matches_one_process(tmp_path):
    """LoRA + state tuning under torchrun (2 CPU processes, gloo) gives the losses of one process."""
    import json

    rng = np.random.default_rng(0)
    eps = tmp_path / "eps"
    eps.mkdir()
    for i in range(6):
        x = rng.standard_normal((80, 6)).astype(np.float32)
        np.savez(eps / f"e{i}.npz", frames=x, target_y=(x[:, 0] > 0).astype(np.int64))
    base = dict(data=str(eps), window_size=16, batch_size=4, lr=3e-3, warmup=1, log_every=1, eval_every=3)
    _quiet_train(**base, **TINY, steps=3, out=str(tmp_path / "base"), progress=False)
    opts = dict(base, steps=4, init_from=str(tmp_path / "base"), lora_rank=4)
    _quiet_train(**opts, train_state=True, out=str(tmp_path / "one"), progress=False)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()] + ["--train-state"]
    proc = torchrun_train(flags, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run):
        return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    assert (tmp_path / "two" / "state.safetensors").exists()


def test_init_from_takes_the_architecture_and_tokenizer_of_the_weights(tmp_path):
    from rwkv_torch.train.finetune import init_config

    world = rt.build(version=6, vocab_size=65536, hidden_size=32, num_layers=3, head_size=16, seed=0)
    rt.save(world, tmp_path / "w")
    cfg = init_config(TrainConfig(init_from=str(tmp_path / "w")), {})
    assert (cfg.backbone, cfg.hidden_size, cfg.num_layers, cfg.head_size, cfg.tokenizer) == ("rwkv6", 32, 3, 16,
                                                                                             "world")
