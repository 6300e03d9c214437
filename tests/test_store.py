"""ShardStore's scans and sweeps: exact ranges, and bounded work per call.

The poll loop runs every store call, so no call may take time in proportion
to everything stored: the retention sweep removes a chunk per call and says
whether more is due, and range scans stop at their range's end.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import frontend.store as store_module
from frontend.store import EXPIRE_CHUNK, DedupEntry, ShardStore, StorageError, StoredMessage

BATCH = 100


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ShardStore]:
    shard = ShardStore(tmp_path / "shard", sync=False)
    yield shard
    shard.close()


def _append(store: ShardStore, count: int, subscriptions: list[int], expire_ms: int = 2**40, ids: str = "id") -> list[int]:
    seqs: list[int] = []
    for first in range(0, count, BATCH):
        messages = [
            StoredMessage(store.next_seq(), "t", f"{ids}-{first + i}", {}, b"x", 0.0, subscriptions, expire_ms) for i in range(min(BATCH, count - first))
        ]
        dedup = [DedupEntry("t", m.message_id, expire_ms, m.seq) for m in messages]
        store.append(messages, dedup)  # counts the backlog too
        seqs.extend(m.seq for m in messages)
    return seqs


def test_pending_reads_one_subscription_up_to_the_durable_seq(store: ShardStore) -> None:
    _append(store, 10, [1, 2, 3])
    store.complete([(2, seq) for seq in range(1, 6)])
    assert store.pending(2, 0, 100) == [(seq, 0) for seq in range(6, 11)]
    assert store.pending(2, 7, 100) == [(8, 0), (9, 0), (10, 0)]
    assert store.pending(2, 0, 2) == [(6, 0), (7, 0)]
    assert store.pending(1, 9, 100) == [(10, 0)]
    assert store.pending(3, 10, 100) == []
    assert store.pending(4, 0, 100) == []
    store.durable_seq = 8  # as while the batch with seqs 9 and 10 is being fsync'd
    assert store.pending(1, 0, 100) == [(seq, 0) for seq in range(1, 9)]


def test_an_entry_settled_between_its_write_and_its_fsync_leaves_no_backlog(store: ShardStore) -> None:
    """Delivery starts before the fsync, so an ack can be settled before its message's batch is durable: the
    backlog count must come out at 0, not at 1 (subtracted first and clamped, then added)."""
    messages = [StoredMessage(store.next_seq(), "t", f"early-{i}", {}, b"x", 0.0, [1, 2], 2**40) for i in range(3)]
    last_seq = store.write(messages, [], [(1, m.seq) for m in messages])
    assert store.backlog == {1: 3, 2: 3}
    store.complete([(1, m.seq) for m in messages])  # subscription 1 acknowledged them all before the fsync
    store.make_durable(last_seq)
    assert store.backlog == {2: 3}
    assert store.pending(1, 0, 10) == [] and len(store.pending(2, 0, 10)) == 3


def test_the_retention_sweep_removes_a_bounded_chunk_per_call(store: ShardStore) -> None:
    total = 3 * EXPIRE_CHUNK + BATCH // 2
    _append(store, total, [1, 2], expire_ms=1_000)
    kept = _append(store, 10, [1], expire_ms=10_000, ids="kept")
    removed: list[int] = []
    while True:
        removed.append(store.expire(now_ms=5_000))
        assert removed[-1] <= EXPIRE_CHUNK + BATCH, "a call goes past its chunk by one batch at most"
        if not store.expiring:
            break
        assert len(removed) < 100
    assert len(removed) >= 4
    assert sum(removed) == total
    assert [m.seq for m in store.messages()] == kept
    assert store.count_pending(2) == 0
    assert store.pending(1, 0, 100) == [(seq, 0) for seq in kept]
    assert store.backlog == {1: 10}
    # Every de-duplication id that expired is forgotten; the later ones are kept.
    assert store.find_duplicates("t", [f"id-{i}" for i in range(total)]) == set()
    assert store.find_duplicates("t", [f"kept-{i}" for i in range(10)]) == {f"kept-{i}" for i in range(10)}
    assert store.expire(now_ms=5_000) == 0 and not store.expiring


def _implicit_keys(store: ShardStore) -> list[bytes]:
    return [key for key, _ in store._scan(b"I", b"J")]


def test_an_entry_handed_out_with_its_write_is_pending_without_a_key_until_settled(store: ShardStore) -> None:
    """An entry handed out as its message is written gets no P key (module docstring, "Implicit entries"): it counts
    as pending until settled, and settling it leaves no key behind. An entry not handed out gets a P key at attempt 0."""
    handed_out = [StoredMessage(store.next_seq(), "t", f"h{i}", {}, b"x", 0.0, [1], 2**40) for i in range(3)]
    two_subscriptions = StoredMessage(store.next_seq(), "t", "two", {}, b"x", 0.0, [1, 2], 2**40)
    messages = [*handed_out, two_subscriptions]
    store.append(messages, [], [(1, m.seq) for m in handed_out] + [(1, two_subscriptions.seq)])
    assert store.pending(1, 0, 10) == [], "every entry of subscription 1 was handed out"
    assert store.pending(2, 0, 10) == [(two_subscriptions.seq, 0)], "subscription 2 had no room: its entry waits on disk"
    assert store.count_pending(1) == 4 and store.backlog == {1: 4, 2: 1}
    assert all(store.holds(1, m.seq) for m in messages) and not store.holds(2, handed_out[0].seq)
    assert len(_implicit_keys(store)) == 1
    assert store.complete([(1, m.seq) for m in handed_out]) == 3
    assert [m.message_id for m in store.messages()] == ["two"]
    assert len(_implicit_keys(store)) == 1, "the write's I key stays while one of its entries is implicit"
    assert store.complete([(1, two_subscriptions.seq)]) == 1
    assert _implicit_keys(store) == [], "the write's I key goes with its last implicit entry"
    assert [m.message_id for m in store.messages()] == ["two"], "subscription 2 still holds it"
    assert store.backlog == {2: 1} and store.count_pending(1) == 0


def test_a_message_outlives_the_settles_of_its_other_subscriptions_while_one_holds_it_implicitly(store: ShardStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling a message the in-memory fan-out map no longer holds reads which of its entries are left: an implicit
    one (no P key) must count, or the message would be deleted under a subscription still to get it."""
    monkeypatch.setattr(store_module, "FANOUT_CACHE_BYTES", 1)  # nothing stays in the map
    shared = StoredMessage(store.next_seq(), "t", "shared", {}, b"x", 0.0, [1, 2, 3], 2**40)
    store.append([shared], [], [(1, shared.seq), (2, shared.seq), (3, shared.seq)])
    later = [StoredMessage(store.next_seq(), "t", f"later{i}", {}, b"x", 0.0, [1], 2**40) for i in range(3)]
    store.append(later, [], [(1, m.seq) for m in later])  # pushes the shared message out of the map
    assert store.complete([(1, shared.seq), (2, shared.seq)]) == 2
    assert store.holds(3, shared.seq) and not store.holds(1, shared.seq)
    assert "shared" in [m.message_id for m in store.messages()], "subscription 3 still holds it"
    assert store.backlog == {1: 3, 3: 1}
    assert store.complete([(3, shared.seq)]) == 1
    assert "shared" not in [m.message_id for m in store.messages()]
    assert store.backlog == {1: 3}
    assert store._fanout_slots == sum(len(holders) for holders in store._fanout.values()) == 0


def test_the_fan_out_map_keeps_its_size_estimate_exact_through_settles_evictions_and_expiry(store: ShardStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The map's memory bound rests on a running count of the subscriptions in its lists: it must match them."""
    monkeypatch.setattr(store_module, "FANOUT_CACHE_BYTES", 30 * (store_module.FANOUT_ENTRY_BYTES + 3 * store_module.FANOUT_SLOT_BYTES))

    def exact() -> bool:
        return store._fanout_slots == sum(len(holders) for holders in store._fanout.values())

    messages = [StoredMessage(store.next_seq(), "t", f"m{i}", {}, b"x", 0.0, [1, 2, 3], 2**40 if i % 2 else 1_000) for i in range(50)]
    store.append(messages, [], [(1, m.seq) for m in messages])
    assert 0 < len(store._fanout) <= 30 and exact(), "the oldest were evicted"
    store.complete([(sub_id, m.seq) for m in messages[:25] for sub_id in (1, 2)])
    assert exact()
    store.complete([(3, m.seq) for m in messages[:25]] + [(1, m.seq) for m in messages[25:]])
    assert exact()
    store.expire(now_ms=5_000)
    assert exact()
    assert [m.seq for m in store.messages()] == [m.seq for m in messages[25:] if m.expire_ms > 5_000]


def test_cached_bodies_of_a_fan_out_backlog_share_their_subscription_list(store: ShardStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoded list of 100 ids was 4 KB of each cached body, so a fan-out backlog filled the cache with 3,500
    messages and read the rest again: bodies with the same list share one, paid for once, and settling through the
    cache (the map holds nothing) still keeps a message until its last subscription settles it."""
    monkeypatch.setattr(store_module, "FANOUT_CACHE_BYTES", 1)  # every settle reads what is left, through the cache
    monkeypatch.setattr(
        store_module, "SHARED_SUBSCRIPTION_BYTES", store_module.SHARED_LIST_BYTES + 150 * store_module.SUBSCRIPTION_ID_BYTES
    )  # one list of 100, not two
    hundred = list(range(1, 101))
    seqs = _append(store, 200, hundred)
    others = _append(store, 3, list(range(200, 300)), ids="other")
    read = store.read_messages(seqs + others)
    assert all(message is not None for message in read)
    lists = {id(message.subscriptions) for message in read[:200] if message is not None}
    assert len(lists) == 1, "the messages with the same list share one"
    assert len({id(message.subscriptions) for message in read[200:] if message is not None}) == 3, "no room left to share"
    assert store._body_bytes < 200 * 1_000 + 3 * 100 * store_module.SUBSCRIPTION_ID_BYTES + 100 * store_module.SUBSCRIPTION_ID_BYTES
    store.complete([(sub_id, seq) for seq in seqs[:100] for sub_id in hundred[:99]])
    assert [m.seq for m in store.messages()][:100] == seqs[:100], "subscription 100 still holds them"
    store.complete([(100, seq) for seq in seqs[:100]])
    assert [m.seq for m in store.messages()] == seqs[100:] + others
    assert all(seq not in store._bodies for seq in seqs[:100]), "the cache never outlives a message"
    assert store.backlog == dict.fromkeys(hundred, 100) | dict.fromkeys(range(200, 300), 3)
    store.delete_subscription(100)  # its list goes, and makes room for another
    assert not store._shared_subscription_lists and store._shared_subscription_bytes == 0
    for seq in others:
        store._forget_body(seq)  # read again, as after an eviction
    assert len({id(message.subscriptions) for message in store.read_messages(others) if message is not None}) == 1


def test_implicit_entries_become_pending_entries_when_taken_back_or_counted(store: ShardStore) -> None:
    """An implicit entry that must outlive its hand-out is written as a P key: taken back at attempt 1, at 0 after
    a refused first DISPATCH (only what a sender took is an attempt), or with the attempt number a redelivery reached."""
    messages = [StoredMessage(store.next_seq(), "t", f"m{i}", {}, b"x", 0.0, [1], 2**40) for i in range(4)]
    store.append(messages, [], [(1, m.seq) for m in messages])
    taken_back, refused, redelivered, untouched = (m.seq for m in messages)
    assert store.materialize([(1, taken_back, 1), (2, untouched, 1)]) == 1
    assert store.materialize([(1, refused, 0)]) == 1
    store.record_attempts([(1, redelivered, 3)])
    assert store.pending(1, 0, 10) == [(taken_back, 1), (refused, 0), (redelivered, 3)]
    assert store.count_pending(1) == 4 and store.backlog == {1: 4}
    assert store.materialize([(1, taken_back, 5)]) == 0, "a P key is not written twice"
    store.complete([(1, seq) for seq in (taken_back, refused, redelivered, untouched)])
    assert store.count_pending(1) == 0 and store.messages() == [] and _implicit_keys(store) == []


def test_implicit_entries_left_at_a_crash_are_pending_entries_after_reopening(tmp_path: Path) -> None:
    """The I key of each write lists its implicit entries: on open, every one whose message is still there becomes a
    P key at attempt 1 (it was handed out once), a P key written while running keeps its count, and the I keys go."""
    path = tmp_path / "shard"
    store = ShardStore(path, sync=False)
    messages = [StoredMessage(store.next_seq(), "t", f"m{i}", {}, b"x", 0.0, [1], 2**40) for i in range(4)]
    store.append(messages, [], [(1, m.seq) for m in messages])
    settled, counted, left, also_left = (m.seq for m in messages)
    store.complete([(1, settled)])
    store.record_attempts([(1, counted, 4)])
    store.close()  # as after a SIGKILL: nothing but what was written
    reopened = ShardStore(path, sync=False)
    try:
        assert reopened.pending(1, 0, 10) == [(counted, 4), (left, 1), (also_left, 1)]
        assert reopened.backlog == {1: 3}
        assert _implicit_keys(reopened) == []
        assert not reopened.is_implicit(1, left)
    finally:
        reopened.close()


def test_implicit_entries_of_a_shared_message_left_at_a_crash_are_pending_entries_after_reopening(tmp_path: Path) -> None:
    """With several subscriptions, every entry left in an I key whose message is still there comes back as a P key:
    the unsettled ones, and (at least once, a duplicate) one settled while another subscription still held it."""
    path = tmp_path / "shard"
    store = ShardStore(path, sync=False)
    shared = StoredMessage(store.next_seq(), "t", "shared", {}, b"x", 0.0, [1, 2, 3], 2**40)
    gone = StoredMessage(store.next_seq(), "t", "gone", {}, b"x", 0.0, [1, 2], 2**40)
    store.append([shared, gone], [], [(1, shared.seq), (2, shared.seq), (1, gone.seq), (2, gone.seq)])
    assert store.pending(3, 0, 10) == [(shared.seq, 0)]
    store.complete([(1, shared.seq), (1, gone.seq), (2, gone.seq)])
    store.close()  # as after a SIGKILL: nothing but what was written
    reopened = ShardStore(path, sync=False)
    try:
        assert reopened.pending(1, 0, 10) == [(shared.seq, 1)], "settled while subscription 2 held the message: again"
        assert reopened.pending(2, 0, 10) == [(shared.seq, 1)]
        assert reopened.pending(3, 0, 10) == [(shared.seq, 0)]
        assert [m.message_id for m in reopened.messages()] == ["shared"]
        assert _implicit_keys(reopened) == []
    finally:
        reopened.close()


def test_the_retention_sweep_removes_implicit_entries_with_their_messages(store: ShardStore) -> None:
    messages = [StoredMessage(store.next_seq(), "t", f"m{i}", {}, b"x", 0.0, [1], 1_000) for i in range(3)]
    store.append(messages, [], [(1, m.seq) for m in messages])
    assert store.expire(now_ms=5_000) == 3
    assert store.count_pending(1) == 0 and store.backlog == {} and _implicit_keys(store) == []
    assert not store.holds(1, messages[0].seq)


def test_an_implicit_entry_whose_settle_write_fails_stays_pending_and_counted(store: ShardStore) -> None:
    """A settle (or expiry) whose write fails changes nothing: the entry is still implicit, still counted, and the
    next settle removes it and its write's I key."""
    messages = [StoredMessage(store.next_seq(), "t", f"m{i}", {}, b"x", 0.0, [7], 2**40) for i in range(2)]
    store.append(messages, [], [(7, m.seq) for m in messages])
    first, second = (m.seq for m in messages)
    real_write = store._write

    def full_disk(batch: Any, options: Any) -> None:
        raise StorageError("IO error: No space left on device")

    store._write = full_disk  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        store.complete([(7, first)])
    with pytest.raises(StorageError):
        store.expire(now_ms=2**41)
    store._write = real_write  # type: ignore[method-assign]
    assert store.is_implicit(7, first) and store.is_implicit(7, second)
    assert store.backlog == {7: 2} and store.count_pending(7) == 2
    store.complete([(7, first)])
    store.complete([(7, second)])
    assert store.backlog == {} and store.count_pending(7) == 0 and store.messages() == [] and _implicit_keys(store) == []


def test_a_write_that_settles_entries_does_both_or_neither(tmp_path: Path) -> None:
    """A dead-letter copy and the settle of its original are one write: a failed write leaves the original
    pending (implicit or a P key) and stores no copy; a written one survives a reopen without the original."""
    store = ShardStore(tmp_path / "shard", sync=False)
    handed_out = StoredMessage(store.next_seq(), "t", "a", {}, b"x", 0.0, [7], 2**40)
    store.append([handed_out], [], [(7, handed_out.seq)])  # implicit
    in_backlog = _append(store, 1, [8])[0]  # a P key, of an old message the fan-out map forgot
    store._fanout.clear()
    store._fanout_slots = 0
    real_write = store._write

    def full_disk(batch: Any, options: Any) -> None:
        raise StorageError("IO error: No space left on device")

    def copy() -> StoredMessage:
        return StoredMessage(store.next_seq(), "t.dead", "a", {"herald.attempts": "5"}, b"x", 0.0, [9], 2**40)

    store._write = full_disk  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        store.write([copy()], [], [], every_entry_handed_out=True, settles=[(7, handed_out.seq), (8, in_backlog)])
    store._write = real_write  # type: ignore[method-assign]
    assert store.is_implicit(7, handed_out.seq) and store.holds(8, in_backlog)
    assert store.backlog == {7: 1, 8: 1} and {m.topic for m in store.messages()} == {"t"}
    written = copy()
    store.make_durable(store.write([written], [], [], every_entry_handed_out=True, settles=[(7, handed_out.seq), (8, in_backlog)]))
    assert store.backlog == {9: 1}
    store.close()
    store = ShardStore(tmp_path / "shard", sync=False)
    try:
        assert not store.holds(7, handed_out.seq) and not store.holds(8, in_backlog)
        assert [m.seq for m in store.messages()] == [written.seq]
        assert store.backlog == {9: 1}
    finally:
        store.close()


def test_a_taken_back_implicit_entry_whose_write_fails_stays_implicit_for_the_retry(store: ShardStore) -> None:
    """materialize() that cannot write leaves the entry implicit (the frontend retries it each second); the retry writes it."""
    message = StoredMessage(store.next_seq(), "t", "m", {}, b"x", 0.0, [7], 2**40)
    store.append([message], [], [(7, message.seq)])
    real_write = store._write

    def full_disk(batch: Any, options: Any) -> None:
        raise StorageError("IO error: No space left on device")

    store._write = full_disk  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        store.materialize([(7, message.seq, 1)])
    store._write = real_write  # type: ignore[method-assign]
    assert store.is_implicit(7, message.seq) and store.pending(7, 0, 10) == []
    assert store.materialize([(7, message.seq, 1)]) == 1
    assert store.pending(7, 0, 10) == [(message.seq, 1)] and _implicit_keys(store) == []


def test_settles_applied_later_are_never_seen_as_pending(store: ShardStore) -> None:
    """settle_later() only queues settled entries; every read of pending entries applies the queue first, so a
    backlog scan never hands a settled entry out again, and the counts follow."""
    seqs = _append(store, 3, [1, 2])
    store.settle_later([(1, seqs[0]), (2, seqs[0]), (1, seqs[1])])
    assert store.settles_waiting == 3 and store.settled_total == 0
    assert store.pending(1, 0, 10) == [(seqs[2], 0)]
    assert store.settles_waiting == 0 and store.settled_total == 3
    assert store.pending(2, 0, 10) == [(seqs[1], 0), (seqs[2], 0)]
    assert store.read_message(seqs[0]) is None  # settled by every subscription: deleted
    assert store.backlog == {1: 1, 2: 2}


def test_settles_still_queued_at_a_crash_leave_their_entries_pending(tmp_path: Path) -> None:
    """The queue lives in memory only: after a crash its entries are pending again (delivered again, at least once)."""
    path = tmp_path / "shard"
    store = ShardStore(path, sync=False)
    seqs = _append(store, 2, [1])
    store.settle_later([(1, seqs[0])])
    store._db.close()  # a SIGKILL: close() would apply the queue first
    reopened = ShardStore(path, sync=False)
    try:
        assert reopened.pending(1, 0, 10) == [(seqs[0], 0), (seqs[1], 0)]
    finally:
        reopened.close()


def test_queued_settles_whose_write_fails_are_counted_and_stay_pending(store: ShardStore) -> None:
    """apply_settles() does not raise (it runs inside unrelated reads): a failed write is counted and logged, and
    its entries stay pending, as after a failed complete()."""
    seqs = _append(store, 2, [1])
    store.settle_later([(1, seqs[0])])
    real_write = store._write

    def full_disk(batch: Any, options: Any) -> None:
        raise StorageError("IO error: No space left on device")

    store._write = full_disk  # type: ignore[method-assign]
    assert store.apply_settles() == 0
    store._write = real_write  # type: ignore[method-assign]
    assert store.settle_failures == 1 and store.settles_waiting == 0 and store.settled_total == 0
    assert store.pending(1, 0, 10) == [(seqs[0], 0), (seqs[1], 0)]
    assert store.backlog == {1: 2}


def test_a_queued_settle_whose_read_fails_is_counted_and_does_not_escape(tmp_path: Path) -> None:
    """Settling a message no longer in the fan-out map reads it back; rocksdict raises plain exceptions there, and
    apply_settles() runs inside unrelated calls (a backlog scan here), so it must not let one out."""
    path = tmp_path / "shard"
    store = ShardStore(path, sync=False)
    seqs = _append(store, 2, [1])
    store.close()
    reopened = ShardStore(path, sync=False)  # an empty fan-out map: settling reads the message back
    try:
        real_get_many = reopened._get_many

        def failing_read(keys: list[bytes]) -> list[bytes | None]:
            raise RuntimeError("IO error: read failed")

        reopened.settle_later([(1, seqs[0])])
        reopened._get_many = failing_read  # type: ignore[method-assign]
        assert reopened.apply_settles() == 0
        reopened._get_many = real_get_many  # type: ignore[method-assign]
        assert reopened.settle_failures == 1
        assert reopened.pending(1, 0, 10) == [(seqs[0], 0), (seqs[1], 0)]
    finally:
        reopened.close()


def test_seqs_written_before_a_lost_wal_tail_are_never_used_again(tmp_path: Path) -> None:
    """Messages are handed out before their fsync. If the WAL's unsynced tail is then lost
    (a power loss, a failed fsync), the reopened shard must not give those seqs to new
    messages: a sender may still hold the lost ones, and their acks would settle the new."""
    store = ShardStore(tmp_path / "shard")
    try:
        durable = _append(store, 3, [1])
        # The disk as a power loss would leave it: what was fsync'd, and nothing after.
        shutil.copytree(tmp_path / "shard", tmp_path / "after-power-loss")
        lost = [StoredMessage(store.next_seq(), "t", f"lost-{i}", {}, b"x", 0.0, [1], 2**40) for i in range(3)]
        store.write(lost, [], [(1, m.seq) for m in lost])  # written and handed out; its fsync never happens
    finally:
        store.close()
    reopened = ShardStore(tmp_path / "after-power-loss")
    try:
        assert [m.seq for m in reopened.messages()] == durable  # the tail is gone...
        fresh = reopened.next_seq()
        assert fresh > max(m.seq for m in lost)  # ...and so are its seqs
        reopened.append([StoredMessage(fresh, "t", "fresh", {}, b"x", 0.0, [1], 2**40)], [])
    finally:
        reopened.close()
    again = ShardStore(tmp_path / "after-power-loss")  # a reservation outlives a clean restart too
    try:
        assert again.next_seq() > fresh
    finally:
        again.close()
