"""The asyncio Herald client.

:class:`AsyncClient` keeps many requests in flight on one DEALER socket: each
request registers a future under its request id, and one loop reader on the
socket drains every queued reply with ``NOBLOCK`` (one wake-up per burst, not
per message) and resolves the futures. The sockets are plain ZeroMQ sockets
driven by the event loop (:class:`_LoopSocket`), not ``zmq.asyncio`` ones, whose
per-call futures cost more Python than the rest of a request. Use :func:`run`
to run a coroutine on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar, cast

import zmq

from clients._core import (
    ACK_FLUSH_DELAY_S,
    CLIENT_RCVHWM,
    CLIENT_SNDHWM,
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT_S,
    PUBLISH_BATCH_BYTES,
    PUBLISH_HEADER_BYTES,
    PUBLISH_HOLD_MAX_S,
    PUBLISHES_IN_FLIGHT,
    AsyncMessage,
    BacklogTally,
    Call,
    ClientCounters,
    ClientStatistics,
    ConsumerCore,
    CurveKeys,
    ItemLike,
    ListPage,
    MessageFields,
    PublishId,
    PublishItem,
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
    make_ids,
    parse_reply,
    ping_call,
    publish_call,
    publish_header_bytes,
    publish_item,
    publish_items,
    reply_header,
    resend_pause,
    retry_pause,
    setup_socket,
    split_batch,
    status_call,
    timeout_error,
)
from clients.protocol import (
    ATTACH_RETRY_S,
    CONSUMER_HEARTBEAT_S,
    MAX_BATCH_MESSAGES,
    NOBLOCK,
    Frames,
    HeraldError,
    ProtocolError,
    check_name,
    recv_frames,
    request_id_of,
    send_frames,
    split_envelope,
)

log = logging.getLogger("herald.client")

T = TypeVar("T")

# A socket is re-checked at least this often even without a wake-up (bounds the
# cost of a missed edge-triggered notification, pyzmq issue 2173).
RECHECK_S: Final = 0.05
DRAIN_BURST: Final = 1_000  # messages handled per callback before yielding to other tasks
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_EVENTS: Final = int(zmq.EVENTS)
# DETACH is flushed on close for at most this long (see clients.client).
DETACH_LINGER_MS: Final = 500


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop when it is installed, else on asyncio.

    Args:
        main: the coroutine to run, e.g. ``amain()``.

    Returns:
        What ``main`` returned.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _LoopSocket:
    """A plain ZeroMQ socket driven by the event loop: calls never block.

    ``zmq.asyncio`` wraps every send and receive in futures and flag enums,
    which cost about 360 us of client CPU per PING round trip here, several
    times what the server spends on it. Here a send is one direct ``NOBLOCK``
    call, and one loop reader on the socket's FD drains every ready message
    into ``on_message``.

    ZeroMQ's FD is edge-triggered, and any call on the socket may consume the
    edge (pyzmq issue 2173), so every send schedules a check of ``EVENTS``
    (one per loop iteration however many sends), and a timer re-checks every
    ``RECHECK_S`` as a backstop.

    Args:
        sock: a socket of a plain ``zmq.Context``.
        on_message: called with each received multipart message; None for a
            socket that only sends.
        on_failure: called when ``on_message`` raises.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: Callable[[list[bytes]], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._on_failure = on_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._writable: list[asyncio.Future[None]] = []
        self._check_scheduled = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the socket on ``loop``; a no-op when already watched there.

        A socket moves to a new loop only once its first loop is closed (one
        ``asyncio.run`` after another); two live loops cannot share it.
        """
        if self._loop is loop:
            return
        if self._loop is not None:
            if not self._loop.is_closed():
                raise RuntimeError("this Herald client is in use by another running event loop")
            if self._timer is not None:
                self._timer.cancel()
            self._writable.clear()
            self._check_scheduled = False
        self._loop = loop
        loop.add_reader(self._fd, self._check)
        self._timer = loop.call_later(RECHECK_S, self._recheck)
        self._schedule_check()

    def send(self, frames: list[bytes]) -> bool:
        """Send now if the socket takes it; False when it would block (nothing sent)."""
        try:
            send_frames(self.sock, frames, NOBLOCK)
            return True
        except zmq.Again:
            return False
        finally:
            self._schedule_check()

    async def send_wait(self, frames: list[bytes]) -> None:
        """Send, waiting for room (or a connection) as long as it takes; cancel to give up."""
        loop = asyncio.get_running_loop()
        self.start(loop)
        while not self.send(frames):
            waiter: asyncio.Future[None] = loop.create_future()
            self._writable.append(waiter)
            await waiter

    def replace(self, sock: zmq.Socket[Any]) -> None:
        """Close the socket and go on with ``sock``, a fresh one connected elsewhere.

        Senders waiting in :meth:`send_wait` keep waiting, for room on ``sock``.
        """
        loop = self._loop if self._loop is not None and not self._loop.is_closed() else None
        if loop is not None:
            loop.remove_reader(self._fd)
        self.sock.close(linger=0)
        self.sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        if loop is not None:
            loop.add_reader(self._fd, self._check)
            self._schedule_check()

    def close(self, linger: int = 0) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
        for waiter in self._writable:
            waiter.cancel()
        self._writable.clear()
        self.sock.close(linger=linger)

    def read_now(self) -> None:
        """Handle everything the socket already holds, without waiting for the loop to call back."""
        sock = self.sock
        while self._on_message is not None and not sock.closed:
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)

    def _schedule_check(self) -> None:
        if not self._check_scheduled and self._loop is not None:
            self._check_scheduled = True
            self._loop.call_soon(self._check)

    def _recheck(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(RECHECK_S, self._recheck)
        self._check()

    def _check(self) -> None:
        self._check_scheduled = False
        sock = self.sock
        if sock.closed:
            return
        for _ in range(DRAIN_BURST):
            events = cast(int, sock.getsockopt(_EVENTS))
            if events & _POLLOUT and self._writable:
                for waiter in self._writable:
                    if not waiter.done():
                        waiter.set_result(None)
                self._writable.clear()
            if not events & _POLLIN or self._on_message is None:
                return
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_message(frames)
            except Exception as exc:
                log.error("handling a message failed: %r", exc, exc_info=exc)
                if self._on_failure is not None:
                    self._on_failure(exc)
        self._schedule_check()  # more is waiting: come back after other callbacks ran


async def _wait_until(future: asyncio.Future[Any], until: float) -> None:
    """Return when ``future`` is done or the loop clock passes ``until``; never cancels ``future``.

    Lighter than ``asyncio.timeout_at`` around ``asyncio.shield``: one timer and
    one callback, no task cancellation.
    """
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_at(until, wake)
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


def _fail_future(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail ``future`` if it is still pending, and mark its exception as seen: a caller that gave up on it
    (cancelled, or closing) must not have asyncio log "Future exception was never retrieved" at collection."""
    if not future.done():
        future.set_exception(error)
        future.exception()


def _watch(task: asyncio.Task[None], on_failure: Callable[[BaseException], None]) -> None:
    """Make a long-lived task's death loud: log it and fail the work that waits on it."""

    def done(finished: asyncio.Task[None]) -> None:
        if finished.cancelled():
            return
        error = finished.exception()
        if error is not None:
            log.error("task %s failed: %r", finished.get_name(), error, exc_info=error)
            on_failure(error)

    task.add_done_callback(done)


class AsyncClient:
    """An asyncio connection to a Herald server; every method is a coroutine.

    Args:
        endpoint: the request endpoint of the proxy.
        timeout: seconds any one call waits for its reply before raising
            ``HeraldError("timeout")``.
        token: the credential's token, for a server that requires one.
        curve: keys for a server that runs CURVE encryption (:class:`CurveKeys`).

    Any number of calls may run concurrently (``asyncio.gather``); they share one
    socket and are matched to their replies by request id. Use ``async with``,
    or ``await close()``. A client belongs to the event loop that first uses it.
    """

    def __init__(
        self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None, curve: CurveKeys | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = check_timeout(timeout)
        self.token = token
        self.curve = curve
        self._context: zmq.Context[Any] = zmq.Context()
        socket: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        try:
            setup_socket(socket, connect=endpoint, sndhwm=CLIENT_SNDHWM, rcvhwm=CLIENT_RCVHWM, immediate=True, curve=curve)
        except ValueError:
            socket.close(0)
            self._context.term()
            raise
        self._io = _LoopSocket(socket, self._on_reply, lambda error: self._fail_pending(HeraldError("internal", f"the reply reader failed: {error!r}")))
        self._ids = RequestIds()
        self._pending: dict[bytes, asyncio.Future[Frames]] = {}
        self._counters = ClientCounters()
        self._subscriptions: set[AsyncSubscription] = set()
        self._batches: dict[str, _Coalesced] = {}
        self._publishing: Counter[str] = Counter()  # coalesced PUBLISH requests in flight, per topic
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.endpoint} timeout={self.timeout:g}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def close(self) -> None:
        """Close subscriptions, fail calls still waiting, close the socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        error = closed_error(repr(self))
        for batch in self._batches.values():
            batch.fail(error)
        self._batches.clear()
        for task in list(self._batch_tasks):
            task.cancel()
        self._fail_pending(error)
        self._io.close(linger=0)
        self._context.term()

    def statistics(self) -> ClientStatistics:
        """A snapshot of this client's request counters."""
        return self._counters.snapshot(len(self._pending))

    # ------------------------------------------------------------------ topics

    async def create_topic(self, name: str, *, exist_ok: bool = False, **settings: Any) -> dict[str, Any]:
        """Create a topic; see :meth:`clients.Client.create_topic`.

        Returns:
            The topic record.

        Raises:
            HeraldError: ``topic_exists``, ``invalid_name``, ``invalid_setting``, ``timeout``...
        """
        return await self._request(create_topic_call(name, exist_ok, settings))

    async def delete_topic(self, name: str) -> list[str]:
        """Delete a topic, its subscriptions and their backlogs.

        Returns:
            The names of the subscriptions deleted with it.

        Raises:
            HeraldError: ``topic_not_found``, ``timeout``...
        """
        return await self._request(delete_topic_call(name))

    async def list_topics(self, prefix: str = "", *, page_size: int | None = None) -> list[dict[str, Any]]:
        """List topics, optionally only those whose name starts with ``prefix``, sorted by name.

        ``page_size``: topics per request (default: as many as one reply holds, up to 10,000); the list
        is always complete.

        Returns:
            Topic records.

        Raises:
            HeraldError: ``timeout``...
        """
        return await self._list_all(lambda after: list_topics_call(prefix, after, page_size))

    async def describe_topic(self, name: str) -> dict[str, Any]:
        """One topic's record with the names of its subscriptions.

        Raises:
            HeraldError: ``topic_not_found``, ``timeout``...
        """
        return await self._request(describe_topic_call(name))

    # ------------------------------------------------------------------ publish

    async def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None, *, message_id: str | None = None) -> PublishId:
        """Publish one message; returns once the server stored it durably.

        Concurrent calls for one topic made in the same event-loop iteration
        (e.g. ``asyncio.gather`` of many publishes) travel in one PUBLISH request
        and share one fsync; each caller still gets its own id and error. While
        PUBLISHES_IN_FLIGHT (4) such requests of the topic are in flight, later
        calls wait and gather into the next request, which goes when one of them
        returns, when it is full, or after PUBLISH_HOLD_MAX_S (50 ms). The
        timeout counts from the first call of the request.

        Args:
            topic: an existing topic.
            data: the payload.
            attributes: string key/value pairs subscriptions can filter on.
            message_id: an id for de-duplication; one is generated when omitted.

        Returns:
            The message id; ``.duplicate`` is True when the id was already stored.

        Raises:
            HeraldError: ``topic_not_found``, ``payload_too_large``, ``timeout``...
                A publish that raised ``timeout``, or was cancelled, after its request
                left may still be stored: publish it again with the same ``message_id``.
        """
        item = publish_item(data, attributes, message_id)
        check_name(topic, "topic")
        if self._closed:
            raise closed_error(repr(self))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PublishId] = loop.create_future()
        header = publish_header_bytes(item)
        batch = self._batches.get(topic)
        if batch is not None and not batch.fits(item, header):
            self._flush_batch(topic, batch, now=True)
            batch = None
        if batch is None:
            batch = self._batches[topic] = _Coalesced(loop.time())
            loop.call_soon(self._flush_batch, topic, batch)
        batch.add(item, future, header)
        return await future

    async def publish_batch(self, topic: str, items: Iterable[ItemLike]) -> list[PublishId]:
        """Publish many messages in as few requests as the limits allow, in order.

        Args:
            topic: an existing topic.
            items: each ``bytes``, ``(bytes, attributes)`` or ``(bytes, attributes, message_id)``.

        Returns:
            One id per item, in order.

        Raises:
            HeraldError: as :meth:`publish`; ``error.details["published"]`` lists
                the ids already stored when a later part of a split batch failed.
        """
        normalised = publish_items(items)
        ids: list[PublishId] = []
        for chunk in split_batch(normalised):
            try:
                stored: list[PublishId] = await self._request(publish_call(topic, chunk))
                ids.extend(stored)
            except HeraldError as error:
                if ids:
                    error.details["published"] = list(map(str, ids))
                raise
        return ids

    # ------------------------------------------------------------------ server

    async def info(self) -> dict[str, Any]:
        """Server version, protocol, durability, limits and endpoints.

        Raises:
            HeraldError: ``timeout``...
        """
        return await self._request(info_call())

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds.

        Raises:
            HeraldError: ``timeout`` when the server does not answer.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._request(ping_call())
        return loop.time() - started

    async def status(self) -> dict[str, Any]:
        """Statistics of the frontend that answered.

        Raises:
            HeraldError: ``timeout``...
        """
        return await self._request(status_call())

    async def backlogs(self) -> dict[str, int]:
        """Messages stored and not yet settled (acknowledged, expired or dead-lettered), per subscription, over
        every frontend. A subscription with none is left out.

        Raises:
            HeraldError: ``unavailable`` when some frontend did not answer STATUS; ``timeout``...
        """
        tally = BacklogTally(int((await self.info())["frontends"]))
        for _ in range(tally.requests):
            tally.add(await self.status())
            if tally.complete:
                return tally.totals()
        raise tally.incomplete()

    # ------------------------------------------------------------------ subscriptions

    async def create_subscription(self, topic: str, name: str, *, exist_ok: bool = False, **settings: Any) -> dict[str, Any]:
        """Create a durable subscription; see :meth:`clients.Client.create_subscription`.

        Returns:
            The subscription record, including ``endpoints``.

        Raises:
            HeraldError: ``topic_not_found``, ``subscription_exists``, ``invalid_setting``...
        """
        return await self._request(create_subscription_call(topic, name, exist_ok, settings))

    async def delete_subscription(self, name: str) -> None:
        """Delete a subscription and its backlog.

        Raises:
            HeraldError: ``subscription_not_found``, ``timeout``...
        """
        await self._request(delete_subscription_call(name))

    async def list_subscriptions(self, topic: str | None = None, *, page_size: int | None = None) -> list[dict[str, Any]]:
        """List subscriptions, optionally only those of ``topic``, sorted by name.

        ``page_size``: subscriptions per request (default: as many as one reply holds, up to 10,000);
        the list is always complete.

        Raises:
            HeraldError: ``timeout``...
        """
        return await self._list_all(lambda after: list_subscriptions_call(topic, after, page_size))

    async def describe_subscription(self, name: str) -> dict[str, Any]:
        """One subscription's record, including its endpoints.

        Raises:
            HeraldError: ``subscription_not_found``, ``timeout``...
        """
        return await self._request(describe_subscription_call(name))

    def subscribe(self, topic: str, name: str, **settings: Any) -> Subscribing:
        """Consume a subscription, creating it when absent.

        Await the result (``sub = await client.subscribe(...)``) or use it as an
        async context manager (``async with client.subscribe(...) as sub:``).

        Args:
            topic: the topic; it must exist.
            name: the subscription; consumers of one name share its messages.
            **settings: as :meth:`create_subscription`; when given they replace all the
                settings of an existing subscription (those left out return to their
                defaults: its dead-letter topic and filter too).

        Returns:
            An awaitable that attaches and yields an :class:`AsyncSubscription`.

        Raises:
            HeraldError: when awaited: ``topic_not_found``, ``subscription_exists``, ``timeout``.
        """
        return Subscribing(self._subscribe(topic, name, settings))

    async def _subscribe(self, topic: str, name: str, settings: dict[str, Any]) -> AsyncSubscription:
        info = await self.create_subscription(topic, name, exist_ok=True, **settings)
        subscription = AsyncSubscription(self, info)
        await subscription._attach()
        return subscription

    # ------------------------------------------------------------------ plumbing

    async def _list_all(self, page_call: Callable[[str | None], Call[ListPage]]) -> list[dict[str, Any]]:
        """Every record of a list read in pages (a long one does not fit one reply): ``page_call(after)`` asks for one."""
        records: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self._request(page_call(after))
            records += page.records
            if (after := page.next_after) is None:
                return records

    async def _request(self, call: Call[T], *, since: float | None = None) -> T:
        """Send ``call`` and await its reply, resending on the attempt schedule, for at most
        ``timeout`` seconds from ``since`` (the loop's clock; default now)."""
        if self._closed:
            raise closed_error(repr(self))
        loop = asyncio.get_running_loop()
        io = self._io
        io.start(loop)
        deadline = (loop.time() if since is None else since) + self.timeout
        request_ids: list[bytes] = []
        # A late reply to an earlier attempt is as good as one to the latest.
        future: asyncio.Future[Frames] = loop.create_future()
        attempt = 0
        try:
            while loop.time() < deadline:
                if attempt:
                    self._counters.retries += 1
                request_id = self._ids.next()
                request_ids.append(request_id)
                self._pending[request_id] = future
                self._counters.requests += 1
                until = attempt_deadline(loop.time(), deadline, attempt, call.repeatable)
                attempt += 1
                request = call.frames(request_id, self.token)
                if not io.send(request):
                    try:
                        async with asyncio.timeout_at(until):
                            await io.send_wait(request)
                    except TimeoutError:
                        if not call.repeatable:
                            break
                        continue  # not connected yet: try again with the attempt schedule
                await _wait_until(future, until)
                if not future.done():
                    if not call.repeatable:
                        break
                    log.info("no reply to %s yet; sending it again", call.command.name)
                    continue
                frames = future.result()
                try:
                    return call.parse(reply_header(frames))
                except HeraldError as error:
                    self._counters.errors += 1
                    pause = retry_pause(error, call, attempt - 1, loop.time(), deadline)
                    if pause is None:
                        raise
                    log.info("retrying %s after %s", call.command.name, error)
                    future = loop.create_future()
                    for earlier in request_ids:
                        self._pending[earlier] = future
                    await asyncio.sleep(pause)
            self._counters.timeouts += 1
            raise timeout_error(call.command.name, self.endpoint, self.timeout)
        finally:
            for request_id in request_ids:
                self._pending.pop(request_id, None)

    def _flush_batch(self, topic: str, batch: _Coalesced, *, now: bool = False) -> None:
        """Send the publishes gathered for ``topic`` as one request (once per batch).

        With PUBLISHES_IN_FLIGHT requests of the topic in flight the batch is held
        instead: it keeps gathering publishes, and goes when one of those returns,
        when it is full, or after PUBLISH_HOLD_MAX_S (``now``), whichever is first.
        """
        if self._batches.get(topic) is not batch:
            return
        loop = asyncio.get_running_loop()
        if not now and self._publishing[topic] >= PUBLISHES_IN_FLIGHT:
            if batch.timer is None:
                batch.timer = loop.call_later(PUBLISH_HOLD_MAX_S, functools.partial(self._flush_batch, topic, batch, now=True))
            return
        del self._batches[topic]
        if batch.timer is not None:
            batch.timer.cancel()
        if not batch.drop_cancelled():
            return  # every caller gave up already
        task = loop.create_task(self._send_coalesced(topic, batch), name=f"herald-publish-{topic}")
        self._publishing[topic] += 1
        self._batch_tasks.add(task)
        # A done callback, not a finally in the task: it runs even for a task
        # cancelled before its first step (asyncio.run's shutdown, close()).
        task.add_done_callback(functools.partial(self._batch_done, topic, batch))

    def _batch_done(self, topic: str, batch: _Coalesced, task: asyncio.Task[None]) -> None:
        """One request of ``topic`` is over: send the batch held for it, if any."""
        self._batch_tasks.discard(task)
        self._publishing[topic] -= 1
        if self._publishing[topic] <= 0:
            del self._publishing[topic]
        held = self._batches.get(topic)
        if not task.cancelled():
            if held is not None and not self._closed:
                self._flush_batch(topic, held)
            return
        # Cancelled: the client is closing, or the event loop is shutting down. A
        # task started now would outlive the loop; answer the held publishes instead.
        if held is not None:
            del self._batches[topic]
            if held.timer is not None:
                held.timer.cancel()
        error = closed_error(repr(self))
        for unanswered in (batch, held):
            if unanswered is not None:
                with contextlib.suppress(RuntimeError):  # a future of a loop already closed
                    unanswered.fail(error)

    async def _send_coalesced(self, topic: str, batch: _Coalesced) -> None:
        try:
            # The ids are made once, here, for the resends below too (publish_call would make new ones).
            items, sequence = make_ids(topic, batch.items)
            try:
                # The timeout counts from the first publish of the batch, held or not.
                ids = await self._request(publish_call(topic, items, sequence), since=batch.since)
            except HeraldError as error:
                if len(batch.items) == 1 or error.code == "timeout":
                    batch.fail(error)
                    return
                # One message's error (say payload_too_large) must not fail its
                # neighbours: send each alone. A failed PUBLISH stored nothing, and
                # the ids are unchanged (a sequence's, each as its own, are looked up
                # in its record), so this cannot store anything twice.
                self._counters.retries += len(items)
                if sequence is not None:
                    items = [(payload, attributes, sequence.message_id(index)) for index, (payload, attributes, _) in enumerate(items)]
                results = await asyncio.gather(*(self._request(publish_call(topic, [item])) for item in items), return_exceptions=True)
                for future, result in zip(batch.futures, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result[0])
                return
            for future, message_id in zip(batch.futures, ids, strict=True):
                if not future.done():
                    future.set_result(message_id)
        except BaseException as exc:
            batch.fail(exc if isinstance(exc, HeraldError) else closed_error(repr(self)))
            raise

    def _fail_pending(self, error: HeraldError) -> None:
        for future in self._pending.values():
            _fail_future(future, error)
        self._pending.clear()

    def _on_reply(self, raw: list[bytes]) -> None:
        try:
            frames = parse_reply(raw)
        except ProtocolError as error:
            self._counters.malformed_replies += 1
            future = self._pending.get(request_id_of(split_envelope(raw)[1]))
            if future is not None and not future.done():
                future.set_exception(error)
            return
        future = self._pending.get(frames.request_id)
        if future is None or future.done():
            self._counters.stray_replies += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<- %s dropped a stray reply to request %s", self.endpoint, frames.request_id.hex())
            return
        self._counters.replies += 1
        future.set_result(frames)


class _Coalesced:
    """Publishes to one topic waiting for the end of the event-loop iteration, or for a request of the topic to return."""

    __slots__ = ("futures", "header", "items", "since", "size", "timer")

    def __init__(self, since: float) -> None:
        self.since = since  # the loop's clock at the first publish
        self.items: list[PublishItem] = []
        self.futures: list[asyncio.Future[PublishId]] = []
        self.size = 0
        self.header = 0  # estimated bytes of the request's header
        self.timer: asyncio.TimerHandle | None = None  # sends a held batch after PUBLISH_HOLD_MAX_S

    def fits(self, item: PublishItem, header: int) -> bool:
        """Whether ``item`` (``header``: its publish_header_bytes) still fits in this request."""
        return len(self.items) < MAX_BATCH_MESSAGES and self.size + len(item[0]) <= PUBLISH_BATCH_BYTES and self.header + header <= PUBLISH_HEADER_BYTES

    def add(self, item: PublishItem, future: asyncio.Future[PublishId], header: int) -> None:
        self.items.append(item)
        self.futures.append(future)
        self.size += len(item[0])
        self.header += header

    def drop_cancelled(self) -> bool:
        """Leave out the publishes whose callers were cancelled; whether any are left."""
        if any(future.cancelled() for future in self.futures):
            kept = [(item, future) for item, future in zip(self.items, self.futures, strict=True) if not future.cancelled()]
            self.items = [item for item, _ in kept]
            self.futures = [future for _, future in kept]
        return bool(self.items)

    def fail(self, error: HeraldError) -> None:
        for future in self.futures:
            # A copy each: one exception object raised in many tasks would share a traceback.
            _fail_future(future, type(error)(error.code, error.message, dict(error.details)))


class Subscribing(Coroutine[Any, Any, "AsyncSubscription"]):
    """The pending result of :meth:`AsyncClient.subscribe`: await it, ``async with`` it, or hand it to
    ``asyncio.create_task`` / ``asyncio.wait_for`` like any coroutine."""

    def __init__(self, coroutine: Coroutine[Any, Any, AsyncSubscription]) -> None:
        self._coroutine = coroutine
        self._subscription: AsyncSubscription | None = None

    def __await__(self) -> Generator[Any, None, AsyncSubscription]:
        return self._coroutine.__await__()

    def send(self, value: Any) -> Any:
        return self._coroutine.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._coroutine.throw(typ, val, tb) if val is not None or tb is not None else self._coroutine.throw(typ)

    def close(self) -> None:
        self._coroutine.close()

    async def __aenter__(self) -> AsyncSubscription:
        self._subscription = await self._coroutine
        return self._subscription

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._subscription is not None:
            await self._subscription.close()


class AsyncSubscription(SubscriptionView):
    """A consumer of one subscription for asyncio: ``async for`` it, ``await msg.ack()``.

    Delivery is at least once; redeliveries of messages this consumer already
    acknowledged successfully are dropped (and acknowledged again), and so are
    buffered copies received more than ``ack_deadline`` ago (unacknowledged:
    the sender has taken them back and sends them again). A reader
    task files deliveries and ack replies, a heartbeat task keeps the consumer
    attached; a coroutine that blocks the event loop for longer than
    ``CONSUMER_EXPIRY_S`` stops heartbeats, and the sender then hands this
    consumer's messages to others.

    When no WELCOME (the sender's answer to every heartbeat) has come for
    ``REDISCOVER_AFTER_S`` (``CONSUMER_EXPIRY_S``), the heartbeat task re-reads
    the subscription with SUB_DESCRIBE in a task of its own, at most once per
    that interval; if its sender moved to other endpoints (the whole system
    restarted and the old ports were taken, or the sender count changed), the
    consumer reconnects there and attaches again, keeping its buffer and
    acknowledged window. A broker that does not answer is asked again later.
    """

    def __init__(self, client: AsyncClient, info: dict[str, Any], *, consumer_id: str | None = None) -> None:
        """Prepare a consumer for ``info`` (a SUB_CREATE/SUB_DESCRIBE record); ``_attach`` connects it."""
        self._client = client
        self._timeout = client.timeout
        self._core: ConsumerCore[AsyncMessage] = ConsumerCore(info, consumer_id or secrets.token_hex(8), AsyncMessage, token=client.token)
        self._ids = RequestIds()
        self._awaiting: dict[bytes, asyncio.Future[list[str]]] = {}
        self._arrived = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._welcome: asyncio.Future[list[str]] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None  # sends the queued acks ACK_FLUSH_DELAY_S after the first
        self._ack_timer_loop: asyncio.AbstractEventLoop | None = None
        # Attaching again after a move to another sender: the heartbeat task sends
        # ATTACH ready=false every ATTACH_RETRY_S until a WELCOME, then ready=true.
        self._reattaching = False
        self._rediscovery: asyncio.Task[None] | None = None  # the SUB_DESCRIBE re-read in progress
        self._closed = False
        context = client._context
        sub: zmq.Socket[Any] = context.socket(zmq.SUB)
        push: zmq.Socket[Any] = context.socket(zmq.PUSH)
        try:
            self._core.connect(sub, push, client.curve)
        except BaseException:
            sub.close(0)
            push.close(0)
            raise
        self._sub = _LoopSocket(sub, self._on_message, self._on_task_failure)
        self._push = _LoopSocket(push)
        client._subscriptions.add(self)

    # ------------------------------------------------------------------ public

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> AsyncMessage:
        if self._closed:
            raise StopAsyncIteration
        try:
            message = await self.receive()
        except HeraldError:
            if self._closed:
                raise StopAsyncIteration from None
            raise
        if message is None:  # only when closed while waiting
            raise StopAsyncIteration
        return message

    async def receive(self, timeout: float | None = None) -> AsyncMessage | None:
        """The next message, waiting at most ``timeout`` seconds (None: forever).

        Returns:
            A message, or None when the timeout passed first.

        Raises:
            HeraldError: ``subscription_not_found`` when the subscription was
                deleted; ``unavailable`` when this subscription is closed.
        """
        if not self._closed and (message := self._core.next_message()) is not None:
            self._send_reacks_later()
            return message  # the common case under load: already buffered, nothing to wait for
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise closed_error(repr(self))
            message = self._core.next_message()
            self._send_reacks_later()
            if message is not None:
                return message
            if self._core.failure is not None:
                raise self._core.failure
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                return None

    async def receive_batch(self, max_messages: int = 100, timeout: float | None = None) -> list[AsyncMessage]:
        """Up to ``max_messages`` messages: waits at most ``timeout`` seconds (None: forever) for the
        first, then takes the ones already received behind it, without waiting for more.

        The throughput reader's call (like a JetStream ``fetch`` or Redis ``XREADGROUP COUNT``): one
        await for a batch instead of one per message.

        Returns:
            The messages, in delivery order; empty when the timeout passed first.

        Raises:
            ValueError: ``max_messages`` is below 1.
            HeraldError: as :meth:`receive`.
        """
        self._core.check_batch_size(max_messages)
        first = await self.receive(timeout)
        if first is None:
            return []
        batch = self._core.batch_behind(first, max_messages)
        self._send_reacks_later()
        return batch

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this consumer's counters."""
        return self._core.statistics()

    async def close(self) -> None:
        """Stop the tasks, tell the sender this consumer left, close the sockets. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        if self._ack_timer is not None:
            self._ack_timer.cancel()  # the queued acks go out below, before DETACH
        for task in (self._heartbeat, self._rediscovery):
            if task is not None and not task.done():  # a task that ended with an error reported it already (_watch)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for future in self._awaiting.values():
            _fail_future(future, closed_error(repr(self)))
        linger_ms = 0
        if self._welcomed.is_set():
            self._sub.read_now()  # what already arrived is named in DETACH as never seen, so it keeps its attempt
            self._core.settle_buffered_copies()
            if (frames := self._core.take_pending_acks()) is not None:
                self._push.send(frames)
            if self._push.send(self._core.detach_frames()):
                linger_ms = DETACH_LINGER_MS
        self._push.close(linger=linger_ms)
        self._sub.close(linger=0)
        self._client._subscriptions.discard(self)

    # ------------------------------------------------------------------ acknowledgements

    def _ack_nowait(self, message: MessageFields) -> None:
        if self._closed:
            raise closed_error(repr(self))
        if self._core.queue_ack(message):
            self._send_queued_acks()
        else:
            self._arm_ack_timer()

    def _send_reacks_later(self) -> None:
        """Arm the ack timer for acks a receive queued itself (copies of acknowledged ids it dropped)."""
        if self._core.acks_due is not None and self._ack_timer is None:
            self._arm_ack_timer()

    def _arm_ack_timer(self) -> None:
        if self._ack_timer is None or self._ack_timer_loop is None or self._ack_timer_loop.is_closed():
            # One timer per batch of acks; a timer on a loop that has closed since never fires.
            loop = asyncio.get_running_loop()
            self._ack_timer, self._ack_timer_loop = loop.call_later(ACK_FLUSH_DELAY_S, self._send_queued_acks), loop

    def _send_queued_acks(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._closed or (frames := self._core.take_pending_acks()) is None:
            return
        if not self._push.send(frames):
            # The socket is full: send them from a task, without blocking the caller.
            flush = asyncio.get_running_loop().create_task(self._push.send_wait(frames), name=f"herald-acks-{self.name}")
            _watch(flush, lambda error: log.warning("queued acks not sent (%r); those messages will be redelivered and acknowledged again", error))

    async def _ack(self, message: AsyncMessage) -> bool:
        if message.ref in self._core.acked:
            return True  # acknowledged already (ack, ack_nowait): a second ACK would only be answered unknown

        def build(request_id: bytes) -> list[bytes]:
            self._core.expect_ack(request_id, message)
            return self._core.ack_frames([(message.ref, message.attempt)], request_id)

        results = await self._exchange("ACK", build)
        if len(results) != 1:
            raise ProtocolError("malformed", f"ACK_REPLY for one ack carries {len(results)} results")
        return ack_result(results[0], message)

    async def _nack(self, message: AsyncMessage) -> None:
        if self._closed:
            raise closed_error(repr(self))
        async with self._deadline("NACK", self._core.ack_endpoint):
            await self._push.send_wait(self._core.nack_frames([(message.ref, message.attempt)]))
        self._core.nacked += 1

    # ------------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str, endpoint: str) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError:
            raise timeout_error(what, endpoint, self._timeout) from None

    async def _exchange(self, what: str, build: Callable[[bytes], list[bytes]]) -> list[str]:
        """Send a message that asks for a reply on the SUB socket, and wait for it."""
        if self._closed:
            raise closed_error(repr(self))
        request_id = self._ids.next()
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._awaiting[request_id] = future
        try:
            async with self._deadline(what, self._core.deliver_endpoint):
                frames = build(request_id)
                await self._push.send_wait(frames)
                resends = 0
                while True:
                    try:
                        return await asyncio.wait_for(asyncio.shield(future), resend_pause(resends))
                    except TimeoutError:
                        # Sent again: a sender killed with the first one unanswered is back within a second or
                        # two, and answers a message it never saw with "unknown" rather than leave it to the timeout.
                        resends += 1
                        await self._push.send_wait(frames)
        finally:
            self._awaiting.pop(request_id, None)
            self._core.forget_ack(request_id)

    async def _attach(self) -> None:
        """Send ATTACH until the sender's WELCOME shows our SUB filter reached it (slow joiner)."""
        try:
            loop = asyncio.get_running_loop()
            self._sub.start(loop)
            self._push.start(loop)
            request_id = self._ids.next()
            # Resolved by the first WELCOME, or failed by an ERROR answering this ATTACH.
            welcome: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
            self._awaiting[request_id] = self._welcome = welcome
            async with self._deadline(f"ATTACH to subscription {self.name!r}", self._core.deliver_endpoint):
                while True:
                    while not welcome.done():
                        self._push.send(self._core.attach_frames(ready=False, request_id=request_id))
                        await asyncio.wait([welcome], timeout=ATTACH_RETRY_S)
                    self._awaiting.pop(request_id, None)
                    error = welcome.exception()
                    if error is None:
                        break
                    if not (isinstance(error, HeraldError) and error.code == "wrong_sender") or not await self._follow_to_serving_sender():
                        raise self._core.failure or error
                    request_id = self._ids.next()
                    welcome = asyncio.get_running_loop().create_future()
                    self._awaiting[request_id] = self._welcome = welcome
                await self._push.send_wait(self._core.attach_frames(ready=True))
                self._reattaching = False  # a move made while attaching is complete as well
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop(), name=f"herald-heartbeat-{self.name}")
            _watch(self._heartbeat, self._on_task_failure)
        except BaseException:
            await self.close()
            raise

    async def _follow_to_serving_sender(self) -> bool:
        """After ``wrong_sender`` answered the first ATTACH: re-read SUB_DESCRIBE and move to the sender it names.

        The record attached with was stale: the system restarted with another
        number of senders since it was read. False (nothing changed) when the
        re-read fails or names the same endpoints, as a sender and metadata that
        disagree about the number of senders would.
        """
        try:
            info = await self._client.describe_subscription(self.name)
        except HeraldError as error:
            self._core.rediscovered(None, error)
            return False
        return self._core.rediscovered(info, None) and self._move(info)

    def _on_task_failure(self, error: BaseException) -> None:
        self._fail(HeraldError("internal", f"consumer task of subscription {self.name!r} failed: {error!r}"))

    def _on_message(self, raw: list[bytes]) -> None:
        events = self._core.handle(raw, self)
        if events.welcomed:
            self._welcomed.set()
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result([])
        for request_id, results in events.replies.items():
            future = self._awaiting.get(request_id)
            if future is not None and not future.done():
                future.set_result(results)
        for request_id, error in events.errors.items():
            future = self._awaiting.get(request_id)
            if future is not None and not future.done():
                future.set_exception(error)
        if events.fatal is not None:
            for future in self._awaiting.values():
                if not future.done():
                    future.set_exception(events.fatal)
        if events.reacks:
            # Best effort: if this ack is lost the sender redelivers and we ack again.
            self._push.send(self._core.ack_frames(events.reacks))
        if events.session_changed and not self._reattaching:
            # A new session (sender restart, expiry): deliveries start with an ATTACH naming it. The heartbeat would, within a second.
            self._push.send(self._core.attach_frames(ready=True))
        if self._core.buffer or events.fatal is not None:
            self._arrived.set()

    async def _heartbeat_loop(self) -> None:
        core = self._core
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(ATTACH_RETRY_S if self._reattaching else CONSUMER_HEARTBEAT_S)
            if self._reattaching:
                self._send_attach()
            else:
                self._push.send(core.attach_frames(ready=True))  # built each time: it names the latest session. Unreachable sender: the next one counts
            # protocol.md §9, step 5; the re-read runs in a task of its own, so heartbeats go on meanwhile.
            if time.monotonic() >= core.rediscover_at() and (self._rediscovery is None or self._rediscovery.done()):
                self._rediscovery = loop.create_task(self._rediscover(), name=f"herald-rediscover-{self.name}")
                _watch(self._rediscovery, self._on_task_failure)

    def _send_attach(self) -> None:
        """One step of attaching again: ATTACH ready=false until a WELCOME came, then ready=true once."""
        ready = self._core.welcomed
        self._push.send(self._core.attach_frames(ready=ready))  # not sent: the next round tries again
        if ready:
            self._reattaching = False

    async def _rediscover(self) -> None:
        """Re-read the subscription; move to its new endpoints if its sender moved.

        A broker that does not answer is asked again REDISCOVER_AFTER_S later;
        ``subscription_not_found`` fails the subscription, as when the sender reports it.
        """
        core = self._core
        core.rediscovering()
        try:
            info = await self._client.describe_subscription(self.name)
        except HeraldError as error:
            core.rediscovered(None, error)
            if core.failure is not None:
                self._fail(core.failure)  # the acks waiting get it too
            return
        if core.rediscovered(info, None) and not self._closed:  # else the sender may be restarting on its old ports
            self._move(info)

    def _move(self, info: dict[str, Any]) -> bool:
        """Reconnect to the endpoints of ``info`` with fresh sockets and attach again; False if they are unusable."""
        self._sub.read_now()  # keep what already arrived
        sockets = self._core.move(info, self._client._context, self._client.curve)
        if sockets is None:
            return False
        # The same _LoopSockets go on with the new sockets: sends waiting for room wait on the new PUSH.
        self._sub.replace(sockets[0])
        self._push.replace(sockets[1])
        self._reattaching = True
        self._send_attach()
        return True

    def _fail(self, error: HeraldError) -> None:
        """Fail the subscription with ``error``: receive() raises it, waiting acks get it."""
        self._core.failure = self._core.failure or error
        for future in self._awaiting.values():
            _fail_future(future, error)
        self._arrived.set()


__all__ = ["AsyncClient", "AsyncMessage", "AsyncSubscription", "Subscribing", "run"]
