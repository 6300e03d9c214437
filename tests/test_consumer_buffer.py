"""The consumer's buffer: de-duplication by delivery ref, and dropping copies the sender took back.

A message id is not unique per stored message (an id published again after the
topic's ``dedup_window``, dead-letter copies of one message from two
subscriptions), so the client de-duplicates on the delivery ``ref``. And a
buffered copy received more than ``ack_deadline`` ago has been taken back by
the sender, which frees the slot and sends it again: the client drops it
unprocessed, so a consumer slower than ``max_unacked / ack_deadline`` keeps a
bounded buffer instead of processing only copies whose ack is stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import clients._core as core_module
from clients import AsyncClient, Client, HeraldError
from clients._core import ConsumerCore, Message
from clients.protocol import DeliveredMessage, decode, encode_deliver
from tests.conftest import HeraldSystem

INFO: dict[str, Any] = {
    "name": "s",
    "topic": "t",
    "endpoints": {"deliver": "tcp://127.0.0.1:1", "ack": "tcp://127.0.0.1:2"},
    "settings": {"ack_deadline": 1.0},
}
# For the tests that read the real clock: no copy expires however slow the machine.
INFO_LONG: dict[str, Any] = {**INFO, "settings": {"ack_deadline": 3600.0}}

# The slow-consumer tests: small enough to run in seconds, and a bound on the
# buffer that the old behaviour (keep every copy) passes within a few sleeps.
ACK_DEADLINE_S = 1.0
MAX_UNACKED = 10
SLOW_TAKES = 4  # the first messages are each taken after a sleep of SLOW_SLEEP_S
SLOW_SLEEP_S = 1.5 * ACK_DEADLINE_S
MESSAGES = 50
# Why 3 x max_unacked: after each take the buffer holds only copies received
# within the last ack_deadline. In a sleep of 1.5 ack_deadlines the sender can
# send at most 2 x max_unacked copies (each slot is freed by an expired deadline
# at most twice), and everything received before the sleep is dropped at the
# next take; the rest of a max_unacked is slack for scheduling delays. Keeping
# every copy (the old behaviour) grows by about 2 x max_unacked per sleep and
# passes the bound by the third.
BUFFER_BOUND = 3 * MAX_UNACKED
DRAIN_DEADLINE_S = 120.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    yield fake


def deliver(core: ConsumerCore[Message], *entries: tuple[str, str], attempt: int = 1) -> list[tuple[str, int]]:
    """Hand ``core`` one DELIVER of (id, ref) entries; returns the acks it queued on arrival."""
    messages = [DeliveredMessage(message_id, "t", attempt, {}, 1.0, ref, message_id.encode()) for message_id, ref in entries]
    return core.handle(encode_deliver("c", "s", messages), None).reacks


def refs(messages: list[Message]) -> list[str]:
    return [message.ref for message in messages]


# --------------------------------------------------------------------------- the core alone


def test_core_drops_copies_by_ref_not_by_id() -> None:
    core: ConsumerCore[Message] = ConsumerCore(INFO_LONG, "c", Message)
    # One id, two stored messages (two refs): both are delivered.
    assert deliver(core, ("same", "0.1"), ("same", "0.2")) == []
    first = core.next_message()
    assert first is not None and first.ref == "0.1"
    core.queue_ack(first)
    second = core.next_message()
    assert second is not None and (second.id, second.ref) == ("same", "0.2")
    core.queue_ack(second)
    # A redelivery (same ref) is dropped on arrival and acknowledged again.
    assert deliver(core, ("same", "0.1"), attempt=2) == [("0.1", 2)]
    # A message with an acknowledged id but a new ref is another stored message: delivered.
    assert deliver(core, ("same", "0.3")) == []
    again = core.next_message()
    assert again is not None and (again.id, again.ref) == ("same", "0.3")
    stats = core.statistics()
    assert (stats.delivered, stats.duplicates_dropped, stats.acked) == (3, 1, 2)


def test_core_drops_expired_copies_by_deliver_batch(clock: FakeClock) -> None:
    core: ConsumerCore[Message] = ConsumerCore(INFO, "c", Message)
    deliver(core, ("a1", "0.1"), ("a2", "0.2"), ("a3", "0.3"))
    clock.now += 0.5
    deliver(core, ("b1", "0.4"), ("b2", "0.5"))
    clock.now += 0.1
    assert refs(core.next_messages(1)) == ["0.1"]
    # 1.1 s after the first DELIVER, 0.6 s after the second: the rest of the first is dropped.
    clock.now += 0.5
    taken = core.next_message()
    assert taken is not None and taken.ref == "0.4"
    assert core.statistics().expired_dropped == 2
    assert core.pending_acks == []  # never processed, so never acknowledged
    clock.now += 0.5
    assert core.next_messages(10) == [] and core.statistics().expired_dropped == 3
    # A DELIVER that arrives while expired copies wait drops them, even if nothing is taken.
    deliver(core, ("c1", "0.6"), ("c2", "0.7"))
    clock.now += 1.5
    deliver(core, ("d1", "0.8"))
    stats = core.statistics()
    assert (stats.buffered, stats.expired_dropped, stats.delivered) == (1, 5, 8)
    assert refs(core.next_messages(10)) == ["0.8"]


def test_core_names_only_fresh_copies_unseen_at_detach(clock: FakeClock) -> None:
    core: ConsumerCore[Message] = ConsumerCore(INFO, "c", Message)
    deliver(core, ("a1", "0.1"), ("a2", "0.2"), ("a3", "0.3"))
    clock.now += 0.6
    deliver(core, ("b1", "0.4"), ("b2", "0.5"))
    core.acked.add("0.2")  # acknowledged meanwhile (an ACK_REPLY for another copy)
    clock.now += 0.1
    core.settle_buffered_copies()
    assert core.pending_acks == [("0.2", 1)]
    assert refs(list(core.buffer)) == ["0.1", "0.3", "0.4", "0.5"]
    # The arrival times survive settling: 1.1 s after the first DELIVER only the second's copies are unseen.
    clock.now += 0.4
    assert decode(core.detach_frames()).header["unseen"] == [["0.4", 1], ["0.5", 1]]
    assert refs(list(core.buffer)) == ["0.4", "0.5"] and core.statistics().expired_dropped == 2


def test_core_without_an_ack_deadline_never_drops(clock: FakeClock) -> None:
    core: ConsumerCore[Message] = ConsumerCore({**INFO, "settings": {}}, "c", Message)
    deliver(core, ("a1", "0.1"), ("a2", "0.2"))
    clock.now += 1e6
    assert refs(core.next_messages(10)) == ["0.1", "0.2"]
    assert core.statistics().expired_dropped == 0


def test_core_keeps_arrival_marks_only_for_what_is_buffered() -> None:
    """A consumer that keeps up holds about one mark, however many DELIVERs it read."""
    core: ConsumerCore[Message] = ConsumerCore(INFO_LONG, "c", Message)
    for batch in range(1000):
        deliver(core, *[(f"m{batch}.{n}", f"0.{batch * 10 + n}") for n in range(10)])
        assert len(core.next_messages(9)) == 9
        assert len(core._arrivals) <= 2
        assert core.next_message() is not None
    assert core.statistics().expired_dropped == 0


# --------------------------------------------------------------------------- against the real system


def test_two_stored_messages_with_one_id_are_both_delivered(herald_module: HeraldSystem) -> None:
    """With dedup_window 0, one id published twice is two messages: the consumer gets (and acks) both."""
    with Client(herald_module.endpoint, timeout=10.0) as client:
        client.create_topic("reused.ids", dedup_window=0)
        client.create_subscription("reused.ids", "reused.ids.sub")
        assert not client.publish("reused.ids", b"first", message_id="same").duplicate
        # The id record of the first expires with the next retention sweep (about a second).
        deadline = time.monotonic() + 30.0
        while client.publish("reused.ids", b"second", message_id="same").duplicate:
            assert time.monotonic() < deadline, "the id of a dedup_window 0 topic was still remembered after 30 s"
            time.sleep(0.2)
        with client.subscribe("reused.ids", "reused.ids.sub") as subscription:
            got: list[Message] = []
            while len(got) < 2 and (message := subscription.receive(timeout=10.0)) is not None:
                assert message.ack() is True
                got.append(message)
            assert [(m.id, m.data) for m in got] == [("same", b"first"), ("same", b"second")]
            assert got[0].ref != got[1].ref
            assert subscription.receive(timeout=1.5) is None  # both settled: nothing comes back
            assert subscription.statistics().duplicates_dropped == 0


def test_dead_letter_copies_of_one_message_from_two_subscriptions_both_arrive(herald_module: HeraldSystem) -> None:
    """Two subscriptions sharing a dead-letter topic put two copies with the original id there; a reader gets both."""
    with Client(herald_module.endpoint, timeout=10.0) as client:
        client.create_topic("shared.src")
        client.create_topic("shared.dead")
        client.create_subscription("shared.dead", "shared.dead.reader")
        for name in ("shared.a", "shared.b"):
            client.create_subscription("shared.src", name, max_attempts=1, dead_letter_topic="shared.dead")
        published = client.publish("shared.src", b"poison", message_id="poison-1")
        with client.subscribe("shared.dead", "shared.dead.reader") as reader:
            copies: list[Message] = []
            for name in ("shared.a", "shared.b"):
                with client.subscribe("shared.src", name) as subscription:
                    original = subscription.receive(timeout=10.0)
                    assert original is not None and original.id == published
                    original.nack()  # its last attempt: dead-lettered
                copy = reader.receive(timeout=15.0)
                assert copy is not None, f"the dead-letter copy from {name} never reached the reader"
                assert copy.ack() is True
                copies.append(copy)
            assert [(c.id, c.attributes["herald.original_topic"]) for c in copies] == [("poison-1", "shared.src")] * 2
            assert copies[0].ref != copies[1].ref
            assert reader.statistics().duplicates_dropped == 0


def test_a_slow_consumer_drops_expired_copies_and_its_buffer_stays_bounded(herald_module: HeraldSystem) -> None:
    """A consumer slower than max_unacked / ack_deadline for a while: copies the sender took back are
    dropped unprocessed, the buffer stays bounded, and every message is still acknowledged."""
    with Client(herald_module.endpoint, timeout=15.0) as client:
        client.create_topic("slow.sync")
        settings = {"ack_deadline": ACK_DEADLINE_S, "max_unacked": MAX_UNACKED, "max_attempts": 1000, "backoff_min": 0.1, "backoff_max": 0.2}
        with client.subscribe("slow.sync", "slow.sync.sub", **settings) as subscription:
            published = {str(i) for i in client.publish_batch("slow.sync", [f"m{n}".encode() for n in range(MESSAGES)])}
            acked: set[str] = set()
            largest = 0

            def take(wait: float) -> None:
                nonlocal largest
                message = subscription.receive(timeout=wait)
                largest = max(largest, len(subscription._core.buffer))
                if message is None:
                    return
                assert message.id in published
                try:
                    if message.ack():
                        acked.add(message.id)
                except HeraldError as error:  # already settled: acked before, under another copy
                    assert error.code == "unknown_delivery", error
                largest = max(largest, len(subscription._core.buffer))

            for _ in range(SLOW_TAKES):
                time.sleep(SLOW_SLEEP_S)  # longer than ack_deadline: what is buffered meanwhile is taken back
                take(15.0)
            deadline = time.monotonic() + DRAIN_DEADLINE_S
            while acked != published and time.monotonic() < deadline:
                take(5.0)
            stats = subscription.statistics()
        assert acked == published, f"{len(published - acked)} of {MESSAGES} never acknowledged; {stats}"
        assert stats.expired_dropped > 0, stats
        assert largest <= BUFFER_BOUND, f"the buffer held {largest} copies; {stats}"


def test_a_slow_async_consumer_drops_expired_copies_and_its_buffer_stays_bounded(herald_module: HeraldSystem) -> None:
    """The same with the asyncio flavour, whose reader keeps filing deliveries while the application sleeps."""

    async def main() -> tuple[set[str], set[str], int, Any]:
        async with AsyncClient(herald_module.endpoint, timeout=15.0) as client:
            await client.create_topic("slow.async")
            settings = {"ack_deadline": ACK_DEADLINE_S, "max_unacked": MAX_UNACKED, "max_attempts": 1000, "backoff_min": 0.1, "backoff_max": 0.2}
            async with client.subscribe("slow.async", "slow.async.sub", **settings) as subscription:
                published = {str(i) for i in await client.publish_batch("slow.async", [f"m{n}".encode() for n in range(MESSAGES)])}
                acked: set[str] = set()
                largest = 0
                done = asyncio.Event()

                async def watch() -> None:  # the reader files deliveries between any two awaits
                    nonlocal largest
                    while not done.is_set():
                        largest = max(largest, len(subscription._core.buffer))
                        await asyncio.sleep(0.01)

                watcher = asyncio.get_running_loop().create_task(watch())

                async def take(wait: float) -> None:
                    message = await subscription.receive(timeout=wait)
                    if message is None:
                        return
                    assert message.id in published
                    try:
                        if await message.ack():
                            acked.add(message.id)
                    except HeraldError as error:
                        assert error.code == "unknown_delivery", error

                for _ in range(SLOW_TAKES):
                    await asyncio.sleep(SLOW_SLEEP_S)
                    await take(15.0)
                deadline = time.monotonic() + DRAIN_DEADLINE_S
                while acked != published and time.monotonic() < deadline:
                    await take(5.0)
                done.set()
                await watcher
                return published, acked, largest, subscription.statistics()

    published, acked, largest, stats = asyncio.run(main())
    assert acked == published, f"{len(published - acked)} of {MESSAGES} never acknowledged; {stats}"
    assert stats.expired_dropped > 0, stats
    assert largest <= BUFFER_BOUND, f"the buffer held {largest} copies; {stats}"
