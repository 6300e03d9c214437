"""Microbenchmarks of Herald's hot paths (pytest-benchmark).

Run::

    python -m pytest bench/test_micro.py --benchmark-enable -p no:cacheprovider

pyproject's addopts disable benchmarks and its testpaths is ``tests``, so the
default suite neither collects nor times these. Every benchmark also checks
its result, so a broken codec fails here instead of looking fast.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import zmq

from broker.config import build_local_config
from broker.runtime import LRUCache, drain
from clients._core import AsyncMessage, slot_constructor
from clients.protocol import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Command,
    DeliveredMessage,
    PublishItem,
    decode,
    decode_deliver,
    decode_publish,
    delivery_ref,
    encode_deliver,
    encode_publish,
    parse_acked_refs,
    parse_delivery_ref,
)
from frontend.server import FrontendServer, SubscriptionCursor
from frontend.store import DedupEntry, ShardStore, StoredMessage

BATCH: Final = 100
SIZE: Final = 100
TOPIC: Final = "bench.micro"
CACHE_ENTRIES: Final = 1_000
FANOUT: Final = 100  # subscriptions of the topic in the fan-out benchmarks
SENDERS: Final = 2


@pytest.fixture(scope="module")
def items() -> list[tuple[bytes, dict[str, str] | None, str | None]]:
    """100 publish items as the client builds them: payload, attributes, a uuid4 hex id."""
    return [(b"x" * SIZE, {"region": "eu"} if i % 2 else None, uuid.uuid4().hex) for i in range(BATCH)]


@pytest.fixture(scope="module")
def publish_frames(items: list[tuple[bytes, dict[str, str] | None, str | None]]) -> list[bytes]:
    return encode_publish(TOPIC, items, b"\x00" * 8)


@pytest.fixture(scope="module")
def deliveries() -> list[DeliveredMessage]:
    return [DeliveredMessage(uuid.uuid4().hex, TOPIC, 1, {"region": "eu"}, time.time(), f"0.{seq}", b"x" * SIZE) for seq in range(BATCH)]


def test_encode_publish(benchmark: Any, items: list[tuple[bytes, dict[str, str] | None, str | None]]) -> None:
    frames = benchmark(encode_publish, TOPIC, items, b"\x00" * 8)
    assert len(frames) == 5  # the payloads travel packed in one frame (docs/protocol.md §2)


def test_decode_publish(benchmark: Any, publish_frames: list[bytes]) -> None:
    """decode (signature, command, header JSON) + decode_publish (validation): what a frontend does per PUBLISH."""

    def run() -> tuple[str, list[Any], Any]:
        return decode_publish(decode(publish_frames), DEFAULT_MAX_PAYLOAD_BYTES)

    topic, decoded, _ = benchmark(run)
    assert topic == TOPIC and len(decoded) == BATCH


def test_publish_round_trip(benchmark: Any, items: list[tuple[bytes, dict[str, str] | None, str | None]]) -> None:
    """Encode and decode one PUBLISH of 100 messages: client plus frontend codec cost."""

    def run() -> tuple[str, list[Any], Any]:
        return decode_publish(decode(encode_publish(TOPIC, items, b"\x00" * 8)), DEFAULT_MAX_PAYLOAD_BYTES)

    topic, decoded, _ = benchmark(run)
    assert topic == TOPIC
    assert [item.message_id for item in decoded] == [item[2] for item in items]


def test_encode_deliver(benchmark: Any, deliveries: list[DeliveredMessage]) -> None:
    frames = benchmark(encode_deliver, "consumer-1", "sub", deliveries)
    assert len(frames) == 5 + BATCH


def test_decode_deliver(benchmark: Any, deliveries: list[DeliveredMessage]) -> None:
    """decode + decode_deliver of a DELIVER of 100 messages: what a consumer does per SUB message."""
    raw = encode_deliver("consumer-1", "sub", deliveries)

    def run() -> tuple[list[DeliveredMessage], int]:
        frames = decode(raw[1:])  # the first frame is the PUB topic
        assert frames.command is Command.DELIVER
        return decode_deliver(frames)

    messages, skipped = benchmark(run)
    assert skipped == 0 and messages == deliveries


@pytest.mark.parametrize("how", ["dataclass __init__", "slot_constructor"])
def test_build_consumer_messages(benchmark: Any, deliveries: list[DeliveredMessage], how: str) -> None:
    """The AsyncMessage objects of a DELIVER of 100 messages, as ConsumerCore makes them, against the dataclass's own __init__."""
    make = AsyncMessage if how == "dataclass __init__" else slot_constructor(AsyncMessage)
    owner: Any = None  # never asked to acknowledge here

    def run() -> list[AsyncMessage]:
        return [make(m.id, m.topic, m.payload, m.attributes, m.attempt, m.ref, "sub", m.ts, owner) for m in deliveries]

    built = benchmark(run)
    assert built == [AsyncMessage(m.id, m.topic, m.payload, m.attributes, m.attempt, m.ref, "sub", m.ts, owner) for m in deliveries]


def test_parse_acked_refs(benchmark: Any) -> None:
    """parse_acked_refs of an ACK of 100: what a sender does per ACK of 100."""
    items = [[delivery_ref(0, 1_000_000 + n), 1] for n in range(BATCH)]
    parsed = benchmark(lambda: parse_acked_refs(items, "acks"))
    assert parsed == [(0, 1_000_000 + n, 1) for n in range(BATCH)]
    assert [parse_delivery_ref(ref) for ref, _ in items] == [(shard, seq) for shard, seq, _ in parsed]


def test_store_append_sync(benchmark: Any, tmp_path: Path) -> None:
    """ShardStore.append of 100 messages (one subscription, dedup ids) with sync=True: one WriteBatch, one fsync."""
    store = ShardStore(tmp_path / "shard", sync=True)
    ids = itertools.count()
    batches = 0
    expire_ms = int((time.time() + 3600) * 1000)

    def batch() -> tuple[tuple[list[StoredMessage], list[DedupEntry]], dict[str, Any]]:
        nonlocal batches
        batches += 1
        messages: list[StoredMessage] = []
        dedup: list[DedupEntry] = []
        for _ in range(BATCH):
            seq = store.next_seq()
            message_id = f"{next(ids):032x}"
            messages.append(StoredMessage(seq, TOPIC, message_id, {}, b"x" * SIZE, time.time(), [1], expire_ms))
            dedup.append(DedupEntry(TOPIC, message_id, expire_ms, seq))
        return (messages, dedup), {}

    try:
        # The messages are built in setup, outside the timer: only the write and its fsync are measured.
        benchmark.pedantic(store.append, setup=batch, rounds=50, warmup_rounds=2)
        assert store.count_messages() == batches * BATCH  # 52 rounds timed, 1 when benchmarks are disabled
        assert len(store.pending(1, 0, 10)) == 10
    finally:
        store.close()


@pytest.fixture
def cache() -> LRUCache[str, dict[str, Any]]:
    lru: LRUCache[str, dict[str, Any]] = LRUCache(CACHE_ENTRIES)
    for index in range(CACHE_ENTRIES):
        lru.put(f"topic-{index}", {"name": f"topic-{index}", "retention": 3600})
    return lru


def test_lru_get_hit(benchmark: Any, cache: LRUCache[str, dict[str, Any]]) -> None:
    value = benchmark(cache.get, "topic-500")
    assert value is not None and value["name"] == "topic-500"


def test_lru_get_miss(benchmark: Any, cache: LRUCache[str, dict[str, Any]]) -> None:
    assert benchmark(cache.get, "absent") is None


# --------------------------------------------------------------------------- fan-out of one message


def _topic_lookup(subscriptions: int) -> dict[str, Any]:
    """A topic lookup as metadata answers it: the topic and its subscriptions, none filtered."""
    settings = {"retention": 3600.0, "dedup_window": 600.0, "max_payload": None}
    return {
        "topic": {"id": 1, "name": TOPIC, "settings": settings},
        "subscriptions": [{"id": sub_id, "settings": {}} for sub_id in range(1, subscriptions + 1)],
    }


@pytest.fixture
def frontend(tmp_path: Path) -> Iterator[tuple[FrontendServer, list[zmq.Socket[Any]]]]:
    """A real FrontendServer (its own shard in tmp_path, not running its loop) and PULL sockets standing in for the senders."""
    config = build_local_config(data_dir=str(tmp_path), port=0, frontends=1, senders=SENDERS)
    context: zmq.Context[Any] = zmq.Context()
    intakes: list[zmq.Socket[Any]] = []
    for endpoint in config.sender_intake_endpoints:
        intake = context.socket(zmq.PULL)
        intake.setsockopt(zmq.LINGER, 0)
        intake.bind(endpoint)
        intakes.append(intake)
    server = FrontendServer(config, 0)
    for sub_id in range(1, FANOUT + 1):
        server.cursors[sub_id] = SubscriptionCursor(sub_id, sub_id % SENDERS, window=1_000, backlog=False)
    try:
        yield server, intakes
    finally:
        server._shutdown()
        for intake in intakes:
            intake.close(0)
        context.term()


def _settle(server: FrontendServer, intakes: list[zmq.Socket[Any]]) -> int:
    """What the senders' completions would do between messages: free every cursor; drain the DISPATCHes. Returns messages received."""
    received = 0
    for intake in intakes:
        received += sum(1 for _ in drain(intake, 100_000))
    for cursor in server.cursors.values():
        cursor.outstanding.clear()
    server.batch_messages, server.batch_dedup, server.batch_replies, server.batch_ids = [], [], [], {}
    return received


def test_fanout_accept_one_message(benchmark: Any, frontend: tuple[FrontendServer, list[zmq.Socket[Any]]]) -> None:
    """FrontendServer._accept_publish of one message to a topic with 100 subscriptions: de-dup lookup, subscription selection, batching."""
    server, intakes = frontend
    lookup = _topic_lookup(FANOUT)
    ids = itertools.count()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        _settle(server, intakes)
        item = PublishItem(f"{next(ids):032x}", {}, b"x" * SIZE)
        return ([b"client"], b"\x00" * 8, TOPIC, [item], None, lookup), {}

    benchmark.pedantic(server._accept_publish, setup=setup, rounds=2_000, warmup_rounds=20)
    assert len(server.batch_messages) == 1 and server.batch_messages[0].subscriptions == list(range(1, FANOUT + 1))


def test_fanout_plan_and_dispatch_one_message(benchmark: Any, frontend: tuple[FrontendServer, list[zmq.Socket[Any]]]) -> None:
    """_plan_fast_dispatch + _send_dispatches of one stored message to 100 subscriptions: one DISPATCH per sender."""
    server, intakes = frontend
    seqs = itertools.count(1)
    expire_ms = int((time.time() + 3600) * 1000)
    subscriptions = list(range(1, FANOUT + 1))

    def setup() -> tuple[tuple[StoredMessage], dict[str, Any]]:
        _settle(server, intakes)
        seq = next(seqs)
        return (StoredMessage(seq, TOPIC, f"{seq:032x}", {}, b"x" * SIZE, time.time(), subscriptions, expire_ms),), {}

    rounds = 0

    def fan_out(message: StoredMessage) -> int:
        nonlocal rounds
        rounds += 1
        plan, left_on_disk = server._plan_fast_dispatch([message])
        server._send_dispatches(plan, fresh=True)
        return len(plan) - len(left_on_disk)

    planned = benchmark.pedantic(fan_out, setup=setup, rounds=2_000, warmup_rounds=20)
    assert planned == FANOUT
    # The last rounds' DISPATCHes (one per sender per round) may still be on their way over TCP; none was refused
    # (a refused one is taken back, uncounted), so every round's 100 entries count as dispatched.
    assert all(intake.poll(5_000) for intake in intakes)
    assert _settle(server, intakes) >= SENDERS
    assert server.counters["dispatched"] >= rounds * FANOUT  # one round only under --benchmark-disable


def test_store_append_fanout_one_message(benchmark: Any, tmp_path: Path) -> None:
    """ShardStore.append of one message with its 100 pending entries (fan-out at write time), sync=False: the write's own cost, no fsync.

    No entry is handed out as it is written (every subscription behind), so each is a ``P`` key: handed out, they
    would be implicit entries and cost no key at all.
    """
    store = ShardStore(tmp_path / "shard", sync=False)
    expire_ms = int((time.time() + 3600) * 1000)
    subscriptions = list(range(1, FANOUT + 1))

    def setup() -> tuple[tuple[list[StoredMessage], list[DedupEntry], list[tuple[int, int]]], dict[str, Any]]:
        seq = store.next_seq()
        message = StoredMessage(seq, TOPIC, f"{seq:032x}", {}, b"x" * SIZE, time.time(), subscriptions, expire_ms)
        return ([message], [DedupEntry(TOPIC, message.message_id, expire_ms, seq)], []), {}

    try:
        benchmark.pedantic(store.append, setup=setup, rounds=500, warmup_rounds=5)
        assert len(store.pending(1, 0, 10)) >= 1 and len(store.pending(FANOUT, 0, 10)) >= 1
    finally:
        store.close()


@pytest.mark.parametrize("subscriptions", [1, 10])
def test_store_write_group_commit(benchmark: Any, tmp_path: Path, subscriptions: int) -> None:
    """ShardStore.write of a group commit of 200 messages with client ids, without the fsync: building the batch and RocksDB's insert.

    The keys go in grouped by kind and in key order; interleaving each
    message's body with its pending entries made this write 13% (1
    subscription) to 33% (10) slower.
    """
    store = ShardStore(tmp_path / "shard", sync=False)
    expire_ms = int((time.time() + 3600) * 1000)
    subs = list(range(1, subscriptions + 1))

    def setup() -> tuple[tuple[list[StoredMessage], list[DedupEntry], list[tuple[int, int]]], dict[str, Any]]:
        messages = [StoredMessage(store.next_seq(), TOPIC, uuid.uuid4().hex, {}, b"x" * SIZE, time.time(), subs, expire_ms) for _ in range(2 * BATCH)]
        dedup = [DedupEntry(TOPIC, message.message_id, expire_ms, message.seq) for message in messages]
        return (messages, dedup, [(subs[0], message.seq) for message in messages]), {}

    try:
        benchmark.pedantic(store.write, setup=setup, rounds=200, warmup_rounds=5)
        store.make_durable(store.last_seq)
        assert store.count_pending(subscriptions) >= 10  # P keys (subscriptions after the first, not handed out)
    finally:
        store.close()


def test_store_backlog_refill(benchmark: Any, tmp_path: Path) -> None:
    """One backlog refill of a subscription: ShardStore.pending of 2,000 entries, then record_attempts of them.

    The path every entry takes when a subscription has fallen behind (at 10
    subscriptions the end-to-end fan-out runs mostly from it).
    """
    store = ShardStore(tmp_path / "shard", sync=False)
    expire_ms = int((time.time() + 3600) * 1000)
    try:
        for _ in range(20):
            store.write([StoredMessage(store.next_seq(), TOPIC, "", {}, b"x" * SIZE, 0.0, [1, 2], expire_ms) for _ in range(10 * BATCH)], [])
        store.make_durable(store.last_seq)

        def refill() -> int:
            found = store.pending(1, 0, 2000)
            store.record_attempts([(1, seq, attempts + 1) for seq, attempts in found], known_pending=True)
            return len(found)

        assert benchmark(refill) == 2000
    finally:
        store.close()


def test_store_pending_scan_beside_settled_entries(benchmark: Any, tmp_path: Path) -> None:
    """ShardStore.pending of a subscription with nothing pending, whose neighbour settled 100 000 entries.

    The scan's upper bound stops it at the end of its own range; without one,
    RocksDB steps over every deleted entry of the next subscription (about
    14 ms here) before it finds a key outside the range.
    """
    store = ShardStore(tmp_path / "shard", sync=False)
    expire_ms = int((time.time() + 3600) * 1000)
    try:
        for _ in range(1000):
            messages = [StoredMessage(store.next_seq(), TOPIC, "", {}, b"x", 0.0, [2], expire_ms) for _ in range(BATCH)]
            store.append(messages, [])
            store.complete([(2, message.seq) for message in messages])
        store.append([StoredMessage(store.next_seq(), TOPIC, "", {}, b"x", 0.0, [3], expire_ms)], [])
        assert benchmark(store.pending, 1, 0, 100) == []
    finally:
        store.close()
