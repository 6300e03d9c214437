"""The suite's two worker roles, one driver for every system (``bench.peers``): a publisher and a consumer.

Both run rounds on the parent's orders until told ``stop``, so one pair of
processes serves a whole ladder of rates instead of paying spawn and imports
per step. Each round starts with an order and ends with a ``done`` report.

Publisher orders:

- ``pipelined`` ``{base, count, batch, window, channel, topics}``: closed loop,
  ``window`` batches of ``batch`` messages in flight; batch i goes to topic
  i mod ``topics``. Reports first send and last acknowledgement.
- ``paced`` ``{base, count, warmup, rate, channel, max_in_flight}``: open
  loop. Message k is due at ``t0 + k / rate``; a pacer thread hands each due
  message to the event loop, and the messages that came due since the loop
  last ran go out as one batch (as Herald's AsyncClient coalesces publishes).
  The scheduled time travels in the payload, so every latency is measured from
  it: a stall anywhere shows, it does not slow the schedule (no coordinated
  omission). The in-flight bound keeps memory finite; waiting for it is counted.

Consumer orders: ``round`` ``{base, count, warmup, latency, deadline_s, idle_end_s, stall_s}``:
every subscription of the process reads until it has seen all ``count``
distinct sequence numbers from ``base`` on, or ``deadline_s`` passed, or nothing
came for ``idle_end_s`` (at-most-once systems) or ``stall_s`` (durable ones). Sequence
numbers below ``base`` are late arrivals of an earlier round and ignored.
Latency is receive time minus scheduled time, for ``seq >= base + warmup``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final

import zmq.asyncio

from bench.harness import LatencyRecorder, Link, WorkerError, now_ns
from bench.peers import Consumer, Publisher, SystemSpec, open_consumer, open_publisher
from bench.workers import MEASURED, Pacer, parse_payload, payload
from clients.aio import run

PROGRESS_INTERVAL_S: Final = 0.5
MAX_COALESCED: Final = 1_000  # messages in one paced batch: what a pacer far behind schedule sends at once
POLL_S: Final = 0.2
FIRST_MESSAGE_WAIT_S: Final = 5.0  # a consumer's wait per next_batch: how soon it notices the round's deadline


def publisher_role(link: Link, spec: SystemSpec, size: int) -> None:
    """Connect a publisher for ``spec``, report ``ready`` with its endpoint (raw ZeroMQ binds), then run rounds."""
    run(_publisher_role(link, spec, size))


async def _publisher_role(link: Link, spec: SystemSpec, size: int) -> None:
    publisher = await open_publisher(spec)
    try:
        link.send("ready", publisher.endpoint)
        while True:
            kind, order = await asyncio.to_thread(link.wait_order)
            match kind:
                case "stop":
                    return
                case "pipelined":
                    link.send("done", await _pipelined(link, publisher, order, size))
                case "paced":
                    link.send("done", await _paced(publisher, order, size))
                case _:
                    raise WorkerError(f"publisher: unknown order {kind!r}")
    finally:
        await publisher.close()


def _channel(order: dict[str, Any], index: int) -> str:
    topics = int(order.get("topics", 1))
    return order["channel"] if topics <= 1 else f"{order['channel']}.{index % topics}"


async def _pipelined(link: Link, publisher: Publisher, order: dict[str, Any], size: int) -> dict[str, Any]:
    base, count, batch, window = int(order["base"]), int(order["count"]), int(order["batch"]), int(order["window"])
    batches = [(first, min(first + batch, count)) for first in range(0, count, batch)]
    pending = iter(enumerate(batches))
    acked = 0
    last_progress = time.monotonic()

    async def lane() -> None:
        nonlocal acked, last_progress
        for index, (first, end) in pending:
            await publisher.publish_batch(_channel(order, index), [payload(MEASURED, base + seq, size) for seq in range(first, end)])
            acked += end - first
            if time.monotonic() - last_progress > PROGRESS_INTERVAL_S:
                last_progress = time.monotonic()
                link.send("progress", {"count": acked})

    cpu = time.process_time()
    start = now_ns()
    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(window, len(batches)))):
            group.create_task(lane())
    return {"start_ns": start, "end_ns": now_ns(), "cpu_s": time.process_time() - cpu, "requests": len(batches)}


@dataclass(slots=True)
class _PacedState:
    completed: int = 0
    errors: int = 0
    last_error: str = ""
    batches: int = 0


async def _paced(publisher: Publisher, order: dict[str, Any], size: int) -> dict[str, Any]:
    base, count, warmup, rate = int(order["base"]), int(order["count"]), int(order["warmup"]), float(order["rate"])
    channel, max_in_flight = str(order["channel"]), int(order["max_in_flight"])
    loop = asyncio.get_running_loop()
    ack_latency = LatencyRecorder()
    send_lag = LatencyRecorder()
    pacer = Pacer(rate, count, max_in_flight)
    finished = asyncio.Event()
    state = _PacedState()
    due_now: list[tuple[int, int]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def publish(batch: list[tuple[int, int]]) -> None:
        try:
            await publisher.publish_each(channel, [payload(MEASURED, base + k, size, due) for k, due in batch])
            acked = now_ns()
            for k, due in batch:
                if k >= warmup:
                    ack_latency.record(acked - due)
        except Exception as exc:
            state.errors += len(batch)
            state.last_error = repr(exc)
        finally:
            pacer.release(len(batch))
            state.completed += len(batch)
            if state.completed >= count:
                finished.set()

    def flush() -> None:
        while due_now:
            batch = due_now[:MAX_COALESCED]
            del due_now[:MAX_COALESCED]
            state.batches += 1
            task = loop.create_task(publish(batch))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def submit(k: int, due: int) -> None:
        if k >= warmup:
            send_lag.record(now_ns() - due)
        if not due_now:
            loop.call_soon(flush)
        due_now.append((k, due))

    pacer.start(loop, submit)
    try:
        await asyncio.wait_for(finished.wait(), timeout=count / rate + float(order.get("timeout_s", 120.0)))
    finally:
        await pacer.finish()
    return {
        "start_ns": pacer.schedule.due_ns(warmup),
        "end_ns": now_ns(),
        "ack_latency": ack_latency.to_bytes(),
        "send_lag": send_lag.to_bytes(),
        "errors": state.errors,
        "last_error": state.last_error,
        "pacer_blocked": pacer.blocked,
        "batches": state.batches,
    }


def consumer_role(link: Link, spec: SystemSpec, channel: str, subscriptions: list[str], publisher_endpoint: str, mode: str) -> None:
    """Attach one consumer per subscription (all in this process, one asyncio task each), report ``ready``, then run rounds."""
    run(_consumer_role(link, spec, channel, subscriptions, publisher_endpoint, mode))


async def _consumer_role(link: Link, spec: SystemSpec, channel: str, subscriptions: list[str], publisher_endpoint: str, mode: str) -> None:
    context = zmq.asyncio.Context()
    consumers: list[Consumer] = []
    try:
        for name in subscriptions:
            consumers.append(await open_consumer(spec, channel, name, publisher_endpoint, mode, context))
        link.send("ready")
        while True:
            kind, order = await asyncio.to_thread(link.wait_order)
            if kind == "stop":
                return
            if kind != "round":
                raise WorkerError(f"consumer: unknown order {kind!r}")
            link.send("done", await _consume_round(link, consumers, subscriptions, order))
    finally:
        for consumer in consumers:
            await consumer.close()
        context.term()


@dataclass(slots=True)
class _Tally:
    seen: bytearray
    unique: int = 0
    duplicates: int = 0
    stale: int = 0
    first_ns: int = 0
    last_ns: int = 0


async def _consume_round(link: Link, consumers: list[Consumer], names: list[str], order: dict[str, Any]) -> dict[str, Any]:
    base, count, warmup = int(order["base"]), int(order["count"]), int(order["warmup"])
    record_latency = bool(order["latency"])
    idle_end_s = order.get("idle_end_s")
    stall_s = order.get("stall_s")
    round_start = now_ns()
    deadline = time.monotonic() + float(order["deadline_s"])
    recorder = LatencyRecorder()
    tallies = [_Tally(bytearray(count)) for _ in consumers]
    cpu = time.process_time()

    async def read(consumer: Consumer, tally: _Tally) -> None:
        seen = tally.seen
        last_arrival = time.monotonic()
        while tally.unique < count:
            now = time.monotonic()
            if now > deadline:
                return
            # An at-most-once reader cannot tell "late" from "lost": quiet for idle_end_s means the round is over,
            # or for FIRST_MESSAGE_WAIT_S when nothing came at all (a SUB that joined too late, the publisher starting).
            if idle_end_s is not None and now - last_arrival > (idle_end_s if tally.unique else max(idle_end_s, FIRST_MESSAGE_WAIT_S)):
                return
            # A durable system that stops delivering is a finding, not a reason to wait out the deadline: report what came.
            if stall_s is not None and now - last_arrival > stall_s:
                return
            batch = await consumer.next_batch(min(POLL_S, max(0.001, deadline - now)))
            if not batch:
                continue
            received = now_ns()
            last_arrival = time.monotonic()
            for data in batch:
                _kind, seq, scheduled = parse_payload(data)
                index = seq - base
                if index < 0 or index >= count:
                    tally.stale += 1
                    continue
                if seen[index]:
                    tally.duplicates += 1
                    continue
                seen[index] = 1
                tally.unique += 1
                if record_latency and index >= warmup:
                    recorder.record(received - scheduled)
            if not tally.first_ns:
                tally.first_ns = received
            tally.last_ns = received

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            link.send("progress", {"count": sum(tally.unique for tally in tallies)})

    reporter = asyncio.create_task(report_progress())
    try:
        await asyncio.gather(*(read(consumer, tally) for consumer, tally in zip(consumers, tallies, strict=True)))
    finally:
        reporter.cancel()
    return {
        "round_start_ns": round_start,
        "cpu_s": time.process_time() - cpu,
        "latency": recorder.to_bytes(),
        "subscriptions": {
            name: {"unique": t.unique, "duplicates": t.duplicates, "stale": t.stale, "first_ns": t.first_ns, "last_ns": t.last_ns}
            for name, t in zip(names, tallies, strict=True)
        },
    }
