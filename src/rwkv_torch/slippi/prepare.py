"""``prepare_replays(sources, out)``: folders, ``.zip`` and ``.7z`` archives of ``.slp`` replays -> a dataset folder
(see ``dataset``), parsed in a process pool, resumable.

Each source file is one job: read (a zip member into a temporary file in ``$TMPDIR``, peppi-py reads paths only),
hash, parse, write its game file atomically, return its metadata row. The main process rewrites the metadata table
atomically every few seconds and at the end (also on Ctrl-C), so an interrupted run loses nothing it wrote: a game
file whose row did not reach the table is recovered from the file's own header on the next run, without parsing.
A source already in the table (same name, same size) is skipped. A broken file is a row with its reason.
"""

import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from .dataset import FORMAT_VERSION, Filters, game_header, read_metadata, write_game, write_metadata

SEVENZIP_EXTRA = "pip install 'rwkv-torch[sevenzip]' (or: pip install py7zr)"
FLUSH_SECONDS = 5.0


def _jobs(sources) -> list[dict]:
    """``[{source, size, path, member}]`` for every ``.slp`` under the sources (sorted within each source)."""
    jobs = []
    for src in sources:
        src = Path(src).absolute()  # the name a re-run from another folder recognises
        if src.is_dir():
            jobs += [dict(source=str(f), size=f.stat().st_size, path=str(f), member=None)
                     for f in sorted(src.rglob("*.slp")) if f.is_file()]
        elif src.suffix.lower() == ".zip" and src.is_file():
            try:
                with zipfile.ZipFile(src) as z:
                    jobs += [dict(source=f"{src}!{i.filename}", size=i.file_size, path=str(src), member=i.filename)
                             for i in sorted(z.infolist(), key=lambda i: i.filename)
                             if not i.is_dir() and i.filename.lower().endswith(".slp")]
            except zipfile.BadZipFile as e:
                raise ValueError(f"{src}: not a readable zip archive ({e})") from None
        elif src.suffix.lower() == ".7z" and src.is_file():
            jobs += _sevenzip_jobs(src)
        elif src.suffix.lower() == ".slp" and src.is_file():
            jobs.append(dict(source=str(src), size=src.stat().st_size, path=str(src), member=None))
        elif src.exists():
            raise ValueError(f"{src}: not a folder, .slp, .zip or .7z")
        else:
            raise ValueError(f"{src}: no such file or directory")
    return jobs


def _sevenzip():
    try:
        import py7zr
    except ImportError as e:
        raise ImportError(f"reading .7z archives needs py7zr, the `sevenzip` extra: {SEVENZIP_EXTRA}") from e
    return py7zr


def _sevenzip_jobs(src: Path) -> list[dict]:
    """The ``.slp`` members of a 7z archive (listed only; ``_unpack`` extracts those a run needs)."""
    py7zr = _sevenzip()
    try:
        z = py7zr.SevenZipFile(src)
    except py7zr.Bad7zFile as e:
        raise ValueError(f"{src}: not a readable 7z archive ({e})") from None
    with z:
        infos = sorted((i for i in z.list() if not i.is_directory and i.filename.lower().endswith(".slp")),
                       key=lambda i: i.filename)
    return [dict(source=f"{src}!{i.filename}", size=int(i.uncompressed), path=str(src), member=i.filename,
                 sevenzip=True) for i in infos]


def _unpack(todo: list, scratch: Path) -> None:
    """A 7z archive is solid (a member cannot be read alone cheaply): the members to parse are extracted in one
    pass into ``scratch`` (under ``$TMPDIR``, removed at the end) and read from there."""
    by_archive: dict = {}
    for j in todo:
        if j.get("sevenzip"):
            by_archive.setdefault(j["path"], []).append(j)
    for archive, jobs in by_archive.items():
        dest = scratch / hashlib.sha256(archive.encode()).hexdigest()[:16]
        with _sevenzip().SevenZipFile(archive) as z:
            z.extract(path=dest, targets=[j["member"] for j in jobs])
        for j in jobs:
            j.update(path=str(dest / j["member"]), member=None)


def _damage_dealt(replay) -> list[float]:
    """Percent each player dealt: the sum of the opponent's percent increases (a stock loss resets to 0)."""
    out = []
    for i in range(len(replay.players)):
        opp = replay.players[1 - i].leader["percent"].astype(np.float64)
        out.append(float(np.clip(np.diff(np.nan_to_num(opp)), 0, None).sum()))
    return out


def _winner(end, replay) -> int:
    """The winner's port: the end block's placement 0 when the file has one, else the only player with stocks
    left when the other has none; -1 when unknown (a quit-out, a timeout)."""
    for p in (end or {}).get("players") or []:
        if p.get("placement") == 0:
            return int(str(p["port"]).lstrip("P"))
    last = [int(p.leader["stocks"][-1]) for p in replay.players]
    if sorted(last)[0] == 0 and sorted(last)[1] > 0:
        return replay.players[int(np.argmax(last))].port
    return -1


def _row(job: dict, **kw) -> dict:
    row = dict(source=job["source"], size=job["size"], hash="", file="", status="error", reason="",
               format_version=FORMAT_VERSION, slippi_version="", num_players=0, ports=[], characters=[], types=[],
               names=[], codes=[], stage=-1, frames=0, winner=-1, damage=[], online=False, is_pal=False)
    row.update(kw)
    return row


_ZIPS: dict = {}  # per process: an archive's central directory is read once, not once per member


def _zip(path: str) -> zipfile.ZipFile:
    if path not in _ZIPS:
        _ZIPS[path] = zipfile.ZipFile(path)
    return _ZIPS[path]


def _process(job: dict, out: str, per_source: bool) -> dict:
    """One source file -> its metadata row (and its game file). Never raises for a bad replay."""
    tmp = None
    try:
        if job["member"] is not None:
            data = _zip(job["path"]).read(job["member"])
            fd, tmp = tempfile.mkstemp(suffix=".slp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            path = tmp
        else:
            path = job["path"]
            data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:32]
        key = hashlib.sha256((digest + job["source"]).encode()).hexdigest()[:32] if per_source else digest
        rel = f"games/{key[:2]}/{key}.parquet"
        game = Path(out) / rel
        if game.exists():  # written before (a duplicate, or a run interrupted before its table was saved)
            try:
                return _row(job, **{**game_header(game)["info"], "hash": digest, "file": rel})
            except (OSError, ValueError, KeyError):
                pass  # unreadable header: parse again
        return _parse(job, path, digest, rel, game)
    except OSError as e:
        return _row(job, reason=f"unreadable file ({e})")
    except zipfile.BadZipFile as e:
        return _row(job, reason=f"bad zip member ({e})")
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _parse(job: dict, path: str, digest: str, rel: str, game: Path) -> dict:
    from .parse import peppi_modules, read_replay

    raw, Start, dc_from_json = peppi_modules()
    try:
        head = raw.read_slippi(path, True)
        start = dc_from_json(Start, head.start)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # peppi raises OSError, pyo3 panics are BaseExceptions
        return _row(job, hash=digest, reason=f"not a readable Slippi replay (peppi-py: {str(e).strip() or e!r})")
    players = sorted(start.players, key=lambda p: int(p.port))
    net = [p.netplay for p in players]
    info = dict(slippi_version=".".join(map(str, start.slippi.version)), num_players=len(players),
                ports=[int(p.port) + 1 for p in players], characters=[int(p.character) for p in players],
                types=[{0: "human", 1: "cpu"}.get(int(p.type), "demo") for p in players],
                names=[(n.name if n else "") or (p.name_tag or "") for p, n in zip(players, net)],
                codes=[(n.code if n else "") or "" for n in net], stage=int(start.stage),
                online=any(n is not None and n.code for n in net), is_pal=bool(start.is_pal))
    if len(players) != 2:
        return _row(job, hash=digest, status="not_1v1", reason=f"{len(players)} players", **info)
    try:
        replay = read_replay(path)
    except ValueError as e:
        return _row(job, hash=digest, reason=str(e).replace(path, job["source"]), **info)
    info.update(frames=len(replay.frame_ids), winner=_winner(head.end, replay), damage=_damage_dealt(replay),
                status="ok")
    write_game(game, replay, info)
    return _row(job, hash=digest, file=rel, **info)


def prepare_replays(sources, out, workers: int | None = None, filters: Filters | None = None,
                    progress: bool = True, per_source_files: bool = False, log=print) -> dict:
    """Parse every ``.slp`` of ``sources`` into the dataset ``out``; returns the summary (also printed by ``log``).

    ``workers``: processes (default: the cores; 1 parses in this process). ``filters`` are saved with the dataset
    (training applies them) and reported here. ``per_source_files``: one game file per source even for identical
    contents (benchmarks); by default identical contents share one file, keyed by their hash.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    filters = Filters() if filters is None else filters
    workers = max(1, workers or os.cpu_count() or 1)
    scratch = Path(tempfile.mkdtemp(prefix="rwkv-prepare-"))
    try:
        jobs = _jobs(sources)
        done = {r["source"]: r for r in read_metadata(out)}
        todo = [j for j in jobs if done.get(j["source"], {}).get("size") != j["size"]]
        _unpack(todo, scratch)
        rows, t0 = dict(done), time.perf_counter()
        frames = _run(todo, out, workers, per_source_files, rows, progress)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for z in _ZIPS.values():  # (workers=1 read them here)
            z.close()
        _ZIPS.clear()
    filters.save(out)
    kept, dropped = filters.apply(list(rows.values()))
    new = [rows[j["source"]] for j in todo]
    summary = dict(sources=len(jobs), skipped=len(jobs) - len(todo), parsed=len(todo),
                   ok=sum(r["status"] == "ok" for r in new), refused=sum(r["status"] != "ok" for r in new),
                   frames=frames, seconds=round(seconds, 3), games_per_s=round(len(todo) / max(seconds, 1e-9), 1),
                   frames_per_s=round(frames / max(seconds, 1e-9)), workers=workers, dataset_games=len(rows),
                   kept=len(kept), dropped=dropped, bytes=sum(f.stat().st_size for f in out.rglob("*.parquet")))
    if log is not None:
        log(f"{out}: {summary['parsed']} parsed ({summary['ok']} ok, {summary['refused']} refused), "
            f"{summary['skipped']} already done; {frames} frames in {seconds:.1f} s ({summary['games_per_s']} "
            f"games/s, {summary['frames_per_s']} frames/s, {workers} workers)")
        log(f"filters {filters}: {len(kept)} of {len(rows)} games kept; dropped per rule: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items()))
        for r in new:
            if r["status"] != "ok":
                log(f"  refused {r['source']}: {r['reason']}")
    return summary


def _worker_init() -> None:
    """Workers ignore Ctrl-C: the main process handles it (it cancels what has not started and saves the rest)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(todo: list, out: Path, workers: int, per_source: bool, rows: dict, progress: bool) -> int:
    """Parse ``todo`` into ``rows`` (by source), flushing the table every ``FLUSH_SECONDS`` and on any exit."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="prepare", unit="game", disable=not progress or not todo, smoothing=0.1)
    frames, last = 0, time.perf_counter()

    def take(row):
        nonlocal frames, last
        rows[row["source"]] = row
        frames += row["frames"]
        bar.update(1)
        bar.set_postfix_str(f"{frames / max(bar.format_dict['elapsed'], 1e-9):,.0f} frames/s", refresh=False)
        if time.perf_counter() - last > max(FLUSH_SECONDS, len(rows) / 20_000):  # a rewrite stays a small share
            write_metadata(out, list(rows.values()))
            last = time.perf_counter()

    try:
        if workers == 1:
            for job in todo:
                take(_process(job, str(out), per_source))
        else:
            with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
                pending, it = set(), iter(todo)
                try:
                    while True:
                        while len(pending) < 4 * workers:
                            job = next(it, None)
                            if job is None:
                                break
                            pending.add(pool.submit(_process, job, str(out), per_source))
                        if not pending:
                            break
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            take(f.result())
                except BaseException:  # Ctrl-C: the running jobs finish (their rows are kept), the rest are dropped
                    pool.shutdown(wait=True, cancel_futures=True)
                    for f in pending:
                        if f.done() and not f.cancelled() and f.exception() is None:
                            take(f.result())
                    raise
    finally:
        bar.close()
        write_metadata(out, list(rows.values()))
    return frames


def add_parser(sub) -> None:
    """The ``prepare-replays`` subcommand (``cli.COMMANDS``' table holds this function)."""
    import argparse

    p = sub.add_parser("prepare-replays", help="parse folders / .zip / .7z of .slp replays into a training dataset")
    a = p.add_argument
    a("sources", nargs="*", help="folders (searched recursively), .zip or .7z archives, .slp files")
    a("--out", required=True, help="the dataset folder (created; a re-run skips the files it already holds)")
    a("--workers", type=int, default=None, help="parser processes (default: the cores)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    d = Filters()
    f = p.add_argument_group("filters (saved with the dataset, applied when training from it)").add_argument
    f("--one-v-one", action=argparse.BooleanOptionalAction, default=d.one_v_one, help="1v1 games only (default on)")
    f("--humans-only", action=argparse.BooleanOptionalAction, default=d.humans_only,
      help="drop games with a CPU player (default on)")
    f("--min-frames", type=int, default=d.min_frames, help=f"drop games shorter than this (default {d.min_frames})")
    f("--dedup", action=argparse.BooleanOptionalAction, default=d.dedup,
      help="drop games whose content hash was seen before (default on)")
    f("--min-damage", type=float, default=d.min_damage,
      help="each player must deal at least this much percent (default 0: off)")
    f("--characters", default=None, help="e.g. FOX,FALCO: train on the sides these characters play (default: all)")

    def call(args):
        from .dataset import character_ids

        filters = Filters(args.one_v_one, args.humans_only, args.min_frames, args.dedup, args.min_damage,
                          character_ids(args.characters))
        return prepare_replays(args.sources, args.out, args.workers, filters, args.progress)

    p.set_defaults(call=call, ok=lambda r: True, errors=(ValueError, ImportError, FileNotFoundError))
