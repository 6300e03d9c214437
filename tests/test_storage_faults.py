"""Storage faults: a full disk, an unwritable data folder and a failed WAL fsync.

A full disk must give the publisher a clear ``storage_failed`` error, never a
false acknowledgement and never a crash; once space is back, publishing works
again without a restart and everything acknowledged is there. A data folder
that cannot be written stops ``herald up`` at once with the reason.

The full-disk test puts the data folder on a small tmpfs, which needs the right
to mount (root in the CI container); without it the test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import Client, HeraldError, Message, PublishId, Subscription
from clients.protocol import shard_of
from frontend.store import ShardStore, StorageError, StoredMessage
from tests.conftest import PROJECT_ROOT, HeraldSystem, health, preload_fsync_shim, stored_messages, wait_for

PAYLOAD_BYTES = 256 * 1024


def _mount(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", *args], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards (after the system using it has stopped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = _mount(["-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)])
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _receive_all(subscription: Subscription, acked: list[str]) -> set[str]:
    """Read and acknowledge until every id in ``acked`` has arrived (or fail after 60 s); the ids received."""
    received: set[str] = set()

    def all_received() -> bool:
        message = subscription.receive(timeout=1)
        while message is not None:
            received.add(message.id)
            message.ack_nowait()
            message = subscription.receive(timeout=0.05)
        return set(acked) <= received

    wait_for(all_received, timeout=60, interval=0, message="every acknowledged message delivered")
    return received


def _running(herald: HeraldSystem) -> bool:
    return all(child["running"] for child in herald.status()["children"])


def test_full_disk_refuses_publishes_then_recovers_without_restart(herald_factory: Callable[..., HeraldSystem], small_disk: Path) -> None:
    herald = herald_factory("--metrics-port", "0", data_dir=small_disk / "data")
    health_url = herald.status()["metrics"].replace("/metrics", "/health")
    acked: list[str] = []
    refusal: HeraldError | None = None
    with Client(herald.endpoint, timeout=3.0) as client:
        client.create_topic("big")
        client.create_subscription("big", "big-reader")
        client.create_subscription("big", "big-spare")
        # Random bytes: RocksDB compresses, so repeated bytes would never fill the disk.
        for _ in range(400):
            try:
                acked.extend(client.publish_batch("big", [os.urandom(PAYLOAD_BYTES) for _ in range(2)]))
            except HeraldError as error:
                refusal = error
                break
        assert refusal is not None, "a 24 MiB disk took 200 MiB of publishes"
        assert refusal.code == "storage_failed", refusal
        assert "No space left" in refusal.message
        assert acked, "something was stored before the disk filled"
        # Every process runs, but /health says the volume is why nothing is stored.
        status, body = health(health_url)
        assert status == 503 and body["data_volume"]["state"].startswith("low: 0 MiB free"), body
        # Every process still runs; reads keep working on a full disk.
        assert client.describe_topic("big")["name"] == "big"
        # Deleted on the full disk: its backlog's purge cannot be written, and is tried again until it can.
        # (The log and the metric snapshots are on the full disk too: the owner's STATUS tells.)
        owner = shard_of("big", 2)

        def owner_statistics() -> dict[str, Any]:
            return wait_for(lambda: (found := client.status()).get("frontend") == owner and found, interval=0.01, message="the owner answered STATUS")

        failures_before = owner_statistics()["storage_failures"]
        client.delete_subscription("big-spare")
        wait_for(
            lambda: (stats := owner_statistics())["purging"] == 1 and stats["storage_failures"] > failures_before + 1,
            timeout=30,
            message="the purge failed on the full disk, and was tried again",
        )
        # Space comes back: the same shard takes writes again, no restart needed.
        assert _mount(["-o", "remount,size=256m", str(small_disk)]).returncode == 0

        def publishes() -> bool:
            try:
                acked.extend(client.publish_batch("big", [os.urandom(1024)]))
            except HeraldError as error:
                assert error.code in ("storage_failed", "timeout"), error
                return False
            return True

        wait_for(publishes, timeout=60, interval=0.5, message="publishing works again once space is back")
        wait_for(lambda: health(health_url)[0] == 200, timeout=15, interval=0.5, message="healthy again once space is back")
        wait_for(
            lambda: (stats := owner_statistics())["purging"] == 0 and stats["purged"] > 0,
            timeout=30,
            interval=0.5,
            message="the purge went on by itself once there was room",
        )
        with client.subscribe("big", "big-reader") as subscription:
            received = _receive_all(subscription, acked)
    assert _running(herald), herald.status()
    assert all(child["restarts"] == 0 for child in herald.status()["children"]), herald.status()
    assert herald.stop() == 0
    assert set(acked) <= {m.message_id for m in stored_messages(herald.data_dir)} | received


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_unusable_data_folder_fails_fast_with_the_reason(tmp_path: Path, kind: str) -> None:
    if kind == "under_a_file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        data_dir = blocker / "data"
        reason = "Not a directory"
    else:
        mount_point = tmp_path / "ro"
        mount_point.mkdir()
        result = _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)])
        if result.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {result.stderr.decode().strip()}")
        data_dir = mount_point / "data"
        reason = "Read-only file system"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "broker.launcher", "--data-dir", str(data_dir), "--port", "0"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
        )
    finally:
        if kind == "read_only":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True, timeout=30)
    assert result.returncode == 2, result.stderr
    message = result.stderr.decode()
    assert f"data folder {data_dir} is not usable: {reason}" in message, message
    assert "Traceback" not in message


class _WalSyncFails:
    """A shard's RocksDB handle whose WAL fsync fails, as on an EIO from the disk; everything else is the real database."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.failing = True

    def flush_wal(self, sync: bool) -> None:
        if self.failing:
            raise OSError("IO error: fdatasync: Input/output error")
        self._db.flush_wal(sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_failed_wal_fsync_refuses_every_later_append(tmp_path: Path) -> None:
    """After an fsync failure the written batch is readable but maybe not on disk, and the kernel may have dropped its
    pages: nothing appended later may be acknowledged as durable, even once fsync works again, until a restart."""
    store = ShardStore(tmp_path / "shard")
    try:
        store.append([_message(store, "before")], [])
        durable_before = store.durable_seq
        handle = _WalSyncFails(store._db)
        store._db = handle  # type: ignore[assignment]
        with pytest.raises(StorageError, match="Input/output error"):
            store.append([_message(store, "lost")], [])
        assert store.sync_failed is not None
        assert store.durable_seq == durable_before, "a batch whose fsync failed must not become scannable"
        handle.failing = False
        with pytest.raises(StorageError, match="an earlier fsync of the WAL failed"):
            store.append([_message(store, "after")], [])
        assert [seq for seq, _ in store.pending(_SUBSCRIPTION, 0, 10)] == [durable_before]
    finally:
        store.close()


class _WalSyncWaits:
    """A shard's RocksDB handle whose WAL fsync waits until released, as a slow disk would; otherwise the real database."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.syncing = threading.Event()
        self.release = threading.Event()

    def flush_wal(self, sync: bool) -> None:
        self.syncing.set()
        self.release.wait(timeout=30)
        self._db.flush_wal(sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_backlog_scans_skip_a_batch_whose_fsync_has_not_returned(tmp_path: Path) -> None:
    """The batch is readable once written, before its fsync ends; a backlog scan must not hand it out until then."""
    store = ShardStore(tmp_path / "shard")
    try:
        store.append([_message(store, "durable")], [])
        durable = store.durable_seq
        handle = _WalSyncWaits(store._db)
        store._db = handle  # type: ignore[assignment]
        in_flight = [_message(store, "in-flight")]
        writer = threading.Thread(target=store.append, args=(in_flight, []))
        writer.start()
        try:
            assert handle.syncing.wait(timeout=10), "the append never reached its fsync"
            assert store.read_message(in_flight[0].seq) is not None, "the written batch should already be readable"
            assert [seq for seq, _ in store.pending(_SUBSCRIPTION, 0, 10)] == [durable]
        finally:
            handle.release.set()
            writer.join(timeout=10)
        assert [seq for seq, _ in store.pending(_SUBSCRIPTION, 0, 10)] == [durable, in_flight[0].seq]
    finally:
        store.close()


def test_one_fsync_makes_every_batch_written_before_it_durable(tmp_path: Path) -> None:
    """The frontend writes a batch while earlier ones wait for their fsync: a scan sees none of them until an fsync
    that started after the last write returns, and then sees all of them."""
    store = ShardStore(tmp_path / "shard")
    try:
        first = [_message(store, "first")]
        second = [_message(store, "second")]
        store.write(first, [])
        last = store.write(second, [])
        assert store.pending(_SUBSCRIPTION, 0, 10) == []
        store.make_durable(last)
        assert [seq for seq, _ in store.pending(_SUBSCRIPTION, 0, 10)] == [first[0].seq, second[0].seq]
        assert store.finished_seq == store.durable_seq == last
    finally:
        store.close()


def test_a_batch_written_before_a_failed_fsync_is_never_made_durable_later(tmp_path: Path) -> None:
    """After an fsync fails, a later fsync call (for a batch written before the failure was known) must fail too,
    even if the disk answers again: its pages may be the ones the kernel dropped."""
    store = ShardStore(tmp_path / "shard")
    try:
        store.append([_message(store, "before")], [])
        durable_before = store.durable_seq
        handle = _WalSyncFails(store._db)
        store._db = handle  # type: ignore[assignment]
        first = store.write([_message(store, "first")], [])
        second = store.write([_message(store, "second")], [])
        with pytest.raises(StorageError, match="Input/output error"):
            store.make_durable(first)
        handle.failing = False
        with pytest.raises(StorageError, match="an earlier fsync of the WAL failed"):
            store.make_durable(second)
        assert store.durable_seq == durable_before
    finally:
        store.close()


def test_a_refused_write_behind_unsynced_ones_is_over_only_once_they_are_durable(tmp_path: Path) -> None:
    """finished_seq promises that every batch up to it that was written is visible to scans (a purge ends on it):
    a refused write must not move it past a batch still waiting for its fsync."""
    store = ShardStore(tmp_path / "shard")
    try:
        unsynced = store.write([_message(store, "unsynced")], [])
        refused = [_message(store, "refused")]
        real_write = store._write

        def full_disk(batch: Any, options: Any) -> None:
            raise StorageError("IO error: No space left on device")

        store._write = full_disk  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="No space left"):
            store.write(refused, [])
        store._write = real_write  # type: ignore[method-assign]
        assert store.finished_seq < unsynced, "the refused write passed a batch whose fsync has not returned"
        store.make_durable(unsynced)
        assert store.finished_seq == refused[0].seq
    finally:
        store.close()


_SUBSCRIPTION = 7


def _message(store: ShardStore, message_id: str) -> StoredMessage:
    return StoredMessage(store.next_seq(), "topic", message_id, {}, b"payload", time.time(), [_SUBSCRIPTION], int((time.time() + 60) * 1000))


def _fsync_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, name: str) -> Path:
    """LD_PRELOAD tests/fail_wal_fsync.c into every Herald process started afterwards, and point the
    shim's ``variable`` at ``tmp_path / name``: the file a test creates to act."""
    preload_fsync_shim(tmp_path, monkeypatch)
    trigger = tmp_path / name
    monkeypatch.setenv(variable, str(trigger))
    return trigger


@pytest.fixture
def fail_one_wal_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file to create: then the next fsync of a frontend's WAL fails with EIO, once."""
    return _fsync_shim(tmp_path, monkeypatch, "HERALD_TEST_FSYNC_FAIL_TRIGGER", "fail-next-wal-fsync")


@pytest.fixture
def hold_wal_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file to create: while it exists, every fsync of a frontend's WAL waits (a written batch stays not yet durable)."""
    return _fsync_shim(tmp_path, monkeypatch, "HERALD_TEST_FSYNC_HOLD", "hold-wal-fsyncs")


def test_a_failed_wal_fsync_restarts_the_frontend_and_loses_nothing_acknowledged(herald_factory: Callable[..., HeraldSystem], fail_one_wal_fsync: Path) -> None:
    """A real EIO from fdatasync on a frontend's WAL: that batch is refused, the frontend exits and is restarted, the
    client's retry with the same ids is stored, and everything acknowledged is delivered."""
    herald = herald_factory()
    with Client(herald.endpoint, timeout=20) as client:
        client.create_topic("synced")
        client.create_subscription("synced", "reader")
        acked = list(client.publish_batch("synced", [(b"before", None, f"before-{n}") for n in range(20)]))
        fail_one_wal_fsync.touch()
        # Refused with storage_failed, which the client retries (same ids) until the restarted frontend takes it.
        acked.extend(client.publish_batch("synced", [(b"during", None, f"during-{n}") for n in range(20)]))
        assert not fail_one_wal_fsync.exists(), "the shim never saw a WAL fsync"
        acked.extend(client.publish_batch("synced", [(b"after", None, f"after-{n}") for n in range(20)]))
        assert client.statistics().retries >= 1, "the refused batch was never retried"
    log = herald.log_path.read_text(errors="replace")
    assert "could not be fsync'd" in log and "exited with code 1; restarting" in log, log[-3000:]
    assert sorted(acked) == sorted(f"{phase}-{n}" for phase in ("before", "during", "after") for n in range(20))
    with Client(herald.endpoint) as client, client.subscribe("synced", "reader") as subscription:
        _receive_all(subscription, acked)


def test_a_failed_wal_fsync_after_early_delivery_loses_nothing_acknowledged(herald_factory: Callable[..., HeraldSystem], fail_one_wal_fsync: Path) -> None:
    """Delivery starts before the fsync: with a consumer attached, the batch whose fsync fails may already have been
    delivered. Its publishes are still refused, the retry stores them, every acknowledged id arrives, and nothing
    arrives that was never published."""
    herald = herald_factory()
    published = {f"{phase}-{n}" for phase in ("before", "during", "after") for n in range(20)}
    with Client(herald.endpoint, timeout=20) as client, Client(herald.endpoint) as reader:
        client.create_topic("early")
        client.create_subscription("early", "reader")
        with reader.subscribe("early", "reader") as subscription:
            acked = list(client.publish_batch("early", [(b"before", None, f"before-{n}") for n in range(20)]))
            received = _receive_all(subscription, acked)  # the consumer is attached and has credit: the fast path
            fail_one_wal_fsync.touch()
            acked.extend(client.publish_batch("early", [(b"during", None, f"during-{n}") for n in range(20)]))
            assert not fail_one_wal_fsync.exists(), "the shim never saw a WAL fsync"
            acked.extend(client.publish_batch("early", [(b"after", None, f"after-{n}") for n in range(20)]))
            assert client.statistics().retries >= 1, "the refused batch was never retried"
            received |= _receive_all(subscription, acked[20:])  # the first 20 arrived above; acknowledged, they do not come again
    log = herald.log_path.read_text(errors="replace")
    assert "could not be fsync'd" in log and "exited with code 1; restarting" in log, log[-3000:]
    assert sorted(acked) == sorted(published)
    assert received <= published, f"delivered ids that were never published: {sorted(received - published)[:5]}"


def test_a_message_dead_lettered_before_its_batch_is_durable_is_copied(herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path) -> None:
    """Delivery starts before the fsync, so a message can run out of attempts while its own batch is still being
    fsync'd. The DEAD that follows must find its pending entry (a backlog scan cannot see it yet) and copy it to the
    dead-letter topic, not take it for settled: every message is copied once the fsync returns, and none comes back."""
    from broker.metrics import read_snapshots
    from clients.protocol import shard_of

    herald = herald_factory()
    topic, name, count = "dead.early", "dead.early.sub", 32
    dead_topic = f"{name}.dead"
    sender = f"sender-{shard_of(name, 2)}"
    with Client(herald.endpoint, timeout=30) as client:
        client.create_topic(topic)
        client.create_topic(dead_topic)
        client.create_subscription(dead_topic, "dead.early.copies")
        client.create_subscription(topic, name, ack_deadline=60, max_attempts=1)
        with client.subscribe(topic, name) as subscription, client.subscribe(dead_topic, "dead.early.copies") as copies:
            client.publish(topic, b"warm")  # attached and credited: the batch below goes out by the fast path
            warm = subscription.receive(timeout=10)
            assert warm is not None and warm.ack()
            # The fsync below must run on the writer thread while the poll loop goes on: a slow disk's way.
            _make_the_disk_slow(herald.endpoint, topic, subscription, hold_wal_fsyncs)
            hold_wal_fsyncs.touch()
            acked: list[str] = []
            publishing = threading.Thread(target=lambda: _publish_ids(herald.endpoint, topic, [f"m-{i}" for i in range(count)], acked))
            publishing.start()
            try:
                delivered = []
                while len(delivered) < count:
                    message = subscription.receive(timeout=10)
                    assert message is not None, f"only {len(delivered)} of {count} delivered before the fsync"
                    delivered.append(message)
                for message in delivered:
                    message.nack()  # its last attempt: the sender sends the frontend a DEAD
                wait_for(lambda: read_snapshots(str(herald.data_dir)).get(sender, {}).get("dead_lettered", 0) >= count, timeout=15, message="DEADs sent")
                time.sleep(0.5)  # the DEADs reach the frontend while the fsync is still held
                assert publishing.is_alive() and not acked, "the batch was answered before its fsync was released"
            finally:
                hold_wal_fsyncs.unlink()
                publishing.join(30)
            assert sorted(acked) == sorted(f"m-{i}" for i in range(count))
            copied: set[str] = set()
            while len(copied) < count:
                copy = copies.receive(timeout=15)
                assert copy is not None, f"{count - len(copied)} of {count} dead-lettered messages were never copied\n{herald.log_tail()}"
                copied.add(copy.attributes["herald.original_id"])
                copy.ack_nowait()
            assert copied == set(acked)
            again = subscription.receive(timeout=2)
            assert again is None, f"{again.id if again else ''} came back after it was dead-lettered"


def test_a_frontend_killed_before_its_dead_letter_copies_are_durable_copies_each_message_once(
    herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path
) -> None:
    """A dead-letter copy and the settle of its original are one write. When they were two, a SIGKILL of the
    owning frontend after the copy's write (in the OS page cache, so kept) and before the original's settle
    left both: the restarted frontend handed the original out again, and it was dead-lettered a second time
    (found by fault experiments, 1 of 3 owner kills). Here the copies' fsync is held, so the kill always falls
    between the write and its fsync."""
    from broker.metrics import read_snapshots

    herald = herald_factory()
    topic, name, count = "dead.once", "dead.once.sub", 10
    dead_topic = f"{name}.dead"
    owner, sender = f"frontend-{shard_of(topic, 2)}", f"sender-{shard_of(name, 2)}"
    ids = [f"m-{i}" for i in range(count)]
    with Client(herald.endpoint, timeout=30) as client:
        client.create_topic(topic)
        client.create_topic(dead_topic)
        client.create_subscription(dead_topic, "dead.once.copies")
        client.create_subscription(topic, name, ack_deadline=60, max_attempts=1)
        with client.subscribe(topic, name) as subscription:
            client.publish_batch(topic, [(b"x", None, message_id) for message_id in ids])  # durable before the hold
            delivered = _take(subscription, count)
            hold_wal_fsyncs.touch()
            try:
                for message in delivered:
                    message.nack()  # its last attempt: the sender sends the frontend a DEAD
                wait_for(lambda: read_snapshots(str(herald.data_dir)).get(sender, {}).get("dead_lettered", 0) >= count, timeout=15, message="DEADs sent")
                time.sleep(1.0)  # the DEADs reach the owner, whose write of the copies then waits for its fsync
                pid = herald.kill_child(owner)
            finally:
                hold_wal_fsyncs.unlink()
            herald.wait_restarted(owner, pid)
            # Whatever the restarted owner hands out again is refused once more, and would be copied again.
            deadline = time.monotonic() + 8
            while (message := subscription.receive(timeout=max(0.1, deadline - time.monotonic()))) is not None or time.monotonic() < deadline:
                if message is not None:
                    message.nack()
        with client.subscribe(dead_topic, "dead.once.copies") as copies:
            copied: Counter[str] = Counter()
            while (copy := copies.receive(timeout=5)) is not None:
                copied[copy.attributes["herald.original_id"]] += 1
                copy.ack_nowait()
    assert copied == Counter(ids), f"copies per message: {dict(copied)}"


def test_the_live_feed_carries_a_message_before_its_publish_is_acknowledged(herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path) -> None:
    """docs/protocol.md §8: a live MESSAGE goes out once its batch is written, before the fsync and the publisher's OK."""
    import zmq

    from clients.protocol import decode, live_topic_frame

    herald = herald_factory()
    topic = "live.early"
    context: zmq.Context[Any] = zmq.Context()
    reader = context.socket(zmq.SUB)
    reader.setsockopt(zmq.SUBSCRIBE, live_topic_frame(topic))
    try:
        with Client(herald.endpoint, timeout=30) as client:
            client.create_topic(topic)
            reader.connect(client.info()["endpoints"]["live"])
            wait_for(lambda: bool(client.publish(topic, b"probe")) and bool(reader.poll(200)), timeout=10, message="the live subscription propagated")
            while reader.poll(300):
                reader.recv_multipart()
        hold_wal_fsyncs.touch()
        acked: list[str] = []
        publishing = threading.Thread(target=lambda: _publish_ids(herald.endpoint, topic, [f"early-{i}" for i in range(4)], acked))
        publishing.start()
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 10
            while len(seen) < 4 and time.monotonic() < deadline:
                if reader.poll(200):
                    seen.extend(entry["id"] for entry in decode(reader.recv_multipart()[1:]).header["messages"])
            assert sorted(seen) == [f"early-{i}" for i in range(4)], f"live feed while the fsync is held: {seen}"
            assert publishing.is_alive() and not acked, "the publish was answered before its fsync was released"
        finally:
            hold_wal_fsyncs.unlink()
            publishing.join(30)
        assert sorted(acked) == [f"early-{i}" for i in range(4)]
    finally:
        reader.close(0)
        context.term()


def test_on_a_slow_disk_a_batch_is_delivered_while_an_earlier_one_waits_for_its_fsync(
    herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path
) -> None:
    """Once fsyncs are slow, they delay the publishers' answers, not delivery: while one batch's fsync is held, the
    next batch is written and delivered too; neither publish is answered until the fsync returns, then both are."""
    herald = herald_factory()
    topic = "pipelined"
    with _reader_on_a_slow_disk(herald, topic, hold_wal_fsyncs) as subscription:
        hold_wal_fsyncs.touch()
        acked: dict[str, list[str]] = {"first": [], "second": []}
        batches = {name: [f"{name}-{i}" for i in range(20)] for name in acked}
        publishing = [threading.Thread(target=_publish_ids, args=(herald.endpoint, topic, batches[name], acked[name])) for name in acked]
        try:
            publishing[0].start()
            received = _receive_all(subscription, batches["first"])
            publishing[1].start()
            received |= _receive_all(subscription, batches["second"])
            assert not acked["first"] and not acked["second"], "a publish was answered before its fsync was released"
        finally:
            hold_wal_fsyncs.unlink()
            for thread in publishing:
                thread.join(30)
        assert sorted(acked["first"] + acked["second"]) == sorted(batches["first"] + batches["second"])


def test_a_batch_over_a_mib_is_fsyncd_off_the_poll_loop(herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path) -> None:
    """A fast disk's batches are fsync'd on the poll loop, but one of more than INLINE_SYNC_BYTES of payload goes to
    the writer thread: while its fsync is held, the frontend still answers other requests. (Inline, the held fsync
    would hold the loop, and the PING below would time out.)"""
    herald = herald_factory(env={"HERALD_FRONTENDS": "1"})  # the PING reaches the frontend writing the batch
    topic = "big.batch"
    with Client(herald.endpoint, timeout=30) as client:
        client.create_topic(topic)
        client.publish(topic, b"small")  # a fast fsync first: the disk is not slow
    acked: list[str] = []
    hold_wal_fsyncs.touch()

    def publish_big_batch() -> None:  # 2 MB of payload in one request, so one batch
        with Client(herald.endpoint, timeout=60) as publisher:
            acked.extend(publisher.publish_batch(topic, [(b"x" * 100_000, None, f"big-{i}") for i in range(20)]))

    publishing = threading.Thread(target=publish_big_batch)
    try:
        publishing.start()
        time.sleep(0.5)  # written, its fsync held
        with Client(herald.endpoint, timeout=3) as other:
            other.ping()
        assert publishing.is_alive() and not acked, "the big batch was answered before its fsync was released"
    finally:
        hold_wal_fsyncs.unlink()
        publishing.join(30)
    assert acked == [f"big-{i}" for i in range(20)]


@contextlib.contextmanager
def _reader_on_a_slow_disk(herald: HeraldSystem, topic: str, hold: Path) -> Iterator[Subscription]:
    """A new topic and subscription, read by an attached consumer (with credit: new messages take the fast path),
    on a frontend whose disk is then slow (see :func:`_make_the_disk_slow`)."""
    with Client(herald.endpoint, timeout=30) as client:
        client.create_topic(topic)
        client.create_subscription(topic, "reader")
    with Client(herald.endpoint) as reader, reader.subscribe(topic, "reader") as subscription:
        with Client(herald.endpoint, timeout=30) as client:
            probe = client.publish(topic, b"probe")
        _receive_all(subscription, [probe])
        _make_the_disk_slow(herald.endpoint, topic, subscription, hold)
        yield subscription


def _make_the_disk_slow(endpoint: str, topic: str, subscription: Subscription, hold: Path) -> None:
    """Hold five fsyncs for 50 ms each, one publish each (read and acknowledged): the median of the frontend's
    recent fsyncs is then slow (SLOW_FSYNC_S), so its fsyncs run on the writer thread while the poll loop goes on."""
    slow: list[str] = []
    for n in range(5):
        hold.touch()
        publishing_one = threading.Thread(target=_publish_ids, args=(endpoint, topic, [f"slow-{n}"], slow))
        publishing_one.start()
        time.sleep(0.05)
        hold.unlink()
        publishing_one.join(30)
    assert sorted(slow) == [f"slow-{n}" for n in range(5)]
    _receive_all(subscription, slow)


def _publish_ids(endpoint: str, topic: str, ids: list[str], acked: list[str]) -> None:
    with Client(endpoint, timeout=60) as client:
        acked.extend(client.publish_batch(topic, [(b"m", None, message_id) for message_id in ids]))


def test_a_dead_letter_copy_that_cannot_be_written_hands_the_original_out_again(herald_factory: Callable[..., HeraldSystem], small_disk: Path) -> None:
    """docs/architecture.md, when a process dies (disk full): dead-letter copies in a refused
    batch are not written, and their originals are released and handed out again; once space
    is back the next dead-letter succeeds. The original's body is large, so its copy cannot
    slip into the last free bytes of the disk.

    The dead-letter topic is owned by the original's frontend and published to before the disk
    fills, so that frontend has it cached: the dead-letter needs no metadata call (whose write
    could fail too), and only the copy's write can fail. (The log is on the full disk as well,
    so it cannot tell.)"""
    from tests.conftest import topic_for_shard

    herald = herald_factory(data_dir=small_disk / "data")
    topic, filler, dead = topic_for_shard("poison.", 0), topic_for_shard("filler.", 0), topic_for_shard("poison.dead.", 0)
    with Client(herald.endpoint, timeout=3.0) as client:
        for name in (topic, filler, dead):
            client.create_topic(name)
        # A long ack deadline: the second delivery is held while the disk recovers.
        client.create_subscription(topic, "poison.sub", max_attempts=1, backoff=(0, 0), ack_deadline=300, dead_letter_topic=dead)
        client.create_subscription(dead, "poison.dead.reader")
        client.publish_batch(dead, [b"primer"])  # caches the dead-letter topic in its (and the original's) frontend
        body = os.urandom(PAYLOAD_BYTES)
        [original_id] = client.publish_batch(topic, [body])
        with client.subscribe(topic, "poison.sub") as subscription:
            first = subscription.receive(timeout=10)
            assert first is not None and first.id == original_id and first.attempt == 1
            filled = False
            for _ in range(400):
                try:
                    client.publish_batch(filler, [os.urandom(PAYLOAD_BYTES) for _ in range(2)])
                except HeraldError as error:
                    assert error.code == "storage_failed", error
                    filled = True
                    break
            assert filled, "a 24 MiB disk took 200 MiB of publishes"
            first.nack()  # the last attempt: the sender dead-letters it, and the copy's write fails
            again = subscription.receive(timeout=15)
            assert again is not None and again.id == original_id and again.attempt == 2, again
            assert _mount(["-o", "remount,size=256m", str(small_disk)]).returncode == 0

            def publishes() -> bool:
                try:
                    client.publish_batch(filler, [b"space is back"])
                except HeraldError as error:
                    assert error.code in ("storage_failed", "timeout"), error
                    return False
                return True

            wait_for(publishes, timeout=60, interval=0.5, message="publishing works again once space is back")
            again.nack()  # dead-lettered again, and this time the copy is written
            assert subscription.receive(timeout=3) is None, "the original came back although its copy was written"
        with client.subscribe(dead, "poison.dead.reader") as dead_letters:
            copies = []
            while (message := dead_letters.receive(timeout=5)) is not None:
                assert message.ack()
                if message.data != b"primer":
                    copies.append(message)
            assert [copy.data for copy in copies] == [body], "exactly one copy, once space was back"
            assert copies[0].attributes["herald.original_id"] == original_id and copies[0].attributes["herald.attempts"] == "2", copies[0].attributes
    assert all(child["restarts"] == 0 for child in herald.status()["children"]), herald.status()


def test_an_id_whose_write_awaits_its_fsync_is_no_duplicate_in_a_recreated_topic(herald_factory: Callable[..., HeraldSystem], hold_wal_fsyncs: Path) -> None:
    """De-duplication ids belong to one incarnation of a topic, in writes still being fsync'd as on disk: an id
    published to a topic that is then deleted and created again, while that write's fsync is held, is stored
    again in the new topic, not answered `duplicate`."""
    herald = herald_factory(env={"HERALD_FRONTENDS": "1"})  # one shard: both writes in flight on it
    topic = "reborn"
    with _reader_on_a_slow_disk(herald, topic, hold_wal_fsyncs):
        pass  # fsyncs now run on the writer thread, so writes can wait for theirs side by side
    answers: dict[str, PublishId] = {}

    def publish(name: str) -> None:
        with Client(herald.endpoint, timeout=60) as publisher:
            answers[name] = publisher.publish(topic, b"m", message_id="same-id")

    hold_wal_fsyncs.touch()
    publishing = [threading.Thread(target=publish, args=(name,)) for name in ("old", "new")]
    try:
        publishing[0].start()
        time.sleep(0.5)  # written to the old topic, its fsync held
        with Client(herald.endpoint, timeout=30) as admin:
            admin.delete_topic(topic)
            admin.create_topic(topic)
        publishing[1].start()
        time.sleep(0.5)
    finally:
        hold_wal_fsyncs.unlink()
        for thread in publishing:
            thread.join(30)
    assert answers["old"] == answers["new"] == "same-id"
    assert not answers["old"].duplicate
    assert not answers["new"].duplicate, "the new topic's publish was answered from the deleted topic's write"


def test_entries_taken_back_on_a_full_disk_are_written_once_there_is_room(herald_factory: Callable[..., HeraldSystem], small_disk: Path) -> None:
    """A restarted sender's deliveries are taken back, and the implicit ones (see frontend/store.py) must be
    written as pending entries before a backlog scan can hand them out again. On a full disk that write fails:
    the frontend keeps them and retries each second, and once there is room the messages come again."""
    herald = herald_factory(data_dir=small_disk / "data", env={"HERALD_FRONTENDS": "1", "HERALD_SENDERS": "1"})
    bodies = [b"held-%d" % i for i in range(20)]
    with Client(herald.endpoint, timeout=5.0) as client:
        client.create_topic("held")
        client.create_subscription("held", "reader", ack_deadline=600)  # nothing comes back by its deadline here
        client.create_topic("filler")
        with client.subscribe("held", "reader") as subscription:
            ids = set(client.publish_batch("held", bodies))
            first = _take(subscription, len(bodies))  # handed out as written (implicit entries), never acknowledged
            assert {m.id for m in first} == ids and {m.attempt for m in first} == {1}
            for _ in range(400):  # random bytes: RocksDB compresses repeated ones
                try:
                    client.publish_batch("filler", [os.urandom(PAYLOAD_BYTES) for _ in range(2)])
                except HeraldError as error:
                    assert error.code == "storage_failed", error
                    break
            else:
                pytest.fail("a 24 MiB disk took 200 MiB of publishes")
            failures = client.status()["storage_failures"]
            herald.kill_child("sender-0")
            wait_for(lambda: client.status()["storage_failures"] > failures, timeout=30, message="the taken-back entries' write refused")
            assert _mount(["-o", "remount,size=256m", str(small_disk)]).returncode == 0
            again = _take(subscription, len(bodies), timeout=60)
            assert {m.id for m in again} == ids and min(m.attempt for m in again) >= 2, [(m.id, m.attempt) for m in again]
            for message in again:
                message.ack_nowait()
    assert _running(herald), herald.status()


def _take(subscription: Subscription, count: int, timeout: float = 30) -> list[Message]:
    """The next ``count`` messages, unacknowledged (fail after ``timeout`` s)."""
    taken: list[Message] = []

    def enough() -> bool:
        message = subscription.receive(timeout=0.5)
        if message is not None:
            taken.append(message)
        return len(taken) >= count

    wait_for(enough, timeout=timeout, interval=0, message=f"{count} messages")
    return taken
