"""UMI frames (``umi-melee``, the Computer Melee Championship's interface) from replays, and the model's rows from
UMI frames: the same rows ``load_replay`` gives, exactly."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed: pip install -e '.[melee]'")
umi_frame = pytest.importorskip("umi.frame", reason='umi-melee is not installed: pip install -e ".[umi]"')

from rwkv_torch.slippi import FRAME_WIDTH, ID_CLASSES, load_replay, replay_to_umi, umi_rows  # noqa: E402
from rwkv_torch.slippi.parse import read_replay  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "slippi"
REPLAYS = sorted(p.name for p in DATA.glob("*.slp") if p.name != "BTTDK.slp")  # BTTDK: peppi refuses it
CASES = [(name, port) for name in REPLAYS for port in (p.port for p in read_replay(DATA / name).players)]


@pytest.mark.parametrize("name, port", CASES, ids=[f"{n[:-4]}-P{p}" for n, p in CASES])
def test_umi_rows_of_a_replay_equal_load_replay(name, port):
    replay = read_replay(DATA / name)
    frames = replay_to_umi(DATA / name, port)
    assert frames.dtype == umi_frame.FRAME and len(frames) == len(replay.frame_ids)  # every frame of the file
    assert frames["frame"][0] == -123 and (np.diff(frames["frame"]) == 1).all()
    me = next(p for p in replay.players if p.port == port)
    opp = next(p for p in replay.players if p is not me)
    np.testing.assert_array_equal(frames["players"][:, 0]["character"], me.leader["character"])
    np.testing.assert_array_equal(frames["players"][:, 1]["character"], opp.leader["character"])
    assert set(np.unique(frames["stage"])) <= set(umi_frame.STAGES.values())
    rows, ids = umi_rows(frames)
    ep = load_replay(DATA / name, port=port)[0]
    T = len(ep["frames"])
    assert rows.shape == (len(frames), FRAME_WIDTH) and rows.dtype == np.float32
    for col in range(FRAME_WIDTH):  # every column, frame for frame
        np.testing.assert_array_equal(rows[:T, col], ep["frames"][:, col], err_msg=f"column {col}")
    assert set(ids) == set(ID_CLASSES)
    for k, v in ids.items():
        assert v.dtype == np.int64
        np.testing.assert_array_equal(v[:T].reshape(ep[f"ids_{k}"].shape), ep[f"ids_{k}"], err_msg=f"ids_{k}")


def test_umi_rows_of_a_batch_of_games_and_what_an_arena_may_send():
    """A batch mixing games (stages, seats), Nana present on some rows, 15 items, ids beyond the tables."""
    a = replay_to_umi(DATA / "unranked_game2.slp", 1)
    b = replay_to_umi(DATA / "PuffVFalcon-Sing.slp", 2)
    batch = np.concatenate([a[:50], b[:50]])[np.random.default_rng(0).permutation(100)]
    rows, ids = umi_rows(batch)
    for k in range(100):  # each row is the row of that frame alone
        r1, i1 = umi_rows(batch[k:k + 1])
        np.testing.assert_array_equal(rows[k], r1[0])
        for name in ids:
            np.testing.assert_array_equal(ids[name][k], i1[name][0])
    odd = a[:3].copy()
    odd["players"]["character"] = 255
    odd["players"]["action"] = 65535
    odd["stage"] = 99
    odd["items"]["exists"] = 1
    odd["items"]["type"] = 65535
    odd["items"]["owner"] = [0, 1, -1] * 5
    odd["nana"][:, 1]["exists"] = [1, 0, 1]
    rows, ids = umi_rows(odd)
    assert np.isfinite(rows).all()
    for name, v in ids.items():
        assert (v >= 0).all() and (v < ID_CLASSES[name]).all()
    assert (ids["stage"] == ID_CLASSES["stage"] - 1).all() and (ids["item"] == ID_CLASSES["item"] - 1).all()
    nana = slice(3 * 19, 4 * 19)
    assert rows[0, nana][-1] == 1 and not rows[1, nana].any() and rows[2, nana][-1] == 1
    with pytest.raises(ValueError, match="FRAME records"):
        umi_rows(np.zeros((3, 4), np.float32))
