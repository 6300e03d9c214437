"""Backlogs: many subscriptions draining one topic's stored messages at once.

The frontend hands out at most DISPATCH_PASS_LIMIT backlog entries per pass
of its loop, starting one subscription further on each pass, and keeps
decoded messages in a bounded cache that the subscriptions of a topic share.
Whatever the pass limit cuts, every subscription must still get every
message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clients import AsyncClient, Client
from clients.aio import run
from frontend.server import DISPATCH_PASS_LIMIT
from frontend.store import BODY_CACHE_BYTES, ShardStore, StoredMessage
from tests.conftest import HeraldSystem

SUBSCRIPTIONS = 25
MESSAGES = 200


def test_many_subscriptions_drain_a_backlog_larger_than_a_dispatch_pass(herald: HeraldSystem) -> None:
    assert SUBSCRIPTIONS * MESSAGES > 2 * DISPATCH_PASS_LIMIT
    names = [f"drain-{n}" for n in range(SUBSCRIPTIONS)]
    with Client(herald.endpoint) as client:
        client.create_topic("drained")
        for name in names:
            client.create_subscription("drained", name)
        published = set(client.publish_batch("drained", [f"m{n}".encode() for n in range(MESSAGES)]))

    async def drain(name: str, client: AsyncClient) -> set[str]:
        received: set[str] = set()
        async with client.subscribe("drained", name) as subscription:
            while received != published:
                message = await subscription.receive(timeout=30)
                assert message is not None, f"{name} stopped after {len(received)} messages"
                received.add(message.id)
                message.ack_nowait()
        return received

    async def drain_all() -> list[set[str]]:
        async with AsyncClient(herald.endpoint, timeout=30) as client:
            return await asyncio.gather(*(drain(name, client) for name in names))

    assert run(drain_all()) == [published] * SUBSCRIPTIONS


@pytest.fixture
def store(tmp_path: Path) -> ShardStore:
    return ShardStore(tmp_path / "shard", sync=False)


def test_a_cached_message_goes_with_its_last_pending_entry(store: ShardStore) -> None:
    subscriptions = [1, 2, 3]
    message = StoredMessage(store.next_seq(), "t", "m", {}, b"x", 0.0, subscriptions, 2**40)
    store.append([message], [])
    store._fanout.clear()
    store._fanout_slots = 0  # read back from disk, as for an old backlog
    try:
        assert store.read_messages([message.seq]) == [message]
        store.complete([(1, message.seq)])
        store.complete([(2, message.seq)])
        assert store.read_messages([message.seq]) == [message]
        store.complete([(3, message.seq)])
        assert store.read_messages([message.seq]) == [None]
        assert store.messages() == []
        assert message.subscriptions == [1, 2, 3], "settling must not edit the message it was given"
    finally:
        store.close()


def test_the_body_cache_is_bounded_and_answers_every_read(store: ShardStore) -> None:
    payload = b"x" * (1024 * 1024)
    count = BODY_CACHE_BYTES // len(payload) + 8
    messages = [StoredMessage(store.next_seq(), "t", f"m{n}", {}, payload, 0.0, [1], 2**40) for n in range(count)]
    try:
        store.append(messages, [])
        # One read of more than the cache holds still returns every message.
        assert [m.seq if m else None for m in store.read_messages([m.seq for m in messages])] == [m.seq for m in messages]
        assert store._body_bytes <= BODY_CACHE_BYTES
        assert len(store._bodies) < count
    finally:
        store.close()
