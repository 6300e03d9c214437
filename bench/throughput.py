"""Throughput of Herald against raw ZeroMQ, measured in one run on one machine.

Usage::

    python -m bench.throughput [--messages N] [--size 100] [--concurrency C] [--subscriptions 0,1,4,16] [--json PATH]

Figures (each with its ratio to the raw baseline of the same run):

a. raw pyzmq PUSH->PULL, 5-frame multipart shaped like a Herald message,
   between two processes: the ceiling of this machine (durability: none);
b. (subscriptions 0) durable publish with ``AsyncClient.publish``, C publishes in
   flight, from the first send to the last ack (every ack = fsync'd);
c. (subscriptions 0) durable publish with sync ``Client.publish_batch`` of 100;
d. (each subscriptions S > 0) publish -> deliver -> ack with S subscriptions,
   one sync consumer process each: msg/s per subscription and aggregate
   deliveries/s, from the publisher's first send until the last consumer
   acknowledged its last message.

Every role runs in its own process and is warmed up before the timer starts.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any, Final

from bench.harness import (
    DURABILITY_FSYNC,
    DURABILITY_NONE,
    CpuMeter,
    HeraldServer,
    LatencyRecorder,
    Result,
    Workers,
    exit_on_signals,
    finish,
    machine_description,
    parse_int_list,
    print_table,
    rate,
    run_main,
    stage,
)
from bench.workers import ACK_MODES, ACK_SYNC, async_publisher, batch_publisher, check_size, consumer, raw_pull, raw_push
from clients import Client
from clients.protocol import shard_of

DEFAULT_MESSAGES: Final = 20_000
DEFAULT_SIZE: Final = 100
DEFAULT_CONCURRENCY: Final = 1_000  # enough that coalescing fills PUBLISH requests; see clients.aio
DEFAULT_SUBSCRIPTIONS: Final = "0,1,4,16"
BATCH: Final = 100
RAW_MIN_MESSAGES: Final = 200_000  # the raw path runs ~250k msg/s: fewer messages would time mostly start-up
DEFAULT_TIMEOUT_S: Final = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help=f"timed messages per Herald figure (default {DEFAULT_MESSAGES})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"payload bytes (default {DEFAULT_SIZE})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help=f"AsyncClient publishes in flight (default {DEFAULT_CONCURRENCY})")
    parser.add_argument(
        "--subscriptions",
        type=parse_int_list,
        default=parse_int_list(DEFAULT_SUBSCRIPTIONS),
        help=f"comma-separated subscription counts; 0 = the publish-only figures (b, c) (default {DEFAULT_SUBSCRIPTIONS})",
    )
    parser.add_argument(
        "--ack",
        choices=ACK_MODES,
        default=ACK_SYNC,
        help="how consumers acknowledge: sync = ack() waits for the sender (default); nowait = ack_nowait(), batched and unconfirmed",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages before each timer (default: N/10, 100..2000)")
    parser.add_argument("--raw-messages", type=int, default=None, help=f"messages for the raw baseline (default: max(10 N, {RAW_MIN_MESSAGES}))")
    parser.add_argument("--raw-repeats", type=int, default=1, help="raw baseline passes, best one kept; use 3+ on a busy machine (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds any one phase may take (default {DEFAULT_TIMEOUT_S:.0f})")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temporary data folder goes (default: system temp; must not be tmpfs)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of bench/results/throughput-<timestamp>.json")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error(f"--messages {args.messages} must be at least 1")
    if args.raw_repeats < 1:
        parser.error(f"--raw-repeats {args.raw_repeats} must be at least 1")
    if args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency} must be at least 1")
    try:
        check_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.warmup is None:
        args.warmup = min(2_000, max(100, args.messages // 10))
    if args.raw_messages is None:
        args.raw_messages = max(10 * args.messages, RAW_MIN_MESSAGES)
    return args


# --------------------------------------------------------------------------- figures


def measure_raw(workers: Workers, args: argparse.Namespace) -> Result:
    """a. raw PUSH->PULL between two processes; the best of ``--raw-repeats`` passes (a ceiling: noise only lowers it)."""
    count = args.raw_messages
    warmup = max(args.warmup, 10_000)
    passes: list[tuple[float, float]] = []  # (msg/s, seconds)
    for _ in range(args.raw_repeats):
        puller = workers.spawn("raw-pull", raw_pull, count, warmup, False)
        endpoint = workers.expect([puller], "ready", args.timeout)["raw-pull"]
        pusher = workers.spawn("raw-push", raw_push, endpoint, count, warmup, args.size, 0.0)
        workers.expect([pusher], "ready", args.timeout)
        pusher.send("warm")
        workers.expect([pusher, puller], "warmed", args.timeout)
        pusher.send("go")
        sent = workers.expect([pusher], "done", args.timeout)["raw-push"]
        received = workers.expect([puller], "done", args.timeout)["raw-pull"]
        workers.join([pusher, puller])
        passes.append((rate(count, sent["start_ns"], received["end_ns"]), (received["end_ns"] - sent["start_ns"]) / 1e9))
    value, seconds = max(passes)
    return Result(
        name="raw pyzmq PUSH->PULL (5 frames)",
        unit="msg/s",
        value=value,
        count=count,
        seconds=seconds,
        durability=DURABILITY_NONE,
        extra={"frames": 5, "hwm": "100000 each side", "passes_msg_per_s": [round(r) for r, _ in passes]},
    )


def measure_publish_async(workers: Workers, admin: Client, endpoint: str, meter: CpuMeter, args: argparse.Namespace) -> Result:
    """b. AsyncClient.publish, C in flight, to a topic without subscriptions."""
    topic = "bench.publish.async"
    admin.create_topic(topic, exist_ok=True)
    publisher = workers.spawn("publisher", async_publisher, endpoint, topic, args.messages, args.warmup, args.size, args.concurrency)
    workers.expect([publisher], "ready", args.timeout)
    publisher.send("warm")
    workers.expect([publisher], "warmed", args.timeout)
    meter.start()
    publisher.send("go")
    done = workers.expect([publisher], "done", args.timeout)["publisher"]
    server_cpu = meter.stop()
    workers.join([publisher])
    ack = LatencyRecorder.from_bytes(done["ack_latency"]).summary()
    return Result(
        name=f"herald publish, AsyncClient, {args.concurrency} in flight",
        unit="msg/s",
        value=rate(args.messages, done["start_ns"], done["acked_ns"]),
        count=args.messages,
        seconds=(done["acked_ns"] - done["start_ns"]) / 1e9,
        durability=DURABILITY_FSYNC,
        extra={
            "publish_to_ack_p50_us": ack.p50_us,
            "publish_to_ack_p99_us": ack.p99_us,
            "publish_requests": done["client"]["requests"],
            "messages_per_request": args.messages / max(1, done["client"]["requests"]),
            "client": done["client"],
            "server_cpu_s": server_cpu,
            "client_cpu_s": {"publisher": round(done["cpu_s"], 3)},
        },
    )


def measure_publish_batch(workers: Workers, admin: Client, endpoint: str, meter: CpuMeter, args: argparse.Namespace) -> Result:
    """c. sync Client.publish_batch of BATCH messages, one batch in flight."""
    topic = "bench.publish.batch"
    admin.create_topic(topic, exist_ok=True)
    publisher = workers.spawn("batch-publisher", batch_publisher, endpoint, topic, args.messages, args.warmup, args.size, BATCH)
    workers.expect([publisher], "ready", args.timeout)
    publisher.send("warm")
    workers.expect([publisher], "warmed", args.timeout)
    meter.start()
    publisher.send("go")
    done = workers.expect([publisher], "done", args.timeout)["batch-publisher"]
    server_cpu = meter.stop()
    workers.join([publisher])
    return Result(
        name=f"herald publish_batch({BATCH}), sync Client, 1 batch in flight",
        unit="msg/s",
        value=rate(args.messages, done["start_ns"], done["acked_ns"]),
        count=args.messages,
        seconds=(done["acked_ns"] - done["start_ns"]) / 1e9,
        durability=DURABILITY_FSYNC,
        extra={"batch": BATCH, "client": done["client"], "server_cpu_s": server_cpu, "client_cpu_s": {"publisher": round(done["cpu_s"], 3)}},
    )


def balanced_names(prefix: str, count: int, senders: int) -> list[str]:
    """``count`` subscription names spread evenly over the senders (a subscription's sender is crc32(name) mod senders).

    Plain numbered names can all hash to one sender, which would measure one
    sender doing all the work while the other idles.
    """
    names: list[str] = []
    candidates = (f"{prefix}-{n}" for n in itertools.count())
    for index in range(count):
        names.append(next(name for name in candidates if shard_of(name, senders) == index % senders))
    return names


def measure_end_to_end(workers: Workers, admin: Client, endpoint: str, meter: CpuMeter, subscriptions: int, args: argparse.Namespace) -> list[Result]:
    """d. publish -> deliver -> ack with ``subscriptions`` subscriptions, one consumer process each."""
    topic = f"bench.e2e.{subscriptions}"
    admin.create_topic(topic, exist_ok=True)
    senders = len(admin.info()["endpoints"]["senders"])
    names = balanced_names(f"bench-e2e-{subscriptions}", subscriptions, senders)
    consumers = [workers.spawn(name, consumer, endpoint, topic, name, args.messages, args.warmup, False, args.ack) for name in names]
    publisher = workers.spawn("publisher", async_publisher, endpoint, topic, args.messages, args.warmup, args.size, args.concurrency)
    # Every subscription exists (consumers attached) before the first message: each must get all of them.
    workers.expect([*consumers, publisher], "ready", args.timeout)
    publisher.send("warm")
    workers.expect([publisher, *consumers], "warmed", args.timeout)
    meter.start()
    publisher.send("go")
    published = workers.expect([publisher], "done", args.timeout)["publisher"]
    consumed = workers.expect(consumers, "done", args.timeout)
    server_cpu = meter.stop()
    workers.join([publisher, *consumers])
    start = published["start_ns"]
    per_sub = {name: rate(args.messages, start, consumed[name]["last_ns"]) for name in names}
    last = max(done["last_ns"] for done in consumed.values())
    duplicates = sum(done["duplicates"] for done in consumed.values())
    common: dict[str, Any] = {
        "subscriptions": subscriptions,
        "subscriptions_per_sender": [sum(1 for name in names if shard_of(name, senders) == k) for k in range(senders)],
        "publish_msg_per_s": rate(args.messages, start, published["acked_ns"]),
        "duplicates": duplicates,
        "concurrency": args.concurrency,
        "ack_mode": args.ack,
        "server_cpu_s": server_cpu,
        "client_cpu_s": {"publisher": round(published["cpu_s"], 3), "consumers": round(sum(done["cpu_s"] for done in consumed.values()), 3)},
    }
    label = f"{subscriptions} subscription{'s' if subscriptions != 1 else ''}"
    acking = "ack" if args.ack == ACK_SYNC else "ack_nowait"
    return [
        Result(
            name=f"herald e2e publish->deliver->{acking}, {label}: per sub",
            unit="msg/s",
            value=statistics.fmean(per_sub.values()),
            count=args.messages,
            seconds=(last - start) / 1e9,
            durability=DURABILITY_FSYNC,
            extra={**common, "per_subscription_msg_per_s": per_sub, "slowest_msg_per_s": min(per_sub.values())},
        ),
        Result(
            name=f"herald e2e publish->deliver->{acking}, {label}: aggregate",
            unit="deliveries/s",
            value=rate(args.messages * subscriptions, start, last),
            count=args.messages * subscriptions,
            seconds=(last - start) / 1e9,
            durability=DURABILITY_FSYNC,
            extra=common,
        ),
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run every figure, print the table, write the JSON.

    Returns:
        The process exit code.
    """
    args = parse_args(argv)
    exit_on_signals()
    results: list[Result] = []
    with HeraldServer(work_dir=args.work_dir) as server, Workers() as workers:
        machine = machine_description(server.data_dir)
        if machine.get("data_dir_filesystem") == "tmpfs":
            print("[bench] warning: the data folder is on tmpfs, where fsync costs nothing; use --work-dir on a disk", file=sys.stderr)
        with stage(f"raw PUSH->PULL, {args.raw_messages} messages"):
            baseline = measure_raw(workers, args)
        meter = CpuMeter(server)
        with Client(server.endpoint, timeout=60.0) as admin:
            if 0 in args.subscriptions:
                with stage(f"publish (AsyncClient, {args.concurrency} in flight), {args.messages} messages"):
                    results.append(measure_publish_async(workers, admin, server.endpoint, meter, args))
                with stage(f"publish_batch({BATCH}), {args.messages} messages"):
                    results.append(measure_publish_batch(workers, admin, server.endpoint, meter, args))
            for count in (c for c in args.subscriptions if c > 0):
                with stage(f"end to end, {count} subscriptions, {args.messages} messages"):
                    results.extend(measure_end_to_end(workers, admin, server.endpoint, meter, count, args))
    for result in results:
        result.ratio = result.value / baseline.value
    results.insert(0, baseline)
    print_table(results)
    finish("throughput", results, args, machine)
    return 0


if __name__ == "__main__":
    run_main(main)
