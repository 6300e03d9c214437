"""The sender's own limits: DELIVER header size, CREDIT window bounds, COMPLETE under back-pressure."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.config import HeraldConfig
from clients import Client
from clients.client import Subscription
from clients.protocol import (
    MAX_ATTRIBUTE_BYTES,
    MAX_ATTRIBUTES,
    MAX_HEADER_BYTES,
    SUBSCRIPTION_SETTINGS,
    U32_MAX,
    Command,
    consumer_topic_frame,
    decode,
    decode_complete,
    decode_credit,
    encode_attach,
)
from sender.server import (
    DELIVER_MAX_HEADER_BYTES,
    MAX_MESSAGES_PER_DELIVER,
    NOTICE_MAX_ENTRIES,
    READ_AHEAD,
    Consumer,
    Delivery,
    SenderServer,
    SubscriptionState,
)
from tests.conftest import HeraldSystem

# 64 attributes of 1000 bytes (key and value) each: ~65 KB of header per message,
# the most the per-message limits allow, so ~64 messages already fill MAX_HEADER_BYTES.
WIDE_MESSAGES = 80
WIDE_ATTRIBUTE_BYTES = 1000
assert WIDE_ATTRIBUTE_BYTES <= MAX_ATTRIBUTE_BYTES


def wide_attributes(index: int) -> dict[str, str]:
    attributes = {}
    for n in range(MAX_ATTRIBUTES):
        key = f"k{n:02d}"
        attributes[key] = f"{index}-{n}-".ljust(WIDE_ATTRIBUTE_BYTES - len(key), "x")
    return attributes


def watch_deliveries(context: zmq.Context[Any], subscription: dict[str, Any], consumer_id: str) -> zmq.Socket[bytes]:
    """A SUB socket that sees every DELIVER the sender addresses to ``consumer_id``.

    The consumer is announced (not ready, so it gets nothing yet) until its
    WELCOME reaches this socket: then this socket's filter is in place before
    any delivery (the slow joiner).
    """
    observer: zmq.Socket[bytes] = context.socket(zmq.SUB)
    observer.setsockopt(zmq.LINGER, 0)
    observer.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(consumer_id))
    observer.setsockopt(zmq.RCVHWM, 0)
    observer.connect(subscription["endpoints"]["deliver"])
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(subscription["endpoints"]["ack"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            push.send_multipart(encode_attach(subscription["name"], consumer_id, ready=False))
            if observer.poll(100) and decode(observer.recv_multipart()[1:]).command is Command.WELCOME:
                return observer
        raise AssertionError("the observer never saw its WELCOME")
    finally:
        push.close(0)


def test_wide_messages_are_split_into_delivers_under_the_header_limit(herald: HeraldSystem) -> None:
    consumer_id = "wide-consumer"
    context: zmq.Context[Any] = zmq.Context()
    with Client(herald.endpoint, timeout=30.0) as client:
        client.create_topic("wide")
        info = client.create_subscription("wide", "wide.sub")
        # The whole backlog is stored before a consumer attaches, so the sender
        # gets it in a few DISPATCHes and hands it out in as few passes.
        published = client.publish_batch("wide", [(f"body-{i}".encode(), wide_attributes(i)) for i in range(WIDE_MESSAGES)])
        observer = watch_deliveries(context, info, consumer_id)
        try:
            received: list[tuple[str, int, bytes, dict[str, str]]] = []
            with Subscription(client, info, consumer_id=consumer_id) as subscription:
                deadline = time.monotonic() + 20
                while len(received) < WIDE_MESSAGES and time.monotonic() < deadline:
                    message = subscription.receive(timeout=0.5)
                    if message is not None:
                        received.append((message.id, message.attempt, message.data, message.attributes))
                        message.ack()
            header_sizes = []
            delivered = 0
            while observer.poll(200):
                raw = observer.recv_multipart()
                frames = decode(raw[1:], max_header_bytes=64 * MAX_HEADER_BYTES)  # a bigger one is what this test looks for
                if frames.command is Command.DELIVER:
                    header_sizes.append(len(raw[4]))
                    delivered += len(frames.header["messages"])
        finally:
            observer.close(0)
            context.term()
    assert delivered == WIDE_MESSAGES, f"DELIVER header sizes: {header_sizes}"
    assert max(header_sizes) < MAX_HEADER_BYTES, header_sizes
    assert len(header_sizes) > 1  # the backlog did not fit one DELIVER
    assert sorted(m[0] for m in received) == sorted(published), "every message exactly once"
    assert {m[1] for m in received} == {1}, "first attempt only: no DELIVER was dropped"
    by_id = {m[0]: m for m in received}
    for index, message_id in enumerate(published):
        assert by_id[message_id][2:] == (f"body-{index}".encode(), wide_attributes(index))


def test_a_credit_window_never_exceeds_what_frontends_accept() -> None:
    largest = int(SUBSCRIPTION_SETTINGS["max_unacked"].maximum or 0)
    consumers = U32_MAX // (READ_AHEAD * largest) + 1  # one more than fits: ~21k
    state = SubscriptionState({"id": 7, "name": "crowded", "settings": {"max_unacked": largest}})
    for n in range(consumers):
        state.consumers[f"c{n}"] = Consumer(f"c{n}", largest, ready=True)
    assert READ_AHEAD * largest * consumers > U32_MAX
    assert state.window() == U32_MAX
    # What a frontend does with it: the CREDIT is taken, not refused as bad input.
    assert decode_credit({"sender": 0, "epoch": 1, "windows": {"7": state.window()}}, 1)[2] == {7: U32_MAX}


@pytest.fixture
def sender_with_a_stalled_frontend(tmp_path: Path) -> Iterator[tuple[SenderServer, zmq.Socket[bytes]]]:
    """A real SenderServer in this process, whose one frontend is a PULL socket the test reads (or not).

    inproc pipes hold exactly SNDHWM + RCVHWM messages (no kernel buffer), so
    with both at 1 the "frontend" stalls after two messages until it is read.
    """
    config = HeraldConfig(
        data_dir=str(tmp_path),
        frontend_control_endpoints=("inproc://frontend-0",),
        sender_intake_endpoints=("inproc://sender-intake",),
        sender_deliver_endpoints=("inproc://sender-deliver",),
        sender_ack_endpoints=("inproc://sender-ack",),
        metadata_rpc_endpoint="inproc://metadata-rpc",
        metadata_events_endpoint="inproc://metadata-events",
        sndhwm=1,
        rcvhwm=1,
    )
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    server = SenderServer(config, 0)  # its StopFlag takes SIGTERM and SIGINT: given back below
    frontend: zmq.Socket[bytes] = server.context.socket(zmq.PULL)
    frontend.setsockopt(zmq.RCVHWM, 1)
    frontend.bind("inproc://frontend-0")
    try:
        yield server, frontend
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        server.context.destroy(linger=0)


def read_completions(frontend: zmq.Socket[bytes]) -> list[list[tuple[int, int]]]:
    """The entries of each COMPLETE waiting on the frontend's socket."""
    out = []
    while frontend.poll(50):
        frames = decode(frontend.recv_multipart())
        if frames.command is Command.COMPLETE:
            out.append(decode_complete(frames.header))
    return out


def test_completions_wait_for_a_stalled_frontend_instead_of_being_dropped(sender_with_a_stalled_frontend: tuple[SenderServer, zmq.Socket[bytes]]) -> None:
    server, frontend = sender_with_a_stalled_frontend
    sent: list[tuple[int, int]] = []
    seqs = iter(range(1_000_000))

    def complete(count: int) -> None:
        # As _apply_acks queues them: appended to the shard's list.
        entries = [(1, next(seqs)) for _ in range(count)]
        server.completions.setdefault(0, []).extend([list(entry) for entry in entries])
        sent.extend(entries)

    # Fill the pipe: each flush sends what it holds as one COMPLETE, until the socket refuses.
    for _ in range(10):
        complete(3)
        server._flush_to_frontends(force=True)
        if server.completions:
            break
    assert server.completions, "the frontend's socket never filled"
    assert 0 in server.stalled_frontends
    # Acks go on while it is stalled: they join the entries waiting for the shard,
    # more than one COMPLETE may carry.
    complete(NOTICE_MAX_ENTRIES + 10)
    server._flush_to_frontends(force=True)
    assert len(server.completions[0]) > NOTICE_MAX_ENTRIES
    # The frontend drains again: everything arrives, once, in COMPLETEs of at most NOTICE_MAX_ENTRIES.
    received: list[list[tuple[int, int]]] = []
    for _ in range(20):
        received.extend(read_completions(frontend))
        server._flush_to_frontends(force=True)
        if not server.completions:
            break
    received.extend(read_completions(frontend))
    assert not server.completions
    assert 0 not in server.stalled_frontends
    assert max(map(len, received)) <= NOTICE_MAX_ENTRIES
    assert [entry for message in received for entry in message] == sent


def test_delivers_are_cut_by_count_and_estimated_size_and_a_big_message_goes_alone(
    sender_with_a_stalled_frontend: tuple[SenderServer, zmq.Socket[bytes]],
) -> None:
    server, _ = sender_with_a_stalled_frontend
    consumer = Consumer("cutter", 10_000, ready=True)
    watcher: zmq.Socket[bytes] = server.context.socket(zmq.SUB)
    watcher.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(consumer.consumer_id))
    watcher.setsockopt(zmq.RCVHWM, 0)
    watcher.setsockopt(zmq.LINGER, 0)
    watcher.connect("inproc://sender-deliver")

    def delivery(seq: int, header_bytes: int) -> Delivery:
        entry = {"id": f"m{seq}", "topic": "t", "attributes": {}, "ts": 1.0, "ref": f"0.{seq}"}
        return Delivery((1, 0, seq), entry, b"x", 1, header_bytes)

    quarter = DELIVER_MAX_HEADER_BYTES // 4
    sizes = [DELIVER_MAX_HEADER_BYTES + 1, 100, quarter, quarter, quarter, quarter, 100, *[100] * (MAX_MESSAGES_PER_DELIVER + 3)]
    counts = []
    try:
        server._send_delivers("cut", consumer, [delivery(seq, size) for seq, size in enumerate(sizes)])
        while watcher.poll(100):
            counts.append(len(decode(watcher.recv_multipart()[1:]).header["messages"]))
    finally:
        watcher.close(0)
    # Alone when over the limit by itself; then up to the limit (100 + 3 quarters);
    # then the last quarter with as many small ones as the count allows.
    assert counts == [1, 4, MAX_MESSAGES_PER_DELIVER, 5]
    assert sum(counts) == len(sizes)
