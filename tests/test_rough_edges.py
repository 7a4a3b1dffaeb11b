"""Rough edges a new user hits (issue 32): a live frame the policy cannot take, flags silently ignored, tracebacks
instead of one line, messages in the library's terms instead of the user's flags, losses without units, the README's
snippets."""

import json
import math
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.slippi.features import FRAME_WIDTH, ID_CLASSES, UNKNOWN_ID, known_ids

README = Path(__file__).resolve().parents[1] / "README.md"
SLP = Path(__file__).resolve().parent / "data" / "slippi"


# --- 1. a live game cannot crash the policy ---------------------------------------------------------------------

def test_known_ids_maps_everything_outside_a_table_to_its_unknown_id():
    assert {name: n - 1 for name, n in ID_CLASSES.items()} == UNKNOWN_ID
    got = known_ids("action", [-1, 0, 14, 511, 512, 10**6])
    assert got.dtype == np.int64 and got.tolist() == [511, 0, 14, 511, 511, 511]
    got = known_ids("character", np.array([[255.0, 9.0], [np.nan, -3.0]]))
    assert got.shape == (2, 2) and got.tolist() == [[32, 9], [32, 32]]
    assert known_ids("stage", -1).tolist() == 63 and known_ids("item", [0, 255, 256]).tolist() == [0, 255, 255]


def _pad(main=(0.5, 0.5)):
    return SimpleNamespace(button={}, main_stick=main, c_stick=(0.5, 0.5), l_shoulder=0.0, r_shoulder=0.0)


def _player(action, character):
    """A libmelee-like ``PlayerState`` (read duck-typed by slippi.live): ``action`` / ``character`` with ``.value``."""
    return SimpleNamespace(
        position=SimpleNamespace(x=1.0, y=2.0), facing=True, percent=0.0, stock=4, shield_strength=60.0,
        jumps_left=2, on_ground=True, hitlag_left=0, action_frame=1, hitstun_frames_left=0, invulnerable=False,
        speed_air_x_self=0.0, speed_y_self=0.0, speed_ground_x_self=0.0, speed_x_attack=0.0, speed_y_attack=0.0,
        action=SimpleNamespace(value=action), character=SimpleNamespace(value=character), controller_state=_pad(),
        nana=None)


def _unknown_game():
    q = SimpleNamespace(owner=1, type=SimpleNamespace(value=-1), position=SimpleNamespace(x=0.0, y=0.0),
                        speed=SimpleNamespace(x=0.0, y=0.0))
    return SimpleNamespace(players={1: _player(-1, 255), 2: _player(9999, 9)}, stage=SimpleNamespace(value=0x7F),
                           projectiles=[q])


def _policy():
    from rwkv_torch.slippi import Policy
    from rwkv_torch.slippi.targets import SHOULDER_CLASSES, STICK_CLASSES, STICKS
    from rwkv_torch.train import Dataset, TrainConfig, build_model
    from rwkv_torch.train.data import IdSpec, Target

    targets = [Target("buttons", "bernoulli", 8), *(Target(s, "categorical", STICK_CLASSES) for s in STICKS),
               Target("shoulder", "categorical", SHOULDER_CLASSES)]
    columns = {"action": 4, "character": 2, "item": 4, "stage": 1}
    ids = [IdSpec(n, columns[n], ID_CLASSES[n]) for n in sorted(columns)]
    data = Dataset([], targets, embed_dim=FRAME_WIDTH, ids=ids)
    return Policy(build_model(TrainConfig(hidden_size=32, num_layers=1, head_size=16), data))


def test_a_live_frame_with_unknown_ids_gives_valid_ids_and_the_policy_acts():
    from rwkv_torch.slippi import gamestate_features

    frame, ids = gamestate_features(_unknown_game(), 1)
    assert frame.shape == (FRAME_WIDTH,) and np.isfinite(frame).all()
    assert ids["action"].tolist() == [511, 0, 511, 0]  # UnknownAnimation -1 and an action past the table; no Nanas
    assert ids["character"].tolist() == [32, 9] and int(ids["stage"]) == 63
    assert ids["item"].tolist() == [255, 0, 0, 0]  # the unknown projectile type is an item of unknown type
    for name, v in ids.items():
        assert ((np.asarray(v) >= 0) & (np.asarray(v) < ID_CLASSES[name])).all()
    pad = _policy().act(frame, ids)  # raised "ids['action'] must be 4 ints in [0, 512)" before
    assert set(pad.buttons) == {"A", "B", "X", "Y", "Z", "L", "R", "D_UP"}


def test_libmelee_defaults_unknown_animation_and_character_do_not_crash_the_policy():
    melee = pytest.importorskip("melee", reason="libmelee (the live extra) is not installed")
    from rwkv_torch.slippi import gamestate_features

    gs = melee.GameState()
    gs.players[1], gs.players[2] = melee.PlayerState(), melee.PlayerState()  # action UnknownAnimation (-1)
    assert gs.players[1].action.value == -1 and gs.players[1].character == melee.Character.UNKNOWN_CHARACTER
    frame, ids = gamestate_features(gs, 2)
    assert ids["action"].tolist() == [511, 0, 511, 0] and ids["character"].tolist() == [32, 32]
    pad = _policy().act(frame, ids)
    out = pad.as_libmelee()
    assert set(out["buttons"]) == {getattr(melee.Button, f"BUTTON_{b}") for b in pad.buttons}
    assert all(isinstance(k, melee.Button) for k in out["buttons"])
    assert 0 <= out["main"][0] <= 1 and 0 <= out["c"][1] <= 1 and 0 <= out["shoulder"] <= 1


def test_as_libmelee_without_libmelee_names_the_button_members(monkeypatch):
    import sys

    from rwkv_torch.slippi.policy import LIBMELEE_BUTTONS, Controller

    monkeypatch.setitem(sys.modules, "melee", None)  # import melee -> ImportError
    c = Controller(main_x=1.0, main_y=-1.0)
    c.buttons["A"] = True
    out = c.as_libmelee()
    assert out["buttons"]["BUTTON_A"] is True and set(out["buttons"]) == set(LIBMELEE_BUTTONS.values())
    assert out["main"] == (1.0, 0.0) and out["c"] == (0.5, 0.5)


def test_replay_features_unchanged_by_known_ids():
    """Replays hold ids inside the tables: the rows of a real replay read as before (no FEATURE_VERSION bump)."""
    pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed")
    from rwkv_torch.slippi import load_replay

    ep = load_replay(SLP / "unranked_game1.slp")[0]
    for name, n in ID_CLASSES.items():
        a = ep[f"ids_{name}"]
        assert a.dtype == np.int64 and (a >= 0).all() and (a < n).all()
    assert (ep["ids_character"] < UNKNOWN_ID["character"]).all() and (ep["ids_stage"] < UNKNOWN_ID["stage"]).all()


# --- 3, 4, 5. one line naming the flag -------------------------------------------------------------------------

def _one_line(capsys, command):
    out, err = capsys.readouterr()
    assert err.startswith(f"rwkv-torch {command}: error: ") and err.count("\n") == 1, err
    return err


def test_export_refuses_embed_dim_with_a_model(tmp_path, capsys):
    rt.save(rt.build(embed_dim=8, hidden_size=32, num_layers=1, head_size=16), tmp_path / "m")
    assert cli.main(["export", "--model", str(tmp_path / "m"), "--embed-dim", "99", "--out",
                     str(tmp_path / "s.onnx")]) == 2
    assert "--embed-dim" in _one_line(capsys, "export") and not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize("command", [["check", "--frames", "4"], ["stream-bench", "--frames", "4", "--no-onnx"],
                                     ["demo", "--steps", "1"]])
@pytest.mark.parametrize("threads", ["-1", "0"])
def test_threads_below_one_is_one_line(command, threads, capsys):
    before = torch.get_num_threads()
    assert cli.main([*command, "--threads", threads]) == 2
    err = _one_line(capsys, command[0])
    assert "--threads must be >= 1" in err and f"got {threads}" in err
    assert torch.get_num_threads() == before


def test_ctrl_c_outside_training_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt  # as zipfile raises it while replays load

    monkeypatch.setattr(cli, "train_and_report", interrupted)
    assert cli.main(["train", "--steps", "3"]) == 130
    out, err = capsys.readouterr()
    assert err == "rwkv-torch train: interrupted (Ctrl-C)\n"


def test_max_bytes_zero_names_the_flag(tmp_path, capsys):
    assert cli.main(["train", "--max-bytes", "0", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--max-bytes must be > 0, got 0" in _one_line(capsys, "train") and not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, expect", [
    (["train", "--lora-rank", "0"], "--lora-rank 0: must be >= 1"),
    (["train", "--hidden-size", "0"], "--hidden-size 0: must be >= 1"),
    (["train", "--val-fraction", "1"], "--val-fraction 1.0: must be in [0, 1)"),
])
def test_config_fields_are_named_as_flags(argv, expect, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = _one_line(capsys, "train")
    assert expect in err and "_" not in err.split("error: ", 1)[1].split(":")[0], err


def test_flag_message_translates_only_fields_the_command_has():
    flags = {"hidden_size": "--hidden-size", "head_size": "--head-size"}
    assert cli.flag_message("RWKVConfig.head_size=48: must divide hidden_size=256", flags) == \
        "--head-size 48: must divide --hidden-size 256"
    untouched = "x.slp: 3 frames, too short for action_delay=1"
    assert cli.flag_message(untouched, flags) == untouched


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm") / "m"
    rt.save(rt.build(vocab_size=256, hidden_size=32, num_layers=1, head_size=16, seed=0), d)
    return str(d)


@pytest.mark.parametrize("flag, value, expect", [
    ("--max-tokens", "-1", "--max-tokens -1: must be >= 0"),
    ("--temperature", "-0.5", "--temperature -0.5: must be >= 0 (0 is greedy)"),
    ("--top-k", "-2", "--top-k -2: must be >= 0 (0 is off)"),
    ("--top-p", "0", "--top-p 0.0: must be in (0, 1] (1 is off)"),
    ("--penalty-decay", "1.5", "--penalty-decay 1.5: must be in [0, 1]"),
    ("--stop-token", "300", "--stop-token [300]: token ids must be in [0, 256)"),
])
def test_generate_says_one_limit_at_a_time(byte_lm, flag, value, expect, capsys):
    assert cli.main(["generate", "--model", byte_lm, "--prompt", "a", flag, value]) == 2
    err = _one_line(capsys, "generate")
    assert expect in err, err
    for other in {"--max-tokens", "--temperature", "--top-k", "--top-p", "--penalty-decay"} - {flag}:
        assert other not in err  # one limit per message
    assert "_" not in err


def test_a_text_file_renamed_slp_is_named_not_dumped(tmp_path, capsys):
    pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed")
    from rwkv_torch.slippi import load_replay

    fake = tmp_path / "notes.slp"
    fake.write_text("hello, this is text\n")
    with pytest.raises(ValueError) as e:
        load_replay(fake)
    msg = str(e.value)
    assert msg.startswith(f"{fake} is not a Slippi replay (") and not re.search(r"\[\d+, \d+", msg), msg


def test_merge_on_an_empty_folder_says_there_is_no_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["merge", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = _one_line(capsys, "merge")
    assert "no training run here" in err and "resum" not in err
    assert cli.main(["merge", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such run folder" in _one_line(capsys, "merge")


# --- 6. units ---------------------------------------------------------------------------------------------------

def test_loss_units_by_data():
    from rwkv_torch.train import Dataset
    from rwkv_torch.train.data import Target
    from rwkv_torch.train.units import bits_unit, label_metrics, loss_unit, summary_line

    text = Dataset([], [Target("next", "categorical", 256)], vocab_size=256)
    frames = Dataset([], [Target("b", "bernoulli", 8), Target("s", "categorical", 17)], embed_dim=4)
    mixed = Dataset([], [Target("b", "bernoulli", 8), Target("r", "regression", 2)], embed_dim=4)
    assert loss_unit(text) == "nats/byte" and loss_unit(text, "world") == "nats/token"
    assert loss_unit(frames) == "nats/frame" and loss_unit(mixed) == "nats+mse/frame"
    assert bits_unit("nats/frame") == "bits/frame" and bits_unit("nats+mse/frame") is None
    row = label_metrics({"step": 3, "loss": 2 * math.log(2), "val_loss": math.log(2)}, "nats/byte")
    assert row["loss_unit"] == "nats/byte" and row["bits_per_byte"] == pytest.approx(2.0)
    assert row["val_bits_per_byte"] == pytest.approx(1.0)
    assert "bits" not in "".join(label_metrics({"loss": 1.0}, "nats+mse/frame"))
    line = summary_line(dict(step=5, loss=math.log(2), val_loss=None, checkpoint="c", loss_unit="nats/byte"))
    assert line == "step 5: loss 0.6931 nats/byte (1.00 bits/byte); checkpoint c"


def test_train_summary_line_names_the_unit(monkeypatch, capsys):
    from rwkv_torch import demo as demo_module

    res = dict(step=2, loss=1.0, val_loss=2.0, checkpoint="ck", rank=0, loss_unit="nats/frame")
    monkeypatch.setattr(demo_module, "train", lambda args, **kw: res)
    demo_module.train_and_report({"steps": 2})
    out = capsys.readouterr().out
    assert out == "step 2: loss 1.0000 nats/frame (1.44 bits/frame), val_loss 2.0000 nats/frame (2.89 bits/frame); " \
                  "checkpoint ck\n"


def test_loss_plot_has_title_and_unit_labels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from rwkv_torch.train.plots import write_plot

    rows = [{"step": s, "loss": 3.0 / s, "loss_unit": "nats/byte", **({"val_loss": 3.5 / s} if s % 2 == 0 else {})}
            for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        ax = fig.axes[0]
        seen.update(title=ax.get_title(), x=ax.get_xlabel(), y=ax.get_ylabel(),
                    right=[a.get_ylabel() for a in fig.axes[0].child_axes])
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert write_plot(tmp_path) and (tmp_path / "loss.png").stat().st_size > 0
    assert "nats/byte" in seen["title"] and seen["x"] == "optimizer step" and seen["y"] == "loss (nats/byte)"
    assert seen["right"] == ["loss (bits/byte)"]


# --- 7. one line per skipped replay -------------------------------------------------------------------------------

def test_one_line_per_skipped_replay_and_no_warning(tmp_path, capfd, recwarn):
    pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed")
    from rwkv_torch.slippi import load_replays

    d = tmp_path / "replays"
    d.mkdir()
    for name in ("unranked_game1.slp", "BTTDK.slp"):
        (d / name).symlink_to((SLP / name).resolve())
    (d / "text.slp").write_text("not a replay\n")
    eps = load_replays(d, cache=tmp_path / "cache", progress=True)
    assert len(eps) == 2 and not [w for w in recwarn if "skip" in str(w.message)]
    err = capfd.readouterr().err
    lines = [ln for ln in re.split(r"[\r\n]", err) if "skip" in ln]
    assert len(lines) == 3, err  # one per skipped file and the count
    assert sum("BTTDK.slp" in ln for ln in lines) == 1 and sum("text.slp is not a Slippi replay" in ln
                                                               for ln in lines) == 1
    assert any("skipped 2 of 3 replay files" in ln for ln in lines)
    assert "warnings.warn" not in err and "UserWarning" not in err


# --- 8. README and files --------------------------------------------------------------------------------------------

def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_ops_snippet_runs_as_written():
    (block,) = [b for b in _python_blocks() if "from rwkv_torch.ops import" in b]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].shape == scope["k4"].shape and scope["final_state"].shape[-1] == scope["N"]


def test_readme_generate_snippet_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("rwkv", reason="the World tokenizer needs the rwkv package (the lm extra)")
    (block,) = [b for b in _python_blocks() if "stream_text(" in b and "get_tokenizer" in b]
    monkeypatch.chdir(tmp_path)
    rt.save(rt.build(vocab_size=65536, hidden_size=32, num_layers=1, head_size=16, seed=0), "rwkv7-0.1b")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert len(scope["more"].tokens[0]) == 40


def test_one_cache_folder_name():
    from rwkv_torch.ops import cpu_lib
    from rwkv_torch.slippi import cache_dir

    env = {k: v for k, v in os.environ.items() if k not in ("RWKV_TORCH_CACHE", "XDG_CACHE_HOME")}
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        assert cache_dir() == Path.home() / ".cache" / "rwkv_torch" / "slippi"
    finally:
        os.environ.clear()
        os.environ.update(old)
    src = Path(cpu_lib.__file__).read_text()
    assert '"rwkv_torch")' in src
    text = README.read_text() + "".join(p.read_text() for p in Path(rt.__file__).parent.rglob("*.py"))
    assert ".cache/rwkv-torch" not in text and "/ \"rwkv-torch\"" not in text


def test_state_and_model_files_get_the_usual_permissions(tmp_path):
    m = rt.build(vocab_size=256, hidden_size=32, num_layers=1, head_size=16)
    (tmp_path / "plain.txt").write_text("x")
    m.init_state(1).save(tmp_path / "s.safetensors")
    rt.save(m, tmp_path / "m")
    usual = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "s.safetensors").stat().st_mode) == usual
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == usual
    assert stat.S_IMODE((tmp_path / "m" / "config.json").stat().st_mode) == usual


def test_max_bytes_zero_from_python_is_refused_by_the_config():
    from rwkv_torch.train import TrainConfig

    with pytest.raises(ValueError, match=r"max_bytes=0: must be None or >= 1"):
        TrainConfig(max_bytes=0)


def test_no_matplotlib_is_one_line_above_the_bar_not_a_warning(tmp_path, monkeypatch, capfd, recwarn):
    from rwkv_torch.train import loop, train

    monkeypatch.setattr(loop, "write_plot", lambda run_dir: False)
    from tests.test_train import write_episodes

    eps = str(write_episodes(tmp_path / "eps", n=3, T=40))
    train(dict(data=eps, hidden_size=16, num_layers=1, head_size=8, window_size=8, batch_size=2, steps=4,
               eval_every=2, eval_batches=1, warmup=0, out=str(tmp_path / "run"), progress=False, val_fraction=0.0))
    err = capfd.readouterr().err
    assert err.count("matplotlib is not installed") == 1
    assert not [w for w in recwarn if "matplotlib" in str(w.message)]
