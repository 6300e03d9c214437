"""Deleting a subscription: its backlog goes in bounded chunks, and goes even if its frontend missed the deletion.

A deleted subscription's pending entries are removed a chunk per poll-loop
pass (``ShardStore.purge``), so a big backlog never holds the frontend; a
purge cut short by a crash, or a deletion the frontend never heard of,
is finished at its next start (``ShardStore.purge_orphans``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import Client, HeraldError
from frontend.store import PURGE_CHUNK, ShardStore, StorageError, StoredMessage
from tests.conftest import HeraldSystem, topic_for_shard, wait_for

KEEPER, DOOMED = 8, 7


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ShardStore]:
    shard = ShardStore(tmp_path / "shard", sync=False)
    yield shard
    shard.close()


def _append(store: ShardStore, count: int, subscriptions: list[int]) -> list[int]:
    seqs = [store.next_seq() for _ in range(count)]
    messages = [StoredMessage(seq, "t", f"id-{seq}", {}, b"x", 0.0, subscriptions, 2**40) for seq in seqs]
    store.append(messages, [])  # counts the backlog too
    return seqs


def _purge_all(store: ShardStore) -> list[int]:
    """Purge pass after pass until done; the entries each pass removed."""
    passes = []
    while store.purging:
        passes.append(store.purge())
        assert len(passes) < 1000, "the purge never finishes"
    return passes


@pytest.mark.parametrize("recent", [True, False], ids=["bodies-in-memory", "bodies-read-back"])
def test_a_deleted_backlog_is_purged_in_bounded_chunks(store: ShardStore, recent: bool) -> None:
    seqs = _append(store, 5 * PURGE_CHUNK, [DOOMED, KEEPER])
    settled_by_keeper = seqs[: 2 * PURGE_CHUNK]
    store.complete([(KEEPER, seq) for seq in settled_by_keeper])
    if not recent:
        store._fanout.clear()
        store._fanout_slots = 0  # as after a restart: which subscriptions hold a message is read back from disk

    store.delete_subscription(DOOMED)

    assert store.count_pending(DOOMED) == 5 * PURGE_CHUNK, "deleting removes nothing on the spot"
    assert store.backlog is not None and DOOMED not in store.backlog
    passes = _purge_all(store)
    assert max(passes) <= PURGE_CHUNK
    assert sum(passes) == 5 * PURGE_CHUNK
    assert store.count_pending(DOOMED) == 0
    assert store.count_pending(KEEPER) == 3 * PURGE_CHUNK
    # Bodies the keeper had settled are freed; the ones it still needs are kept.
    assert sorted(message.seq for message in store.messages()) == seqs[2 * PURGE_CHUNK :]
    assert store.backlog == {KEEPER: 3 * PURGE_CHUNK}


def test_a_purge_waits_for_messages_accepted_before_the_deletion(store: ShardStore) -> None:
    _append(store, 10, [DOOMED])
    in_flight = store.next_seq()  # accepted (its seq taken) but not yet written when the deletion arrives
    store.delete_subscription(DOOMED)
    store.purge()
    store.purge()
    assert store.purging == 1, "a message of the deleted subscription may still be written"
    store.append([StoredMessage(in_flight, "t", "late", {}, b"x", 0.0, [DOOMED], 2**40)], [])
    _purge_all(store)
    assert store.count_pending(DOOMED) == 0
    assert store.messages() == []


def test_purge_orphans_removes_only_backlogs_of_unknown_subscriptions(tmp_path: Path) -> None:
    shard = ShardStore(tmp_path / "shard", sync=False)
    _append(shard, 20, [DOOMED, KEEPER])
    shard.close()
    shard = ShardStore(tmp_path / "shard", sync=False)
    try:
        assert shard.purge_orphans({KEEPER, 99}) == [DOOMED]
        _purge_all(shard)
        assert shard.count_pending(DOOMED) == 0
        assert shard.count_pending(KEEPER) == 20
        assert len(shard.messages()) == 20
        assert shard.purge_orphans({KEEPER}) == []
        # Entries written after the open count too (a list asked again after missed events), and so do
        # those of messages accepted but not yet written; a known subscription is never taken for an orphan.
        _append(shard, 5, [42, 43])
        seqs = [shard.next_seq() for _ in range(3)]  # handed out at once: implicit entries, no P key
        shard.append([StoredMessage(seq, "t", f"id-{seq}", {}, b"x", 0.0, [45], 2**40) for seq in seqs], [], [(45, seq) for seq in seqs])
        assert shard.is_implicit(45, seqs[0])
        # Past BACKLOG_COUNT_LIMIT there are no counts: the seeks find the same subscriptions.
        counted, shard.backlog = shard.backlog, None
        assert shard.subscriptions_with_entries() == set(counted or {}) == {KEEPER, 42, 43, 45}
        shard.backlog = counted
        # A list in pages may miss subscriptions created meanwhile: ids from its first page's next_id on are spared.
        assert shard.purge_orphans({KEEPER}, below=42) == []
        assert shard.purge_orphans({KEEPER, 42}, unwritten=[44], below=44) == [43]
        assert shard.purge_orphans({KEEPER, 42}, unwritten=[44, KEEPER]) == [44, 45]
        _purge_all(shard)
        assert shard.count_pending(42) == 5
        assert shard.count_pending(43) == 0
        assert not shard.holds(45, seqs[0])
        assert shard.count_pending(KEEPER) == 20
    finally:
        shard.close()


def _frontend_status(client: Client, index: int) -> dict[str, Any] | None:
    """STATUS answered by frontend ``index`` (the proxy picks the frontend; try a few times)."""
    for _ in range(8):
        status = client.status()
        if status.get("frontend") == index:
            return status
    return None


def _delete_past_a_stopped_frontend(client: Client, name: str) -> None:
    """Delete a subscription while one frontend is stopped: a request the proxy hands to it is lost, so send it again."""
    for _ in range(4):
        try:
            client.delete_subscription(name)
            return
        except HeraldError as error:
            if error.code == "subscription_not_found":
                return  # an earlier try was applied; only its answer was lost
            assert error.code == "timeout", error
    pytest.fail("the deletion was never answered")


def _wait_until_frontend_1_purged(client: Client, entries: int, what: str) -> None:
    def purged() -> bool:
        status = _frontend_status(client, 1)
        return status is not None and status["purged"] >= entries and status["purging"] == 0

    wait_for(purged, timeout=30, interval=0.1, message=what)


def _keeper_and_doomed_on_frontend_1(client: Client, prefix: str, backlog: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A topic of frontend 1 with two subscriptions, ``<prefix>-keeper`` and ``<prefix>-doomed``, each with ``backlog`` entries."""
    topic = topic_for_shard(f"{prefix}.", 1)
    client.create_topic(topic)
    keeper = client.create_subscription(topic, f"{prefix}-keeper")
    doomed = client.create_subscription(topic, f"{prefix}-doomed")
    client.publish_batch(topic, [b"x"] * backlog)
    return topic, keeper, doomed


def test_a_deletion_its_frontend_never_applied_is_purged_when_it_restarts(herald: HeraldSystem) -> None:
    with Client(herald.endpoint, timeout=4.0) as client:
        topic, keeper, doomed = _keeper_and_doomed_on_frontend_1(client, "orphan", 3000)
        # Stopped, frontend-1 cannot apply the deletion; killed, it never will.
        pid = herald.kill_child("frontend-1", signal.SIGSTOP)
        try:
            _delete_past_a_stopped_frontend(client, "orphan-doomed")
        finally:
            os.kill(pid, signal.SIGKILL)
        herald.wait_restarted("frontend-1", pid)
        _wait_until_frontend_1_purged(client, 3000, "the orphaned backlog purged")
    herald.stop()
    shard = ShardStore(herald.data_dir / "shard-1")
    try:
        assert shard.count_pending(doomed["id"]) == 0
        assert shard.count_pending(keeper["id"]) == 3000
        assert len([message for message in shard.messages() if message.topic == topic]) == 3000
    finally:
        shard.close()


def test_credit_for_a_deleted_subscription_is_ignored(herald: HeraldSystem) -> None:
    """A sender that has not heard of a deletion yet may still credit the subscription: the frontend
    must not make a delivery cursor for it (it would hand out the entries being purged)."""
    import zmq

    from clients.protocol import Command, encode

    with Client(herald.endpoint, timeout=4.0) as client:
        _, keeper, doomed = _keeper_and_doomed_on_frontend_1(client, "credited", 100)
        client.delete_subscription("credited-doomed")
        _wait_until_frontend_1_purged(client, 100, "the deleted subscription's backlog purged")
        before = _frontend_status(client, 1)
        assert before is not None
        # As a sender that restarted (new epoch) and credits both subscriptions.
        context: zmq.Context[Any] = zmq.Context()
        push = context.socket(zmq.PUSH)
        try:
            push.connect(herald.config["frontend_control_endpoints"][1])
            push.send_multipart(encode(Command.CREDIT, b"", {"sender": 0, "epoch": 424242, "windows": {str(doomed["id"]): 50, str(keeper["id"]): 50}}))
        finally:
            push.close(linger=5000)
            context.term()
        wait_for(lambda: "sender 0 restarted; handing its deliveries out again" in herald.log_tail(200), message="the CREDIT handled")
        after = _frontend_status(client, 1)
        assert after is not None
        # No consumer ever attached, so no sender had credited either; now only the keeper has a cursor.
        assert (before["subscriptions_dispatching"], after["subscriptions_dispatching"]) == (0, 1), (before, after)


def test_a_frontend_that_starts_while_metadata_is_down_purges_nothing_until_it_can_list(herald: HeraldSystem) -> None:
    with Client(herald.endpoint, timeout=4.0) as client:
        _, keeper, doomed = _keeper_and_doomed_on_frontend_1(client, "listless", 2000)
        frontend = herald.kill_child("frontend-1", signal.SIGSTOP)
        try:
            _delete_past_a_stopped_frontend(client, "listless-doomed")
            # Restarted while metadata cannot answer: its SUB_LIST times out.
            metadata = herald.kill_child("metadata", signal.SIGSTOP)
        finally:
            os.kill(frontend, signal.SIGKILL)
        try:
            herald.wait_restarted("frontend-1", frontend)
            wait_for(
                lambda: "metadata did not list the subscriptions" in herald.log_tail(400),
                timeout=20,
                interval=0.2,
                message="the restarted frontend's SUB_LIST timed out",
            )
            status = _frontend_status(client, 1)
            assert status is not None and status["purged"] == 0 and status["purging"] == 0, status
        finally:
            os.kill(metadata, signal.SIGCONT)
        _wait_until_frontend_1_purged(client, 2000, "the orphaned backlog purged once metadata answered")
    herald.stop()
    shard = ShardStore(herald.data_dir / "shard-1")
    try:
        assert shard.count_pending(doomed["id"]) == 0
        assert shard.count_pending(keeper["id"]) == 2000
    finally:
        shard.close()


def test_a_purge_sees_every_batch_that_ends_before_it_finishes(store: ShardStore) -> None:
    """The purge decides it is done from one reading of the writer's progress: a batch that ends between its scan and that decision is not skipped."""
    _append(store, 5, [DOOMED])
    other, late = store.next_seq(), store.next_seq()  # accepted, not yet written
    store.delete_subscription(DOOMED)
    store.purge()  # removes the five
    store.purge()  # finds nothing, and knows writes may still bring some
    assert store.purging == 1 and not store.purge_runnable, "waiting for the writes, not spinning"
    store.append([StoredMessage(other, "t", "other", {}, b"x", 0.0, [KEEPER], 2**40)], [])
    assert store.purge_runnable
    real_pending = store.pending

    def write_lands_during_the_scan(*args: Any, **kwargs: Any) -> list[tuple[int, int]]:
        found = real_pending(*args, **kwargs)
        # As if the writer thread finished the last batch just after this scan.
        store.append([StoredMessage(late, "t", "late", {}, b"x", 0.0, [DOOMED], 2**40)], [])
        return found

    store.pending = write_lands_during_the_scan  # type: ignore[method-assign]
    store.purge()
    store.pending = real_pending  # type: ignore[method-assign]
    _purge_all(store)
    assert store.count_pending(DOOMED) == 0


def test_a_refused_write_does_not_keep_a_purge_waiting(store: ShardStore) -> None:
    _append(store, 3, [DOOMED])
    refused = store.next_seq()
    store.delete_subscription(DOOMED)
    store.sync_failed = "injected"  # the next append is refused
    with pytest.raises(StorageError):
        store.append([StoredMessage(refused, "t", "refused", {}, b"x", 0.0, [DOOMED], 2**40)], [])
    _purge_all(store)
    assert store.purging == 0
    assert store.count_pending(DOOMED) == 0


def test_a_metadata_change_whose_write_fails_gives_out_no_id(tmp_path: Path) -> None:
    """SUB_LIST's next_id must bound every id given out after it, or a frontend reading the list in pages could
    take a subscription created meanwhile for an orphan. An id drawn for a change whose write then failed
    must not raise it: after a restart the stored counter gives that id out again."""
    from clients.protocol import HeraldError
    from metadata.server import MetadataStore

    store = MetadataStore(tmp_path / "metadata")

    class FailingWrites:
        def __init__(self, db: Any) -> None:
            self.db = db

        def write(self, *_args: Any) -> None:
            raise Exception("IO error: No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

    try:
        first, _ = store.create_topic("t", {})
        real = store._db
        store._db = FailingWrites(real)  # type: ignore[assignment]
        with pytest.raises(HeraldError, match="storage_failed"):
            store.create_topic("u", {})
        store._db = real
        assert store.next_id == first["id"] + 1
        second, _ = store.create_topic("u", {})
        assert second["id"] == first["id"] + 1
    finally:
        store.close()
