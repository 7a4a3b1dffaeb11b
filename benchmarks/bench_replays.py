"""Replay datasets at scale: ``prepare-replays`` throughput, dataset size, loader speed and resident memory.

    python benchmarks/bench_replays.py [--games 1000] [--replays tests/data/slippi] [--no-trainer]
    python benchmarks/bench_replays.py --games 10000          # the full run (about 10x the default's time)

The games are copies of the readable replays of ``--replays`` under distinct names (symbolic links, so the copies
cost no disk), prepared with one game file per source (``per_source_files``: every copy is parsed and written, as
distinct games would be; the dedup filter is off). Rows:

* prepare on 1 and 2 workers: games/s and frames/s, end to end (read, hash, parse, write the game file and table);
  features are computed when training reads the data, so they are in the loader row, not here;
* bytes per frame of the game files (each file has a fixed ~7 KB footer: short test replays pay more per frame than
  real games of 5,000-10,000 frames);
* loader frames/s: every game read from its file and featurized (both sides), frames of player sides per second,
  against the frames/s a C256 L6 RWKV-7 step at batch 64 x window 60 consumes on this machine (``--no-trainer``
  skips timing that step);
* resident memory (VmRSS, in a fresh process: ``train.data.load_data`` on a dataset of the first K games, then 200
  stateful batches of 16 x 60 walked through ``make_batch``) at 100, 1,000 and ``--games`` games.
Nothing is installed; everything is written under a temporary folder that is removed at the end.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from rwkv_torch.slippi.dataset import META_FILE, Filters, read_metadata, write_metadata  # noqa: E402
from rwkv_torch.slippi.prepare import prepare_replays  # noqa: E402

MEMORY_PROBE = """
import json, resource, sys
from rwkv_torch.slippi import DATA_SOURCES
from rwkv_torch.train.data import load_data, make_batch, window_plans
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
data = load_data(sys.argv[1], progress=False, sources=DATA_SOURCES)
before = rss()
plans = window_plans([len(s) for s in data.sequences], 60, 60, 16, 0)
for _ in range(200):
    make_batch(data, next(plans), 60)
print(json.dumps(dict(sequences=len(data.sequences), loaded_mb=before, after_batches_mb=rss(),
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def copies(replays: Path, n: int, into: Path) -> list:
    """``n`` symbolic links to the readable replays of ``replays``, round robin, under distinct names."""
    from rwkv_torch.slippi.parse import read_replay

    good = []
    for f in sorted(replays.glob("*.slp")):
        try:
            read_replay(f)
            good.append(f.resolve())
        except ValueError:
            pass
    into.mkdir(parents=True)
    for i in range(n):
        (into / f"game{i:06d}.slp").symlink_to(good[i % len(good)])
    return good


def prepare_row(src: Path, out: Path, workers: int) -> dict:
    s = prepare_replays([src], out, workers, Filters(min_frames=0, humans_only=False, dedup=False), progress=False,
                        per_source_files=True, log=None)
    print(f"prepare, {workers} worker{'s' * (workers > 1)}: {s['parsed']} games, {s['frames']} frames in "
          f"{s['seconds']:.1f} s: {s['games_per_s']:,.0f} games/s, {s['frames_per_s']:,.0f} frames/s")
    return s


def loader_row(ds: Path) -> float:
    from rwkv_torch.slippi import DATA_SOURCES
    from rwkv_torch.train.data import load_data

    data = load_data(ds, progress=False, sources=DATA_SOURCES)
    t0, frames = time.perf_counter(), 0
    for s in data.sequences:  # each game read and featurized once (its two sides come from one read)
        frames += len(s.x) + 0 * len(s.y["buttons"])
    seconds = time.perf_counter() - t0
    print(f"loader: {len(data.sequences)} sides, {frames:,} frames in {seconds:.1f} s: {frames / seconds:,.0f} "
          f"frames/s (read + features + targets)")
    return frames / seconds


def trainer_frames_per_s(embed: int) -> float:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import batch, build, step_fn, timed

    task = build("rwkv7", 60, embed)
    step = step_fn(task, *batch(64, 60, embed))
    step()  # warm-up
    seconds = sorted(timed(step) for _ in range(3))[1]
    print(f"trainer: C256 L6 RWKV-7 step at batch 64 x 60 ({embed} features, {torch.get_num_threads()} threads): "
          f"{seconds:.2f} s, {64 * 60 / seconds:,.0f} frames/s consumed")
    return 64 * 60 / seconds


def subset(ds: Path, k: int, into: Path) -> Path:
    """A dataset of the first ``k`` games of ``ds`` (its own table, the game files shared by a link)."""
    into.mkdir()
    rows = sorted(read_metadata(ds), key=lambda r: r["source"])[:k]
    write_metadata(into, rows)
    shutil.copy(ds / "filters.json", into / "filters.json")
    (into / "games").symlink_to(ds / "games")
    return into


def memory_row(ds: Path, k: int, tmp: Path) -> dict:
    sub = subset(ds, k, tmp / f"sub{k}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(sub)], env=env, capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"memory, {k} games ({r['sequences']} sides): {r['loaded_mb']:.0f} MB loaded, "
          f"{r['after_batches_mb']:.0f} MB after 200 batches, peak {r['peak_mb']:.0f} MB")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--games", type=int, default=1000, help="games in the dataset (default 1000; the goal: 10000)")
    ap.add_argument("--replays", default=str(ROOT / "tests" / "data" / "slippi"), help="the replays to copy")
    ap.add_argument("--no-trainer", action="store_true", help="skip timing the C256 L6 training step")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-replays-"))
    try:
        src = tmp / "replays"
        good = copies(Path(args.replays), args.games, src)
        print(f"{args.games} games: copies of {len(good)} replays of {args.replays}")
        one = prepare_row(src, tmp / "ds1", 1)
        two = prepare_row(src, tmp / "ds2", 2)
        print(f"2 workers / 1: {two['frames_per_s'] / max(one['frames_per_s'], 1):.2f}x")
        ds = tmp / "ds2"
        games = sum(1 for _ in (ds / "games").rglob("*.parquet"))
        print(f"dataset: {two['bytes'] - (ds / META_FILE).stat().st_size:,} bytes of game files for {two['frames']:,}"
              f" frames: {(two['bytes'] - (ds / META_FILE).stat().st_size) / two['frames']:.1f} bytes/frame "
              f"({games} files)")
        loader = loader_row(ds)
        if not args.no_trainer:
            consumed = trainer_frames_per_s(123)  # 113 float features + 10 id columns
            print(f"loader / trainer: {loader / consumed:.1f}x")
        mem = [memory_row(ds, k, tmp) for k in sorted({min(100, args.games), min(1000, args.games), args.games})]
        print(f"memory {mem[-1]['sequences']} / {mem[0]['sequences']} sides: "
              f"{mem[-1]['after_batches_mb'] / mem[0]['after_batches_mb']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
