"""Backlog benchmark: a large backlog for an offline subscription stays on disk.

``python -m bench.backlog [--messages 1000000] [--size 100] [--limit-mb 300] [--subscriptions 1]``

Publishes N messages to a topic whose subscriptions have no consumer, while
sampling the resident memory of every Herald process; then attaches one
consumer per subscription and measures how fast the backlog drains (every
message delivered and acknowledged with ``ack_nowait``). Meanwhile a probe
publishes one message every 10 ms to another topic of the same frontend, to
show how long the drain holds that frontend's other work. Exits 1 when a
process's peak memory passes ``--limit-mb``, so the bound is checked, not
just printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Self

from bench.harness import HeraldServer, LatencyRecorder, Result, exit_on_signals, finish, machine_description, now_ns, print_table, run_main
from clients import AsyncClient, Client
from clients.aio import run
from clients.protocol import shard_of

SAMPLE_INTERVAL_S = 0.2
PUBLISH_BATCH = 1000
PUBLISH_IN_FLIGHT = 4
PROBE_INTERVAL_S = 0.01
TOPIC = "backlog"


def resident_mb(pid: int) -> float:
    """The resident set size of a process, in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Background:
    """A thread running ``_run`` for the length of a ``with`` block; ``_stop`` is set when the block ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class MemorySampler(Background):
    """Samples every Herald child's RSS in the background and keeps each one's peak."""

    def __init__(self, server: HeraldServer) -> None:
        super().__init__()
        self.server = server
        self.peaks: dict[str, float] = {}

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            for name, pid in self.server.children().items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), resident_mb(pid))


async def publish_all(endpoint: str, topic: str, messages: int, size: int) -> float:
    payload = b"x" * size
    async with AsyncClient(endpoint, timeout=60.0) as client:
        started = time.perf_counter()
        sent = 0
        while sent < messages:
            batches = []
            for _ in range(PUBLISH_IN_FLIGHT):
                count = min(PUBLISH_BATCH, messages - sent)
                if count <= 0:
                    break
                batches.append(client.publish_batch(topic, [payload] * count))
                sent += count
            await asyncio.gather(*batches)
        return time.perf_counter() - started


def drain(endpoint: str, topic: str, subscription: str, messages: int) -> tuple[float, int]:
    seen: set[str] = set()
    deliveries = 0
    with Client(endpoint, timeout=60.0) as client, client.subscribe(topic, subscription) as consumer:
        started = time.perf_counter()
        while len(seen) < messages:
            message = consumer.receive(timeout=30)
            if message is None:
                raise RuntimeError(f"drain stalled after {len(seen)} of {messages} messages")
            deliveries += 1
            seen.add(message.id)
            message.ack_nowait()
        return time.perf_counter() - started, deliveries - len(seen)


async def drain_many(endpoint: str, topic: str, subscriptions: list[str], messages: int) -> tuple[float, int]:
    """Every subscription drained at once by one AsyncClient; (seconds, duplicate deliveries)."""
    async with AsyncClient(endpoint, timeout=60.0) as client:

        async def one(name: str) -> int:
            seen: set[str] = set()
            deliveries = 0
            async with client.subscribe(topic, name) as consumer:
                while len(seen) < messages:
                    message = await consumer.receive(timeout=30)
                    if message is None:
                        raise RuntimeError(f"drain of {name} stalled after {len(seen)} of {messages} messages")
                    deliveries += 1
                    seen.add(message.id)
                    message.ack_nowait()
            return deliveries - len(seen)

        started = time.perf_counter()
        duplicates = await asyncio.gather(*(one(name) for name in subscriptions))
        return time.perf_counter() - started, sum(duplicates)


class Probe(Background):
    """Publishes to another topic of the drained topic's frontend every PROBE_INTERVAL_S, recording each publish's latency."""

    def __init__(self, endpoint: str, topic: str) -> None:
        super().__init__()
        self.endpoint, self.topic = endpoint, topic
        self.latency = LatencyRecorder()

    def _run(self) -> None:
        with Client(self.endpoint, timeout=60.0) as client:
            while not self._stop.wait(PROBE_INTERVAL_S):
                started = now_ns()
                client.publish(self.topic, b"probe")
                self.latency.record(now_ns() - started)


def probe_topic(frontends: int) -> str:
    """A topic name owned by the same frontend as TOPIC."""
    owner = shard_of(TOPIC, frontends)
    return next(name for n in range(10_000) if shard_of(name := f"probe-{n}", frontends) == owner)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--limit-mb", type=float, default=300.0, help="peak RSS allowed per Herald process")
    parser.add_argument("--subscriptions", type=int, default=1, help="offline subscriptions of the topic, drained at once (default 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temporary data folder goes (not tmpfs)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_signals()
    with HeraldServer(work_dir=args.work_dir) as server:
        machine = machine_description(server.data_dir)
        names = ["offline"] if args.subscriptions == 1 else [f"offline-{n}" for n in range(args.subscriptions)]
        with Client(server.endpoint) as admin:
            probe = probe_topic(int(admin.info()["frontends"]))
            admin.create_topic(TOPIC)
            admin.create_topic(probe)
            for name in names:
                admin.create_subscription(TOPIC, name)
        with MemorySampler(server) as sampler:
            publish_s = asyncio.run(publish_all(server.endpoint, TOPIC, args.messages, args.size))
            after_publish = dict(sampler.peaks)
            with Probe(server.endpoint, probe) as probing:
                if len(names) == 1:
                    drain_s, duplicates = drain(server.endpoint, TOPIC, names[0], args.messages)
                else:
                    drain_s, duplicates = run(drain_many(server.endpoint, TOPIC, names, args.messages))
        peaks = sampler.peaks
    durability = "fsync: each publish acknowledged after the WAL fsync"
    results = [
        Result("backlog publish (AsyncClient publish_batch 1000 x 4 in flight)", "msg/s", args.messages / publish_s, args.messages, publish_s, durability),
        Result(
            "backlog drain to one consumer (receive + ack_nowait)"
            if len(names) == 1
            else f"backlog drain of {len(names)} subscriptions at once (deliveries; receive + ack_nowait)",
            "msg/s",
            args.messages * len(names) / drain_s,
            args.messages * len(names),
            drain_s,
            durability,
            extra={"duplicates": duplicates, "subscriptions": len(names)},
        ),
    ]
    probe_latency = probing.latency.summary()
    for label, value in (("p50", probe_latency.p50_us), ("max", probe_latency.max_us)):
        name = f"publish to another topic of that frontend during the drain, {label} (one every 10 ms)"
        results.append(Result(name, "us", value, len(probing.latency), drain_s, durability, latency=probe_latency))
    for name in sorted(peaks):
        results.append(
            Result(f"peak RSS {name}", "MiB", peaks[name], args.messages, publish_s + drain_s, "-", extra={"after_publish_mib": after_publish.get(name, 0.0)})
        )
    print_table(results)
    over = {name: peak for name, peak in peaks.items() if peak > args.limit_mb}
    finish("backlog", results, args, machine)
    if over:
        print(f"FAIL: peak memory over {args.limit_mb:g} MiB: {over}", file=sys.stderr)
        return 1
    print(f"every Herald process stayed under {args.limit_mb:g} MiB")
    return 0


if __name__ == "__main__":
    run_main(main)
