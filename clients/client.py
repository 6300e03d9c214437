"""The blocking Herald client.

One :class:`Client` owns one ``zmq.Context`` and one DEALER socket connected to
the proxy. Each request carries a fresh request id and waits for the reply
with that id, at most ``timeout`` seconds; replies to earlier requests that
timed out are recognised by their id and dropped. A client may be shared by
threads (requests are serialised by a lock); a :class:`Subscription` belongs to
the thread that iterates it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import zmq

from clients._core import (
    CLIENT_RCVHWM,
    CLIENT_SNDHWM,
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT_S,
    BacklogTally,
    Call,
    ClientCounters,
    ClientStatistics,
    ConsumerCore,
    CurveKeys,
    ItemLike,
    ListPage,
    Message,
    MessageFields,
    PublishId,
    RequestIds,
    SubscriptionStatistics,
    SubscriptionView,
    ack_result,
    attempt_deadline,
    check_timeout,
    closed_error,
    create_subscription_call,
    create_topic_call,
    delete_subscription_call,
    delete_topic_call,
    describe_subscription_call,
    describe_topic_call,
    info_call,
    list_subscriptions_call,
    list_topics_call,
    parse_reply,
    ping_call,
    publish_call,
    publish_item,
    publish_items,
    reply_header,
    retry_pause,
    setup_socket,
    split_batch,
    status_call,
    timeout_error,
)
from clients.protocol import ATTACH_RETRY_S, CONSUMER_HEARTBEAT_S, Frames, HeraldError, ProtocolError, request_id_of, split_envelope

log = logging.getLogger("herald.client")

T = TypeVar("T")

# DETACH is the one message worth flushing on close: it lets the sender hand
# this consumer's unacknowledged messages to others at once instead of after
# CONSUMER_EXPIRY_S. Close waits at most this long for it.
DETACH_LINGER_MS: Final = 500
# A few heartbeats may wait for a reconnecting sender; older ones are worthless.
CONSUMER_HEARTBEAT_QUEUE: Final = 4
REDISCOVER_WAIT_S: Final = 2.0  # the longest a re-read of SUB_DESCRIBE holds receive() (see Subscription._rediscover)
DRAIN_BURST: Final = 10_000  # SUB messages handled per wake-up before checking the caller's deadline
# A subscription's SUB and PUSH sockets are shared by every thread that uses it (one
# receiving, others acking or closing) through one lock: ZeroMQ sockets are not
# thread-safe, and an ack() from a worker thread polling the SUB socket while receive()
# polled it too had aborted the process inside libzmq. receive() waits holding the lock,
# polling a wake-up socket beside the SUB one: a thread that finds the lock taken writes
# a byte to it, and receive() steps aside. So an idle receive() wakes only when something
# is due (the caller's deadline, queued acks, the check on the sender), and at least
# this often as a safety net.
IDLE_WAIT_MAX_MS: Final = 1_000


def _poll_ms(deadline: float) -> int:
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


class Client:
    """A blocking connection to a Herald server.

    Args:
        endpoint: the request endpoint of the proxy.
        timeout: seconds any one call waits for its reply before raising
            ``HeraldError("timeout")``; a dead server raises the same error.
        token: the credential's token, for a server that requires one.
        curve: keys for a server that runs CURVE encryption (:class:`CurveKeys`).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None, curve: CurveKeys | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = check_timeout(timeout)
        self.token = token
        self.curve = curve
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        try:
            setup_socket(self._socket, connect=endpoint, sndhwm=CLIENT_SNDHWM, rcvhwm=CLIENT_RCVHWM, immediate=True, curve=curve)
        except ValueError:
            self._context.term()
            raise
        self._ids = RequestIds()
        self._lock = threading.Lock()
        self._counters = ClientCounters()
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.endpoint} timeout={self.timeout:g}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close open subscriptions, the socket and the context. Safe to call twice."""
        if self._closed:
            return
        for subscription in list(self._subscriptions):
            subscription.close()
        with self._lock:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()

    def statistics(self) -> ClientStatistics:
        """A snapshot of this client's request counters."""
        return self._counters.snapshot(0)

    # ------------------------------------------------------------------ topics

    def create_topic(self, name: str, *, exist_ok: bool = False, **settings: Any) -> dict[str, Any]:
        """Create a topic.

        Args:
            name: the topic name (letters, digits and ``. _ - / : @``).
            exist_ok: return the existing topic instead of failing when it exists
                (its settings are left as they are).
            **settings: ``retention`` (s), ``dedup_window`` (s), ``max_payload`` (bytes).

        Returns:
            The topic record: ``id``, ``name``, ``settings``, ``created_at``.

        Raises:
            HeraldError: ``topic_exists``, ``invalid_name``, ``invalid_setting``, ``timeout``...
        """
        return self._request(create_topic_call(name, exist_ok, settings))

    def delete_topic(self, name: str) -> list[str]:
        """Delete a topic, its subscriptions and their backlogs.

        Returns:
            The names of the subscriptions deleted with it.

        Raises:
            HeraldError: ``topic_not_found``, ``timeout``...
        """
        return self._request(delete_topic_call(name))

    def list_topics(self, prefix: str = "", *, page_size: int | None = None) -> list[dict[str, Any]]:
        """List topics, optionally only those whose name starts with ``prefix``, sorted by name.

        ``page_size``: topics per request (default: as many as one reply holds, up to 10,000); the list
        is always complete.

        Returns:
            Topic records, as :meth:`create_topic` returns them.

        Raises:
            HeraldError: ``timeout``...
        """
        return self._list_all(lambda after: list_topics_call(prefix, after, page_size))

    def describe_topic(self, name: str) -> dict[str, Any]:
        """One topic's record with the names of its subscriptions (``subscriptions``).

        Raises:
            HeraldError: ``topic_not_found``, ``timeout``...
        """
        return self._request(describe_topic_call(name))

    # ------------------------------------------------------------------ publish

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None, *, message_id: str | None = None) -> PublishId:
        """Publish one message; returns once the server stored it durably.

        Args:
            topic: an existing topic.
            data: the payload.
            attributes: string key/value pairs subscriptions can filter on.
            message_id: an id for de-duplication; one is generated when omitted.
                Passing your own lets a retry of yours be de-duplicated too.

        Returns:
            The message id; ``.duplicate`` is True when the id was already stored.

        Raises:
            HeraldError: ``topic_not_found``, ``payload_too_large``, ``timeout``...
                A publish that raised ``timeout`` may still be stored: publish it
                again with the same ``message_id``.
        """
        return self._request(publish_call(topic, [publish_item(data, attributes, message_id)]))[0]

    def publish_batch(self, topic: str, items: Iterable[ItemLike]) -> list[PublishId]:
        """Publish many messages in as few requests as the limits allow.

        Args:
            topic: an existing topic.
            items: each ``bytes``, ``(bytes, attributes)`` or ``(bytes, attributes, message_id)``.

        Returns:
            One id per item, in order.

        Raises:
            HeraldError: as :meth:`publish`. When a large batch was split and a
                later request fails, ``error.details["published"]`` holds the ids
                of the messages already stored.
        """
        normalised = publish_items(items)
        ids: list[PublishId] = []
        for chunk in split_batch(normalised):
            try:
                stored: list[PublishId] = self._request(publish_call(topic, chunk))
                ids.extend(stored)
            except HeraldError as error:
                if ids:
                    error.details["published"] = list(map(str, ids))
                raise
        return ids

    # ------------------------------------------------------------------ server

    def info(self) -> dict[str, Any]:
        """Server version, protocol, durability, limits and endpoints.

        Raises:
            HeraldError: ``timeout``...
        """
        return self._request(info_call())

    def ping(self) -> float:
        """Round-trip time of one PING, in seconds.

        Raises:
            HeraldError: ``timeout`` when the server does not answer.
        """
        started = time.perf_counter()
        self._request(ping_call())
        return time.perf_counter() - started

    def status(self) -> dict[str, Any]:
        """Statistics of the frontend that answered.

        Raises:
            HeraldError: ``timeout``...
        """
        return self._request(status_call())

    def backlogs(self) -> dict[str, int]:
        """Messages stored and not yet settled (acknowledged, expired or dead-lettered), per subscription, over
        every frontend. A subscription with none is left out.

        Raises:
            HeraldError: ``unavailable`` when some frontend did not answer STATUS; ``timeout``...
        """
        tally = BacklogTally(int(self.info()["frontends"]))
        for _ in range(tally.requests):
            tally.add(self.status())
            if tally.complete:
                return tally.totals()
        raise tally.incomplete()

    # ------------------------------------------------------------------ subscriptions

    def create_subscription(self, topic: str, name: str, *, exist_ok: bool = False, **settings: Any) -> dict[str, Any]:
        """Create a durable subscription to ``topic``.

        Args:
            topic: an existing topic.
            name: the subscription name, unique across topics.
            exist_ok: return the existing subscription instead of failing; settings
                given here then replace its settings.
            **settings: ``ack_deadline``, ``max_attempts``, ``backoff_min``, ``backoff_max``
                (or ``backoff=(min, max)``), ``max_unacked``, ``dead_letter_topic``, ``filter`` (dict).

        Returns:
            The subscription record, including ``endpoints`` (``deliver``, ``ack``).

        Raises:
            HeraldError: ``topic_not_found``, ``subscription_exists``, ``invalid_setting``...
        """
        return self._request(create_subscription_call(topic, name, exist_ok, settings))

    def delete_subscription(self, name: str) -> None:
        """Delete a subscription and its backlog.

        Raises:
            HeraldError: ``subscription_not_found``, ``timeout``...
        """
        self._request(delete_subscription_call(name))

    def list_subscriptions(self, topic: str | None = None, *, page_size: int | None = None) -> list[dict[str, Any]]:
        """List subscriptions, optionally only those of ``topic``, sorted by name.

        ``page_size``: subscriptions per request (default: as many as one reply holds, up to 10,000);
        the list is always complete.

        Raises:
            HeraldError: ``timeout``...
        """
        return self._list_all(lambda after: list_subscriptions_call(topic, after, page_size))

    def describe_subscription(self, name: str) -> dict[str, Any]:
        """One subscription's record, including its endpoints.

        Raises:
            HeraldError: ``subscription_not_found``, ``timeout``...
        """
        return self._request(describe_subscription_call(name))

    def subscribe(self, topic: str, name: str, **settings: Any) -> Subscription:
        """Consume a subscription, creating it when absent.

        Args:
            topic: the topic; it must exist.
            name: the subscription; consumers of one name share its messages.
            **settings: as :meth:`create_subscription`; when given they replace all the
                settings of an existing subscription (those left out return to their
                defaults: its dead-letter topic and filter too).

        Returns:
            An attached :class:`Subscription`; iterate it and ``ack()`` each message.

        Raises:
            HeraldError: ``topic_not_found``, ``subscription_exists`` (the name is
                used on another topic), ``timeout`` when the sender does not answer.
        """
        info = self.create_subscription(topic, name, exist_ok=True, **settings)
        return Subscription(self, info)

    # ------------------------------------------------------------------ plumbing

    def _list_all(self, page_call: Callable[[str | None], Call[ListPage]]) -> list[dict[str, Any]]:
        """Every record of a list read in pages (a long one does not fit one reply): ``page_call(after)`` asks for one."""
        records: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self._request(page_call(after))
            records += page.records
            if (after := page.next_after) is None:
                return records

    def _request(self, call: Call[T], *, timeout: float | None = None) -> T:
        """Send ``call`` and wait for its reply, resending on the attempt schedule, for at most
        ``timeout`` seconds (default: the client's)."""
        timeout = self.timeout if timeout is None else timeout
        # From the call, not from getting the lock: a thread queued behind others sharing this
        # client must still give up after ``timeout`` (it had waited their time as well).
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
            self._counters.timeouts += 1
            raise timeout_error(call.command.name, self.endpoint, timeout)
        try:
            return self._request_locked(call, deadline, timeout)
        finally:
            self._lock.release()

    def _request_locked(self, call: Call[T], deadline: float, timeout: float) -> T:
        """:meth:`_request`, holding the client's lock."""
        if self._closed:
            raise closed_error(repr(self))
        # Replies to every attempt count: a late answer to the first is as good as any.
        waiting: set[bytes] = set()
        attempt = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if attempt:
                self._counters.retries += 1
            request_id = self._ids.next()
            waiting.add(request_id)
            self._counters.requests += 1
            until = attempt_deadline(now, deadline, attempt, call.repeatable)
            attempt += 1
            if not self._send(call.frames(request_id, self.token), until):
                continue
            frames = self._wait_reply(waiting, until)
            if frames is None:
                if not call.repeatable:
                    break
                log.info("no reply to %s yet; sending it again", call.command.name)
                continue
            try:
                return call.parse(reply_header(frames))
            except HeraldError as error:
                self._counters.errors += 1
                pause = retry_pause(error, call, attempt - 1, time.monotonic(), deadline)
                if pause is None:
                    raise
                log.info("retrying %s after %s", call.command.name, error)
                time.sleep(pause)
        self._counters.timeouts += 1
        raise timeout_error(call.command.name, self.endpoint, timeout)

    def _send(self, frames: list[bytes], until: float) -> bool:
        """Send without blocking past ``until``; False when the deadline passed."""
        while True:
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                # No connected server (IMMEDIATE) or a full queue: wait for room.
                wait_ms = _poll_ms(until)
                if wait_ms <= 0:
                    return False
                self._socket.poll(wait_ms, zmq.POLLOUT)

    def _wait_reply(self, waiting: set[bytes], until: float) -> Frames | None:
        """The first reply to one of ``waiting``, or None at ``until``; stray replies are dropped."""
        while True:
            wait_ms = _poll_ms(until)
            if wait_ms <= 0:
                return None
            if not self._socket.poll(wait_ms, zmq.POLLIN):
                continue
            while True:
                try:
                    raw = self._socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    frames = parse_reply(raw)
                except ProtocolError:
                    self._counters.malformed_replies += 1
                    if request_id_of(split_envelope(raw)[1]) in waiting:
                        raise
                    continue
                if frames.request_id in waiting:
                    self._counters.replies += 1
                    return frames
                self._counters.stray_replies += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("<- %s dropped a stray reply to request %s", self.endpoint, frames.request_id.hex())


class _SocketLock:
    """The lock of a subscription's sockets and consumer state, counting the threads waiting for it.

    Reentrant (close() from the receiving thread, acks inside receive()). Taking it
    when free costs one non-blocking acquire: it is taken for every message. A thread
    that finds it taken wakes the holder through :attr:`wake_fd` (see IDLE_WAIT_MAX_MS).
    """

    __slots__ = ("_closed", "_guard", "_lock", "_wake_reader", "_wake_writer", "waiting")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._guard = threading.Lock()
        self.waiting = 0  # threads blocked in __enter__: receive() steps aside for them between polls
        # A socket pair rather than a pipe: zmq_poll takes any file descriptor on POSIX, only sockets on Windows.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._closed = False

    @property
    def wake_fd(self) -> int:
        """Readable while a thread waits for the lock (or once after one did): poll it beside the SUB socket."""
        return self._wake_reader.fileno()

    def __enter__(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        with self._guard:
            self.waiting += 1
            if not self._closed:  # under the guard: close() cannot free the descriptor mid-send
                with contextlib.suppress(OSError):  # full: the holder is woken already
                    self._wake_writer.send(b"\0")
        try:
            self._lock.acquire()
        finally:
            with self._guard:
                self.waiting -= 1

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()

    def clear_wake_ups(self) -> None:
        """Read what waiting threads wrote (the holder, after waking on :attr:`wake_fd`)."""
        with contextlib.suppress(OSError):
            while self._wake_reader.recv(4096):
                pass

    def close(self) -> None:
        with self._guard:
            self._closed = True
            self._wake_reader.close()
            self._wake_writer.close()


class Subscription(SubscriptionView):
    """A consumer of one subscription: iterate it, ``ack()`` each message.

    Delivery is at least once: a message not acknowledged within the
    subscription's ``ack_deadline`` comes again with a higher ``attempt``. A
    redelivery of a message this consumer already acknowledged successfully
    (one of at least the last ``ACKED_WINDOW`` deliveries, known by ``ref``) is
    dropped and acknowledged again. A buffered copy received more than
    ``ack_deadline`` ago is dropped unprocessed: the sender has taken it back
    and sends it again.

    A background thread with its own socket sends heartbeats, so the sender
    keeps this consumer even while the application is busy with a message.
    Other threads may acknowledge the messages (``ack``, ``ack_nowait``,
    ``nack``; a worker pool, say) and close the subscription while one thread
    receives: the sockets are shared under a lock, and a receive() waiting
    when another thread closes the subscription returns None. Receive from one
    thread at a time.

    When no WELCOME (the sender's answer to every heartbeat) has come for
    ``REDISCOVER_AFTER_S`` (``CONSUMER_EXPIRY_S``), :meth:`receive` re-reads the
    subscription with SUB_DESCRIBE, at most once per that interval; if its
    sender moved to other endpoints (the whole system restarted and the old
    ports were taken, or the sender count changed), it reconnects there and
    attaches again, keeping its buffer and acknowledged window. The re-read
    happens while :meth:`receive` waits with nothing to return; it waits for
    its reply as long as :meth:`receive` has left, but at least 1 s and at most
    ``REDISCOVER_WAIT_S`` (2 s), so :meth:`receive` may overrun its timeout by
    up to a second. A broker that does not answer is asked again
    ``REDISCOVER_AFTER_S`` after the attempt ended.
    """

    def __init__(self, client: Client, info: dict[str, Any], *, consumer_id: str | None = None) -> None:
        """Attach to a subscription described by ``info`` (a SUB_CREATE/SUB_DESCRIBE record).

        Raises:
            HeraldError: ``timeout`` when the sender does not welcome this consumer
                in time; the error the sender reports otherwise.
        """
        self._client = client
        self._timeout = client.timeout
        self._core: ConsumerCore[Message] = ConsumerCore(info, consumer_id or secrets.token_hex(8), Message, token=client.token)
        self._ids = RequestIds()
        self._awaiting: dict[bytes, list[str] | HeraldError | None] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._closed = False
        # Attaching again after a move to another sender: receive() sends ATTACH
        # ready=false every ATTACH_RETRY_S until a WELCOME, then ready=true.
        self._reattaching = False
        self._maintain_at = math.inf  # when receive() next runs _maintain (time.monotonic())
        context = client._context
        self._sub: zmq.Socket[bytes] = context.socket(zmq.SUB)
        try:
            self._push: zmq.Socket[bytes] = context.socket(zmq.PUSH)
        except BaseException:
            self._sub.close(0)
            raise
        self._io = _SocketLock()  # the SUB and PUSH sockets and the consumer state (see IDLE_WAIT_MAX_MS)
        self._poller = zmq.Poller()  # receive()'s wait: self._sub (re-registered when _move swaps it) and the lock's wake-up socket
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._io.wake_fd, zmq.POLLIN)
        try:
            self._core.connect(self._sub, self._push, client.curve)
            self._attach()
        except BaseException:
            self._sub.close(0)
            self._push.close(0)
            self._io.close()
            raise
        self._maintain_at = self._core.rediscover_at()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"herald-heartbeat-{self.name}", daemon=True)
        self._heartbeat.start()
        client._subscriptions.add(self)

    # ------------------------------------------------------------------ public

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[Message]:
        """Yield messages as they arrive, blocking, until the subscription is closed (by any thread).

        Raises:
            HeraldError: ``subscription_not_found`` when the subscription is deleted.
        """
        while not self._closed:
            message = self.receive()
            if message is not None:
                yield message

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting at most ``timeout`` seconds (None: forever).

        Returns:
            A message; None when the timeout passed first, or when another
            thread closed the subscription meanwhile.

        Raises:
            HeraldError: ``subscription_not_found`` when the subscription was
                deleted; ``closed`` when this subscription was closed before the call.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            with self._io:
                if self._closed:
                    return None
                done, message = self._receive_step(deadline)
            if done:
                return message
            if self._io.waiting:
                time.sleep(0.0001)  # hand the sockets to the thread waiting for them: an ack, a close

    def _receive_step(self, deadline: float | None) -> tuple[bool, Message | None]:
        """One wait of :meth:`receive`, holding ``_io``: (True, the result) or (False, None) to go on."""
        acks_due = self._core.acks_due
        if acks_due is not None and time.monotonic() >= acks_due:
            self._flush_acks()
            acks_due = None
        if (message := self._core.next_message()) is not None:
            return True, message
        if self._core.failure is not None:
            raise self._core.failure
        wake_at = min(self._maintain_at, math.inf if deadline is None else deadline, math.inf if acks_due is None else acks_due)
        wait_ms = min(IDLE_WAIT_MAX_MS, _poll_ms(wake_at)) if wake_at < math.inf else IDLE_WAIT_MAX_MS
        if self._io.waiting:
            # Counted before its byte is written: a waiter whose byte was read by an earlier wake-up,
            # but which has not taken the lock yet, would otherwise wait out this poll.
            return False, None
        ready = dict(self._poller.poll(wait_ms))
        if self._io.wake_fd in ready:
            self._io.clear_wake_ups()  # another thread wants the sockets: receive() lets it in before its next step
        if self._sub in ready:
            self._drain()
            return False, None
        if ready:
            return False, None
        # Nothing arrived: the one place that checks on the sender, so the
        # path with messages flowing pays nothing for it.
        now = time.monotonic()
        if now >= self._maintain_at:
            self._maintain(now, deadline)
            return False, None
        if deadline is not None and now >= deadline:
            self._flush_acks()  # nothing here sends them before the next receive()
            return True, None
        return False, None

    def receive_batch(self, max_messages: int = 100, timeout: float | None = None) -> list[Message]:
        """Up to ``max_messages`` messages: waits at most ``timeout`` seconds (None: forever) for the
        first, then takes the ones already received behind it, without waiting for more.

        The throughput reader's call (like a JetStream ``fetch`` or Redis ``XREADGROUP COUNT``).

        Returns:
            The messages, in delivery order; empty when the timeout passed first.

        Raises:
            ValueError: ``max_messages`` is below 1.
            HeraldError: as :meth:`receive`.
        """
        self._core.check_batch_size(max_messages)
        first = self.receive(timeout)
        if first is None:
            return []
        with self._io:
            if len(self._core.buffer) < max_messages - 1 and not self._closed:
                self._drain()  # what the socket already holds, without waiting
            return self._core.batch_behind(first, max_messages)

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this consumer's counters."""
        return self._core.statistics()

    def close(self) -> None:
        """Stop heartbeats, tell the sender this consumer left, close the sockets.

        Messages that were not acknowledged are redelivered to other consumers
        (or to the next one to attach); those still buffered here, never
        returned by :meth:`receive`, keep their attempt number. Safe to call twice.
        """
        self._closed = True  # a receive() in another thread returns None at its next step
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        # Every caller waits for the sockets to be closed, a second one too: Client.close()
        # terminates the context next, which would hang on a socket still open.
        with self._io:
            if self._sub.closed:
                return
            linger_ms = 0
            try:
                # What already arrived is named in DETACH as never seen, so it keeps its attempt.
                while self._sub.poll(0, zmq.POLLIN):
                    self._drain()
                self._core.settle_buffered_copies()
                self._flush_acks()
                self._push.send_multipart(self._core.detach_frames(), zmq.NOBLOCK)
                linger_ms = DETACH_LINGER_MS
            except zmq.ZMQError as error:  # full (Again), or the context is going away: close all the same
                log.debug("closing subscription %s without DETACH: %s", self.name, error)
            finally:
                self._push.close(linger=linger_ms)
                self._sub.close(linger=0)
                self._client._subscriptions.discard(self)
                self._io.close()

    # ------------------------------------------------------------------ acknowledgements

    def _ack(self, message: Message) -> bool:
        with self._io:
            return self._ack_holding_io(message)

    def _ack_holding_io(self, message: Message) -> bool:
        self._check_open()
        if message.ref in self._core.acked:
            return True  # acknowledged already (ack, ack_nowait): a second ACK would only be answered unknown
        request_id = self._ids.next()
        self._awaiting[request_id] = None
        self._core.expect_ack(request_id, message)
        frames = self._core.ack_frames([(message.ref, message.attempt)], request_id)
        now = time.monotonic()
        deadline = now + self._timeout
        resends = 0
        resend_at = attempt_deadline(now, deadline, resends, repeatable=True)
        try:
            if not self._send(frames, deadline):
                raise timeout_error("ACK", self._core.ack_endpoint, self._timeout)
            while (reply := self._awaiting[request_id]) is None:
                if self._core.failure is not None:
                    raise self._core.failure
                wait_ms = _poll_ms(deadline)
                if wait_ms <= 0:
                    raise timeout_error("ACK", self._core.deliver_endpoint, self._timeout)
                if time.monotonic() >= resend_at:
                    # Sent again: a sender killed with the first one unanswered is back within a second or
                    # two, and answers an ACK it never saw with "unknown" rather than leave it to the timeout.
                    resends += 1
                    resend_at = attempt_deadline(time.monotonic(), deadline, resends, repeatable=True)
                    self._send(frames, deadline)
                    continue
                if self._sub.poll(min(wait_ms, _poll_ms(resend_at)), zmq.POLLIN):
                    self._drain()
        finally:
            self._awaiting.pop(request_id, None)
            self._core.forget_ack(request_id)
        if isinstance(reply, HeraldError):
            raise reply
        if len(reply) != 1:
            raise ProtocolError("malformed", f"ACK_REPLY for one ack carries {len(reply)} results")
        return ack_result(reply[0], message)

    def _ack_nowait(self, message: MessageFields) -> None:
        with self._io:
            self._check_open()
            if self._core.queue_ack(message):
                self._flush_acks()

    def _flush_acks(self) -> None:
        frames = self._core.take_pending_acks()
        if frames is not None and not self._send(frames, time.monotonic() + self._timeout):
            log.warning("could not send %d queued acks; those messages will be redelivered and acknowledged again", len(frames))

    def _nack(self, message: Message) -> None:
        with self._io:
            self._check_open()
            if not self._send(self._core.nack_frames([(message.ref, message.attempt)]), time.monotonic() + self._timeout):
                raise timeout_error("NACK", self._core.ack_endpoint, self._timeout)
            self._core.nacked += 1

    # ------------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error(repr(self))

    def _send(self, frames: list[bytes], until: float) -> bool:
        while True:
            try:
                self._push.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                wait_ms = _poll_ms(until)
                if wait_ms <= 0:
                    return False
                self._push.poll(wait_ms, zmq.POLLOUT)

    def _drain(self) -> None:
        """Handle what the SUB socket holds: buffer deliveries, file replies."""
        for _ in range(DRAIN_BURST):
            try:
                raw = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            events = self._core.handle(raw, self)
            for request_id, results in events.replies.items():
                if request_id in self._awaiting:
                    self._awaiting[request_id] = results
            for request_id, error in events.errors.items():
                if request_id in self._awaiting:
                    self._awaiting[request_id] = error
            if events.reacks:
                # Best effort: if this ack is lost the sender redelivers and we ack again.
                with contextlib.suppress(zmq.Again):
                    self._push.send_multipart(self._core.ack_frames(events.reacks), zmq.NOBLOCK)
            if events.session_changed and not self._reattaching:
                # A new session (sender restart, expiry): deliveries start with an ATTACH naming it. The heartbeat thread would, within a second.
                with contextlib.suppress(zmq.Again):
                    self._push.send_multipart(self._core.attach_frames(ready=True), zmq.NOBLOCK)

    def _attach(self) -> None:
        """Send ATTACH until the sender's WELCOME shows our SUB filter reached it (slow joiner)."""
        request_id = self._ids.next()
        self._awaiting[request_id] = None
        deadline = time.monotonic() + self._timeout
        try:
            while not self._core.welcomed:
                reply = self._awaiting[request_id]
                if isinstance(reply, HeraldError):
                    if reply.code != "wrong_sender" or not self._follow_to_serving_sender(deadline):
                        raise self._core.failure or reply
                    self._awaiting[request_id] = None
                    continue
                if self._core.failure is not None:
                    raise self._core.failure
                if time.monotonic() >= deadline:
                    raise timeout_error(f"ATTACH to subscription {self.name!r}", self._core.deliver_endpoint, self._timeout)
                with contextlib.suppress(zmq.Again):  # sender not reachable yet: the next round tries again
                    self._push.send_multipart(self._core.attach_frames(ready=False, request_id=request_id), zmq.NOBLOCK)
                retry_at = min(deadline, time.monotonic() + ATTACH_RETRY_S)
                while not self._core.welcomed and self._awaiting[request_id] is None and (wait_ms := _poll_ms(retry_at)) > 0:
                    if self._sub.poll(wait_ms, zmq.POLLIN):
                        self._drain()
        finally:
            self._awaiting.pop(request_id, None)
        if not self._send(self._core.attach_frames(ready=True), deadline):
            raise timeout_error(f"ATTACH to subscription {self.name!r}", self._core.ack_endpoint, self._timeout)
        self._reattaching = False  # a move made while attaching is complete as well

    def _follow_to_serving_sender(self, deadline: float) -> bool:
        """After ``wrong_sender`` answered the first ATTACH: re-read SUB_DESCRIBE and move to the sender it names.

        The record attached with was stale: the system restarted with another
        number of senders since it was read. False (nothing changed) when the
        re-read fails or names the same endpoints, as a sender and metadata that
        disagree about the number of senders would.
        """
        try:
            info = self._client._request(describe_subscription_call(self.name), timeout=max(deadline - time.monotonic(), 0.001))
        except HeraldError as error:
            self._core.rediscovered(None, error)
            return False
        return self._core.rediscovered(info, None) and self._move(info)

    def _maintain(self, now: float, deadline: float | None) -> None:
        """Attach again after a move, and re-read SUB_DESCRIBE when no WELCOME came for
        REDISCOVER_AFTER_S (protocol.md §9, step 5). On the receive() thread, which owns
        the SUB and PUSH sockets; sets the next :attr:`_maintain_at`, always after ``now``."""
        core = self._core
        if self._reattaching:
            self._send_attach()
        if now >= core.rediscover_at():
            self._rediscover(deadline)
        self._maintain_at = time.monotonic() + ATTACH_RETRY_S if self._reattaching else core.rediscover_at()

    def _send_attach(self) -> None:
        """One step of attaching again: ATTACH ready=false until a WELCOME came, then ready=true once."""
        ready = self._core.welcomed
        with contextlib.suppress(zmq.Again):  # sender not reachable yet: the next round tries again
            self._push.send_multipart(self._core.attach_frames(ready=ready), zmq.NOBLOCK)
        if ready:
            self._reattaching = False  # the heartbeat thread sends ready=true from here on

    def _rediscover(self, deadline: float | None) -> None:
        """Re-read the subscription; move to its new endpoints if its sender moved.

        A broker that does not answer is asked again REDISCOVER_AFTER_S later;
        ``subscription_not_found`` fails the subscription, as when the sender reports it.
        """
        core = self._core
        now = time.monotonic()
        # Hold receive() past its own deadline, and the client's lock from other
        # threads' calls, by as little as works: at least one resend-free round
        # trip, at most REDISCOVER_WAIT_S (a broker that is up answers in
        # milliseconds; one that is down is asked again later).
        remaining = math.inf if deadline is None else deadline - now
        timeout = min(self._client.timeout, REDISCOVER_WAIT_S, max(CONSUMER_HEARTBEAT_S, remaining))
        core.rediscovering()
        try:
            info = self._client._request(describe_subscription_call(self.name), timeout=timeout)
        except HeraldError as error:
            core.rediscovered(None, error)
            return
        if core.rediscovered(info, None):  # else the sender may be restarting on its old ports: ZeroMQ reconnects by itself
            self._move(info)

    def _move(self, info: dict[str, Any]) -> bool:
        """Reconnect to the endpoints of ``info`` with fresh sockets and attach again; False if they are unusable."""
        while self._sub.poll(0, zmq.POLLIN):  # keep what already arrived
            self._drain()
        sockets = self._core.move(info, self._client._context, self._client.curve)
        if sockets is None:
            return False
        old_sub, old_push = self._sub, self._push
        self._poller.unregister(old_sub)
        self._sub, self._push = sockets
        self._poller.register(self._sub, zmq.POLLIN)
        old_sub.close(linger=0)
        old_push.close(linger=0)  # queued ATTACHes and acks for the old sender are worthless
        self._reattaching = True
        self._send_attach()
        return True

    def _heartbeat_socket(self, endpoint: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._client._context.socket(zmq.PUSH)
        setup_socket(sock, connect=endpoint, sndhwm=CONSUMER_HEARTBEAT_QUEUE, rcvhwm=CONSUMER_HEARTBEAT_QUEUE, curve=self._client.curve)
        return sock

    def _heartbeat_loop(self) -> None:
        # zmq sockets are not thread-safe: this thread sends on a PUSH of its own.
        core = self._core
        sock: zmq.Socket[bytes] | None = None
        try:
            endpoint = core.ack_endpoint
            sock = self._heartbeat_socket(endpoint)
            while not self._stop.wait(CONSUMER_HEARTBEAT_S):
                if core.ack_endpoint != endpoint:
                    # receive() moved this consumer to another sender: this thread reconnects its own socket.
                    sock.close(linger=0)
                    sock = None
                    endpoint = core.ack_endpoint
                    sock = self._heartbeat_socket(endpoint)
                if not core.welcomed:
                    continue  # receive() is attaching again: ready=true only after the WELCOME
                with contextlib.suppress(zmq.Again):  # sender unreachable: heartbeats are idempotent, the next one counts
                    sock.send_multipart(core.attach_frames(ready=True), zmq.NOBLOCK)  # built each time: it names the latest session
        except Exception:
            log.exception("heartbeat thread of %s failed; the sender will expire this consumer", self.name)
        finally:
            if sock is not None:
                sock.close(linger=0)
