"""Server paths that had no end-to-end test, each checked by what it leaves behind.

1. A long drain of COMPLETEs within one poll-loop pass applies the queued
   settles at once past SETTLES_QUEUE_LIMIT (frontend/server.py, ``_on_complete``).
   No counter tells that path apart, so the test reads the owning shard's
   RocksDB write-ahead log, which records each settle as one write batch:
   a batch deleting at least SETTLES_QUEUE_LIMIT pending entries can only come
   from the queue reaching the limit inside ``_on_complete``.
2. A publish forwarded to a stopped owning frontend is refused with
   ``unavailable`` once the owner has taken nothing for FORWARD_STALL_S,
   instead of being held (frontend/server.py, ``_flush_forwards``).
3. A consumer whose sender is stopped re-reads SUB_DESCRIBE, and no more often
   than once per REDISCOVER_AFTER_S (clients/_core.py, ``rediscover_at``),
   counted at the frontends by command.

Each test also checks that nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import zmq

from broker.metrics import read_snapshots
from clients import AsyncClient, Client, Message
from clients._core import REDISCOVER_AFTER_S
from clients.protocol import CONSUMER_HEARTBEAT_S, Command, decode, encode, shard_of, split_envelope
from frontend.server import FORWARD_STALL_S, SETTLES_QUEUE_LIMIT
from sender.server import NOTICE_MAX_ENTRIES
from tests.conftest import HeraldSystem, stored_messages, topic_for_shard, wait_for

# --------------------------------------------------------------------------- helpers


def _snapshot(herald: HeraldSystem, role: str, *, written_after: float = 0.0, timeout: float = 15.0) -> dict[str, Any]:
    """``role``'s metrics snapshot, once one written after ``written_after`` (wall clock) exists."""

    def fresh() -> dict[str, Any] | None:
        snapshot = read_snapshots(str(herald.data_dir)).get(role)
        return snapshot if snapshot and float(snapshot.get("written_at", 0.0)) > written_after else None

    found: dict[str, Any] = wait_for(fresh, timeout=timeout, interval=0.1, message=f"a snapshot of {role} written after {written_after}")
    return found


_WAL_BLOCK: Final = 32 * 1024
_WAL_HEADER: Final = struct.Struct("<IHB")  # masked crc32c, length, record type
_WAL_FULL, _WAL_FIRST, _WAL_MIDDLE, _WAL_LAST = 1, 2, 3, 4
_BATCH_HEADER: Final = struct.Struct("<QI")  # first sequence number, operation count
_DELETES: Final = frozenset({0x0, 0x4, 0x7, 0x8})  # Deletion, ColumnFamilyDeletion, SingleDeletion, ColumnFamilySingleDeletion
_WITH_VALUE: Final = frozenset({0x1, 0x2, 0x5, 0x6, 0xE, 0xF})  # Value, Merge, their column-family forms, range deletions
_WITH_FAMILY: Final = frozenset({0x4, 0x5, 0x6, 0x8, 0xE})


def _wal_records(data: bytes) -> Iterator[bytes]:
    """The logical records (write batches) of a RocksDB write-ahead log file, up to a torn tail."""
    position, pending = 0, bytearray()
    while position + _WAL_HEADER.size <= len(data):
        if _WAL_BLOCK - position % _WAL_BLOCK < _WAL_HEADER.size:
            position += _WAL_BLOCK - position % _WAL_BLOCK  # a block's trailer
            continue
        _, length, kind = _WAL_HEADER.unpack_from(data, position)
        start = position + _WAL_HEADER.size
        if start + length > len(data):
            return  # being written right now
        fragment, position = data[start : start + length], start + length
        if kind == _WAL_FULL:
            yield fragment
        elif kind == _WAL_FIRST:
            pending = bytearray(fragment)
        elif kind == _WAL_MIDDLE:
            pending += fragment
        elif kind == _WAL_LAST:
            yield bytes(pending + fragment)
        elif kind == 0 and length == 0:
            position += -position % _WAL_BLOCK  # zeroes left by preallocation
        # Other record types (compression, timestamp sizes) carry no batch.


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _pending_deletes(batch: bytes) -> int:
    """How many pending entries (``P`` keys, see frontend/store.py) one write batch deletes."""
    _, count = _BATCH_HEADER.unpack_from(batch)
    position, operations, deletes = _BATCH_HEADER.size, 0, 0
    while position < len(batch):
        tag = batch[position]
        position += 1
        if tag in _WITH_FAMILY:
            _, position = _varint(batch, position)
        if tag == 0x3:  # LogData: a blob, not an operation
            size, position = _varint(batch, position)
            position += size
            continue
        assert tag in _DELETES or tag in _WITH_VALUE, f"unexpected write batch tag {tag:#x}"
        size, position = _varint(batch, position)
        key = batch[position : position + size]
        position += size
        if tag in _WITH_VALUE:
            size, position = _varint(batch, position)
            position += size
        elif key[:1] == b"P":
            deletes += 1
        operations += 1
    assert operations == count, f"a write batch of {count} operations parsed as {operations}"
    return deletes


def _largest_settle(shard: Path) -> int:
    """The most pending entries that one write batch in the shard's write-ahead logs deleted."""
    logs = sorted(shard.glob("*.log"))
    assert logs, f"no write-ahead log in {shard}"
    return max((_pending_deletes(batch) for wal in logs for batch in _wal_records(wal.read_bytes())), default=0)


# --------------------------------------------------------------------------- 1. SETTLES_QUEUE_LIMIT

SETTLE_MESSAGES: Final = 80_000


def test_a_long_drain_of_completes_is_settled_at_the_queue_limit_and_nothing_comes_back(herald: HeraldSystem) -> None:
    """80,000 acks that reach the owning frontend in one burst are applied in pieces of about SETTLES_QUEUE_LIMIT, and stay applied.

    80,000 small messages wait for a subscription with no consumer. A consumer
    with room for all of them (max_unacked 100,000) receives every one, unacked.
    Then the owning frontend is SIGSTOPped, the consumer acks everything, and
    once the senders have counted every ack (their COMPLETEs queued on the
    stopped frontend's control socket) it is resumed: its first pass drains
    those COMPLETEs. The shard's write-ahead log must show one settle batch of
    at least SETTLES_QUEUE_LIMIT entries (the queue reached the limit inside
    ``_on_complete``, where it is applied at once), and none larger than the
    limit plus one COMPLETE (it was not left to grow until the end of the pass).
    Every message arrives once; the backlog goes to 0; after a SIGKILL of that
    frontend nothing comes back, and no body of the topic is left on disk.
    """
    topic, name = topic_for_shard("settle.", 0), "settle.all"
    payloads = [index.to_bytes(4, "big") for index in range(SETTLE_MESSAGES)]
    with Client(herald.endpoint, timeout=30.0) as client:
        client.create_topic(topic)
        client.create_subscription(topic, name, max_unacked=100_000, ack_deadline=600)
        client.publish_batch(topic, payloads)
        published_at = time.time()
        with client.subscribe(topic, name) as subscription:
            received: list[Message] = []
            while len(received) < SETTLE_MESSAGES:
                message = subscription.receive(timeout=30)
                assert message is not None, f"only {len(received)} of {SETTLE_MESSAGES} delivered"
                received.append(message)
            assert sorted(message.data for message in received) == payloads, "not every message arrived exactly once"
            assert {message.attempt for message in received} == {1}
            backlog = _snapshot(herald, "frontend-0", written_after=published_at).get("backlog")
            assert backlog == {name: SETTLE_MESSAGES}, f"delivered but unacknowledged, every message is still in the backlog: {backlog}"

            acked_before = sum(int(s.get("acked", 0)) for role, s in read_snapshots(str(herald.data_dir)).items() if role.startswith("sender-"))
            pid = herald.kill_child("frontend-0", signal.SIGSTOP)
            try:
                for message in received:
                    message.ack_nowait()
                assert subscription.receive(timeout=0.5) is None  # sends the last acks

                def all_acks_counted() -> int:
                    snapshots = read_snapshots(str(herald.data_dir))
                    acked = sum(int(s.get("acked", 0)) for role, s in snapshots.items() if role.startswith("sender-")) - acked_before
                    return acked if acked >= SETTLE_MESSAGES else 0

                wait_for(all_acks_counted, timeout=30, interval=0.1, message="the senders counted every ack")
                time.sleep(0.5)  # their last COMPLETEs go out (at most COMPLETE_DELAY_S later)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_at = time.time()

            def drained() -> dict[str, Any] | None:
                # A subscription with nothing left is dropped from the backlog map; this shard settles nothing else.
                snapshot = _snapshot(herald, "frontend-0", written_after=resumed_at)
                done = not snapshot.get("backlog") and int(snapshot.get("completed", 0)) >= SETTLE_MESSAGES
                return snapshot if done else None

            wait_for(drained, timeout=30, interval=0.2, message=f"frontend-0 settled every message and the backlog of {name} went to 0")
            largest = _largest_settle(herald.data_dir / "shard-0")
            assert largest >= SETTLES_QUEUE_LIMIT, (
                f"the largest settle deleted {largest} entries: the queue never reached SETTLES_QUEUE_LIMIT within a pass, so the path was not exercised"
            )
            assert largest < SETTLES_QUEUE_LIMIT + NOTICE_MAX_ENTRIES, f"a settle of {largest} entries: the queue outgrew its limit"

            killed = herald.kill_child("frontend-0")
            restarted = herald.wait_restarted("frontend-0", killed)
            after = _snapshot(herald, "frontend-0", written_after=time.time())
            assert after["pid"] == restarted
            assert sum(after.get("backlog", {}).values()) == 0, f"settled entries came back after a restart: {after.get('backlog')}"
            assert subscription.receive(timeout=3) is None, "an acknowledged message was delivered again after the restart"
    herald.stop()
    left = [message for message in stored_messages(herald.data_dir) if message.topic == topic]
    assert not left, f"{len(left)} settled messages of {topic} are still stored"


# --------------------------------------------------------------------------- 2. a forwarded publish to a stopped owner

HELD_PAYLOAD_BYTES: Final = 128 * 1024  # fills the loopback buffers towards the stopped frontend in a few dozen requests
HELD_IN_FLIGHT: Final = 400  # enough to fill both paths to frontend-1 (~100 requests each) and frontend-0's 64 waiting forwards
REPLY_TIMEOUT_S: Final = 10.0  # the publisher's own deadline for a refusal
QUIET_S: Final = 2.5  # longer than FORWARD_STALL_S: a quiet publisher then has nothing waiting in frontend-0


def _tagged(tag: str, size: int = HELD_PAYLOAD_BYTES) -> bytes:
    return tag.encode().ljust(size, b".")


def _tag_of(data: bytes) -> str:
    return data.rstrip(b".").decode()


class _RawPublisher:
    """A DEALER that keeps many PUBLISH requests in flight and records each one's reply (there must be exactly one)."""

    def __init__(self, endpoint: str) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.request_ids = (f"held-request-{n}".encode() for n in itertools.count())
        self.sent: dict[bytes, tuple[str, float]] = {}  # request id -> (message tag, sent at)
        self.replies: dict[bytes, tuple[Command, dict[str, Any], float]] = {}  # request id -> (command, header, received at)

    def publish(self, topic: str, tag: str, size: int = HELD_PAYLOAD_BYTES) -> bool:
        """Send one message, its tag as its id and the start of its payload; False when the socket's queue is full."""
        request_id = next(self.request_ids)
        try:
            self.socket.send_multipart(
                [b"", *encode(Command.PUBLISH, request_id, {"topic": topic, "messages": [{"id": tag}]}, [_tagged(tag, size)])], zmq.NOBLOCK
            )
        except zmq.Again:
            return False
        self.sent[request_id] = (tag, time.monotonic())
        return True

    def collect(self, wait_s: float) -> None:
        """Record the replies that arrive within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            while True:
                try:
                    raw = self.socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = decode(split_envelope(raw)[1])
                assert reply.request_id in self.sent, f"a reply to a request never sent: {reply.request_id!r}"
                assert reply.request_id not in self.replies, f"two replies to {self.sent[reply.request_id][0]}"
                self.replies[reply.request_id] = (reply.command, reply.header, time.monotonic())
            if time.monotonic() >= deadline:
                return

    @property
    def in_flight(self) -> int:
        return len(self.sent) - len(self.replies)

    def answered(self, command: Command) -> dict[str, tuple[dict[str, Any], float]]:
        """Tag -> (reply header, seconds from send to reply) of the replies of ``command``."""
        return {self.sent[request_id][0]: (header, at - self.sent[request_id][1]) for request_id, (got, header, at) in self.replies.items() if got is command}

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def _receive_tags(client: Client, topic: str, name: str, expected: set[str], *, settle_s: float = 2.0) -> list[str]:
    """Every tag ``name`` delivers until ``expected`` all came and nothing more arrives for ``settle_s``; each acked."""
    tags: list[str] = []
    with client.subscribe(topic, name) as subscription:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = subscription.receive(timeout=settle_s if expected <= set(tags) else 5.0)
            if message is None:
                if expected <= set(tags):
                    break
                continue
            tags.append(_tag_of(message.data))
            message.ack()
    return tags


def test_a_publish_forwarded_to_a_stopped_owner_is_refused_as_unavailable_and_served_after_it_resumes(herald: HeraldSystem) -> None:
    """A publish held for a stopped owning frontend is refused, not held forever; then that topic works again, and nothing acknowledged is lost.

    frontend-1 owns ``stuck`` and is SIGSTOPped. A raw publisher keeps up to
    400 publishes of 128 KiB to ``stuck`` in flight: those the proxy hands to
    frontend-1 wait in its queues, and once the forwards from frontend-0 fill
    the loopback buffers and high-water mark towards it, they wait in
    frontend-0 and are refused with ``unavailable`` ("took nothing for 1 s"),
    each well within the publisher's 10 s deadline, as frontend-0's error
    counters confirm. Once the publisher has paused (no reply for 2.5 s),
    frontend-0 holds none of them, and it answers publishes to its own topic.
    After SIGCONT every request gets exactly one reply, and no further
    refusal: the ones frontend-1 held are stored, and with later publishes to
    ``stuck`` they are all delivered, while no refused message ever is.
    """
    stuck, alive = topic_for_shard("stuck.", 1), topic_for_shard("alive.", 0)
    with Client(herald.endpoint, timeout=30.0) as admin:
        for topic in (stuck, alive):
            admin.create_topic(topic)
            admin.create_subscription(topic, f"{topic}.sub", ack_deadline=120)
    publisher = _RawPublisher(herald.endpoint)
    try:
        pid = herald.kill_child("frontend-1", signal.SIGSTOP)
        try:
            held = itertools.count()
            deadline = time.monotonic() + 30
            while not publisher.answered(Command.ERROR) and time.monotonic() < deadline:
                while publisher.in_flight < HELD_IN_FLIGHT and publisher.publish(stuck, f"held-{next(held)}"):
                    pass
                publisher.collect(0.05)
            # Then send nothing more until no reply came for QUIET_S: frontend-0 refuses whatever waits for
            # frontend-1 within FORWARD_STALL_S, so the requests still unanswered are all held by frontend-1.
            quiet_until = time.monotonic() + 20
            while time.monotonic() < quiet_until:
                answered = len(publisher.replies)
                publisher.collect(QUIET_S)
                if len(publisher.replies) == answered:
                    break
            refused = publisher.answered(Command.ERROR)
            assert refused, (
                f"no publish to {stuck} was refused within 30 s of stopping its owner ({len(publisher.sent)} sent, {len(publisher.replies)} answered)"
            )
            refused_at = time.time()
            assert all(header.get("code") == "unavailable" for header, _ in refused.values()), refused
            stalled = [header["message"] for header, _ in refused.values() if f"took nothing for {FORWARD_STALL_S:g} s" in header["message"]]
            assert stalled, f"refused, but not for a stalled owner: {sorted({header['message'] for header, _ in refused.values()})}"
            slowest = max(seconds for _, seconds in refused.values())
            assert slowest < REPLY_TIMEOUT_S, f"a refusal took {slowest:.1f} s, past the publisher's {REPLY_TIMEOUT_S:g} s"
            assert not publisher.answered(Command.OK), "frontend-1 is stopped: nothing for its topic can be stored"

            # frontend-0 counted what it refused, and forwarded what it could.
            def counted() -> dict[str, Any] | None:
                snapshot = _snapshot(herald, "frontend-0", written_after=refused_at)
                return snapshot if int(snapshot.get("errors_by_code", {}).get("unavailable", 0)) >= len(refused) else None

            snapshot = wait_for(counted, timeout=15, interval=0.2, message=f"frontend-0 counted {len(refused)} unavailable replies")
            assert int(snapshot["forwarded"]) > 0

            # The other frontend keeps serving its own topics. All of these reach it: the
            # proxy's round robin skips frontend-1, whose queue the flood filled.
            alive_tags = [f"alive-{n}" for n in range(5)]
            for tag in alive_tags:
                assert publisher.publish(alive, tag, size=16)
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while len(publisher.answered(Command.OK)) < len(alive_tags) and time.monotonic() < deadline:
                publisher.collect(0.1)
            served = set(publisher.answered(Command.OK))
            assert served == set(alive_tags), f"frontend-0 answered {sorted(served)} of the publishes to its own topic within {REPLY_TIMEOUT_S:g} s"
        finally:
            os.kill(pid, signal.SIGCONT)

        # Every request gets exactly one reply: nothing is held forever.
        deadline = time.monotonic() + 60
        while publisher.in_flight and time.monotonic() < deadline:
            publisher.collect(0.2)
        assert not publisher.in_flight, f"{publisher.in_flight} publishes never answered after frontend-1 resumed"
        errors = publisher.answered(Command.ERROR)
        assert set(errors) == set(refused), f"refused after the owner resumed: {set(errors) - set(refused)}"
        stored = set(publisher.answered(Command.OK))
        assert set(alive_tags) <= stored
        assert stored | set(refused) == {tag for tag, _ in publisher.sent.values()}
    finally:
        publisher.close()

    after_tags = [f"after-{n}" for n in range(5)]
    with Client(herald.endpoint, timeout=30.0) as client:
        for tag in after_tags:
            client.publish(stuck, _tagged(tag, 16))
        held_tags = stored - set(alive_tags)
        delivered = _receive_tags(client, stuck, f"{stuck}.sub", held_tags | set(after_tags))
        assert len(delivered) == len(set(delivered)), "a message was delivered twice"
        assert set(delivered) == held_tags | set(after_tags), (
            f"missing: {sorted(held_tags | set(after_tags) - set(delivered))[:5]}, refused yet delivered: {sorted(set(delivered) & set(refused))[:5]}"
        )
        assert sorted(_receive_tags(client, alive, f"{alive}.sub", set(alive_tags))) == sorted(alive_tags)


# --------------------------------------------------------------------------- 3. SUB_DESCRIBE re-reads of a consumer without WELCOME

SENDER_STOP_S: Final = 16.0  # three re-reads each: about 4-5, 9-10 and 14-15 s into the stop


class _Rereads(logging.Handler):
    """Records when each subscription's consumer starts a SUB_DESCRIBE re-read (``ConsumerCore.rediscovering`` logs it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.starts: dict[str, list[float]] = {}
        self._lock_starts = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("no WELCOME from sender") and isinstance(record.args, tuple) and record.args:
            with self._lock_starts:
                self.starts.setdefault(str(record.args[-1]), []).append(record.created)

    def of(self, name: str) -> list[float]:
        with self._lock_starts:
            return list(self.starts.get(name, []))


class _ConsumerThread:
    """One consumer, run in its own thread for the whole test, acking what it receives."""

    def __init__(self, name: str, run: Callable[[_ConsumerThread], None]) -> None:
        self.name = name
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self.attached = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(run,), name=f"consumer-{name}", daemon=True)
        self._thread.start()

    def _run(self, run: Callable[[_ConsumerThread], None]) -> None:
        try:
            run(self)
        except BaseException as error:  # reported by the test
            self.errors.append(error)
            self.attached.set()

    def has(self, payloads: list[bytes]) -> Callable[[], bool]:
        return lambda: set(payloads) <= set(self.received)

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), f"the {self.name} consumer did not stop"
        assert not self.errors, self.errors


def _sync_consumer(endpoint: str, topic: str) -> Callable[[_ConsumerThread], None]:
    def run(consumer: _ConsumerThread) -> None:
        with Client(endpoint, timeout=10) as client, client.subscribe(topic, consumer.name) as subscription:
            consumer.attached.set()
            while not consumer.stop.is_set():
                message = subscription.receive(timeout=0.5)
                if message is not None:
                    consumer.received.append(message.data)
                    message.ack_nowait()

    return run


def _async_consumer(endpoint: str, topic: str) -> Callable[[_ConsumerThread], None]:
    async def main(consumer: _ConsumerThread) -> None:
        async with AsyncClient(endpoint, timeout=10) as client, client.subscribe(topic, consumer.name) as subscription:
            consumer.attached.set()
            while not consumer.stop.is_set():
                message = await subscription.receive(timeout=0.5)
                if message is not None:
                    consumer.received.append(message.data)
                    message.ack_nowait()

    return lambda consumer: asyncio.run(main(consumer))


def _sub_describes(herald: HeraldSystem, written_after: float) -> tuple[int, float]:
    """SUB_DESCRIBE requests the frontends received, from snapshots written after ``written_after``, and when the later one was written."""
    snapshots = [_snapshot(herald, f"frontend-{index}", written_after=written_after) for index in range(2)]
    count = sum(int(snapshot.get("requests_by_command", {}).get(Command.SUB_DESCRIBE.name, 0)) for snapshot in snapshots)
    return count, max(float(snapshot["written_at"]) for snapshot in snapshots)


def test_a_consumer_whose_sender_is_stopped_re_reads_sub_describe_at_most_once_per_interval(herald: HeraldSystem) -> None:
    """A consumer that gets no WELCOME re-reads SUB_DESCRIBE every REDISCOVER_AFTER_S, never more often, and carries on when its sender does.

    tests/test_consumer_rediscovery.py covers a sender that moved (the whole
    system restarted on other ports). Here the sender stays where it is but
    stops answering: SIGSTOP for 16 s. A sync and an async consumer, on two
    subscriptions served by that sender, each re-read their record at least
    twice, the first only REDISCOVER_AFTER_S after their last WELCOME and each
    later one REDISCOVER_AFTER_S after the one before (as the client logs
    them); the frontends' request counters, by command, see every one and no
    more than that spacing allows. The record is unchanged, so the consumers
    stay on their sockets: after SIGCONT each receives the messages published
    before, during and after the stop.
    """
    topic = "rediscover.stopped"
    names = {"sync": topic_for_shard("rediscover.sync.", 0), "async": topic_for_shard("rediscover.async.", 0)}
    assert {shard_of(name, 2) for name in names.values()} == {0}
    rereads = _Rereads()
    client_log = logging.getLogger("herald.client")
    level = client_log.level
    client_log.addHandler(rereads)
    client_log.setLevel(logging.INFO)
    consumers: list[_ConsumerThread] = []
    try:
        with Client(herald.endpoint, timeout=30.0) as client:
            client.create_topic(topic)
            for name in names.values():
                client.create_subscription(topic, name, ack_deadline=60, max_attempts=100)
            consumers = [
                _ConsumerThread(names["sync"], _sync_consumer(herald.endpoint, topic)),
                _ConsumerThread(names["async"], _async_consumer(herald.endpoint, topic)),
            ]
            for consumer in consumers:
                assert consumer.attached.wait(30) and not consumer.errors, consumer.errors
            client.publish(topic, b"before")
            for consumer in consumers:
                wait_for(consumer.has([b"before"]), timeout=30, interval=0.05, message=f"the {consumer.name} consumer received the first message")
            assert not any(rereads.starts.values()), f"re-reads while the sender answered: {rereads.starts}"

            pid = herald.kill_child("sender-0", signal.SIGSTOP)
            stopped_at, stopped_wall = time.monotonic(), time.time()
            try:
                # Counted before any re-read (checked below): the first comes REDISCOVER_AFTER_S after the last WELCOME.
                baseline, baseline_written = _sub_describes(herald, written_after=stopped_wall)
                during = [f"during-{n}".encode() for n in range(5)]
                for payload in during:
                    client.publish(topic, payload)  # the frontends are fine: stored, delivered later
                time.sleep(max(0.0, stopped_at + SENDER_STOP_S - time.monotonic()))
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_wall = time.time()

            after = [f"after-{n}".encode() for n in range(5)]
            for payload in after:
                client.publish(topic, payload)
            for consumer in consumers:
                wait_for(consumer.has(during + after), timeout=30, interval=0.1, message=f"the {consumer.name} consumer received every message after the stop")
        time.sleep(0.5)  # the last re-read's request reaches a frontend
        described = _sub_describes(herald, written_after=time.time())[0] - baseline
    finally:
        for consumer in consumers:
            consumer.stop.set()
        client_log.removeHandler(rereads)
        client_log.setLevel(level)
    for consumer in consumers:
        consumer.finish()

    most = int((SENDER_STOP_S + 2 * CONSUMER_HEARTBEAT_S) // REDISCOVER_AFTER_S) + 1  # a WELCOME comes within a heartbeat or two of SIGCONT
    logged = 0
    assert baseline_written < min(min(rereads.of(name), default=float("inf")) for name in names.values()), "the baseline count came after a re-read"
    for flavour, name in names.items():
        starts = rereads.of(name)
        logged += len(starts)
        assert len(starts) >= 2, f"the {flavour} consumer re-read SUB_DESCRIBE {len(starts)} times in {SENDER_STOP_S:g} s without WELCOME"
        assert len(starts) <= most, f"the {flavour} consumer re-read SUB_DESCRIBE {len(starts)} times in {SENDER_STOP_S:g} s: {starts}"
        assert all(stopped_wall <= start <= resumed_wall + 2 * CONSUMER_HEARTBEAT_S for start in starts), (stopped_wall, resumed_wall, starts)
        # Its last WELCOME came at most a heartbeat (and a little) before the stop.
        assert starts[0] - stopped_wall >= REDISCOVER_AFTER_S - CONSUMER_HEARTBEAT_S - 0.5, (
            f"the {flavour} consumer re-read too soon: {starts[0] - stopped_wall:.2f} s"
        )
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(gap >= REDISCOVER_AFTER_S - 0.1 for gap in gaps), f"the {flavour} consumer re-read more often than every {REDISCOVER_AFTER_S:g} s: {gaps}"
    # Every re-read reached a frontend (a slow reply may add a resend), and no more were made than the spacing allows.
    assert logged <= described <= len(names) * most, f"{described} SUB_DESCRIBE requests counted for {logged} re-reads logged (at most {len(names) * most})"
