"""Kill each process kind mid-stream and count: no acknowledged message may be
missing from any subscription, and delivery resumes by itself.

A short seeded run is part of the default suite; the workload and the checks
are the ones a longer soak would use.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import Counter

import pytest

from clients import Client, HeraldError
from tests.conftest import HeraldSystem, stored_messages, wait_for

SUBSCRIPTIONS = ("fault-a", "fault-b")


class Workload:
    """Publishers and consumers that keep going through faults and record the history."""

    def __init__(self, herald: HeraldSystem, topic: str) -> None:
        self.herald = herald
        self.topic = topic
        self.acked: set[str] = set()
        self.attempted: set[str] = set()
        self.received: dict[str, Counter[str]] = {name: Counter() for name in SUBSCRIPTIONS}
        self.publish_errors: Counter[str] = Counter()
        self.stop_publishing = threading.Event()
        self.stop_consuming = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._publish, name="publisher", daemon=True)]
        self.threads += [threading.Thread(target=self._consume, args=(name,), name=name, daemon=True) for name in SUBSCRIPTIONS]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _publish(self) -> None:
        batch_number = 0
        with Client(self.herald.endpoint, timeout=3.0) as client:
            while not self.stop_publishing.is_set():
                batch_number += 1
                items = [(f"{batch_number}".encode(), None, f"b{batch_number}-{i}") for i in range(20)]
                with self.lock:
                    self.attempted.update(message_id for _, _, message_id in items)
                # Retry the same ids until acknowledged: de-duplication makes it safe.
                while not self.stop_publishing.is_set():
                    try:
                        ids = client.publish_batch(self.topic, items)
                    except HeraldError as error:
                        self.publish_errors[error.code] += 1
                        continue
                    with self.lock:
                        self.acked.update(ids)
                    break
                time.sleep(0.01)

    def _consume(self, name: str) -> None:
        while not self.stop_consuming.is_set():
            try:
                with Client(self.herald.endpoint, timeout=3.0) as client, client.subscribe(self.topic, name) as subscription:
                    while not self.stop_consuming.is_set():
                        message = subscription.receive(timeout=0.2)
                        if message is None:
                            continue
                        with self.lock:
                            self.received[name][message.id] += 1
                        # An ack lost with a dead sender only brings the message back.
                        with contextlib.suppress(HeraldError):
                            message.ack()
            except HeraldError:
                time.sleep(0.2)

    def missing(self) -> dict[str, int]:
        with self.lock:
            return {name: len(self.acked - set(self.received[name])) for name in SUBSCRIPTIONS}

    def finish(self, timeout: float = 60.0) -> None:
        self.stop_publishing.set()
        self.threads[0].join(30)
        wait_for(lambda: not any(self.missing().values()), timeout=timeout, interval=0.2, message="every acknowledged message delivered to every subscription")
        self.stop_consuming.set()
        for thread in self.threads[1:]:
            thread.join(30)


@pytest.fixture
def workload(herald: HeraldSystem) -> Workload:
    with Client(herald.endpoint) as client:
        client.create_topic("faults")
        for name in SUBSCRIPTIONS:
            # A short deadline so deliveries lost with a dead sender come back quickly.
            client.create_subscription("faults", name, ack_deadline=2.0, backoff_min=0.1, backoff_max=0.5, max_attempts=1000)
    return Workload(herald, "faults")


@pytest.mark.parametrize("victim", ["sender-0", "sender-1", "metadata", "proxy", "frontend-0", "frontend-1"])
def test_sigkill_one_process_mid_stream_loses_nothing(herald: HeraldSystem, workload: Workload, victim: str) -> None:
    workload.start()
    wait_for(lambda: len(workload.acked) >= 200, timeout=30, message="traffic flowing")
    old_pid = herald.kill_child(victim, signal.SIGKILL)
    herald.wait_restarted(victim, old_pid)
    acked_at_restart = len(workload.acked)
    wait_for(lambda: len(workload.acked) >= acked_at_restart + 200, timeout=30, message="publishing resumed after the restart")
    workload.finish()
    duplicates = {name: sum(c.values()) - len(c) for name, c in workload.received.items()}
    print(f"{victim}: acked {len(workload.acked)}, duplicates {duplicates}, publish errors {dict(workload.publish_errors)}")
    with workload.lock:
        for name in SUBSCRIPTIONS:
            # A publish can be stored yet unacknowledged (its reply lost in the crash), so
            # deliveries are checked against what was sent, not only what was acknowledged.
            assert set(workload.received[name]) <= workload.attempted, "delivered an id never published"


def test_sigkill_everything_then_restart_delivers_the_backlog(herald: HeraldSystem, workload: Workload) -> None:
    rng = random.Random(7)
    workload.start()
    wait_for(lambda: len(workload.acked) >= 300, timeout=30, message="traffic flowing")
    time.sleep(rng.uniform(0.0, 0.3))
    herald.kill_all()
    workload.stop_publishing.set()
    herald.start()
    workload.finish(timeout=90)
    assert all(len(workload.received[name]) >= len(workload.acked) for name in SUBSCRIPTIONS)


def test_sigstop_sender_longer_than_ack_deadline(herald: HeraldSystem, workload: Workload) -> None:
    workload.start()
    wait_for(lambda: len(workload.acked) >= 200, timeout=30, message="traffic flowing")
    pid = herald.kill_child("sender-0", signal.SIGSTOP)
    time.sleep(3.0)  # the fault itself: longer than the 2 s ack deadline
    import os

    os.kill(pid, signal.SIGCONT)
    workload.finish()


def test_consumer_killed_with_unacked_messages(herald: HeraldSystem) -> None:
    with Client(herald.endpoint) as client:
        client.create_topic("abandon")
        client.create_subscription("abandon", "abandoner", ack_deadline=30)
        ids = set(client.publish_batch("abandon", [b"m"] * 50))
    # A consumer process that takes messages and dies without acking or detaching.
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    script = (
        "import os, sys\n"
        "from clients import Client\n"
        "with Client(sys.argv[1]) as c:\n"
        "    s = c.subscribe('abandon', 'abandoner')\n"
        "    got = [s.receive(timeout=10) for _ in range(20)]\n"
        "    assert all(got)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, herald.endpoint], cwd=PROJECT_ROOT, timeout=60, capture_output=True)
    assert result.returncode == -9, result.stderr
    received: set[str] = set()
    with Client(herald.endpoint) as client, client.subscribe("abandon", "abandoner") as subscription:
        deadline = time.monotonic() + 30
        while received != ids and time.monotonic() < deadline:
            message = subscription.receive(timeout=1)
            if message is not None:
                received.add(message.id)
                message.ack()
    assert received == ids
    herald.stop()
    assert not [m for m in stored_messages(herald.data_dir) if m.topic == "abandon"], "acknowledged messages are freed from disk"


def test_dead_letter_of_an_expired_message_does_not_stall_the_subscription(herald: HeraldSystem) -> None:
    """A message that expires while its last attempt is out must not hold the subscription's credit."""
    with Client(herald.endpoint) as client:
        client.create_topic("short.lived", retention=1)
        client.create_subscription("short.lived", "one.at.a.time", ack_deadline=2, max_attempts=1, max_unacked=1)
        with client.subscribe("short.lived", "one.at.a.time") as subscription:
            client.publish("short.lived", b"m1")
            first = subscription.receive(timeout=10)
            assert first is not None and first.data == b"m1"  # not acked: it expires, then exhausts its attempt
            time.sleep(3.5)  # the fault itself: past both the retention (1 s) and the ack deadline (2 s)
            client.publish("short.lived", b"m2")
            second = subscription.receive(timeout=15)
            assert second is not None and second.data == b"m2"


def test_deleting_subscriptions_under_load_crashes_nothing(herald: HeraldSystem) -> None:
    stop = threading.Event()
    published = Counter[str]()

    def publish() -> None:
        with Client(herald.endpoint) as client:
            while not stop.is_set():
                client.publish_batch("churn", [b"x"] * 50)
                published["batches"] += 1

    with Client(herald.endpoint) as client:
        client.create_topic("churn")
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        for n in range(8):
            client.create_subscription("churn", f"churn-{n}")
            with client.subscribe("churn", f"churn-{n}") as subscription:
                for _ in range(20):
                    message = subscription.receive(timeout=10)
                    assert message is not None
                    message.ack_nowait()
            client.delete_subscription(f"churn-{n}")
        stop.set()
        thread.join(30)
    assert published["batches"] > 0
    assert all(child["restarts"] == 0 for child in herald.status()["children"]), herald.status()


def test_filter_change_never_drops_a_message_on_a_lagging_sender(herald: HeraldSystem) -> None:
    """A sender that has not yet re-read a changed filter must deliver, not settle, a message
    the frontend stored under the new filter. SIGSTOP of that sender makes it lag for sure."""
    from clients.protocol import shard_of

    name = "lagging.filter"
    with Client(herald.endpoint) as client:
        client.create_topic("filtered")
        client.create_subscription("filtered", name, filter={"k": "a"})
        with client.subscribe("filtered", name) as subscription:
            client.publish("filtered", b"warm", {"k": "a"})
            warm = subscription.receive(timeout=10)
            assert warm is not None and warm.ack()
            pid = herald.kill_child(f"sender-{shard_of(name, 2)}", signal.SIGSTOP)
            try:
                client.create_subscription("filtered", name, exist_ok=True, filter={"k": "b"})
                client.publish("filtered", b"after-change", {"k": "b"})
                time.sleep(1.0)  # the fault itself: the sender stays stopped with its old filter
            finally:
                import os

                os.kill(pid, signal.SIGCONT)
            message = subscription.receive(timeout=15)
            assert message is not None and message.data == b"after-change"
