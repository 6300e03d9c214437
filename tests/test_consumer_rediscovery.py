"""A consumer whose sender moved finds it again (docs/protocol.md §9, step 5).

The whole system is killed; the old deliver ports of the subscriptions'
senders are held by plain sockets, so the restarted launcher (which reuses the
last run's endpoints only when their ports are free) binds those senders
elsewhere. The consumers, left running all along, get no WELCOME, re-read
SUB_DESCRIBE (which fails while the system is down, and is asked again),
reconnect, and receive what is published after the restart.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from clients import AsyncClient, Client
from clients._core import REDISCOVER_AFTER_S
from tests.conftest import HeraldSystem, wait_for

TOPIC = "moving"
SETTINGS: dict[str, Any] = {"ack_deadline": 5, "max_attempts": 100}
RECEIVE_TIMEOUT_S = 60.0


def _hold_port(endpoint: str, timeout_s: float = 10.0) -> socket.socket:
    """A listening plain socket on ``endpoint``'s port, so nothing else can bind it."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The killed sender's connections leave the port in TIME_WAIT; listening makes it taken all the same.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind((host, int(port)))
        except OSError:
            holder.close()
            # Seen once in a CI run, right after the SIGKILL of every process: the port was
            # still taken for a moment. What holds it is in the message if it lasts.
            if time.monotonic() > deadline:
                try:
                    holders = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=False).stdout
                except OSError:
                    holders = "(ss is not installed)"
                raise AssertionError(
                    f"port {port} stayed taken for {timeout_s:g} s:\n" + "\n".join(line for line in holders.splitlines() if f":{port} " in line)
                ) from None
            time.sleep(0.1)
            continue
        holder.listen(1)
        return holder


class Consumer:
    """One consumer running in its own thread for the whole test, never recreated."""

    def __init__(self, name: str, target: Callable[[Consumer], None]) -> None:
        self.name = name
        self.received: list[bytes] = []
        self.infos: queue.Queue[dict[str, Any]] = queue.Queue()  # the subscription's record: at start, then at stop
        self.errors: list[BaseException] = []
        self.statistics: Any = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), name=f"consumer-{name}", daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[Consumer], None]) -> None:
        try:
            target(self)
        except BaseException as error:  # reported by the test
            self.errors.append(error)
            self.infos.put({})

    def has(self, payloads: list[bytes]) -> Callable[[], bool]:
        """A predicate for wait_for: every one of ``payloads`` was received."""
        return lambda: set(payloads) <= set(self.received)

    def first_info(self) -> dict[str, Any]:
        info = self.infos.get(timeout=60)
        assert not self.errors, self.errors
        return info

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), f"{self.name} consumer did not stop"
        assert not self.errors, self.errors
        return self.infos.get_nowait()


def _sync_consumer(endpoint: str) -> Callable[[Consumer], None]:
    def run(consumer: Consumer) -> None:
        with Client(endpoint, timeout=10) as client, client.subscribe(TOPIC, f"{TOPIC}.sync", **SETTINGS) as subscription:
            consumer.infos.put(subscription.info)
            while not consumer.stop.is_set():
                message = subscription.receive(timeout=0.5)
                if message is not None:
                    consumer.received.append(message.data)
                    message.ack_nowait()
            consumer.statistics = subscription.statistics()
            consumer.infos.put(subscription.info)

    return run


def _async_consumer(endpoint: str) -> Callable[[Consumer], None]:
    async def main(consumer: Consumer) -> None:
        async with AsyncClient(endpoint, timeout=10) as client, client.subscribe(TOPIC, f"{TOPIC}.async", **SETTINGS) as subscription:
            consumer.infos.put(subscription.info)
            while not consumer.stop.is_set():
                message = await subscription.receive(timeout=0.5)
                if message is not None:
                    consumer.received.append(message.data)
                    message.ack_nowait()
            consumer.statistics = subscription.statistics()
            consumer.infos.put(subscription.info)

    return lambda consumer: asyncio.run(main(consumer))


def test_consumers_follow_their_sender_to_new_endpoints_after_a_restart(herald: HeraldSystem) -> None:
    endpoint = herald.endpoint
    with Client(endpoint, timeout=30) as admin:
        admin.create_topic(TOPIC)
    consumers = [Consumer("sync", _sync_consumer(endpoint)), Consumer("async", _async_consumer(endpoint))]
    holders: list[socket.socket] = []
    try:
        old_delivers = {c.first_info()["endpoints"]["deliver"] for c in consumers}
        with Client(endpoint, timeout=30) as publisher:
            publisher.publish(TOPIC, b"before")
        for consumer in consumers:
            wait_for(consumer.has([b"before"]), timeout=30, message=f"{consumer.name} received the first message")
        time.sleep(0.5)  # the acks go out (ack_nowait batches them for a few ms)

        herald.kill_all()
        holders = [_hold_port(deliver) for deliver in sorted(old_delivers)]
        # Down for longer than REDISCOVER_AFTER_S: the consumers' first SUB_DESCRIBE
        # finds no broker, which must not raise out of receive(); they ask again later.
        time.sleep(REDISCOVER_AFTER_S + 3)
        herald.start()
        assert herald.endpoint == endpoint, "the client port was free, so the restarted launcher keeps it"
        assert not old_delivers & set(herald.config["sender_deliver_endpoints"]), "the held ports must have been replaced"

        after = [f"after-{i}".encode() for i in range(5)]
        with Client(endpoint, timeout=30) as publisher:
            for payload in after:
                publisher.publish(TOPIC, payload)
        try:
            for consumer in consumers:
                wait_for(
                    consumer.has(after),
                    timeout=RECEIVE_TIMEOUT_S,
                    interval=0.1,
                    message=f"{consumer.name} consumer received the messages published after the move",
                )
        except AssertionError as error:
            raise AssertionError(f"{error}\nlog:\n{herald.log_tail()}") from None
    finally:
        for consumer in consumers:
            consumer.stop.set()
        for holder in holders:
            holder.close()
    for consumer in consumers:
        info = consumer.finish()
        # The same consumer, moved: it adopted the new record and kept its state.
        assert info["endpoints"]["deliver"] not in old_delivers
        assert consumer.statistics.acked >= 1 + len(after)


def test_a_consumer_attaching_with_a_stale_record_moves_to_the_serving_sender(herald: HeraldSystem) -> None:
    """A SUB_DESCRIBE record read before a restart with another number of senders names the wrong sender, which
    answers the first ATTACH with ``wrong_sender``: both clients re-read the record and attach where it says."""
    from clients.aio import AsyncSubscription
    from clients.client import Subscription

    with Client(herald.endpoint, timeout=10) as client:
        client.create_topic("stale")
        senders = client.info()["endpoints"]["senders"]
        assert len(senders) == 2, "the fixture runs two senders"
        infos = {flavour: client.create_subscription("stale", f"stale.{flavour}") for flavour in ("sync", "async")}
        stale = {flavour: {**info, "endpoints": next(endpoints for endpoints in senders if endpoints != info["endpoints"])} for flavour, info in infos.items()}
        with Subscription(client, stale["sync"]) as subscription:
            assert subscription.info["endpoints"] == infos["sync"]["endpoints"]
            client.publish("stale", b"found")
            message = subscription.receive(timeout=10)
            assert message is not None and message.data == b"found"
            assert message.ack()

    async def attach_async() -> bytes:
        async with AsyncClient(herald.endpoint, timeout=10) as aclient:
            subscription = AsyncSubscription(aclient, stale["async"])
            try:
                await subscription._attach()
                assert subscription.info["endpoints"] == infos["async"]["endpoints"]
                message = await subscription.receive(timeout=10)
                assert message is not None
                assert await message.ack()
                return message.data
            finally:
                await subscription.close()

    assert asyncio.run(attach_async()) == b"found"
