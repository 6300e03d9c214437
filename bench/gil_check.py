"""Does a durable RocksDB write let other Python threads run while it fsyncs?

Usage::

    python -m bench.gil_check [--seconds 1.0]

A thread appends one small batch after another, durably, in each of two ways:
``write(sync=True)``, and ``write(sync=False)`` followed by ``flush_wal(True)``
(what ``frontend.store.ShardStore.append`` does), the latter also with the
frontend's GIL switch interval. Meanwhile the main thread counts in a
pure-Python loop. Its count relative to a run alone is the share of time the
appending thread left it the GIL: near 1 when the fsync runs with the GIL
released, near 0.5 when it does not (the two then take turns). The appends per
second show the other side: a thread that released the GIL must wait for it
back, up to the switch interval.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from frontend.server import GIL_SWITCH_INTERVAL_S

MODES = ("write(sync=True)", "write + flush_wal(True)")


def count_for(seconds: float) -> int:
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def measure(db: Rdict, mode: str, seconds: float, alone: int) -> tuple[float, int]:
    """(main thread's share of its solo count, durable appends per second) for ``mode``."""
    synced, lazy = WriteOptions(), WriteOptions()
    synced.sync, lazy.sync = True, False
    stop = threading.Event()
    appends = 0

    def append() -> None:
        nonlocal appends
        key = 0
        while not stop.is_set():
            key += 1
            batch = WriteBatch(raw_mode=True)
            batch.put(key.to_bytes(8, "big"), b"x" * 100)
            if mode == MODES[0]:
                db.write(batch, synced)
            else:
                db.write(batch, lazy)
                db.flush_wal(True)
            appends += 1

    thread = threading.Thread(target=append)
    thread.start()
    counted = count_for(seconds)
    stop.set()
    thread.join()
    return counted / alone, round(appends / seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gil_check", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each measurement (default 1.0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        db = Rdict(str(Path(folder) / "db"), options)
        try:
            alone = count_for(args.seconds)
            default_interval = sys.getswitchinterval()
            for mode, interval in ((MODES[0], default_interval), (MODES[1], default_interval), (MODES[1], GIL_SWITCH_INTERVAL_S)):
                sys.setswitchinterval(interval)
                share, rate = measure(db, mode, args.seconds, alone)
                label = f"{mode}, switch {interval * 1000:g} ms"
                print(f"{label:42s} main thread ran at {share:.2f} of its speed alone; {rate} durable appends/s")
            sys.setswitchinterval(default_interval)
        finally:
            db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
