import json
import os
import re
import signal
import threading

import numpy as np
import pytest
import torch

from rwkv_torch import cli
from rwkv_torch.train import TrainConfig, build_model, param_groups, train
from rwkv_torch.train.data import default_corpus, load_data, load_episodes, make_batch, window_plans
from tests.utils import torchrun_train

TINY = dict(hidden_size=32, num_layers=1, head_size=16, window_size=16, batch_size=4, lr=3e-3, warmup=5,
            log_every=1, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_episodes(d, n=6, T=80, D=4, seed=0):
    """Targets a model can learn: a class and a bit from the current frame, a bit from the previous frame, a
    value from the current frame."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        f = rng.standard_normal((T, D)).astype(np.float32)
        np.savez(d / f"ep{i}.npz", frames=f, target_act=(f[:, 0] > 0).astype(np.int64) + 2 * (f[:, 1] > 0),
                 target_bits=np.stack([f[:, 1] > 0, np.roll(f[:, 2], 1) > 0], 1),
                 target_val=(2 * f[:, 3]).astype(np.float32), classes_act=np.int64(5))
    return d


def write_text(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("the cat sat on the mat. " * 40)
    (d / "b.txt").write_text("abcdefghij" * 100)
    (d / "c.txt").write_text("hello world, hello rwkv. " * 40)
    return d


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_episode_targets_are_inferred(tmp_path):
    data = load_episodes(write_episodes(tmp_path / "eps"))
    kinds = {t.name: (t.kind, t.size) for t in data.targets}
    assert kinds == {"act": ("categorical", 5), "bits": ("bernoulli", 2), "val": ("regression", 1)}
    assert data.embed_dim == 4 and len(data.sequences) == 6


def test_loss_falls_on_episodes(tmp_path):
    res = train(dict(TINY, data=str(write_episodes(tmp_path / "eps")), out=str(tmp_path / "run"), steps=40))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 40 and {"loss_act", "loss_bits", "loss_val"} <= set(rows[0])
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.5 * rows[0]["loss"]
    assert res["val_loss"] is not None and np.isfinite(res["val_loss"])


def test_loss_falls_on_text(tmp_path):
    train(dict(TINY, data=str(write_text(tmp_path / "txt")), out=str(tmp_path / "run"), steps=40, val_fraction=0))
    rows = metrics(tmp_path / "run")
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.7 * rows[0]["loss"]
    assert "tokens_per_s" in rows[0]


def test_resume_is_bit_exact(tmp_path):
    eps = str(write_episodes(tmp_path / "eps"))
    base = dict(TINY, data=eps, num_layers=2, batch_size=3, steps=10, eval_every=4, dropout=0.1)
    full = train(dict(base, out=str(tmp_path / "a")))
    half = train(dict(base, out=str(tmp_path / "b"), stop_after=3))
    assert half["step"] == 3
    rest = train(dict(resume=str(tmp_path / "b"), steps=10, progress=False))  # stop_after is not inherited
    assert rest["step"] == 10 and rest["loss"] == full["loss"]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in a] == [(r["step"], r["loss"], r.get("val_loss"))
                                                                     for r in b]
    # the optimizer is torch's fused AdamW on CPU (one kernel over every tensor), saved and restored as such
    opt = torch.load(sorted((tmp_path / "b").glob("ckpt-*.pt"))[-1], weights_only=False)["optimizer"]
    assert all(g["fused"] for g in opt["param_groups"])


def test_time_limit_stops_with_checkpoint_and_saves_the_language_model(tmp_path):
    import rwkv_torch as rt

    txt = str(write_text(tmp_path / "txt"))
    res = train(dict(TINY, data=txt, out=str(tmp_path / "run"), steps=100_000, time_limit=1.0, val_fraction=0))
    assert 1 <= res["step"] < 100_000 and not res["interrupted"]
    assert torch.load(res["checkpoint"], weights_only=True)["step"] == res["step"]
    lm = rt.load(res["model_dir"])  # the RWKV language model itself, in rt.save format
    x = torch.tensor([list(b"the cat")])
    trained = build_model(TrainConfig(**TINY), load_data(txt))
    trained.load_state_dict(torch.load(res["checkpoint"], weights_only=True)["model"])
    assert lm.config.hidden_size == TINY["hidden_size"]
    torch.testing.assert_close(lm.eval()(x), trained.backbone.eval()(x))
    more = train(dict(resume=str(tmp_path / "run"), steps=res["step"] + 2, progress=False))  # limit not inherited
    assert more["step"] == res["step"] + 2
    with pytest.raises(ValueError, match="time_limit"):
        train(dict(TINY, data=txt, out=str(tmp_path / "bad"), time_limit=0))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    eps = str(write_episodes(tmp_path / "eps"))
    res = train(dict(TINY, data=eps, out=str(tmp_path / "run"), steps=7, save_every=2, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert [n for n in names if n.startswith("ckpt")] == ["ckpt-00000006.pt", "ckpt-00000007.pt"]
    assert not [n for n in names if n.endswith(".tmp")]
    ckpt = torch.load(res["checkpoint"], weights_only=True)
    assert ckpt["step"] == 7 and ckpt["config"]["steps"] == 7


def _bad(d, name, **arrays):
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / name, **arrays)
    return d


def _frames(T=20):
    return np.zeros((T, 3), np.float32)


@pytest.mark.parametrize("case", ["nan", "length", "ragged", "empty", "classes", "no_target", "width"])
def test_bad_data_names_the_file(tmp_path, case):
    d = tmp_path / "eps"
    y = np.zeros(20, np.int64)
    if case == "nan":
        f = _frames()
        f[3, 1] = np.nan
        _bad(d, "bad.npz", frames=f, target_y=y)
    elif case == "length":
        _bad(d, "bad.npz", frames=_frames(), target_y=y[:19])
    elif case == "ragged":
        ragged = np.empty(2, dtype=object)
        ragged[:] = [np.zeros(3), np.zeros(4)]
        _bad(d, "bad.npz", frames=_frames(), target_y=ragged)
    elif case == "empty":
        d.mkdir()
    elif case == "classes":
        _bad(d, "bad.npz", frames=_frames(), target_y=y + 3, classes_y=np.int64(2))
    elif case == "no_target":
        _bad(d, "bad.npz", frames=_frames())
    elif case == "width":
        _bad(d, "a.npz", frames=_frames(), target_y=y)
        _bad(d, "bad.npz", frames=np.zeros((20, 4), np.float32), target_y=y)
    with pytest.raises(ValueError, match="bad.npz" if case != "empty" else "eps"):
        load_data(str(d))


def test_window_longer_than_every_episode(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", T=30))
    with pytest.raises(ValueError, match="longer than every sequence.*ep0.npz with 30"):
        train(dict(TINY, data=eps, out=str(tmp_path / "run"), window_size=31, steps=1))


def test_stateful_plans_walk_each_sequence_in_order():
    plans = window_plans([40, 25, 64], window=10, stride=10, batch_size=2, seed=0)
    seen = {0: [], 1: []}
    for plan in (next(plans) for _ in range(12)):
        for lane, (seq, start, reset) in enumerate(plan):
            seen[lane].append((seq, start, reset))
    for walk in seen.values():
        for (s0, a0, _), (s1, a1, r1) in zip(walk, walk[1:]):
            assert (s1, a1, r1) == (s0, a0 + 10, False) or (a1 == 0 and r1)


def test_text_windows_stay_inside_one_document(tmp_path):
    data = load_data(str(write_text(tmp_path / "txt")))
    assert data.vocab_size == 256 and len(data.sequences) == 3
    plans = window_plans([len(s) for s in data.sequences], 32, 32, 4, 0)
    for _ in range(50):
        plan = next(plans)
        x, ys, _ = make_batch(data, plan, 32)
        for row, (i, start, _) in enumerate(plan):
            doc = data.sequences[i]
            assert start + 32 <= len(doc)
            np.testing.assert_array_equal(x[row, 1:], ys["next"][row, :-1])


def test_default_corpus_is_the_stdlib():
    data = default_corpus(max_bytes=50_000)
    assert data.vocab_size == 256 and data.sequences and data.source.startswith("python-stdlib")


def test_param_groups_follow_the_recipe(tmp_path):
    from rwkv_torch.train import TrainConfig

    model = build_model(TrainConfig(**dict(TINY, num_layers=2)),
                        load_data(str(write_episodes(tmp_path / "eps", n=2))))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, lr=1.0, weight_decay=0.1):
        for p in g["params"]:
            n = names[id(p)]
            assert g["lr"] == (2.0 if n.endswith("att.w0") else 1.0), n
            assert g["weight_decay"] == (0.1 if p.dim() == 2 and n.endswith(".weight") else 0.0), n


@pytest.mark.parametrize("backbone", ["transformer", "lstm"])
def test_baselines_train(tmp_path, backbone):
    res = train(dict(TINY, backbone=backbone, data=str(write_episodes(tmp_path / "eps", n=3)),
                     out=str(tmp_path / "run"), steps=3, truncate_bptt=8))
    assert res["step"] == 3 and np.isfinite(res["loss"])


def test_sigterm_saves_and_stops(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=3))
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        res = train(dict(TINY, data=eps, out=str(tmp_path / "run"), steps=100_000))
    finally:
        timer.cancel()
    assert res["interrupted"] and 0 < res["step"] < 100_000
    assert os.path.exists(res["checkpoint"])


def test_cli_train(tmp_path, capsys):
    eps = str(write_episodes(tmp_path / "eps", n=3))
    assert cli.main(["train", "--data", eps, "--out", str(tmp_path / "run"), "--steps", "2", "--hidden-size", "32",
                     "--num-layers", "1", "--head-size", "16", "--window-size", "16", "--batch-size", "2",
                     "--no-progress"]) == 0
    assert "step 2: loss" in capsys.readouterr().out
    assert len(metrics(tmp_path / "run")) == 1  # log_every 10: only the last step
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err


def test_loss_plot_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    train(dict(TINY, data=str(write_episodes(tmp_path / "eps", n=3)), out=str(tmp_path / "run"), steps=2))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains on the same global batches as one process: same losses (up to
    the all-reduce's float summation order), and its checkpoint resumes in a single process."""
    eps = str(write_episodes(tmp_path / "eps"))
    opts = dict(data=eps, hidden_size=32, num_layers=1, head_size=16, window_size=16, batch_size=4, steps=6,
                lr=3e-3, warmup=2, log_every=1, eval_every=3)
    train(dict(opts, out=str(tmp_path / "one"), progress=False))
    proc = torchrun_train([f"--{k.replace('_', '-')}={v}" for k, v in opts.items()], tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in b if "val_loss" in r],
                               [r["val_loss"] for r in a if "val_loss" in r], rtol=1e-5)
    assert (tmp_path / "two" / "loss.png").exists()
    ckpt = torch.load(sorted((tmp_path / "two").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["carry"][0].shape[0] == 4 and len(ckpt["rng_cpu_ranks"]) == 2  # every lane, gathered
    more = train(dict(resume=str(tmp_path / "two"), steps=8, progress=False))  # 2-rank run resumed in 1 process
    assert more["step"] == 8 and np.isfinite(more["loss"])


def test_eval_reports_accuracy_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    train(dict(TINY, data=str(write_episodes(tmp_path / "eps")), out=str(tmp_path / "run"), steps=4, eval_every=2))
    rows = [r for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert 0.0 <= rows[-1]["val_acc_act"] <= 1.0 and "val_acc_bits" not in rows[-1]  # categorical heads only
    assert {"val_loss_act", "val_loss_bits", "val_loss_val"} <= set(rows[-1])
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_ddp_needs_divisible_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        train(dict(TINY, data=str(write_episodes(tmp_path / "eps")), out=str(tmp_path / "run"), steps=2))


def test_gradient_checkpoint_gives_the_same_run(tmp_path):
    eps = str(write_episodes(tmp_path / "eps"))
    base = dict(TINY, data=eps, num_layers=2, steps=5, val_fraction=0)
    train(dict(base, out=str(tmp_path / "a")))
    assert cli.main(["train", f"--data={eps}", f"--out={tmp_path / 'b'}", "--hidden-size=32", "--num-layers=2",
                     "--head-size=16", "--window-size=16", "--batch-size=4", "--lr=3e-3", "--warmup=5",
                     "--log-every=1", "--steps=5", "--val-fraction=0", "--no-progress",
                     "--gradient-checkpoint"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["gradient_checkpoint"] is True
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "b")],
                               [r["loss"] for r in metrics(tmp_path / "a")], rtol=1e-6)
    with pytest.raises(ValueError, match="RWKV backbones"):
        train(dict(base, backbone="lstm", gradient_checkpoint=True, out=str(tmp_path / "c")))


def test_world_token_text_trains_and_generates(tmp_path):
    pytest.importorskip("rwkv", reason="the World tokenizer comes from the rwkv package (dev extra)")
    import rwkv_torch as rt
    from rwkv_torch.generate import generate
    from rwkv_torch.tokenizer import WorldTokenizer

    txt = write_text(tmp_path / "txt")
    (txt / "d.txt").write_bytes("naïve café, 東京 \U0001f600 ".encode() * 20 + b"\xff\xfe")  # not valid UTF-8
    data = load_data(str(txt), tokenizer="world")
    tok = WorldTokenizer()
    assert data.vocab_size == 65536 and data.targets[0].size == 65536
    for seq, f in zip(data.sequences, sorted(txt.iterdir())):
        ids = np.concatenate([seq.x, seq.y["next"][-1:]])
        assert seq.x.dtype == np.uint16 and tok.decode_bytes(ids) == f.read_bytes()
        assert np.array_equal(seq.x[1:], seq.y["next"][:-1])
    res = train(dict(TINY, data=str(txt), tokenizer="world", out=str(tmp_path / "run"), steps=30, val_fraction=0))
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    lm = rt.load(res["model_dir"])
    assert lm.config.vocab_size == 65536
    out = generate(lm, [tok.encode("the cat")], max_tokens=3, temperature=0)
    assert len(out.tokens[0]) == 3
    with pytest.raises(ValueError, match="tokenizer"):
        load_data(str(txt), tokenizer="gpt2")


def test_compiled_training_matches_eager(tmp_path):
    # The trainer's torch.compile plumbing (wrapping, carried state, unwrapping for init_state and checkpoints) with
    # the aot_eager backend, which traces fwd+bwd like inductor but skips its C++ code generation (minutes on CPU).
    eps = str(write_episodes(tmp_path / "eps"))
    base = dict(TINY, data=eps, num_layers=2, steps=6, eval_every=3)
    train(dict(base, out=str(tmp_path / "eager")))
    compiled = train(dict(base, out=str(tmp_path / "compiled"), compile="aot_eager"))
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    ckpt = torch.load(compiled["checkpoint"], weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # the plain model's names
    assert train(dict(resume=str(tmp_path / "compiled"), steps=8, progress=False))["step"] == 8


def test_epochs_set_the_step_count_and_exclude_steps(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=6, T=80))  # 5 training episodes x 5 windows of 16
    res = train(dict(TINY, data=eps, out=str(tmp_path / "run"), epochs=2, eval_every=100))
    assert res["step"] == metrics(tmp_path / "run")[-1]["step"] == 13  # ceil(2 * 25 / 4)
    with pytest.raises(ValueError, match="not both"):
        train(dict(TINY, data=eps, out=str(tmp_path / "run2"), epochs=1, steps=5))
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="backbone='gru'.*rwkv7"):
        train(dict(TINY, backbone="gru", out=str(tmp_path / "run")))
    with pytest.raises(SystemExit):
        cli.main(["train", "--backbone", "gru"])


def test_cli_accepts_temporal_and_epochs(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=3, T=40))
    assert cli.main(["train", "--temporal", "--data", eps, "--epochs", "1", "--hidden-size", "32", "--num-layers",
                     "1", "--head-size", "16", "--window-size", "16", "--batch-size", "2", "--out",
                     str(tmp_path / "run"), "--no-progress"]) == 0
    assert metrics(tmp_path / "run")[-1]["step"] == 2  # 2 training episodes x 2 windows / batch 2


def test_carried_state_learns_what_lies_in_the_previous_window(tmp_path):
    """The target is the previous frame's sign. Inside a window the token shift sees it; at a window's first frame
    only the state carried from the previous window does. Stateful windows (stride == window) learn every frame;
    independent windows (each from a zero state) stay at chance on the first frame of each window."""
    d = tmp_path / "eps"
    d.mkdir()
    rng = np.random.default_rng(0)
    W = 4
    for i in range(8):
        f = rng.standard_normal((W * 30, 2)).astype(np.float32)
        past = np.concatenate([[0], (f[:-1, 0] > 0).astype(np.int64)])
        np.savez(d / f"ep{i}.npz", frames=f, target_past=past)
    opts = dict(TINY, data=str(d), window_size=W, batch_size=8, steps=150, lr=1e-2, warmup=10, eval_every=150,
                val_fraction=0.25, eval_batches=16)
    train(dict(opts, out=str(tmp_path / "carried")))
    train(dict(opts, out=str(tmp_path / "windowed"), stride=W + 1))
    acc = {name: metrics(tmp_path / name)[-1]["val_acc_past"] for name in ("carried", "windowed")}
    assert acc["carried"] > 0.93 and acc["carried"] - acc["windowed"] > 0.05, acc  # measured: 0.98 vs 0.89


def test_a_run_folder_belongs_to_one_run(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=3))
    run = tmp_path / "run"
    train(dict(TINY, data=eps, out=str(run), steps=6, save_every=2))
    with pytest.raises(ValueError, match=r"run: holds another run.*--resume .*run.*another --out.*--overwrite"):
        train(dict(TINY, data=eps, out=str(run), steps=2))
    res = train(dict(TINY, data=eps, out=str(run), steps=2, overwrite=True))  # the old run's files are gone
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000002.pt"] and res["step"] == 2
    assert [r["step"] for r in metrics(run)] == [1, 2]
    with pytest.raises(ValueError, match="resume or overwrite"):
        train(dict(resume=str(run), overwrite=True, progress=False))
    (tmp_path / "empty").mkdir()  # an empty folder (or one without run files) is fine
    assert train(dict(TINY, data=eps, out=str(tmp_path / "empty"), steps=1))["step"] == 1


def test_an_early_stop_logs_its_last_step_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import sys

    eps = str(write_episodes(tmp_path / "eps", n=3))
    opts = dict(TINY, data=eps, steps=100_000, log_every=10**6, eval_every=10**6, val_fraction=0)
    res = train(dict(opts, out=str(tmp_path / "timed"), time_limit=0.5))
    assert metrics(tmp_path / "timed")[-1]["step"] == res["step"] and not res["interrupted"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        capsys.readouterr()
        res = train(dict(opts, out=str(tmp_path / "run")))
    finally:
        timer.cancel()
    assert res["interrupted"] and res["signal"] == signal.SIGINT
    assert metrics(tmp_path / "run")[-1]["step"] == res["step"]
    said = capsys.readouterr()
    assert len(re.findall(r"no loss.png.*rwkv-torch\[plot\]", said.err)) == 1  # one line, not a warning
    assert not (tmp_path / "run" / "loss.png").exists()
    out = said.out
    assert f"interrupted by SIGINT at step {res['step']}" in out
    assert f"rwkv-torch train --resume {tmp_path / 'run'}" in out


@pytest.mark.parametrize("field, value", [("val_fraction", 1.0), ("val_fraction", -0.1), ("warmup", -1),
                                          ("lr", 0.0), ("lr", -1e-3)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        TrainConfig(**{field: value})


def test_warmup_past_the_run_warns_and_epochs_record_the_steps(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=6, T=80))
    with pytest.warns(UserWarning, match="warmup=50 >= the 13 planned steps"):
        train(dict(TINY, data=eps, out=str(tmp_path / "run"), epochs=2, warmup=50, eval_every=100))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 13


def test_text_data_skips_hidden_folders_and_binary_files(tmp_path):
    d = write_text(tmp_path / "txt")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 50)
    (d / "x.pyc").write_bytes(b"abc" * 100)
    (d / "blob.bin").write_bytes(b"ab\0cd" * 100)
    data = load_data(str(d))
    assert sorted(os.path.basename(s.name) for s in data.sequences) == ["a.txt", "b.txt", "c.txt"]
    with pytest.raises(ValueError, match="blob.bin: a binary file"):
        load_data(str(d / "blob.bin"))
    with pytest.raises(ValueError, match="larger than --max-bytes 10"):
        load_data(str(d), max_bytes=10)


def test_a_checkpoint_holds_no_more_than_its_tensors(tmp_path):
    eps = str(write_episodes(tmp_path / "eps", n=3, T=256))
    res = train(dict(TINY, data=eps, out=str(tmp_path / "run"), hidden_size=128, head_size=32, window_size=128,
                     batch_size=8, steps=1, warmup=0, val_fraction=0))
    ckpt = torch.load(res["checkpoint"], weights_only=True)

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.nbytes
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    assert os.path.getsize(res["checkpoint"]) <= 1.1 * nbytes(ckpt)


@pytest.mark.parametrize("device,message", [("tpu", "is not a device"), ("meta", "this runs on cpu, cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU is available here")]))
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, message, capsys):
    from rwkv_torch import cli

    with pytest.raises(ValueError, match=message):
        TrainConfig(device=device)
    assert cli.main(["train", "--steps", "2", "--device", device, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkv-torch train: error: device") and message in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("stride", [16, 5])  # stateful lanes, shuffled independent windows
def test_plans_resume_from_their_saved_position(stride):
    """A plan iterator restored from its ``state_dict`` continues exactly where the saved one was, without being
    replayed from the start."""
    lengths = [40, 25, 64, 17, 90]
    plans = window_plans(lengths, 16, stride, 3, seed=1)
    for _ in range(7):
        next(plans)
    saved = torch.load(_round_trip(plans.state_dict()), weights_only=True)  # as a checkpoint holds it
    want = [next(plans) for _ in range(20)]
    fresh = window_plans(lengths, 16, stride, 3, seed=1)
    fresh.load_state_dict(saved)
    assert [next(fresh) for _ in range(20)] == want and fresh.steps == 27
    other = window_plans(lengths, 16, stride, 3, seed=1)
    other.skip(7)
    assert [next(other) for _ in range(20)] == want  # the fallback for checkpoints without a position


def _round_trip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_resume_restores_the_data_position_without_replaying(tmp_path, monkeypatch):
    from rwkv_torch.train.data import WindowPlans

    eps = str(write_episodes(tmp_path / "eps"))
    base = dict(TINY, data=eps, steps=8, eval_every=4)
    full = train(dict(base, out=str(tmp_path / "a")))
    train(dict(base, out=str(tmp_path / "b"), stop_after=5))
    assert torch.load(sorted((tmp_path / "b").glob("ckpt-*.pt"))[-1], weights_only=True)["plans"]["steps"] == 5
    monkeypatch.setattr(WindowPlans, "skip", lambda self, n: pytest.fail("replayed the data order"))
    rest = train(dict(resume=str(tmp_path / "b"), steps=8, progress=False))
    assert rest["step"] == 8 and rest["loss"] == full["loss"]


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    eps = str(write_episodes(tmp_path / "eps"))
    train(dict(TINY, data=eps, out=str(tmp_path / "run"), steps=3, warmup=1))
    with pytest.raises(ValueError, match=r"the run is finished \(step 3 of 3\); give --steps N with N > 3"):
        train(dict(resume=str(tmp_path / "run"), progress=False))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "loss" not in out and err.count("\n") == 1 and "finished" in err
    assert train(dict(resume=str(tmp_path / "run"), steps=4, progress=False))["step"] == 4  # --steps continues it


def test_action_delay_on_episodes_is_refused(tmp_path, capsys):
    eps = str(write_episodes(tmp_path / "eps"))
    with pytest.raises(ValueError, match=r"--action-delay is for \.slp replays; --data .*eps is episodes data"):
        train(dict(TINY, data=eps, out=str(tmp_path / "run"), steps=1, action_delay=3))
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", "--data", eps, "--action-delay", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "--action-delay" in capsys.readouterr().err


def test_init_from_a_run_that_does_not_fit_leaves_the_folder_and_says_what_differs(tmp_path):
    """A fine-tune whose data has another frame width fails before writing anything to --out (the rerun is not
    refused as another run), and the error names the tensors and widths that differ."""
    train(dict(TINY, data=str(write_episodes(tmp_path / "a", D=4)), out=str(tmp_path / "base"), steps=2, warmup=1))
    wide = str(write_episodes(tmp_path / "b", D=12))
    with pytest.raises(ValueError, match=r"input_proj\.weight \[32, 4\] \(this data's model: \[32, 12\]\).*"
                                         r"input width 4 in --init-from .*base, 12 from this data"):
        train(dict(TINY, data=wide, init_from=str(tmp_path / "base"), out=str(tmp_path / "R"), steps=2))
    assert not (tmp_path / "R").exists()
    narrow = str(write_episodes(tmp_path / "c", D=4))
    res = train(dict(TINY, data=narrow, init_from=str(tmp_path / "base"), out=str(tmp_path / "R"), steps=2, warmup=1))
    assert res["step"] == 2
