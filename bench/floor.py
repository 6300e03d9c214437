"""The storage floor of publish latency: Herald's own shard write, alone, at a fixed rate.

Every durable Herald publish is acknowledged after a :meth:`ShardStore.append`
whose WAL fsync has returned, so no publish->deliver latency can be below what
that append costs on the data disk. This measures exactly that, in the
benchmark's own process: a message with one pending entry due every 1/rate
s, open loop (latency from the scheduled time to the append's return), group
committed as a frontend does, on the same filesystem as the Herald under
test, with no network, no other process and no Python hop.

The figure goes beside the peers' in the latency table: of Herald's p99, this
much is the disk's; and a peer that acknowledges before its fsync (JetStream's
default) can be below it, which no fsync-before-ack system can.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Final, NamedTuple

from bench.harness import LatencyRecorder
from frontend.store import ShardStore, StoredMessage

STORE_FLOOR: Final = "store-floor"  # its system name in results and the report
STORE_FLOOR_LABEL: Final = "Herald's store alone (append + WAL fsync, no network)"
DURABILITY_STORE_FLOOR: Final = "fsync per group commit: the shard write a publish waits for, alone in the benchmark process"
FLOOR_SUBSCRIPTION: Final = 1  # one pending entry per message, as a topic with one subscription
FLOOR_RETENTION_S: Final = 3600
SPIN_NS: Final = 300_000  # the last stretch before a due time, spun rather than slept


class StoreFloor(NamedTuple):
    """What :func:`measure_store_floor` measured (warm-up excluded)."""

    latency: LatencyRecorder  # each message, from its scheduled time to its append's return
    appends: LatencyRecorder  # each append call alone (one per group commit)
    achieved_msg_per_s: float


def measure_store_floor(work_dir: Path, rate: int, seconds: float, warmup_s: float, size: int) -> StoreFloor:
    """Append a ``size``-byte message due every 1/``rate`` s for ``warmup_s`` + ``seconds``, fsync'd.

    What is due by the time the previous append returned goes in one append
    (group commit, as in a frontend), so the floor keeps up wherever one
    fsync per batch does. The last SPIN_NS before a due time are spent
    spinning rather than sleeping: a sleep's overshoot is this process's,
    not the store's.

    Args:
        work_dir: a folder on the filesystem to measure (a temporary shard is made and removed inside it).
    """
    root = Path(tempfile.mkdtemp(prefix="store-floor-", dir=work_dir))
    try:
        store = ShardStore(root / "shard")
        try:
            return _paced_appends(store, rate, seconds, warmup_s, size)
        finally:
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _paced_appends(store: ShardStore, rate: int, seconds: float, warmup_s: float, size: int) -> StoreFloor:
    payload = b"x" * size
    warmup = int(rate * warmup_s)
    count = warmup + max(1, int(rate * seconds))
    interval_ns = 1_000_000_000 // rate
    latency = LatencyRecorder()
    appends = LatencyRecorder()
    expire_ms = int((time.time() + FLOOR_RETENTION_S) * 1000)
    start = time.perf_counter_ns()
    measured_from = start + warmup * interval_ns
    index = 0
    while index < count:
        due = start + index * interval_ns
        wait = due - time.perf_counter_ns()
        if wait > SPIN_NS:
            time.sleep((wait - SPIN_NS) / 1e9)
        while time.perf_counter_ns() < due:
            pass
        # Group commit, as a frontend does: everything due by now shares one write and one fsync.
        began = time.perf_counter_ns()
        batch_end = min(count, max(index + 1, (began - start) // interval_ns + 1))
        messages = []
        for _ in range(index, batch_end):
            seq = store.next_seq()
            messages.append(StoredMessage(seq, "floor", f"floor-{seq}", {}, payload, time.time(), [FLOOR_SUBSCRIPTION], expire_ms))
        store.append(messages, [])
        done = time.perf_counter_ns()
        if batch_end > warmup:
            appends.record(done - began)
        for position in range(max(index, warmup), batch_end):
            latency.record(done - (start + position * interval_ns))
        index = batch_end
    elapsed_s = (time.perf_counter_ns() - measured_from) / 1e9
    return StoreFloor(latency, appends, (count - warmup) / elapsed_s if elapsed_s > 0 else 0.0)
