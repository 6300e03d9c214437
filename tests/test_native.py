"""Native ZeroMQ users: plain pyzmq sockets and the documented protocol, no Herald client code."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import zmq

from clients import protocol
from clients.protocol import SIGNATURE, Command, decode, encode
from tests.conftest import HeraldSystem, RawClient, wait_for
from tests.native import NativeConsumer


def make_topic(raw: RawClient, name: str) -> None:
    assert raw.request(Command.TOPIC_CREATE, {"name": name}).command is Command.OK


def make_subscription(raw: RawClient, topic: str, name: str, **settings: Any) -> dict[str, Any]:
    reply = raw.request(Command.SUB_CREATE, {"topic": topic, "name": name, "settings": settings})
    assert reply.command is Command.OK, reply.header
    return reply.header["subscription"]


def publish(raw: RawClient, topic: str, payloads: list[bytes], attributes: list[dict[str, str]] | None = None) -> list[str]:
    messages = [{"attributes": a} for a in attributes] if attributes else [{} for _ in payloads]
    reply = raw.request(Command.PUBLISH, {"topic": topic, "messages": messages}, payloads)
    assert reply.command is Command.OK, reply.header
    return list(reply.header["ids"])


def test_live_feed_with_a_plain_sub_socket(herald: HeraldSystem, raw: RawClient) -> None:
    for topic in ("orders", "orders2", "orders.eu", "orders.us"):
        make_topic(raw, topic)
    live = raw.request(Command.INFO).header["live"]
    context: zmq.Context = zmq.Context()
    exact = context.socket(zmq.SUB)
    exact.setsockopt(zmq.SUBSCRIBE, b"orders\x00")
    exact.connect(live)
    family = context.socket(zmq.SUB)
    family.setsockopt(zmq.SUBSCRIBE, b"orders.")
    family.connect(live)
    try:
        # Slow joiner: publish probes until the subscription has reached the publisher.
        def probe() -> bool:
            publish(raw, "orders", [b"probe"])
            publish(raw, "orders.eu", [b"probe"])
            return bool(exact.poll(100)) and bool(family.poll(100))

        wait_for(probe, timeout=10, message="live subscriptions propagated")
        for sock in (exact, family):
            while sock.poll(300):
                sock.recv_multipart()
        publish(raw, "orders2", [b"not for exact"])
        ids = publish(raw, "orders", [b"one", b"two"], [{"k": "v"}, {}])
        eu = publish(raw, "orders.eu", [b"eu"])
        us = publish(raw, "orders.us", [b"us"])
        # The two messages of one PUBLISH arrive in one MESSAGE: an entry and a payload frame each, in order.
        assert exact.poll(2000)
        frames = exact.recv_multipart()
        assert frames[0] == b"orders\x00"
        message = decode(frames[1:])
        assert message.command is Command.MESSAGE
        entries = message.header["messages"]
        assert [(e["id"], e["topic"], e["attributes"]) for e in entries] == [(ids[0], "orders", {"k": "v"}), (ids[1], "orders", {})]
        assert message.payloads == [b"one", b"two"]
        assert all(isinstance(e["ts"], float) for e in entries)
        received_family = []
        while len(received_family) < 2 and family.poll(2000):
            frames = family.recv_multipart()
            received_family.extend((frames[0], entry["id"]) for entry in decode(frames[1:]).header["messages"])
        assert received_family == [(b"orders.eu\x00", eu[0]), (b"orders.us\x00", us[0])]
        assert not exact.poll(300), "orders2 must not reach a subscriber of exactly 'orders'"
    finally:
        exact.close(0)
        family.close(0)
        context.term()


def test_native_at_least_once_consumer(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "jobs")
    sub = make_subscription(raw, "jobs", "workers")
    ids = publish(raw, "jobs", [f"job-{i}".encode() for i in range(20)])
    consumer = NativeConsumer(sub, "native-1")
    try:
        consumer.attach()
        got = consumer.deliveries(20)
        assert sorted(m["id"] for m, _ in got) == sorted(ids)
        assert all(m["attempt"] == 1 for m, _ in got)
        assert consumer.ack([(m["ref"], m["attempt"]) for m, _ in got]) == ["ok"] * 20
        # Already acknowledged: reported as unknown, nothing breaks.
        assert consumer.ack([(got[0][0]["ref"], 1)]) == ["unknown"]
    finally:
        consumer.close()


def test_packed_payloads_both_ways(herald: HeraldSystem, raw: RawClient) -> None:
    """docs/protocol.md §2, packed payloads: a PUBLISH may carry its payloads in one frame cut by
    `payload_sizes`; a consumer that asks at ATTACH gets its DELIVERs packed the same way, and one
    that does not gets a frame per payload."""
    make_topic(raw, "packed")
    plain_sub = make_subscription(raw, "packed", "packed.plain")
    packed_sub = make_subscription(raw, "packed", "packed.packed")
    bodies = [b"first", b"", b"\x00third\xff", *(f"m{i}".encode() for i in range(20))]
    header = {"topic": "packed", "messages": [{} for _ in bodies], "payload_sizes": [len(body) for body in bodies]}
    reply = raw.request(Command.PUBLISH, header, [b"".join(bodies)])
    assert reply.command is Command.OK, reply.header
    sent = dict(zip(reply.header["ids"], bodies, strict=True))
    plain, packer = NativeConsumer(plain_sub, "plain"), NativeConsumer(packed_sub, "packer", packed=True)
    try:
        for consumer in (plain, packer):
            consumer.attach()
            got = consumer.deliveries(len(bodies))
            assert {message["id"]: payload for message, payload in got} == sent
            assert consumer.ack([(message["ref"], message["attempt"]) for message, _ in got]) == ["ok"] * len(bodies)
        for raw_deliver in plain.raw_delivers:
            deliver_header = orjson.loads(raw_deliver[4])
            assert "payload_sizes" not in deliver_header and len(raw_deliver) == 5 + len(deliver_header["messages"])
        assert any(len(orjson.loads(frames[4])["messages"]) > 1 for frames in packer.raw_delivers)
        for raw_deliver in packer.raw_delivers:
            deliver_header = orjson.loads(raw_deliver[4])
            if len(deliver_header["messages"]) > 1:
                assert len(raw_deliver) == 6 and sum(deliver_header["payload_sizes"]) == len(raw_deliver[5])
                assert len(deliver_header["payload_sizes"]) == len(deliver_header["messages"])
    finally:
        plain.close()
        packer.close()


def test_native_detach_with_unseen_keeps_attempts_and_a_bad_unseen_still_detaches(herald: HeraldSystem, raw: RawClient) -> None:
    """docs/protocol.md, DETACH: deliveries named `unseen` come again with their attempt; the rest
    with a higher one; a malformed `unseen` is ignored and the DETACH still takes effect."""
    make_topic(raw, "handback")
    sub = make_subscription(raw, "handback", "handback.sub")
    ids = publish(raw, "handback", [b"seen", b"unseen-1", b"unseen-2"])
    first = NativeConsumer(sub, "leaver")
    try:
        first.attach()
        got = {message["id"]: message for message, _ in first.deliveries(3)}
        assert sorted(got) == sorted(ids)
        unseen = [[got[message_id]["ref"], got[message_id]["attempt"]] for message_id in ids[1:]]
        first.push.send_multipart(encode(Command.DETACH, b"", {"subscription": "handback.sub", "consumer": "leaver", "unseen": unseen}))
        first.push.setsockopt(zmq.LINGER, 5000)  # the DETACH goes out before the socket closes
    finally:
        first.close()
    second = NativeConsumer(sub, "stayer")
    try:
        second.attach()
        again = {message["id"]: message["attempt"] for message, _ in second.deliveries(3)}
        assert again == {ids[0]: 2, ids[1]: 1, ids[2]: 1}
        # A malformed unseen list: ignored, and the consumer still leaves at once (not after 5 s of silence).
        second.push.send_multipart(encode(Command.DETACH, b"", {"subscription": "handback.sub", "consumer": "stayer", "unseen": "all of them"}))
        second.push.setsockopt(zmq.LINGER, 5000)
        lines = wait_for(
            lambda: _log_lines(herald, "ignoring its unseen list", "consumer stayer left handback.sub"),
            message="the bad unseen logged, and the consumer dropped",
        )
        # Dropped by this DETACH, in the same handler, not by the consumer expiry 5 s later.
        assert lines[1] - lines[0] < protocol.CONSUMER_EXPIRY_S / 2, lines
    finally:
        second.close()
    third = NativeConsumer(sub, "third")
    try:
        third.attach()
        last = {message["id"]: message for message, _ in third.deliveries(3)}
        assert {message_id: message["attempt"] for message_id, message in last.items()} == {ids[0]: 3, ids[1]: 2, ids[2]: 2}
        assert third.ack([(message["ref"], message["attempt"]) for message in last.values()]) == ["ok"] * 3
    finally:
        third.close()


def _log_lines(herald: HeraldSystem, *needles: str) -> list[float] | None:
    """The time (s since the epoch) of the first log line holding each needle, or None if one is missing."""
    import datetime

    found: list[float] = []
    lines = herald.log_tail(400).splitlines()
    for needle in needles:
        line = next((line for line in lines if needle in line), None)
        if line is None:
            return None
        found.append(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return found


def test_redelivery_stale_ack_and_dead_letter(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "flaky")
    sub = make_subscription(raw, "flaky", "picky", ack_deadline=0.3, max_attempts=3, backoff_min=0.0, backoff_max=0.0)
    [message_id] = publish(raw, "flaky", [b"poison"])
    consumer = NativeConsumer(sub, "slowpoke")
    try:
        consumer.attach()
        attempts = []
        refs = []
        for _ in range(3):
            [(header, payload)] = consumer.deliveries(1, timeout=10)
            assert header["id"] == message_id and payload == b"poison"
            attempts.append(header["attempt"])
            refs.append(header["ref"])
        assert attempts == [1, 2, 3]
        assert len(set(refs)) == 1
        # Attempt 1 was superseded: its late ack is stale and does not settle attempt 3.
        assert consumer.ack([(refs[0], 1)]) == ["stale"]
    finally:
        consumer.close()
    # Attempt 3 is never acknowledged: the message goes to picky.dead with its history.
    dead_topic = wait_for(
        lambda: raw.request(Command.TOPIC_DESCRIBE, {"name": "picky.dead"}).command is Command.OK,
        message="dead-letter topic created",
    )
    assert dead_topic
    dead_sub = make_subscription(raw, "picky.dead", "dead-reader")
    # The dead-letter copy may have been written before dead-reader existed; publish after to prove the path works either way.
    reader = NativeConsumer(dead_sub, "dead-1")
    try:
        reader.attach()
        got = reader.deliveries(1, timeout=3)
    finally:
        reader.close()
    if got:
        header, payload = got[0]
        assert payload == b"poison"
        assert header["attributes"]["herald.original_id"] == message_id
        assert header["attributes"]["herald.original_topic"] == "flaky"
        assert header["attributes"]["herald.attempts"] == "3"


def test_dead_letter_reaches_an_existing_dead_letter_subscription(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "bad.jobs")
    make_topic(raw, "bad.jobs.dlq")
    dlq_sub = make_subscription(raw, "bad.jobs.dlq", "dlq-reader")
    sub = make_subscription(raw, "bad.jobs", "bad-worker", ack_deadline=0.2, max_attempts=2, backoff_min=0.0, backoff_max=0.0, dead_letter_topic="bad.jobs.dlq")
    [message_id] = publish(raw, "bad.jobs", [b"boom"], [{"kind": "x"}])
    consumer = NativeConsumer(sub, "nacker")
    reader = NativeConsumer(dlq_sub, "dlq-1")
    try:
        consumer.attach()
        for attempt in (1, 2):
            [(header, _)] = consumer.deliveries(1, timeout=10)
            assert header["attempt"] == attempt
            assert consumer.ack([(header["ref"], attempt)], command=Command.NACK) == ["ok"]
        reader.attach()
        [(header, payload)] = reader.deliveries(1, timeout=10)
        assert payload == b"boom"
        assert header["attributes"] == {"kind": "x", "herald.original_id": message_id, "herald.original_topic": "bad.jobs", "herald.attempts": "2"}
        assert header["id"] == message_id
    finally:
        consumer.close()
        reader.close()


def test_two_consumers_share_and_flow_control_bounds_each(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "work")
    sub = make_subscription(raw, "work", "pool", max_unacked=5)
    first, second = NativeConsumer(sub, "c-a"), NativeConsumer(sub, "c-b")
    try:
        first.attach()
        second.attach()
        ids = publish(raw, "work", [str(i).encode() for i in range(40)])
        seen: dict[str, str] = {}
        while len(seen) < 40:
            batch_a = first.deliveries(5, timeout=1)
            batch_b = second.deliveries(5, timeout=1)
            assert len(batch_a) <= 5 and len(batch_b) <= 5, "max_unacked bounds each consumer"
            assert batch_a or batch_b, f"stalled after {len(seen)}"
            for consumer, batch in ((first, batch_a), (second, batch_b)):
                for header, _ in batch:
                    assert header["id"] not in seen
                    seen[header["id"]] = consumer.consumer_id
                if batch:
                    assert consumer.ack([(h["ref"], h["attempt"]) for h, _ in batch]) == ["ok"] * len(batch)
        assert sorted(seen) == sorted(ids)
        assert set(seen.values()) == {"c-a", "c-b"}
    finally:
        first.close()
        second.close()


def test_a_big_publish_reaches_the_live_feed_in_messages_of_at_most_500(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "bulk")
    live = raw.request(Command.INFO).header["live"]
    context: zmq.Context[Any] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"bulk\x00")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(live)
    try:

        def probe() -> bool:
            publish(raw, "bulk", [b"probe"])
            return bool(sub.poll(100))

        wait_for(probe, timeout=10, message="live subscription propagated")
        while sub.poll(300):
            sub.recv_multipart()
        payloads = [f"m{index}".encode() for index in range(1200)]
        ids = publish(raw, "bulk", payloads)
        sizes: list[int] = []
        received: list[tuple[str, bytes]] = []
        while len(received) < len(ids) and sub.poll(5000):
            message = decode(sub.recv_multipart()[1:])
            entries = message.header["messages"]
            assert len(entries) == len(message.payloads)
            sizes.append(len(entries))
            received.extend((entry["id"], payload) for entry, payload in zip(entries, message.payloads, strict=True))
        assert received == list(zip(ids, payloads, strict=True))  # every message, in publish order
        assert sizes == [500, 500, 200]
    finally:
        sub.close(0)
        context.term()


def test_live_messages_split_to_stay_under_the_header_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_live halves a batch whose header would exceed MAX_HEADER_BYTES (readers refuse bigger ones)."""
    monkeypatch.setattr(protocol, "MAX_HEADER_BYTES", 2_000)
    entries = [{"id": f"{index:032x}", "topic": "t", "attributes": {"k": "v" * 20}, "ts": 1.0} for index in range(100)]
    payloads = [str(index).encode() for index in range(100)]
    messages = protocol.encode_live("t", entries, payloads)
    assert len(messages) > 1
    got: list[tuple[str, bytes]] = []
    for frames in messages:
        assert frames[0] == b"t\x00" and len(frames[4]) <= 2_000
        decoded = decode(frames[1:], max_header_bytes=2_000)
        got.extend((entry["id"], payload) for entry, payload in zip(decoded.header["messages"], decoded.payloads, strict=True))
    assert got == [(entry["id"], payload) for entry, payload in zip(entries, payloads, strict=True)]


def test_offline_subscription_keeps_backlog_and_two_subscriptions_each_get_everything(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "news")
    sub_a = make_subscription(raw, "news", "reader-a")
    sub_b = make_subscription(raw, "news", "reader-b")
    ids = publish(raw, "news", [b"n"] * 300)
    herald.restart()  # the backlog is on disk, not in anyone's memory
    raw2 = RawClient(herald.endpoint)
    sub_a = raw2.request(Command.SUB_DESCRIBE, {"name": "reader-a"}).header["subscription"]
    sub_b = raw2.request(Command.SUB_DESCRIBE, {"name": "reader-b"}).header["subscription"]
    live_ids = publish(raw2, "news", [b"live"] * 10)
    raw2.close()
    for sub in (sub_a, sub_b):
        consumer = NativeConsumer(sub, f"c-{sub['name']}")
        try:
            consumer.attach()
            got = consumer.deliveries(310, timeout=15)
            assert sorted(h["id"] for h, _ in got) == sorted(ids + live_ids)
            consumer.ack([(h["ref"], h["attempt"]) for h, _ in got])
        finally:
            consumer.close()


def test_attribute_filter(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "events")
    sub = make_subscription(raw, "events", "eu-only", filter={"region": "eu"})
    ids = publish(raw, "events", [b"1", b"2", b"3"], [{"region": "eu"}, {"region": "us"}, {"region": "eu", "x": "y"}])
    consumer = NativeConsumer(sub, "f-1")
    try:
        consumer.attach()
        got = consumer.deliveries(3, timeout=2)
        assert sorted(h["id"] for h, _ in got) == sorted([ids[0], ids[2]])
    finally:
        consumer.close()


def test_consumer_that_goes_away_has_its_messages_rerouted(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "handoff")
    sub = make_subscription(raw, "handoff", "team")
    ids = publish(raw, "handoff", [b"h"] * 10)
    quitter = NativeConsumer(sub, "quitter")
    try:
        quitter.attach()
        assert len(quitter.deliveries(10)) == 10
        quitter.detach()
    finally:
        quitter.close()
    stayer = NativeConsumer(sub, "stayer")
    try:
        stayer.attach()
        got = stayer.deliveries(10)
        assert sorted(h["id"] for h, _ in got) == sorted(ids)
        assert all(h["attempt"] == 2 for h, _ in got)
    finally:
        stayer.close()


def test_bad_consumer_messages_get_errors_and_the_sender_keeps_serving(herald: HeraldSystem, raw: RawClient) -> None:
    make_topic(raw, "robust")
    sub = make_subscription(raw, "robust", "robust-sub")
    consumer = NativeConsumer(sub, "prober")
    try:
        consumer.attach()
        consumer.send_raw([b"garbage"])
        # A verb that is not in the protocol is dropped unanswered, like a header that is not JSON.
        consumer.send_raw([SIGNATURE, b"FROB", b"q0", orjson.dumps({"subscription": "robust-sub", "consumer": "prober"})])
        consumer.send_raw([SIGNATURE, b"ACK", b"q1", b"{not json"])
        consumer.send_raw(encode(Command.ACK, b"q2", {"subscription": "robust-sub", "consumer": "prober", "acks": [["nonsense", 1]]}))
        consumer.send_raw(encode(Command.DISPATCH, b"q3", {"subscription": "robust-sub", "consumer": "prober"}))
        # Consumer commands carry no payload: a stray payload_sizes does not hide the consumer field.
        consumer.send_raw(encode(Command.ATTACH, b"q4", {"subscription": "robust-sub", "consumer": "prober", "max_unacked": "x", "payload_sizes": "x"}))
        # ATTACH fields have the documented types and ranges.
        consumer.send_raw(encode(Command.ATTACH, b"q5", {"subscription": "robust-sub", "consumer": "prober", "ready": "yes"}))
        consumer.send_raw(encode(Command.ATTACH, b"q6", {"subscription": "robust-sub", "consumer": "prober", "ready": True, "max_unacked": 0}))
        errors = {}
        deadline = time.monotonic() + 5
        while len(errors) < 5 and time.monotonic() < deadline:
            frames = consumer.next_frames(1)
            if frames is not None and frames.command is Command.ERROR:
                errors[frames.request_id] = frames.header["code"]
        assert errors == {b"q2": "invalid_header", b"q3": "unknown_command", b"q4": "invalid_header", b"q5": "invalid_header", b"q6": "invalid_header"}
        ids = publish(raw, "robust", [b"still works"])
        [(header, _)] = consumer.deliveries(1)
        assert header["id"] == ids[0]
        assert consumer.ack([(header["ref"], 1)]) == ["ok"]
    finally:
        consumer.close()


def test_attach_to_an_unknown_subscription_is_answered_by_name_hash_first(herald: HeraldSystem, raw: RawClient) -> None:
    """The sender a name hashes to answers subscription_not_found; any other sender names the right one."""
    senders = raw.request(Command.INFO).header["endpoints"]["senders"]
    assert len(senders) >= 2, "the fixture runs two senders"
    name = "no-such-subscription"
    owner = protocol.shard_of(name, len(senders))
    answers = {}
    for index, endpoints in enumerate(senders):
        consumer = NativeConsumer({"name": name, "endpoints": endpoints}, f"lost-{index}")
        try:
            deadline = time.monotonic() + 10
            while index not in answers and time.monotonic() < deadline:
                # Resent until answered: the SUB socket's subscription may not have reached the sender yet.
                consumer.send_raw(encode(Command.ATTACH, b"a", {"subscription": name, "consumer": f"lost-{index}", "ready": False}))
                frames = consumer.next_frames(0.3)
                if frames is not None and frames.command is Command.ERROR:
                    answers[index] = (frames.header["code"], frames.header["message"])
        finally:
            consumer.close()
    assert answers[owner][0] == "subscription_not_found", answers
    for index, (code, message) in answers.items():
        if index != owner:
            assert code == "wrong_sender" and f"served by sender {owner}" in message, answers


@pytest.mark.parametrize("how", ["nack", "deadline"])
def test_messages_taken_back_together_come_again_in_order(herald: HeraldSystem, raw: RawClient, how: str) -> None:
    """A NACK of several messages, or their ack deadline passing, redelivers them oldest first (a C consumer saw
    them come back in reverse: each went to the front of the queue on its own)."""
    make_topic(raw, f"ordered-{how}")
    sub = make_subscription(raw, f"ordered-{how}", f"ordered-{how}.reader", ack_deadline=0.5 if how == "deadline" else 30, backoff_min=0.0, backoff_max=0.0)
    ids = publish(raw, f"ordered-{how}", [f"m{i}".encode() for i in range(5)])
    consumer = NativeConsumer(sub, f"orderly-{how}")
    try:
        consumer.attach()
        first = consumer.deliveries(5)
        assert [header["id"] for header, _ in first] == ids
        if how == "nack":
            assert consumer.ack([(header["ref"], 1) for header, _ in first], command=Command.NACK) == ["ok"] * 5
        again = consumer.deliveries(5)
        assert [(header["id"], header["attempt"]) for header, _ in again] == [(message_id, 2) for message_id in ids]
    finally:
        consumer.close()
