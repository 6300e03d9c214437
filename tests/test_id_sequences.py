"""Id sequences (docs/protocol.md, PUBLISH ``sequence``, and §7): ids a client makes, named by a prefix and a first
number, and remembered by the owning frontend as ranges of numbers instead of an index key per id."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from clients import AsyncClient, Client, HeraldError
from clients._core import SEQUENCE_BLOCK, publish_call, reserve_ids
from clients.protocol import Command, Frames, IdSequence, encode_publish, shard_of, split_sequence_id
from frontend.store import EXPIRE_CHUNK, SEQUENCE_CACHE_ENTRIES, SEQUENCE_MAX_RANGES, ShardStore, StoredMessage, merge_ranges, sequence_key
from tests.conftest import HeraldSystem, RawClient, stored_messages

TOPIC = "sequenced"


def _publish(raw: RawClient, sequence: dict[str, Any] | None, count: int, messages: list[dict[str, Any]] | None = None) -> Frames:
    header: dict[str, Any] = {"topic": TOPIC}
    if sequence is not None:
        header["sequence"] = sequence
    if messages is not None:
        header["messages"] = messages
    return raw.request(Command.PUBLISH, header, [f"m{index}".encode() for index in range(count)])


def test_a_sequence_publish_sent_again_is_stored_once_also_after_its_frontend_is_killed(herald: HeraldSystem, raw: RawClient) -> None:
    assert raw.request(Command.TOPIC_CREATE, {"name": TOPIC}).command is Command.OK
    first = _publish(raw, {"prefix": "app-1", "first": 10}, 5)
    assert first.command is Command.OK, first.header
    assert first.header["ids"] == [f"app-1~{number:x}" for number in range(10, 15)]
    assert first.header["duplicate"] == [False] * 5

    again = _publish(raw, {"prefix": "app-1", "first": 10}, 5)
    assert again.header["ids"] == first.header["ids"] and again.header["duplicate"] == [True] * 5

    # Overlapping the stored numbers at one end, and another prefix with the same numbers.
    overlap = _publish(raw, {"prefix": "app-1", "first": 13}, 4)
    assert overlap.header["duplicate"] == [True, True, False, False]
    other = _publish(raw, {"prefix": "app-2", "first": 10}, 2)
    assert other.header["duplicate"] == [False, False]
    # An id a sequence gave, sent again as a message's own id: still the same message.
    echoed = _publish(raw, None, 2, [{"id": "app-1~c"}, {"id": "app-1~100"}])
    assert echoed.header["duplicate"] == [True, False]

    # The records are on disk with their messages: a SIGKILL of every frontend forgets nothing.
    for name in ("frontend-0", "frontend-1"):
        herald.wait_restarted(name, herald.kill_child(name, signal.SIGKILL))
    deadline = time.monotonic() + 30
    while True:
        after = _publish(raw, {"prefix": "app-1", "first": 10}, 7)
        if after.command is Command.OK or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the restarted owner may not be serving yet
    assert after.command is Command.OK, after.header
    assert after.header["duplicate"] == [True] * 7
    assert _publish(raw, {"prefix": "app-2", "first": 11}, 2).header["duplicate"] == [True, False]

    herald.stop()
    ids = sorted(message.message_id for message in stored_messages(herald.data_dir) if message.topic == TOPIC)
    expected = [f"app-1~{number:x}" for number in range(10, 17)] + ["app-1~100", "app-2~a", "app-2~b", "app-2~c"]
    assert ids == sorted(expected)  # each stored once


@pytest.mark.parametrize(
    ("sequence", "messages", "says"),
    [
        ("app", None, "must be an object"),
        ({"first": 1}, None, "sequence.prefix"),
        ({"prefix": "", "first": 1}, None, "sequence.prefix"),
        ({"prefix": "a~b", "first": 1}, None, "sequence.prefix"),
        ({"prefix": "p" * 65, "first": 1}, None, "sequence.prefix"),
        ({"prefix": "app", "first": -1}, None, "sequence.first"),
        ({"prefix": "app", "first": 1.5}, None, "sequence.first"),
        ({"prefix": "app", "first": True}, None, "sequence.first"),
        ({"prefix": "app", "first": 2**64 - 1}, None, "sequence.first"),
        ({"prefix": "app", "first": 2**63 - 1}, None, "sequence.first"),  # the second message's number is 2**63
        ({"prefix": "app", "first": 1}, [{"id": "own"}, {}], "id of its own"),
    ],
)
def test_a_bad_sequence_is_refused_as_invalid_header_and_stores_nothing(
    herald: HeraldSystem, raw: RawClient, sequence: Any, messages: list[dict[str, Any]] | None, says: str
) -> None:
    assert raw.request(Command.TOPIC_CREATE, {"name": TOPIC}).command is Command.OK
    reply = _publish(raw, sequence, 2, messages)
    assert reply.command is Command.ERROR and reply.header["code"] == "invalid_header", reply.header
    assert says in reply.header["message"]
    assert _publish(raw, {"prefix": "app", "first": 0}, 2).command is Command.OK  # still serving
    herald.stop()
    assert len([message for message in stored_messages(herald.data_dir) if message.topic == TOPIC]) == 2


def test_the_python_client_sends_the_ids_it_makes_as_one_sequence_and_its_resend_is_a_duplicate(herald: HeraldSystem) -> None:
    with Client(herald.endpoint) as client:
        client.create_topic(TOPIC)
        made = client.publish_batch(TOPIC, [b"a", b"b", b"c"])
        parts = [split_sequence_id(str(message_id)) for message_id in made]
        assert all(part is not None for part in parts) and len({part[0] for part in parts if part}) == 1
        assert [part[1] for part in parts if part] == list(range(parts[0][1], parts[0][1] + 3))  # type: ignore[index]
        # Mixed with an id of the caller's own, the made ones go in their entries, outside any sequence.
        mixed = client.publish_batch(TOPIC, [b"d", (b"e", None, "own-id")])
        assert "~" not in mixed[0] and mixed[1] == "own-id"
        # A resend of the very same request (as after a lost reply) finds every message stored.
        call = publish_call(TOPIC, [(b"f", None, None), (b"g", None, None)])
        sent = client._request(call)
        resent = client._request(call)
        assert resent == sent and all(message_id.duplicate for message_id in resent)
        assert not any(message_id.duplicate for message_id in sent)
        # The owner counts the messages stored with ids of their own (b"d", whose id was made outside any
        # sequence, and b"e") and with ids from a sequence.
        owner = _owner_status(client)
        assert owner["ids_indexed"] == 2 and owner["ids_in_sequences"] == 5 and owner["published"] == 7
    herald.stop()
    stored = sorted(message.payload for message in stored_messages(herald.data_dir) if message.topic == TOPIC)
    assert stored == [b"a", b"b", b"c", b"d", b"e", b"f", b"g"]


def _owner_status(client: Client) -> dict[str, Any]:
    """STATUS of the frontend that owns TOPIC (the proxy spreads requests over the frontends)."""
    owner = shard_of(TOPIC, client.info()["frontends"])
    for _ in range(50):
        status = client.status()
        if status["frontend"] == owner:
            return status
    raise AssertionError(f"no STATUS answer from frontend {owner}")


def test_the_highest_numbers_a_sequence_may_use_are_stored(herald: HeraldSystem, raw: RawClient) -> None:
    assert raw.request(Command.TOPIC_CREATE, {"name": TOPIC}).command is Command.OK
    last = _publish(raw, {"prefix": "edge", "first": 2**63 - 2}, 2)
    assert last.command is Command.OK, last.header
    assert last.header["ids"] == [f"edge~{2**63 - 2:x}", f"edge~{2**63 - 1:x}"]
    assert _publish(raw, {"prefix": "edge", "first": 2**63 - 2}, 2).header["duplicate"] == [True, True]


def test_each_topic_gets_numbers_of_its_own_so_its_record_stays_one_range() -> None:
    """One counter for every topic would leave a gap in a topic's record for each request to another (and the
    server keeps a record's newest 256 ranges only)."""
    a_first, b_first, a_next = reserve_ids("ids.a", 3), reserve_ids("ids.b", 2), reserve_ids("ids.a", 4)
    assert a_next.first == a_first.first + 3 and a_next.prefix == a_first.prefix == b_first.prefix
    assert abs(b_first.first - a_first.first) >= SEQUENCE_BLOCK  # blocks apart: never the same numbers


def test_a_coalesced_batch_split_after_an_error_keeps_its_ids(herald: HeraldSystem) -> None:
    """After an error for one message, an AsyncClient sends each of a coalesced batch alone, with the ids the batch
    had: a sequence's, each as its own id, which the server finds in the sequence's record if the batch was stored."""

    async def publish() -> list[Any]:
        async with AsyncClient(herald.endpoint) as client:
            await client.create_topic(TOPIC, max_payload=10)
            return await asyncio.gather(*(client.publish(TOPIC, payload) for payload in (b"a", b"x" * 11, b"c")), return_exceptions=True)

    before = reserve_ids(TOPIC, 1)  # this process's counter for the topic: the batch takes the next three
    first, refused, third = asyncio.run(publish())
    assert isinstance(refused, HeraldError) and refused.code == "payload_too_large"
    assert split_sequence_id(str(first)) == (before.prefix, before.first + 1)  # not new numbers for the resends
    assert split_sequence_id(str(third)) == (before.prefix, before.first + 3)
    herald.stop()
    assert sorted(m.payload for m in stored_messages(herald.data_dir) if m.topic == TOPIC) == [b"a", b"c"]


def test_a_sequence_request_carries_no_per_message_ids_on_the_wire() -> None:
    frames = encode_publish(TOPIC, [(b"x", None, None)] * 3, b"r", sequence=IdSequence("p", 7))
    header = frames[3]
    assert b'"sequence":{"prefix":"p","first":7}' in header and b'"messages"' not in header
    with_attributes = encode_publish(TOPIC, [(b"x", {"k": "v"}, None), (b"y", None, None)], b"r", sequence=IdSequence("p", 7))[3]
    assert b'"messages":[{"attributes":{"k":"v"}},{}]' in with_attributes


def test_ranges_merge_whatever_order_the_numbers_come_in() -> None:
    assert merge_ranges([], [5, 7]) == [5, 7]
    assert merge_ranges([5, 7], [7, 9]) == [5, 9]  # the next numbers of a client
    assert merge_ranges([5, 7], [8, 9]) == [5, 7, 8, 9]  # a gap stays a gap: 7 was never stored
    assert merge_ranges([5, 7, 8, 9], [7, 8]) == [5, 9]
    assert merge_ranges([10, 20], [1, 3, 2, 4, 15, 25]) == [1, 4, 10, 25]
    assert merge_ranges([10, 20], [12, 14]) == [10, 20]


def _write(store: ShardStore, key: bytes, runs: list[int], expire_ms: int) -> None:
    message = StoredMessage(store.next_seq(), "t", "m", {}, b"x", 0.0, [], 2**40)
    store.make_durable(store.write([message], [], sequences={key: (runs, expire_ms)}))


def test_a_sequence_record_outlives_a_reopen_and_expires_a_window_after_its_last_write(tmp_path: Path) -> None:
    key = sequence_key("1:t", "app")
    store = ShardStore(tmp_path / "shard")
    try:
        _write(store, key, [0, 100], expire_ms=1_000)
        _write(store, key, [100, 150], expire_ms=2_000)  # later writes move the expiry on
        assert store.stored_in_sequence(key, 90, 20) == list(range(90, 110))
        assert store.stored_in_sequence(key, 150, 5) == []
    finally:
        store.close()
    store = ShardStore(tmp_path / "shard")
    try:
        assert store.stored_in_sequence(key, 0, 200) == list(range(150))
        store.expire(now_ms=1_500)  # its first check: written to since, so it is looked at again later
        assert store.stored_in_sequence(key, 149, 1) == [149]
        store.expire(now_ms=2_001)
        assert store.stored_in_sequence(key, 0, 200) == []
    finally:
        store.close()
    store = ShardStore(tmp_path / "shard")
    try:
        assert store.stored_in_sequence(key, 0, 200) == []
        left = store._db.keys()
        assert not any(stored_key[:1] in (b"G", b"H") for stored_key in left)
    finally:
        store.close()


def test_the_expiry_of_many_sequence_records_is_swept_in_chunks(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "shard")
    try:
        keys = [sequence_key("1:t", f"client-{index}") for index in range(EXPIRE_CHUNK + 10)]
        message = StoredMessage(store.next_seq(), "t", "m", {}, b"x", 0.0, [], 2**40)
        store.make_durable(store.write([message], [], sequences={key: ([0, 1], 1_000) for key in keys}))
        store.expire(now_ms=5_000)
        assert store.expiring  # more was due than one call takes
        store.expire(now_ms=5_000)
        assert not store.expiring
        assert all(store.stored_in_sequence(key, 0, 1) == [] for key in keys)
    finally:
        store.close()


def test_a_record_keeps_its_newest_ranges_and_records_evicted_from_memory_are_read_back(tmp_path: Path) -> None:
    """protocol.md §7: a record keeps its newest SEQUENCE_MAX_RANGES ranges; and a record no longer cached is read
    from its G key, so a resend still finds it however many other prefixes were used since."""
    key = sequence_key("1:t", "gappy")
    store = ShardStore(tmp_path / "shard")
    try:
        runs = [number for start in range(0, 2 * (SEQUENCE_MAX_RANGES + 10), 2) for number in (start, start + 1)]  # every other number
        _write(store, key, runs, expire_ms=2**40)
        assert store.stored_in_sequence(key, 0, 20) == []  # the oldest ten ranges are forgotten
        newest = 2 * (SEQUENCE_MAX_RANGES + 9)
        assert store.stored_in_sequence(key, 20, 2) == [20] and store.stored_in_sequence(key, newest, 2) == [newest]
        others = {sequence_key("1:t", f"other-{index}"): ([0, 1], 2**40) for index in range(SEQUENCE_CACHE_ENTRIES + 10)}
        message = StoredMessage(store.next_seq(), "t", "m", {}, b"x", 0.0, [], 2**40)
        store.make_durable(store.write([message], [], sequences=others))
        assert key not in store._sequences  # pushed out of memory by the newer records
        assert store.stored_in_sequence(key, newest, 1) == [newest]  # read back from disk
    finally:
        store.close()
