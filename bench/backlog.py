"""Backlog benchmark: a large backlog for an offline subscription stays on disk.

``python -m bench.backlog [--messages 1000000] [--size 100] [--limit-mb 300]``

Publishes N messages to a topic whose only subscription has no consumer, while
sampling the resident memory of every Herald process; then attaches one
consumer and measures how fast the backlog drains (every message delivered and
acknowledged with ``ack_nowait``). Exits 1 when a process's peak memory passes
``--limit-mb``, so the bound is checked, not just printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

from bench.harness import HeraldServer, Result, exit_on_signals, finish, machine_description, print_table, run_main
from clients import AsyncClient, Client

SAMPLE_INTERVAL_S = 0.2
PUBLISH_BATCH = 1000
PUBLISH_IN_FLIGHT = 4


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


class MemorySampler:
    """Samples every Herald child's RSS in the background and keeps each one's peak."""

    def __init__(self, server: HeraldServer) -> None:
        self.server = server
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--limit-mb", type=float, default=300.0, help="peak RSS allowed per Herald process")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temporary data folder goes (not tmpfs)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_signals()
    with HeraldServer(work_dir=args.work_dir) as server:
        machine = machine_description(server.data_dir)
        with Client(server.endpoint) as admin:
            admin.create_topic("backlog")
            admin.create_subscription("backlog", "offline")
        with MemorySampler(server) as sampler:
            publish_s = asyncio.run(publish_all(server.endpoint, "backlog", args.messages, args.size))
            after_publish = dict(sampler.peaks)
            drain_s, duplicates = drain(server.endpoint, "backlog", "offline", args.messages)
        peaks = sampler.peaks
    durability = "fsync: each publish acknowledged after the WAL fsync"
    results = [
        Result("backlog publish (AsyncClient publish_batch 1000 x 4 in flight)", "msg/s", args.messages / publish_s, args.messages, publish_s, durability),
        Result(
            "backlog drain to one consumer (receive + ack_nowait)",
            "msg/s",
            args.messages / drain_s,
            args.messages,
            drain_s,
            durability,
            extra={"duplicates": duplicates},
        ),
    ]
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
