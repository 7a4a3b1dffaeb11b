"""The quality benchmarks (benchmarks/quality) run end to end in --quick mode and write finite, in-range results."""

import argparse
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


@pytest.fixture
def script(monkeypatch):
    """Import a benchmark script the way ``python benchmarks/quality/<name>.py`` does (its folder on sys.path)."""
    monkeypatch.syspath_prepend(str(QUALITY))
    n_threads = torch.get_num_threads()

    def load(name: str):
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(n_threads)
    for name in ("common", "recall", "lm", "control", "melee"):  # generic names: leave no trace in sys.modules
        sys.modules.pop(name, None)


def run(module, tmp_path) -> list:
    results = module.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    name = module.__name__
    assert (tmp_path / f"{name}.md").stat().st_size > 0
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 torch thread(s)" in (tmp_path / f"{name}.md").read_text()
    return results


def in_unit_range(x) -> bool:
    return math.isfinite(x) and 0.0 <= x <= 1.0


def test_recall_quick(script, tmp_path):
    results = run(script("recall"), tmp_path)
    assert [r["model"] for r in results] == ["rwkv7", "rwkv6", "rwkv4", "transformer", "lstm"]
    for r in results:
        assert r["acc"] and all(in_unit_range(a) for a in r["acc"].values())
        assert math.isfinite(r["final_loss"]) and r["params"] > 0


def test_lm_quick(script, tmp_path):
    results = run(script("lm"), tmp_path)
    assert [r["model"] for r in results] == ["rwkv7", "rwkv6", "rwkv4", "transformer", "lstm"]
    for r in results:
        assert 0.0 < r["val_bpb"] < 12.0 and 0.0 < r["train_bpb"] < 12.0
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        steps, seconds, bpb = zip(*r["curve"])
        assert steps[0] == 0 and list(steps) == sorted(steps) and list(seconds) == sorted(seconds)
        assert all(math.isfinite(b) for b in bpb)


def test_control_quick(script, tmp_path):
    results = run(script("control"), tmp_path)
    runs = {(r["model"], r["window"], r["carried"]) for r in results}
    assert ("rwkv7", 30, True) in runs and ("rwkv7", 30, False) in runs and ("transformer", 60, False) in runs
    for r in results:
        assert all(in_unit_range(a) for a in r["acc"].values()), r
        assert math.isfinite(r["loss"])


def test_control_task_targets(script):
    """The generated targets are what the task says: the class in flight is the type of the event that fired
    (its pattern is in that frame) plus 4 x the current mode, the impact comes 5-40 frames after the event, and the
    Bayes-optimal mode filter beats chance."""
    control = script("control")
    args = argparse.Namespace(seed=0, event_scale=6.0, mode_shift=0.25, dwell=200.0, gap=10.0)
    world = control.World(args)
    ep = world.episode(np.random.default_rng(0), 600, "ep")
    effect, flags, age, impact = ep.y["effect"], ep.y["flags"], ep.y["age"], ep.y["impact"]
    n = control.N_TYPES
    assert impact.sum() > 10 and ((effect > 0) == (age > 0)).all()
    assert ((effect[effect > 0] - 1) // n == flags[effect > 0, 0]).all()
    assert age[impact].min() >= control.MIN_DELAY and age[impact].max() <= control.MAX_DELAY
    fired = np.flatnonzero(effect > 0) - age[effect > 0]  # the frame each in-flight class points back to
    nearest = ((ep.x[fired, None, :8] - world.protos[None, :n]) ** 2).sum(-1).argmin(-1) + 1
    assert (nearest == (effect[effect > 0] - 1) % n + 1).mean() > 0.95
    assert flags[fired, 1].all()  # in flight from the event frame
    data = control.Dataset([ep], control.TARGETS, embed_dim=control.D)
    assert 0.6 < world.mode_ceiling(data) <= 1.0


def test_melee_quick(script, tmp_path):
    pytest.importorskip("peppi_py", reason="peppi-py (the melee extra) is not installed")
    melee = script("melee")
    results = run(melee, tmp_path)
    assert [(r["delay"], r["variant"]) for r in results] == [(d, v) for d in (1, 18) for v in ("copy", *melee.VARIANTS)]
    copy = results[0]["acc"]
    assert copy["acc_main_x"] > 0.8 and copy["chg_main_x"] == 0.0  # players hold the stick; changes are misses
    for r in results:
        if r["variant"] == "copy":
            continue
        assert r["steps"] == 3 and r["params"] > 0
        accs = [v for k, v in r["acc"].items() if k.startswith("acc_")]
        assert len(accs) == 6 and all(in_unit_range(a) for a in accs), r
        parts = [v for k, v in r["acc"].items() if k.startswith("nll_")]
        assert len(parts) == 6 and all(math.isfinite(v) and v > 0 for v in parts)
        assert r["acc"]["nll"] == pytest.approx(sum(parts))
