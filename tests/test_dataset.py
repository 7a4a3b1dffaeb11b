"""Prepared replay datasets (``rwkv-torch prepare-replays``, ``rwkv_torch.slippi.dataset``) on the replays of
tests/data/slippi: the same episodes as ``load_replay`` from a folder and from a zip, re-runs that skip, interrupted
runs that resume, the filters, and training from a dataset equal to training from the folder."""

import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed: pip install -e '.[melee]'")
pytest.importorskip("pyarrow")

from rwkv_torch.slippi import DATA_SOURCES, load_replay  # noqa: E402
from rwkv_torch.slippi import prepare as prep  # noqa: E402
from rwkv_torch.slippi.dataset import (  # noqa: E402
    Filters,
    character_ids,
    is_dataset,
    load_dataset,
    read_metadata,
    training_data,
)

SLP = Path(__file__).resolve().parent / "data" / "slippi"
GOOD = ["KirbyVMario-nB.slp", "PuffVFalcon-Sing.slp", "ranked_game1_tiebreak.slp", "realtimeTest.slp",
        "unranked_game1.slp", "unranked_game2.slp"]
OPEN = Filters(humans_only=False, min_frames=0)  # every readable 1v1 game of the test data
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    folder = root / "replays" / "nested"
    folder.mkdir(parents=True)
    for name in GOOD + ["BTTDK.slp"]:
        shutil.copy(SLP / name, folder / name)
    (folder / "broken.slp").write_bytes(b"not a replay")
    archive = root / "replays.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in GOOD:
            z.write(SLP / name, f"zipped/{name}")
    return root / "replays", archive


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    ds = tmp_path_factory.mktemp("ds") / "DS"
    summary = prep.prepare_replays(list(sources), ds, workers=2, filters=OPEN, progress=False, log=None)
    return ds, summary


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_folder_and_zip_give_load_replays_episodes(prepared):
    ds, summary = prepared
    assert is_dataset(ds)
    assert summary["parsed"] == 2 * len(GOOD) + 2 and summary["ok"] == 2 * len(GOOD) and summary["refused"] == 2
    rows = {Path(r["source"].split("!")[-1]).name + ("@zip" if "!" in r["source"] else ""): r
            for r in read_metadata(ds)}
    assert "peppi-py" in rows["BTTDK.slp"]["reason"] and rows["broken.slp"]["status"] == "error"
    assert rows["ranked_game1_tiebreak.slp"]["codes"] == ["NIKK＃513", "NIKK＃142"]
    assert rows["ranked_game1_tiebreak.slp"]["online"] and not rows["realtimeTest.slp"]["online"]
    assert rows["KirbyVMario-nB.slp"]["types"] == ["human", "cpu"]
    assert rows["realtimeTest.slp"]["ports"] == [2, 3] and rows["realtimeTest.slp"]["frames"] > 2000
    assert rows["KirbyVMario-nB.slp"]["hash"] == rows["KirbyVMario-nB.slp@zip"]["hash"]
    eps = load_dataset(ds, filters=Filters(humans_only=False, min_frames=0, dedup=False))
    seen = {}
    for name, ep, game in eps:
        port = int(name.rsplit(":P", 1)[1])
        _same(ep, load_replay(SLP / Path(game.split("!")[-1]).name, port=port)[0])
        seen[name] = game
    assert len(seen) == len(eps) == 2 * 10  # 6 games, 4 with two humans, once from the folder and once from the zip
    assert sum("!" in g for g in seen.values()) == 10


def test_sevenzip_archive(tmp_path):
    py7zr = pytest.importorskip("py7zr", reason="py7zr (the sevenzip extra) is not installed")
    archive = tmp_path / "replays.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        for name in ("unranked_game1.slp", "KirbyVMario-nB.slp"):
            z.write(SLP / name, f"dump/{name}")
    ds = tmp_path / "DS"
    first = prep.prepare_replays([archive], ds, workers=1, filters=OPEN, progress=False, log=None)
    assert first["ok"] == 2 and prep.prepare_replays([archive], ds, workers=1, progress=False, log=None)["parsed"] == 0
    eps = load_dataset(ds, filters=OPEN)
    assert len(eps) == 3
    for name, ep, game in eps:
        _same(ep, load_replay(SLP / Path(game).name, port=int(name.rsplit(":P", 1)[1]))[0])


def test_rerun_skips_and_partial_rerun_adds(prepared, sources, tmp_path):
    ds, _ = prepared
    again = prep.prepare_replays(list(sources), ds, workers=1, filters=OPEN, progress=False, log=None)
    assert again["skipped"] == again["sources"] and again["parsed"] == 0
    folder, _ = sources
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(SLP / "unranked_game2.slp", extra / "copy.slp")
    ds2 = tmp_path / "DS2"
    shutil.copytree(ds, ds2)
    more = prep.prepare_replays([folder, extra], ds2, workers=1, filters=OPEN, progress=False, log=None)
    assert more["parsed"] == 1 and more["skipped"] == 8
    assert more["dropped"]["duplicate"] == len(GOOD) + 1  # the zip's six and the copy


def _snapshot(ds):
    rows = sorted(read_metadata(ds), key=lambda r: Path(r["source"]).name)
    files = sorted(p.relative_to(ds).as_posix() for p in (Path(ds) / "games").rglob("*.parquet"))
    drop = lambda r: {k: v for k, v in r.items() if k != "source"}  # noqa: E731
    return [drop(r) for r in rows], files


def test_interrupted_prepare_resumes_to_the_same_dataset(sources, prepared, tmp_path, monkeypatch):
    folder, _ = sources
    ref = tmp_path / "ref"
    prep.prepare_replays([folder], ref, workers=1, filters=OPEN, progress=False, log=None)
    real, calls = prep._process, []

    def dying(job, out, per_source):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job["source"])
        return real(job, out, per_source)

    ds = tmp_path / "DS"
    monkeypatch.setattr(prep, "_process", dying)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_replays([folder], ds, workers=1, filters=OPEN, progress=False, log=None)
    monkeypatch.setattr(prep, "_process", real)
    assert sorted(r["source"] for r in read_metadata(ds)) == sorted(calls)  # what was done was saved
    (ds / "metadata.parquet").unlink()  # as if killed before the table was written: the game files hold the rows
    done = prep.prepare_replays([folder], ds, workers=1, filters=OPEN, progress=False, log=None)
    assert done["parsed"] == 8
    assert _snapshot(ds) == _snapshot(ref)


def test_sigint_loses_nothing(sources, tmp_path):
    """A real Ctrl-C (SIGINT to the process group of a 2-worker run, which parses every copy), then a re-run: the
    rows written before the signal are kept, and the dataset ends complete."""
    import os
    import signal
    import time

    folder, _ = sources
    many = tmp_path / "many"
    many.mkdir()
    for i in range(300):
        (many / f"g{i:03d}.slp").symlink_to(folder / "nested" / "realtimeTest.slp")
    ds = tmp_path / "DS"
    code = ("import sys; from rwkv_torch.slippi.prepare import prepare_replays; "
            "prepare_replays([sys.argv[1]], sys.argv[2], workers=2, progress=False, per_source_files=True)")
    cmd = [sys.executable, "-c", code, str(many), str(ds)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not any((ds / "games").rglob("*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    first = read_metadata(ds)
    assert 0 < len(first) < 300 and all((ds / r["file"]).is_file() for r in first)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_metadata(ds)
    assert len(rows) == 300 and all(r["status"] == "ok" for r in rows) and len({r["file"] for r in rows}) == 300
    assert {r["source"]: r for r in rows}.items() >= {r["source"]: r for r in first}.items()


def test_filters_drop_what_they_say(prepared):
    ds, _ = prepared
    rows = read_metadata(ds)
    kept, dropped = Filters().apply(rows)  # the defaults: humans only, 3600 frames, dedup
    assert kept == [] and dropped["unreadable"] == 2 and dropped["cpu"] == 4  # Kirby and Puff games, twice
    assert dropped["short"] == 8 and sum(dropped.values()) == len(rows)
    kept, dropped = OPEN.apply(rows)
    assert len(kept) == len(GOOD) and dropped["duplicate"] == len(GOOD)
    kept, dropped = Filters(humans_only=False, min_frames=2000, dedup=False).apply(rows)
    assert [Path(r["source"]).name for r, _ in kept] == ["realtimeTest.slp"] * 2 and dropped["short"] == 10
    assert all(r["frames"] >= 2000 for r, _ in kept)
    fox_falco = Filters(humans_only=False, min_frames=0, characters=character_ids("FOX,FALCO"))
    kept, dropped = fox_falco.apply(rows)
    assert kept and all(any(r["characters"][i] in (2, 20) for i in s) for r, s in kept)
    assert dropped["characters"] == len(GOOD) - len(kept)
    eps = load_dataset(ds, filters=fox_falco)
    assert {ep["ids_character"][0, 0] for _, ep, _ in eps} <= {1, 22}  # Fox and Falco's in-game ids
    kept, dropped = Filters(humans_only=False, min_frames=0, min_damage=1.0).apply(rows)
    assert all(min(r["damage"]) >= 1 for r, _ in kept) and dropped["low_damage"] > 0
    with pytest.raises(ValueError, match="unknown character"):
        character_ids("FOX,NOBODY")


def test_training_data_reads_games_lazily_into_a_bounded_cache(prepared):
    from rwkv_torch.train.data import episodes_dataset

    ds, _ = prepared
    lazy = training_data(ds, episodes_dataset, filters=OPEN, cache_games=2)
    eager = episodes_dataset(load_dataset(ds, filters=OPEN), str(ds))
    assert [s.name for s in lazy.sequences] == [s.name for s in eager.sequences]
    assert (lazy.targets, lazy.ids, lazy.embed_dim) == (eager.targets, eager.ids, eager.embed_dim)
    cache = lazy.sequences[0].games.cache
    assert not cache or len(cache) == 1  # only the first game, read for the targets and ids
    for a, b in zip(lazy.sequences, eager.sequences):
        assert len(a) == len(b) and a.group == b.group and np.array_equal(a.x, b.x)
        assert all(np.array_equal(a.y[k], b.y[k]) for k in b.y)
        assert len(cache) <= 2


def test_training_from_the_dataset_equals_training_from_the_folder(prepared, tmp_path, monkeypatch):
    from rwkv_torch.train import train

    monkeypatch.setenv("RWKV_TORCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in GOOD:
        (folder / name).symlink_to(SLP / name)
    ds = tmp_path / "DS"
    prep.prepare_replays([folder], ds, workers=1, filters=OPEN, progress=False, log=None)
    opts = dict(hidden_size=32, num_layers=1, head_size=16, window_size=16, batch_size=4, steps=4, eval_every=4,
                eval_batches=1, progress=False, val_fraction=0.3, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = train(dict(opts, data=str(folder), out=str(tmp_path / "a")), sources=DATA_SOURCES)
        b = train(dict(opts, data=str(ds), out=str(tmp_path / "b")), sources=DATA_SOURCES)
        # interrupted, then --resume
        train(dict(opts, data=str(ds), out=str(tmp_path / "c"), stop_after=2), sources=DATA_SOURCES)
        c = train(dict(resume=str(tmp_path / "c"), steps=4, progress=False), sources=DATA_SOURCES)
    assert a["step"] == b["step"] == c["step"] == 4
    assert c["val_loss"] == b["val_loss"] and c["loss"] == b["loss"]  # the resumed run: the same windows, in order
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    import json

    keys = lambda r: {k: v for k, v in json.loads(r).items() if "loss" in k or "acc" in k}  # noqa: E731
    assert [keys(r) for r in la] == [keys(r) for r in lb] and keys(la[-1])


def test_sevenzip_without_the_extra_names_it(tmp_path, monkeypatch):
    (tmp_path / "a.7z").write_bytes(b"7z")
    monkeypatch.setitem(sys.modules, "py7zr", None)  # as if not installed
    with pytest.raises(ImportError, match=r"sevenzip.*py7zr"):
        prep.prepare_replays([tmp_path / "a.7z"], tmp_path / "DS", workers=1, progress=False, log=None)
