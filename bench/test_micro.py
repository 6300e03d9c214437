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
from pathlib import Path
from typing import Any, Final

import pytest

from broker.runtime import LRUCache
from clients.protocol import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Command,
    DeliveredMessage,
    decode,
    decode_deliver,
    decode_publish,
    encode_deliver,
    encode_publish,
)
from frontend.store import DedupEntry, ShardStore, StoredMessage

BATCH: Final = 100
SIZE: Final = 100
TOPIC: Final = "bench.micro"
CACHE_ENTRIES: Final = 1_000


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
    assert len(frames) == 4 + BATCH


def test_decode_publish(benchmark: Any, publish_frames: list[bytes]) -> None:
    """decode (signature, command, header JSON) + decode_publish (validation): what a frontend does per PUBLISH."""

    def run() -> tuple[str, list[Any]]:
        return decode_publish(decode(publish_frames), DEFAULT_MAX_PAYLOAD_BYTES)

    topic, decoded = benchmark(run)
    assert topic == TOPIC and len(decoded) == BATCH


def test_publish_round_trip(benchmark: Any, items: list[tuple[bytes, dict[str, str] | None, str | None]]) -> None:
    """Encode and decode one PUBLISH of 100 messages: client plus frontend codec cost."""

    def run() -> tuple[str, list[Any]]:
        return decode_publish(decode(encode_publish(TOPIC, items, b"\x00" * 8)), DEFAULT_MAX_PAYLOAD_BYTES)

    topic, decoded = benchmark(run)
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
