"""A shard's WAL files are recycled (frontend/store.py RECYCLED_WAL_FILES): after a crash, the
records still in a recycled file from its earlier life must not come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from frontend.store import ShardStore
from tests.conftest import PROJECT_ROOT

# Run in a child that is SIGKILLed once it has written, as a crashed frontend would be.
WRITER = r"""
import sys, time
from pathlib import Path
from frontend.store import DedupEntry, ShardStore, StoredMessage

store = ShardStore(Path(sys.argv[1]), sync=True)

def append(count, subs):
    messages = [StoredMessage(store.next_seq(), "t", f"m-{store.last_seq}", {}, b"p" * 200, 0.0, subs, 2**40) for _ in range(count)]
    store.append(messages, [DedupEntry("t", m.message_id, 2**40, m.seq) for m in messages])
    return [m.seq for m in messages]

def wal_sizes():
    return {p.name: p.stat().st_size for p in Path(sys.argv[1]).glob("*.log")}

first = append(300, [1, 2])
first_wal_bytes = max(wal_sizes().values())
store._db.flush()  # the memtable goes to a table file; the WAL that held it becomes obsolete, kept for recycling
second = append(300, [1, 2])
store._db.flush()  # the next WAL is the first one written over
third = append(1, [1, 2])
current = max(wal_sizes().items(), key=lambda item: int(item[0].split(".")[0]))
# Settle, in the recycled file, entries whose puts are records of its earlier life.
store.complete([(1, seq) for seq in first])
store.complete([(1, seq) for seq in second[:100]] + [(2, seq) for seq in second[:100]])
fourth = append(50, [1, 2])  # fsync'd: the settles above are in the WAL before it
print("recycled" if current[1] >= first_wal_bytes else f"not recycled: {current} after {first_wal_bytes}", first[0], second[0], third[0], fourth[0], flush=True)
time.sleep(60)
"""


def test_a_recycled_wal_replays_only_its_own_records_after_a_crash(tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(shard)], stdout=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert line and line[0] == "recycled", line  # else this test proves nothing about recycling
    first, second, third, fourth = (int(seq) for seq in line[1:])

    store = ShardStore(shard, sync=True)
    try:
        assert store.last_seq == fourth + 49
        # Subscription 1 settled the first 300 and the next 100; none of it is pending again.
        assert [seq for seq, _ in store.pending(1, 0, 10_000)] == [*range(second + 100, second + 300), third, *range(fourth, fourth + 50)]
        assert [seq for seq, _ in store.pending(2, 0, 10_000)] == [
            *range(first, first + 300),
            *range(second + 100, second + 300),
            third,
            *range(fourth, fourth + 50),
        ]
        # Settled by both, so deleted: the body stays gone.
        assert store.read_messages(list(range(second, second + 100))) == [None] * 100
        assert all(message is not None for message in store.read_messages([first, second + 100, third, fourth + 49]))
    finally:
        store.close()
