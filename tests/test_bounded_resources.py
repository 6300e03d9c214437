"""Bounded resources: one misbehaving peer must neither grow a process without
bound nor stop other clients from being served.

- a client that floods PUBLISH requests and never reads a reply;
- a subscriber that attaches and never reads its deliveries;
- 1,000 idle consumer connections on one sender.

Each test watches the resident memory of every Herald process while the
misbehaviour lasts and checks a well-behaved client is served meanwhile. The
memory bound asserted is generous (what matters is "bounded", not a figure:
figures belong to bench/); docs/operations.md explains the high-water marks
that make the bounds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from clients import Client
from clients.protocol import consumer_topic_frame, encode_attach
from tests.conftest import PROJECT_ROOT, HeraldSystem, wait_for

# Far below what an unbounded queue reaches within these tests, above the
# worst seen: under the flood the owning frontend peaked at 205-267 MiB here
# and once at 407 MiB in a CI run (RocksDB memtables and cache up to ~160 MiB since the memtables grew to 64 MiB, the
# 8 MiB group-commit batch, and replies queued toward a proxy that is busy
# pushing requests, up to sndhwm of them).
RSS_LIMIT_MIB = 600


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class MemoryWatch:
    """Samples the RSS of every Herald child in the background; keeps each one's peak."""

    def __init__(self, herald: HeraldSystem) -> None:
        self.pids = {child["name"]: child["pid"] for child in herald.status()["children"]}
        self.peak: dict[str, float] = dict.fromkeys(self.pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.peak[name] = max(self.peak[name], rss_mib(pid))

    def check(self) -> None:
        print("peak RSS MiB: " + ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(self.peak.items())))
        over = {name: round(mib) for name, mib in self.peak.items() if mib > RSS_LIMIT_MIB}
        assert not over, f"processes grew past {RSS_LIMIT_MIB} MiB: {over}"


def served_while(
    herald: HeraldSystem, misbehaving: Callable[[threading.Event], Any], seconds: float, well_behaved: Callable[[Client], None], timeout: float = 30.0
) -> list[float]:
    """Run ``misbehaving`` in a thread for ``seconds`` while ``well_behaved`` is called in a loop (each call
    failing after ``timeout`` seconds); returns its latencies."""
    stop = threading.Event()
    thread = threading.Thread(target=misbehaving, args=(stop,), daemon=True)
    latencies: list[float] = []
    with MemoryWatch(herald) as watch:
        thread.start()
        try:
            with Client(herald.endpoint, timeout=timeout) as client:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    well_behaved(client)  # raises HeraldError("timeout") if not served
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.05)
        finally:
            stop.set()
            thread.join(30)
    watch.check()
    assert all(child["running"] and child["restarts"] == 0 for child in herald.status()["children"]), herald.status()
    latencies.sort()
    print(f"well-behaved client: {len(latencies)} calls, median {latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    return latencies


# argv: endpoint, payload bytes, messages per request.
FLOODER = """
import sys, time, zmq
from clients.protocol import encode_publish
frames = [b"", *encode_publish("flood", [(b"f" * int(sys.argv[2]), None, None)] * int(sys.argv[3]), b"")]
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.SNDHWM, 1_000_000)
sock.connect(sys.argv[1])
sent = 0
while True:  # as fast as the socket takes them, never reading a reply
    try:
        frames[3] = sent.to_bytes(8, "big")
        sock.send_multipart(frames, zmq.NOBLOCK)
        sent += 1
    except zmq.Again:
        time.sleep(0.001)
"""


@pytest.mark.parametrize(
    ("payload_bytes", "per_request"),
    [
        (1024, 100),
        # Empty payloads, the most a request may carry: a frontend's batch must be
        # bounded by its messages, not only by their payload bytes (zero here).
        # Without a rate limit such a flood saturates its topic's owner, and other
        # publishes to that owner are refused as `unavailable` meanwhile: the
        # well-behaved client asks only for PINGs here, which any frontend answers.
        (0, 10_000),
    ],
    ids=["kib-payloads", "empty-payloads"],
)
def test_flooding_publisher_that_never_reads_replies(herald: HeraldSystem, payload_bytes: int, per_request: int) -> None:
    with Client(herald.endpoint) as client:
        client.create_topic("flood")
        client.create_topic("polite")

    def flood(stop: threading.Event) -> None:
        # Its own process, as a real flooding client would be: it must not share our GIL.
        process = subprocess.Popen(
            [sys.executable, "-c", FLOODER, herald.endpoint, str(payload_bytes), str(per_request)],
            cwd=PROJECT_ROOT,
            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
        )
        try:
            stop.wait()
        finally:
            process.kill()
            process.wait(10)

    if payload_bytes:
        served_while(herald, flood, 8.0, lambda client: client.publish("polite", b"hello") and None)
    else:
        # Nothing sheds a flood of empty messages to a cached topic: its owner writes them all, and a
        # PING queued behind them waits its turn. On a 2-vCPU VM with about twice the last one's CPU
        # per message, one waited 16 s in a passing run and more than 30 s in 3 of 5 runs (at 902a301
        # too), so the bound here is what the test is about (served, eventually, with memory bounded
        # and nothing restarted), not a latency.
        served_while(herald, flood, 8.0, lambda client: client.ping() and None, timeout=120.0)
    with Client(herald.endpoint) as client:
        shed = sum(client.status()["shed"] for _ in range(4))
    print(f"publishes refused as overload (sampled from the answering frontends): {shed}")


def test_subscriber_that_never_reads(herald: HeraldSystem) -> None:
    with Client(herald.endpoint) as client:
        client.create_topic("feed")
        stuck = client.create_subscription("feed", "never-reads", max_unacked=1000)
        client.create_subscription("feed", "reads")

    def never_read(stop: threading.Event) -> None:
        context: zmq.Context[Any] = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame("stuck"))
        sub.connect(stuck["endpoints"]["deliver"])
        push = context.socket(zmq.PUSH)
        push.connect(stuck["endpoints"]["ack"])
        try:
            while not stop.wait(0.5):  # heartbeats only: attached, ready, and never reading
                push.send_multipart(encode_attach("never-reads", "stuck", ready=True))
        finally:
            sub.close(0)
            push.close(0)
            context.term()

    published: list[str] = []
    received: set[str] = set()
    with Client(herald.endpoint) as reader_client, reader_client.subscribe("feed", "reads") as reader:

        def publish_and_read(client: Client) -> None:
            published.extend(client.publish_batch("feed", [b"r" * 4096] * 200))
            while (message := reader.receive(timeout=0.01)) is not None:
                received.add(message.id)
                message.ack_nowait()

        served_while(herald, never_read, 8.0, publish_and_read)

        def caught_up() -> bool:
            while (message := reader.receive(timeout=0.2)) is not None:
                received.add(message.id)
                message.ack_nowait()
            return set(published) <= received

        wait_for(caught_up, timeout=60, interval=0, message="the reading subscription got everything")
    with Client(herald.endpoint) as client:
        backlog = client.describe_subscription("never-reads")
    print(f"never-reads: {backlog}")


def test_a_thousand_idle_consumers(herald: HeraldSystem) -> None:
    with Client(herald.endpoint) as client:
        client.create_topic("idle")
        idle = client.create_subscription("idle", "idle-consumers")
        client.create_subscription("idle", "busy")
    context: zmq.Context[Any] = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 4096)
    sockets: list[zmq.Socket[Any]] = []

    def idle_consumers(stop: threading.Event) -> None:
        pushes = []
        for n in range(1000):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(f"idle-{n}"))
            sub.connect(idle["endpoints"]["deliver"])
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(idle["endpoints"]["ack"])
            sockets.extend((sub, push))
            pushes.append((n, push))
        while not stop.wait(1.0):  # attached and heartbeating, never ready for a message
            for n, push in pushes:
                push.send_multipart(encode_attach("idle-consumers", f"idle-{n}", ready=False))

    try:
        with Client(herald.endpoint) as reader_client, reader_client.subscribe("idle", "busy") as busy:

            def round_trip(client: Client) -> None:
                message_id = client.publish("idle", b"ping")
                message = busy.receive(timeout=10)
                assert message is not None and message.id == message_id
                message.ack_nowait()

            served_while(herald, idle_consumers, 8.0, round_trip)
    finally:
        for sock in sockets:
            sock.close(0)
        context.term()


def test_ack_deadlines_of_settled_deliveries_are_compacted_and_a_held_one_still_expires(herald: HeraldSystem) -> None:
    """A sender keeps ack deadlines per delivery pass; acks leave their keys behind until a compaction.

    60,000 deliveries acked well within their deadline must not leave 60,000
    keys behind until it passes (the compaction runs past 50,000), and one
    delivery held unacked across that compaction must still come back once
    its deadline passes.
    """
    from broker.metrics import read_snapshots

    ack_deadline_s = 15.0
    total = 60_000
    with Client(herald.endpoint, timeout=30.0) as client:
        client.create_topic("deadlines")
        client.create_subscription("deadlines", "deadlines.sub", ack_deadline=ack_deadline_s, backoff=(0, 0))
        with client.subscribe("deadlines", "deadlines.sub") as subscription:
            client.publish("deadlines", b"held")
            held = subscription.receive(timeout=10)
            assert held is not None and held.data == b"held"
            held_at = time.monotonic()
            settled = 0
            for _ in range(total // 1000):
                client.publish_batch("deadlines", [b"x" * 10] * 1000)
                while (message := subscription.receive(timeout=0)) is not None:
                    message.ack_nowait()
                    settled += 1
            while settled < total:
                message = subscription.receive(timeout=10)
                assert message is not None, f"only {settled} of {total} delivered"
                assert message.id != held.id, "the held delivery came back before its deadline"
                message.ack_nowait()
                settled += 1
            subscription.receive(timeout=0.2)  # sends the last acks

            def compacted() -> bool:
                senders = {role: snapshot for role, snapshot in read_snapshots(str(herald.data_dir)).items() if role.startswith("sender-")}
                return sum(int(snapshot.get("acked", 0)) for snapshot in senders.values()) >= total and all(
                    int(snapshot.get("deadline_keys", 0)) < 50_000 for snapshot in senders.values()
                )

            # Before the deadline: past it, the due lists are dropped anyway.
            before_deadline = held_at + ack_deadline_s - 1.0 - time.monotonic()
            assert before_deadline > 1.0, "publishing took too long to see the compaction before the deadline"
            wait_for(compacted, timeout=before_deadline, interval=0.2, message="the senders' deadline lists compacted after 60,000 acks")
            again = subscription.receive(timeout=ack_deadline_s + 20)
            assert again is not None and again.id == held.id, "the held delivery was not handed out again after its deadline"
            assert again.attempt == 2
            assert time.monotonic() - held_at >= ack_deadline_s - 0.5
            again.ack()
