"""Malformed messages on the internal sockets cost the message, never the process.

Only Herald's own processes should write to a frontend's control socket (FORWARD
from other frontends; CREDIT, COMPLETE, ATTEMPTED, DEAD from senders) or to a
sender's intake (DISPATCH), but a version mix-up or a stray client on the
loopback must not crash a role or change what it holds. Each bad message here is
one the code once applied in part, or never looked at: every one must be dropped
whole and counted, the processes must keep their pids, and a stored backlog must
still arrive complete, followed by a fresh round trip.
"""

from __future__ import annotations

from typing import Any, Final

import zmq

from broker.metrics import read_snapshots
from clients import Client
from clients.protocol import SIGNATURE, Command, encode
from tests.conftest import HeraldSystem, wait_for

GUARD_TOPIC: Final = "internal.guard"
GUARD_SUBSCRIPTION: Final = "internal.guard.sub"
GUARD_MESSAGES: Final = 40
NEVER_TOPIC: Final = "internal.dead.never"  # a DEAD whose second entry is broken must not create it
NEGATIVE_TOPIC: Final = "internal.dead.negative"
NEVER_TOPICS: Final = {NEVER_TOPIC, NEGATIVE_TOPIC, "None", "123"}
DEEP_JSON: Final = [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]

BAD_CONTROL: Final[list[list[bytes]]] = [
    [b"not herald"],
    [SIGNATURE, b"NOPE", b"", b"{}"],
    [SIGNATURE, b"CREDIT", b"", b"{not json"],
    [SIGNATURE, b"CREDIT", b"", b"[1, 2]"],
    encode(Command.PUBLISH, b"r1", {"topic": GUARD_TOPIC}, [b"a client command"]),
    encode(Command.CREDIT, b"", {"sender": "zero", "epoch": 1}),
    # Applied in part before: a negative index reached the last sender, and the
    # epoch was taken before the windows failed, so the real sender's next CREDIT
    # looked like a restart and every cursor was handed out again.
    encode(Command.CREDIT, b"", {"sender": -1, "epoch": 77, "windows": {}}),
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 77, "windows": {"1": "many"}}),
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 77, "windows": ["1"]}),
    # Well-typed JSON but not an id: a negative or 2**64 subscription id made the
    # next backlog scan raise outside any handler (the frontend crashed), and int()
    # read true, 1.9 and "12" as numbers.
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 77, "windows": {"-1": 5}}),
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 77, "windows": {str(2**64): 5}}),
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 77, "windows": {"1": True}}),
    encode(Command.CREDIT, b"", {"sender": True, "epoch": 77, "windows": {}}),
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 0, "windows": {}}),
    encode(Command.COMPLETE, b"", {"entries": [[1, -1]]}),
    encode(Command.COMPLETE, b"", {"entries": ["12"]}),
    encode(Command.COMPLETE, b"", {"entries": [[1, 1.9]]}),
    encode(Command.DEAD, b"", {"entries": [[-1, 1, 5, NEGATIVE_TOPIC]]}),
    encode(Command.DEAD, b"", {"entries": [[1, 1, 5, None], [1, 1, 5, 123]]}),
    encode(Command.DEAD, b"", {"entries": [[1, 1, 5, "not a name"]]}),
    encode(Command.COMPLETE, b"", {"entries": [[1, 1], [2]]}),
    encode(Command.COMPLETE, b"", {"entries": "12"}),
    encode(Command.ATTEMPTED, b"", {"entries": [[1, 1, 2], [1, "x", 2]]}),
    encode(Command.DEAD, b"", {"entries": [[1, 1, 5, NEVER_TOPIC], [1, 2]]}),
    encode(Command.FORWARD, b"", {"envelope": 5}, [b"one frame"]),
    encode(Command.FORWARD, b"", {"envelope": -1}, [b"one frame"]),
    encode(Command.FORWARD, b"", {"envelope": "two"}, [b"a", b"b"]),
    encode(Command.FORWARD, b"", {}, []),
]


BAD_INTAKE: Final[list[list[bytes]]] = [
    [b"junk"],
    encode(Command.CREDIT, b"", {"sender": 0, "epoch": 1}),
    [SIGNATURE, b"DISPATCH", b"", b"{oops"],
    encode(Command.DISPATCH, b"", {"messages": [], "entries": []}),
    encode(Command.DISPATCH, b"", {"shard": 9, "messages": [], "entries": []}),
    encode(Command.DISPATCH, b"", {"shard": -1, "messages": [], "entries": []}),
    encode(Command.DISPATCH, b"", {"shard": 0, "messages": [{"seq": 1}], "entries": []}, []),
    encode(Command.DISPATCH, b"", {"shard": 0, "messages": "abc", "entries": []}, [b"x", b"y", b"z"]),
    encode(Command.DISPATCH, b"", {"shard": 0, "messages": []}),
]


def bad_intake(sub_id: int) -> list[list[bytes]]:
    """Bad DISPATCHes; some name the guard subscription, which a sender then holds and re-encodes."""
    good = {"seq": 10**9, "id": "fake", "topic": GUARD_TOPIC, "attributes": {}, "ts": 1.0}
    entry = [sub_id, 0, 1]

    def dispatch(messages: list[dict[str, object]], entries: list[object], shard: object = 0) -> list[bytes]:
        return encode(Command.DISPATCH, b"", {"shard": shard, "messages": messages, "entries": entries}, [b"x"] * len(messages))

    return [
        *BAD_INTAKE,
        # Accepted before and kept: re-encoding it for a consumer raised outside any handler.
        dispatch([{**good, "attributes": {"k": DEEP_JSON}}], [entry]),
        dispatch([{**good, "id": {"deep": DEEP_JSON}}], [entry]),
        dispatch([{**good, "seq": -1}], [entry]),
        dispatch([good], [[sub_id, 0, 0]]),  # attempt 0
        dispatch([good], [[sub_id, 1, 1]]),  # no message 1
        dispatch([good], [[sub_id, "0", 1]]),
        dispatch([good], [{"sub": sub_id, "index": 0, "attempt": 1}]),
        dispatch([good], [entry], shard="0"),
        # A good entry before a bad one: the whole DISPATCH is dropped, the good one too.
        dispatch([good, {**good, "seq": 10**9 + 1, "ts": "now"}], [entry, [sub_id, 1, 1]]),
        dispatch([good], [entry, [-1, 0, 1]]),
    ]


def send_all(context: zmq.Context[Any], endpoint: str, messages: list[list[bytes]]) -> None:
    sock = context.socket(zmq.PUSH)
    try:
        sock.connect(endpoint)
        for frames in messages:
            sock.send_multipart(frames)
    finally:
        sock.close(linger=5000)  # delivered before the test looks at the counters


def counter(role: str, name: str, data_dir: str) -> int:
    return int(read_snapshots(data_dir).get(role, {}).get(name, -1))


def test_malformed_internal_messages_are_dropped_whole_and_every_process_keeps_serving(herald: HeraldSystem) -> None:
    config = herald.config
    data_dir = str(herald.data_dir)
    frontends = [f"frontend-{index}" for index in range(len(config["frontend_control_endpoints"]))]
    senders = [f"sender-{index}" for index in range(len(config["sender_intake_endpoints"]))]
    with Client(herald.endpoint, timeout=15) as client:
        client.create_topic(GUARD_TOPIC)
        sub_id = client.create_subscription(GUARD_TOPIC, GUARD_SUBSCRIPTION)["id"]
        intake = bad_intake(sub_id)
        expected = {client.publish(GUARD_TOPIC, f"guard {number}".encode()) for number in range(GUARD_MESSAGES)}
        # Senders send CREDIT only for subscriptions with consumers: attach one so
        # that a misapplied CREDIT would have cursors to disturb.
        with client.subscribe(GUARD_TOPIC, GUARD_SUBSCRIPTION) as subscription:
            first = subscription.receive(timeout=15)
            assert first is not None, "the first guard message never came"
            # Unacknowledged: it comes again after the test's checks.
        pids = {role: herald.child_pid(role) for role in (*frontends, *senders, "metadata", "proxy")}
        for role in (*frontends, *senders):
            wait_for(
                lambda role=role: counter(role, "bad_control_messages" if role.startswith("frontend") else "bad_dispatches", data_dir) == 0,
                message=f"{role}'s first snapshot",
            )

        context: zmq.Context[Any] = zmq.Context()
        try:
            for endpoint in config["frontend_control_endpoints"]:
                send_all(context, endpoint, BAD_CONTROL)
            for endpoint in config["sender_intake_endpoints"]:
                send_all(context, endpoint, intake)
        finally:
            context.term()

        for role in frontends:
            wait_for(
                lambda role=role: counter(role, "bad_control_messages", data_dir) == len(BAD_CONTROL),
                message=f"{role} counting {len(BAD_CONTROL)} bad control messages",
            )
        for role in senders:
            wait_for(lambda role=role: counter(role, "bad_dispatches", data_dir) == len(intake), message=f"{role} counting {len(intake)} bad dispatches")
        assert {role: herald.child_pid(role) for role in pids} == pids, "a process died or was restarted"

        # Everything stored is still there and deliverable, and a new message makes the round trip.
        received: set[str] = set()
        with client.subscribe(GUARD_TOPIC, GUARD_SUBSCRIPTION) as subscription:
            while received != expected:
                message = subscription.receive(timeout=15)
                assert message is not None, f"guard messages missing: {sorted(expected - received)[:5]}"
                assert message.id != "fake", "a DISPATCH that was dropped was delivered"
                received.add(message.id)
                assert message.ack() is True
            fresh = client.publish(GUARD_TOPIC, b"after the bad messages")
            while (message := subscription.receive(timeout=15)) is not None and message.id != fresh:
                assert message.id in expected, message
            assert message is not None, "the round-trip message never came"
            assert message.ack() is True
        assert not NEVER_TOPICS & {topic["name"] for topic in client.list_topics()}
    log = herald.log_tail(400)
    assert "restarted; handing its deliveries out again" not in log, log
    assert log.count("dropped a bad control message") == len(BAD_CONTROL) * len(frontends), log
