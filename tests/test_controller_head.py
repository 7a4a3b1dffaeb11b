"""The autoregressive controller head (task.model), its decoding by the policy, the bot and ONNX, the residual-LSTM
baseline and ``rwkv-torch eval``."""

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_torch.task import Target, TaskModel
from rwkv_torch.task.baselines import ResidualLSTM, build_baseline, matched_width
from rwkv_torch.task.model import CONTROLLER_ORDER, autoregressive_order, frame_nll
from rwkv_torch.train.step import task_loss
from tests.utils import assert_onnx_policy_matches, episode_row

SLP = Path(__file__).resolve().parent / "data" / "slippi"
SMALL = ["unranked_game1.slp", "unranked_game2.slp", "KirbyVMario-nB.slp"]
TINY = [Target("buttons", "bernoulli", 2), Target("main_x", "categorical", 3), Target("shoulder", "categorical", 2)]


def _model(order=True, targets=TINY, width=16, seed=0):
    torch.manual_seed(seed)
    backbone = build_baseline("lstm", width=width, num_layers=1, head_size=8, max_len=32, embed_dim=5)
    return TaskModel(backbone, targets, width, False, (), 5, autoregressive_order(targets) if order else ()).eval()


def _ys(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"buttons": torch.randint(0, 2, (B, T, 2), generator=g).float(),
            "main_x": torch.randint(0, 3, (B, T), generator=g), "shoulder": torch.randint(0, 2, (B, T), generator=g)}


def test_order_is_the_controller_order():
    from rwkv_torch.slippi.targets import HEAD_ORDER

    assert HEAD_ORDER == CONTROLLER_ORDER == ("buttons", "main_x", "main_y", "c_x", "c_y", "shoulder")
    names = [Target(n, "categorical", 3) for n in sorted(("shoulder", "c_y", "main_y", "buttons", "zeta", "c_x"))]
    assert autoregressive_order(names) == ("buttons", "main_y", "c_x", "c_y", "shoulder", "zeta")
    with pytest.raises(ValueError, match="must name every target"):
        TaskModel(_model().backbone, TINY, 16, False, (), 5, ("buttons", "main_x"))


def test_joint_likelihood_factorises_and_sums_to_one():
    """Teacher-forced per-component NLLs sum to the joint NLL; the per-component terms are the training loss's
    parts; the joint probabilities of every controller (2 bits x 3 x 2 classes) sum to one."""
    m = _model()
    B, T = 2, 4
    x = torch.randn(B, T, 5)
    ys = _ys(B, T)
    with torch.no_grad():
        outs, _ = m(x, m.init_state(B), targets=ys)
        nll = frame_nll(outs, ys, TINY)
        total, parts = task_loss(outs, ys, TINY, False)
    torch.testing.assert_close(total, sum(parts.values()))
    for t in TINY:  # a Bernoulli part is the mean over bits: its per-frame NLL is the bits' sum
        want = parts[t.name] * (t.size if t.kind == "bernoulli" else 1)
        torch.testing.assert_close(nll[t.name].mean(), want)
    combos = list(itertools.product(range(2), range(2), range(3), range(2)))
    joint = torch.zeros(B, T)
    with torch.no_grad():
        h = m.backbone(x, m.init_state(B), return_sequence=True)
        for b0, b1, mx, sh in combos:
            y = {"buttons": torch.tensor([b0, b1]).float().expand(B, T, 2), "main_x": torch.full((B, T), mx),
                 "shoulder": torch.full((B, T), sh)}
            o, _ = m.decode_heads(h, targets=y)
            joint += torch.exp(-sum(frame_nll(o, y, TINY).values()))
    torch.testing.assert_close(joint, torch.ones(B, T), rtol=1e-5, atol=1e-5)
    # the heads do condition on the earlier values: another main_x changes the shoulder's logits
    other = dict(ys, main_x=(ys["main_x"] + 1) % 3)
    with torch.no_grad():
        o2, _ = m.decode_heads(h, targets=other)
    assert not torch.allclose(o2["shoulder"], outs["shoulder"])
    torch.testing.assert_close(o2["buttons"], outs["buttons"])  # the first head sees only the backbone


def test_teacher_forcing_equals_step_by_step_decoding():
    """The training forward (teacher forcing over a window) and frame-by-frame decoding that chooses the true
    values give the same outputs; greedy decoding in the window equals greedy decoding step by step."""
    m = _model()
    B, T = 2, 6
    x, ys = torch.randn(B, T, 5), _ys(B, T)
    with torch.no_grad():
        tf, _ = m(x, m.init_state(B), targets=ys)
        greedy, _ = m(x, m.init_state(B))
        state = m.init_state(B)
        for t in range(T):
            h, state = m.backbone(x[:, t:t + 1], state, return_sequence=True, return_state=True)
            seen = []

            def true(name, out, t=t, seen=seen):
                seen.append(name)
                return ys[name][:, t]

            step, values = m.decode_heads(h[:, 0], choose=true)
            assert seen == ["buttons", "main_x", "shoulder"]  # in order, the last one too (a sampler's draw)
            for name, o in step.items():
                torch.testing.assert_close(o, tf[name][:, t], rtol=1e-5, atol=1e-6)
            g, _ = m.decode_heads(h[:, 0])
            for name, o in g.items():
                torch.testing.assert_close(o, greedy[name][:, t], rtol=1e-5, atol=1e-6)


def test_independent_head_unchanged():
    m = _model(order=False)
    assert m.controller_head == "independent" and all(isinstance(h, torch.nn.Linear) for h in m.heads.values())
    x, ys = torch.randn(2, 3, 5), _ys(2, 3)
    with torch.no_grad():
        a, _ = m(x, m.init_state(2))
        b, _ = m(x, m.init_state(2), targets=ys)
        h = m.backbone(x, m.init_state(2), return_sequence=True)
    for name, head in m.heads.items():
        torch.testing.assert_close(a[name], head(h))
        torch.testing.assert_close(b[name], head(h))


def test_residual_lstm_trains_and_streams():
    m = ResidualLSTM(width=16, num_layers=2, embed_dim=5)
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        full, (h, c) = m(x, return_state=True)
        state, outs = m.init_state(2), []
        for t in range(7):
            o, state = m(x[:, t:t + 1], state, return_state=True)
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], h)
    assert h.shape == (2, 2, 16)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    y = torch.randn(2, 7, 16)
    losses = []
    for _ in range(20):
        loss = ((m(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    w = matched_width("residual-lstm", 100_000, head_size=16, num_layers=2, max_len=16, embed_dim=5)
    n = sum(p.numel() for p in build_baseline("residual-lstm", width=w, num_layers=2, head_size=16, max_len=16,
                                              embed_dim=5).parameters())
    assert abs(n - 100_000) < 0.1 * 100_000


# ---- trained runs on real replays (the melee extra)

def _train(root, **kw):
    from rwkv_torch.slippi import DATA_SOURCES
    from rwkv_torch.train import train

    d = root / "replays"
    if not d.exists():
        d.mkdir()
        for name in SMALL:
            (d / name).symlink_to((SLP / name).resolve())
    opts = dict(data=str(d), hidden_size=32, num_layers=2, head_size=16, window_size=16, batch_size=2, steps=3,
                eval_every=3, eval_batches=1, progress=False, val_fraction=0.3, lr=1e-2, action_delay=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train({**opts, **kw}, sources=DATA_SOURCES)


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    pytest.importorskip("peppi_py")
    root = tmp_path_factory.mktemp("ar")
    _train(root, out=str(root / "run"))
    return root / "run"


def test_run_records_head_delay_features_and_held_out_games(ar_run):
    from rwkv_torch.slippi import Policy
    from rwkv_torch.slippi.features import FEATURE_VERSION
    from rwkv_torch.task import find_checkpoint

    ckpt = torch.load(find_checkpoint(ar_run), weights_only=True)
    assert ckpt["config"]["controller_head"] == "autoregressive"  # the default for .slp data
    assert ckpt["data_meta"] == {"feature_version": FEATURE_VERSION, "action_delay": 3}
    assert len(ckpt["held_out"]) >= 1 and all(":P" in n for n in ckpt["held_out"])
    pol = Policy.from_run(ar_run)
    assert pol.controller_head == "autoregressive" and pol.action_delay == 3
    assert pol.feature_version == FEATURE_VERSION
    with pytest.raises(ValueError, match="features version 1"):
        Policy(pol.model, feature_version=1)


def test_independent_flag_and_old_checkpoints_load_as_independent(tmp_path):
    pytest.importorskip("peppi_py")
    from rwkv_torch.slippi import Policy
    from rwkv_torch.task import find_checkpoint

    _train(tmp_path, out=str(tmp_path / "ind"), controller_head="independent", steps=1)
    assert Policy.from_run(tmp_path / "ind").controller_head == "independent"
    path = find_checkpoint(tmp_path / "ind")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["controller_head"], ckpt["data_meta"], ckpt["held_out"]  # as written before them
    torch.save(ckpt, path)
    pol = Policy.from_run(tmp_path / "ind")
    assert pol.controller_head == "independent" and pol.feature_version is None and pol.action_delay == 3
    # fine-tuning such a run keeps its heads (the .slp default does not override them); asking for others is refused
    _train(tmp_path, out=str(tmp_path / "ft"), init_from=str(tmp_path / "ind"), steps=1)
    assert Policy.from_run(tmp_path / "ft").controller_head == "independent"
    with pytest.raises(ValueError, match="--controller-head autoregressive contradicts --init-from"):
        _train(tmp_path, out=str(tmp_path / "ft2"), init_from=str(tmp_path / "ind"), steps=1,
               controller_head="autoregressive")


def test_controller_head_is_for_episode_data(tmp_path):
    from rwkv_torch.train import train

    (tmp_path / "t.txt").write_text("hello world " * 100)
    with pytest.raises(ValueError, match="--controller-head is for episode data"):
        train(dict(data=str(tmp_path / "t.txt"), controller_head="autoregressive", out=str(tmp_path / "r")))


def test_policy_greedy_is_the_argmax_chain_and_bot_decodes_the_same(ar_run):
    """Policy.act (greedy and sampled) decodes the AR head in order; the bot's batched step plays the same
    controllers greedily, and its seeded sampling is reproducible and per game."""
    from rwkv_torch.slippi import Policy
    from rwkv_torch.slippi.batch_policy import BatchPolicy
    from rwkv_torch.slippi.replays import load_replay
    from rwkv_torch.slippi.targets import BUTTONS, STICK_VALUES

    pol = Policy.from_run(ar_run)
    ep = load_replay(SLP / "unranked_game1.slp", action_delay=3)[0]
    T = 30
    x = torch.from_numpy(np.concatenate([ep["frames"][:T]] + [
        ep[f"ids_{s.name}"][:T].reshape(T, -1).astype(np.float32) for s in pol.model.id_specs], axis=1))[None]
    with torch.no_grad():
        par, _ = pol.model(x, pol.model.init_state(1))  # greedy decode over the window
    for t in range(T):
        c = pol.act(*episode_row(ep, t))
        assert c.main_x == pytest.approx(float(STICK_VALUES[int(par["main_x"][0, t].argmax())]))
        assert [c.buttons[b] for b in BUTTONS] == (par["buttons"][0, t] > 0).tolist()
    bp = BatchPolicy(pol.model)
    rows = x[0]
    state = bp.initial_state(2)
    single = Policy(pol.model)
    for t in range(T):
        heads, state = bp.step(rows[t:t + 1].repeat(2, 1), state, np.array([t == 0] * 2))
        ctrl, _ = bp.controls(heads)
        want = single.act(*episode_row(ep, t))
        expect = [(want.main_x + 1) / 2, (want.main_y + 1) / 2, (want.c_x + 1) / 2, (want.c_y + 1) / 2,
                  want.shoulder] + [float(want.buttons[b]) for b in BUTTONS]
        np.testing.assert_allclose(ctrl[0], np.float32(expect), atol=1e-6)
        np.testing.assert_array_equal(ctrl[0], ctrl[1])


def test_bot_sampling_decodes_the_ar_head_reproducibly(ar_run):
    pytest.importorskip("umi")
    from rwkv_torch.slippi.batch_policy import BatchPolicy
    from rwkv_torch.slippi.umi import replay_to_umi

    frames = replay_to_umi(SLP / "unranked_game1.slp", 1)[:30]

    def play(pol, game, batch=1):
        state, rows = pol.initial_state(batch), []
        for t in range(len(frames)):
            ctrl, state = pol.act(np.repeat(frames[t:t + 1], batch), state, np.full(batch, t == 0),
                                  np.arange(game, game + batch))
            rows.append(ctrl[0])
        return np.array(rows)

    s = BatchPolicy.load(ar_run, sample=True, seed=5, temperature=2.0)
    a = play(s, 3)
    np.testing.assert_array_equal(a, play(s, 3, batch=4))
    assert not np.array_equal(a, play(s, 4))
    g = BatchPolicy.load(ar_run)
    np.testing.assert_array_equal(play(g, 1), play(g, 2))


def test_onnx_decodes_the_ar_head_with_metadata(ar_run, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from rwkv_torch.slippi import Policy
    from rwkv_torch.slippi.features import FEATURE_VERSION
    from rwkv_torch.slippi.replays import load_replay

    pol = Policy.from_run(ar_run)
    path = pol.export_onnx(tmp_path / "p.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["controller_head"] == "autoregressive" and json.loads(meta["action_delay"]) == 3
    assert json.loads(meta["feature_version"]) == FEATURE_VERSION
    assert json.loads(meta["head_order"]) == list(CONTROLLER_ORDER)
    assert [n for n, _ in json.loads(meta["head_sizes"])] == list(pol.head_sizes())
    assert [c for _, c in json.loads(meta["id_columns"])] == [s.columns for s in pol.model.id_specs]
    assert_onnx_policy_matches(pol, path, load_replay(SLP / "unranked_game2.slp", action_delay=3)[0], 6)


# ---- rwkv-torch eval

def test_eval_scores_the_held_out_games_as_the_policy_plays_them(ar_run, monkeypatch):
    from rwkv_torch.slippi import Policy, evaluate
    from rwkv_torch.slippi.replays import load_replay
    from rwkv_torch.slippi.targets import BUTTONS, STICK_VALUES
    from rwkv_torch.task import find_checkpoint

    held = torch.load(find_checkpoint(ar_run), weights_only=True)["held_out"]
    res = evaluate.evaluate_run(ar_run)
    assert res["games"] == len(held) and res["action_delay"] == 3 and res["controller_head"] == "autoregressive"
    rows = res["components"]
    assert list(rows) == ["buttons", "main_x", "main_y", "c_x", "c_y", "shoulder", "all"]
    assert rows["all"]["nll_bits"] == pytest.approx(sum(r["nll_bits"] for n, r in rows.items() if n != "all"))
    assert all(0 < r["nll_bits"] < 64 for r in rows.values())
    monkeypatch.setattr(evaluate, "CHUNK", 7)  # the state carried across chunks: the same numbers
    again = evaluate.evaluate_run(ar_run)["components"]
    for n, r in rows.items():
        for k, v in r.items():
            assert v == pytest.approx(again[n][k], rel=1e-4, abs=1e-6), (n, k)
    # the greedy controllers scored are those Policy.act presses, frame by frame from the game's start
    file, _, port = held[0].rpartition(":P")
    ep = load_replay(file, port=int(port), action_delay=3)[0]
    pol = Policy.from_run(ar_run)
    acted = [pol.act(*episode_row(ep, t)) for t in range(len(ep["frames"]))]
    g = evaluate.score_game(pol.model, _targets(ar_run), ep, 3, keep=True)
    for name in ("main_x", "c_y"):
        cls = np.array([int(np.argmin(np.abs(STICK_VALUES - getattr(c, name)))) for c in acted])
        np.testing.assert_array_equal(g["pred"][name], cls)
        assert g[name]["hit"] == int((cls == ep[f"target_{name}"])[3:].sum())
    bits = np.array([[c.buttons[b] for b in BUTTONS] for c in acted])
    np.testing.assert_array_equal(g["pred"]["buttons"], bits)
    assert g["buttons"]["hit"] == int((bits == ep["target_buttons"]).all(1)[3:].sum())
    copy = ep["target_main_y"][3:] == ep["target_main_y"][:-3]
    assert g["main_y"]["copy"] == int(copy.sum()) and g["main_y"]["change"] == int((~copy).sum())


def _targets(run):
    from rwkv_torch.task import Target, find_checkpoint

    return [Target(**t) for t in torch.load(find_checkpoint(run), weights_only=True)["targets"]]


def test_eval_command_and_a_residual_lstm_run(ar_run, tmp_path, capsys):
    from rwkv_torch.cli import main as cli

    assert cli(["eval", str(ar_run), "--max-games", "1"]) == 0
    out = capsys.readouterr().out
    assert "autoregressive head, action delay 3; 1 games" in out and "NLL bits/frame" in out and "copy rule" in out
    _train(tmp_path, out=str(tmp_path / "res"), backbone="residual-lstm", val_fraction=0.0, steps=2)
    assert cli(["eval", str(tmp_path / "res")]) == 2
    assert "records no held-out games" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path / "res"), "--data", str(SLP / "unranked_game2.slp")]) == 0
    assert "residual-lstm, autoregressive head" in capsys.readouterr().out
