"""The benchmark roles, each run in its own process by :class:`bench.harness.Workers`.

Every role follows the same handshake with the parent: connect and report
``ready``; on ``warm`` send the warm-up traffic and report ``warmed``; on
``go`` run the timed part and report ``done`` with its timestamps. Consumers
need no ``go``: they report ``warmed`` once they have seen the whole warm-up
and then count the timed messages as they come.

Payload layout (``size`` bytes, so a figure's message size is what it says)::

    kind (1 byte: W = warm-up, M = measured) | seq (u64 BE) | scheduled time (u64 BE, ns, CLOCK_MONOTONIC) | padding

Only the latency benchmark fills in the scheduled time; throughput leaves it 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import zmq

from bench.harness import LatencyRecorder, Link, WorkerError, now_ns
from clients import AsyncClient, Client
from clients.aio import run
from clients.protocol import Command, encode, recv_frames, send_frames

WARMUP: Final = b"W"[0]
MEASURED: Final = b"M"[0]
_PREFIX: Final = struct.Struct(">cQQ")
PAYLOAD_HEADER_BYTES: Final = _PREFIX.size  # 17
CLIENT_TIMEOUT_S: Final = 60.0  # a loaded 2-core box can stall a request for seconds; a benchmark should report it, not die
RAW_HWM: Final = 100_000  # as Herald's own sockets: finite, and PUSH blocks at it (nothing dropped)
PROGRESS_TIMEOUT_S: Final = 60.0  # a consumer that sees nothing new for this long reports failure


def payload(kind: int, seq: int, size: int, scheduled_ns: int = 0) -> bytes:
    """A benchmark payload of exactly ``size`` bytes (at least PAYLOAD_HEADER_BYTES)."""
    head = _PREFIX.pack(bytes((kind,)), seq, scheduled_ns)
    return head + b"x" * (size - len(head))


def parse_payload(data: bytes) -> tuple[int, int, int]:
    """(kind, seq, scheduled_ns) of a benchmark payload."""
    kind, seq, scheduled = _PREFIX.unpack_from(data)
    return kind[0], seq, scheduled


def check_size(size: int) -> int:
    """``size`` if a benchmark payload fits in it.

    Raises:
        ValueError: naming the minimum.
    """
    if size < PAYLOAD_HEADER_BYTES:
        raise ValueError(f"--size {size} is below the {PAYLOAD_HEADER_BYTES} bytes a benchmark payload needs (kind, seq, scheduled time)")
    return size


def raw_frames(payload_bytes: bytes) -> list[bytes]:
    """Five frames shaped like a Herald PUBLISH of one message: signature, command, request id, header, payload."""
    return encode(Command.PUBLISH, b"\x00" * 8, {"topic": "bench", "messages": [{"id": "0" * 32}]}, [payload_bytes])


# --------------------------------------------------------------------------- pacing (open loop)

PR_SET_TIMERSLACK: Final = 29  # <linux/prctl.h>


def tighten_timer_slack() -> None:
    """Let this thread's sleeps end on time: Linux lets a sleep overrun by the thread's timer slack (50 us by default).

    Measured here, ``time.sleep(0.0004)`` overran by 72 us at the median with
    the default slack and by 22 us with a slack of 1 ns. The overrun counts in
    every system's latency alike (it runs from the due time), so the default
    slack only added noise to every figure. Elsewhere than Linux: nothing.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class Schedule:
    """Message ``k`` is due at ``start_ns + k * interval``: a fixed schedule, whatever the system does."""

    def __init__(self, rate_per_s: float, total: int, start_delay_s: float = 0.01) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate = {rate_per_s} must be positive")
        self.interval_ns = 1e9 / rate_per_s
        self.total = total
        self.start_ns = now_ns() + int(start_delay_s * 1e9)

    def due_ns(self, k: int) -> int:
        return self.start_ns + int(k * self.interval_ns)

    def run(self, emit: Callable[[int, int], None], stop: threading.Event | None = None) -> None:
        """Call ``emit(k, due_ns)`` for every k at (not before) its due time.

        ``time.sleep`` with a tight timer slack (see :func:`tighten_timer_slack`)
        ends ~20 us late here, unlike event-loop timers (1 ms), so pacing adds
        little of its own to measured latency. When behind schedule, due
        messages are emitted back to back: the lag shows in the latency, it is
        not skipped (no coordinated omission).
        """
        tighten_timer_slack()
        for k in range(self.total):
            if stop is not None and stop.is_set():
                return
            due = self.due_ns(k)
            delay = due - now_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            emit(k, due)


class Pacer:
    """Open-loop pacing for an asyncio publisher: a thread hands message ``k`` to
    ``submit`` on the event loop at its due time, once one of ``max_in_flight``
    slots is free. A full window delays the hand-over; the delay then shows as
    latency, since latency runs from the due time (nothing is skipped)."""

    def __init__(self, rate_per_s: float, total: int, max_in_flight: int) -> None:
        self.schedule = Schedule(rate_per_s, total)
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.stop = threading.Event()
        self.blocked = 0  # times the pacer waited for an in-flight slot
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, submit: Callable[[int, int], None]) -> None:
        def emit(k: int, due: int) -> None:
            if not self.slots.acquire(blocking=False):
                self.blocked += 1
                while not self.slots.acquire(timeout=1.0):
                    if self.stop.is_set():
                        return
            loop.call_soon_threadsafe(submit, k, due)

        self._thread = threading.Thread(target=self.schedule.run, args=(emit, self.stop), name="pacer", daemon=True)
        self._thread.start()

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.slots.release()

    async def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


# --------------------------------------------------------------------------- raw ZeroMQ baseline


def raw_pull(link: Link, count: int, warmup: int, latency: bool) -> None:
    """PULL side of the raw baseline: bind, receive warm-up, then ``count`` timed messages."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RCVHWM, RAW_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        link.send("ready", f"tcp://127.0.0.1:{port}")
        # Herald's own receive and send (compiled calls, plain int flags): the
        # ceiling must not pay pyzmq wrapper costs that Herald itself avoids.
        for _ in range(warmup):
            recv_frames(sock)
        link.send("warmed")
        recorder = LatencyRecorder()
        if latency:
            for _ in range(count):
                frames = recv_frames(sock)
                received = now_ns()
                _kind, _seq, scheduled = parse_payload(frames[4])
                recorder.record(received - scheduled)
        else:
            for _ in range(count):
                recv_frames(sock)
        link.send("done", {"end_ns": now_ns(), "latency": recorder.to_bytes()})
    finally:
        sock.close(0)
        context.term()


def raw_push(link: Link, endpoint: str, count: int, warmup: int, size: int, rate_per_s: float) -> None:
    """PUSH side of the raw baseline: as fast as possible (rate 0) or on a fixed schedule."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.SNDHWM, RAW_HWM)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        link.send("ready")
        link.wait("warm")
        frames = raw_frames(payload(WARMUP, 0, size))
        for _ in range(warmup):
            send_frames(sock, frames)
        link.send("warmed")
        link.wait("go")
        if rate_per_s <= 0:
            frames = raw_frames(payload(MEASURED, 0, size))
            start = now_ns()
            for _ in range(count):
                send_frames(sock, frames)
            link.send("done", {"start_ns": start, "sent_ns": now_ns()})
            return
        schedule = Schedule(rate_per_s, count)
        send_lag = LatencyRecorder()

        def emit(k: int, due: int) -> None:
            send_frames(sock, raw_frames(payload(MEASURED, k, size, due)))
            send_lag.record(now_ns() - due)

        schedule.run(emit)
        link.send("done", {"start_ns": schedule.start_ns, "sent_ns": now_ns(), "send_lag": send_lag.to_bytes()})
    finally:
        sock.close()
        context.term()


# --------------------------------------------------------------------------- Herald publishers


def async_publisher(link: Link, endpoint: str, topic: str, count: int, warmup: int, size: int, concurrency: int) -> None:
    """AsyncClient.publish with ``concurrency`` publishes in flight (closed loop); each ack = stored durably."""
    run(_async_publisher(link, endpoint, topic, count, warmup, size, concurrency))


async def _publish_closed_loop(client: AsyncClient, topic: str, kind: int, count: int, size: int, concurrency: int, recorder: LatencyRecorder | None) -> None:
    # ``concurrency`` lanes share one sequence: each lane publishes, awaits the ack, takes the next seq.
    # Lanes woken by one reply publish in the same loop iteration, so the client coalesces them into one PUBLISH.
    sequence = iter(range(count))
    publish = client.publish

    async def lane() -> None:
        for seq in sequence:
            data = payload(kind, seq, size)
            if recorder is None:
                await publish(topic, data)
            else:
                sent = now_ns()
                await publish(topic, data)
                recorder.record(now_ns() - sent)

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(concurrency, count))):
            group.create_task(lane())


async def _async_publisher(link: Link, endpoint: str, topic: str, count: int, warmup: int, size: int, concurrency: int) -> None:
    async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
        await client.ping()
        link.send("ready")
        link.wait("warm")  # blocking the loop is fine: nothing is in flight yet
        await _publish_closed_loop(client, topic, WARMUP, warmup, size, concurrency, None)
        link.send("warmed")
        link.wait("go")
        recorder = LatencyRecorder()
        cpu = time.process_time()
        start = now_ns()
        await _publish_closed_loop(client, topic, MEASURED, count, size, concurrency, recorder)
        end = now_ns()
        link.send(
            "done",
            {
                "start_ns": start,
                "acked_ns": end,
                "cpu_s": time.process_time() - cpu,
                "ack_latency": recorder.to_bytes(),
                "client": dataclasses.asdict(client.statistics()),
            },
        )


def batch_publisher(link: Link, endpoint: str, topic: str, count: int, warmup: int, size: int, batch: int) -> None:
    """Sync Client.publish_batch of ``batch`` messages, one batch at a time; each reply = the batch is stored durably."""
    with Client(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
        client.ping()
        link.send("ready")
        link.wait("warm")
        _publish_batches(client, topic, WARMUP, warmup, size, batch)
        link.send("warmed")
        link.wait("go")
        cpu = time.process_time()
        start = now_ns()
        _publish_batches(client, topic, MEASURED, count, size, batch)
        end = now_ns()
        link.send("done", {"start_ns": start, "acked_ns": end, "cpu_s": time.process_time() - cpu, "client": dataclasses.asdict(client.statistics())})


def _publish_batches(client: Client, topic: str, kind: int, count: int, size: int, batch: int) -> None:
    for first in range(0, count, batch):
        client.publish_batch(topic, [payload(kind, seq, size) for seq in range(first, min(first + batch, count))])


@dataclasses.dataclass(slots=True)
class _OpenLoopState:
    completed: int = 0  # publishes answered, with an ack or an error
    errors: int = 0
    last_error: str = ""


def open_loop_publisher(link: Link, endpoint: str, topic: str, rate_per_s: float, count: int, warmup: int, size: int, max_in_flight: int) -> None:
    """AsyncClient publishes on a fixed schedule; the scheduled time travels in the payload."""
    run(_open_loop_publisher(link, endpoint, topic, rate_per_s, count, warmup, size, max_in_flight))


async def _open_loop_publisher(link: Link, endpoint: str, topic: str, rate_per_s: float, count: int, warmup: int, size: int, max_in_flight: int) -> None:
    loop = asyncio.get_running_loop()
    async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
        await client.ping()
        link.send("ready")
        link.wait("go")
        total = warmup + count
        ack_latency = LatencyRecorder()  # scheduled time -> durable ack, measured messages only
        send_lag = LatencyRecorder()  # scheduled time -> publish() called
        pacer = Pacer(rate_per_s, total, max_in_flight)  # the window bounds memory if the server stalls
        finished = asyncio.Event()
        state = _OpenLoopState()
        tasks: set[asyncio.Task[None]] = set()

        async def publish_one(k: int, due: int) -> None:
            kind, seq = (WARMUP, k) if k < warmup else (MEASURED, k - warmup)
            try:
                await client.publish(topic, payload(kind, seq, size, due))
                if kind == MEASURED:
                    ack_latency.record(now_ns() - due)
            except Exception as exc:
                state.errors += 1
                state.last_error = repr(exc)
            finally:
                pacer.release()
                state.completed += 1
                if state.completed == total:
                    finished.set()

        def submit(k: int, due: int) -> None:
            if k >= warmup:
                send_lag.record(now_ns() - due)
            task = loop.create_task(publish_one(k, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        pacer.start(loop, submit)
        try:
            await asyncio.wait_for(finished.wait(), timeout=total / rate_per_s + CLIENT_TIMEOUT_S)
        finally:
            await pacer.finish()
        link.send(
            "done",
            {
                "start_ns": pacer.schedule.due_ns(warmup),
                "end_ns": now_ns(),
                "ack_latency": ack_latency.to_bytes(),
                "send_lag": send_lag.to_bytes(),
                "errors": state.errors,
                "last_error": state.last_error,
                "pacer_blocked": pacer.blocked,
            },
        )


# --------------------------------------------------------------------------- Herald consumer


ACK_SYNC: Final = "sync"
ACK_NOWAIT: Final = "nowait"
ACK_MODES: Final = (ACK_SYNC, ACK_NOWAIT)


def consumer(link: Link, endpoint: str, topic: str, subscription: str, count: int, warmup: int, latency: bool, ack_mode: str = ACK_SYNC) -> None:
    """A sync Client subscription: receive and acknowledge each message, count distinct measured seqs until all ``count`` arrived.

    ``ack_mode`` "sync" calls ``ack()`` (waits for the sender's confirmation: one round trip per message);
    "nowait" calls ``ack_nowait()`` (batched, sent on the next ``receive()``, not confirmed).
    """
    nowait = ack_mode == ACK_NOWAIT
    with Client(endpoint, timeout=CLIENT_TIMEOUT_S) as client, client.subscribe(topic, subscription) as sub:
        link.send("ready")
        warm_seen = bytearray(max(warmup, 1))
        warm_unique = 0
        seen = bytearray(count)
        unique = duplicates = 0
        first_ns = last_ns = 0
        recorder = LatencyRecorder()
        # Split at the frontend's accept time, which every delivery carries (wall clock, in seconds):
        # scheduled -> accepted is the publisher, the proxy and the frontend's reading;
        # accepted -> received is the write, the sender and the consumer.
        to_frontend, from_frontend = LatencyRecorder(), LatencyRecorder()
        wall_minus_monotonic_ns = time.time_ns() - now_ns()
        receive = sub.receive
        cpu = time.process_time()
        if warm_unique >= warmup:
            link.send("warmed")
        while unique < count:
            message = receive(PROGRESS_TIMEOUT_S)
            if message is None:
                raise WorkerError(f"{subscription}: nothing for {PROGRESS_TIMEOUT_S:.0f} s after {unique}/{count} messages (warm-up {warm_unique}/{warmup})")
            received = now_ns()
            kind, seq, scheduled = parse_payload(message.data)
            if nowait:
                message.ack_nowait()
            else:
                message.ack()
            if kind == WARMUP:
                if warm_seen[seq]:
                    duplicates += 1
                    continue
                warm_seen[seq] = 1
                warm_unique += 1
                if warm_unique == warmup:
                    link.send("warmed")
                    cpu = time.process_time()
                continue
            if seen[seq]:
                duplicates += 1
                continue
            seen[seq] = 1
            unique += 1
            if not first_ns:
                first_ns = received
            last_ns = now_ns()
            if latency:
                recorder.record(received - scheduled)
                accepted = int(message.timestamp * 1e9) - wall_minus_monotonic_ns
                to_frontend.record(max(0, accepted - scheduled))
                from_frontend.record(max(0, received - accepted))
            if not link.parent_alive():
                return
        link.send(
            "done",
            {
                "first_ns": first_ns,
                "last_ns": last_ns,
                "unique": unique,
                "duplicates": duplicates,
                "cpu_s": time.process_time() - cpu,
                "latency": recorder.to_bytes(),
                "to_frontend": to_frontend.to_bytes(),
                "from_frontend": from_frontend.to_bytes(),
                "statistics": dataclasses.asdict(sub.statistics()),
            },
        )
