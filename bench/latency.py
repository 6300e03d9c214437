"""Open-loop latency of Herald against raw ZeroMQ at the same fixed rate.

Usage::

    python -m bench.latency [--rate 2000] [--seconds 10] [--size 100] [--json PATH]

A publisher process sends message k at ``t0 + k / rate`` whatever happens to
earlier messages, and writes that *scheduled* time into the payload. Latency is
``receive time - scheduled time``, so a stall anywhere (publisher, server,
consumer) shows up in the percentiles instead of silently slowing the sender
down (no coordinated omission). Both ends read CLOCK_MONOTONIC, one clock for
every process of the host.

Figures:

- raw pyzmq PUSH->PULL at the rate (5-frame messages; durability: none);
- Herald publish -> deliver: AsyncClient publishing on the schedule, one
  sync consumer process (``Client.subscribe``) acknowledging with
  ``ack_nowait()`` (``--ack sync``: each message before reading the next);
- Herald publish -> durable ack, measured at the publisher from the same
  scheduled times.

The first ``--warmup-seconds`` of traffic go through the same paths but are
not recorded.
"""

from __future__ import annotations

import argparse
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
    print_table,
    rate,
    run_main,
    stage,
)
from bench.workers import ACK_NOWAIT, ACK_SYNC, check_size, consumer, open_loop_publisher, raw_pull, raw_push
from clients import Client

DEFAULT_RATE: Final = 2_000.0
DEFAULT_SECONDS: Final = 10.0
DEFAULT_WARMUP_S: Final = 1.0
DEFAULT_SIZE: Final = 100
DEFAULT_MAX_IN_FLIGHT: Final = 100_000  # unacknowledged publishes before the pacer waits (and the wait shows as latency)
DEFAULT_TIMEOUT_S: Final = 300.0
UNIT: Final = "us p50"
KEPT_UP: Final = 0.95  # an achieved rate below this share of the schedule means the run measured a growing queue


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help=f"messages per second on the schedule (default {DEFAULT_RATE:g})")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"recorded seconds of traffic (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup-seconds", type=float, default=DEFAULT_WARMUP_S, help=f"unrecorded seconds first (default {DEFAULT_WARMUP_S:g})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"payload bytes (default {DEFAULT_SIZE})")
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, help=f"publishes awaiting their ack (default {DEFAULT_MAX_IN_FLIGHT})")
    parser.add_argument("--skip-raw", action="store_true", help="leave out the raw ZeroMQ baseline")
    parser.add_argument(
        "--ack",
        choices=[ACK_SYNC, ACK_NOWAIT],
        default=ACK_NOWAIT,
        help="consumer acks: nowait (batched, default, so acking does not hold the consumer back) or sync (one round trip each)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds any one phase may take beyond its schedule (default {DEFAULT_TIMEOUT_S:.0f})"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temporary data folder goes (default: system temp; must not be tmpfs)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of bench/results/latency-<timestamp>.json")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.warmup_seconds < 0:
        parser.error("--rate and --seconds must be positive, --warmup-seconds not negative")
    if args.max_in_flight < 1:
        parser.error(f"--max-in-flight {args.max_in_flight} must be at least 1")
    try:
        check_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    args.count = max(1, int(args.rate * args.seconds))
    args.warmup = int(args.rate * args.warmup_seconds)
    return args


def measure_raw(workers: Workers, args: argparse.Namespace) -> Result:
    """Raw PUSH->PULL on the same schedule."""
    timeout = args.seconds + args.warmup_seconds + args.timeout
    puller = workers.spawn("raw-pull", raw_pull, args.count, args.warmup, True)
    endpoint = workers.expect([puller], "ready", args.timeout)["raw-pull"]
    pusher = workers.spawn("raw-push", raw_push, endpoint, args.count, args.warmup, args.size, args.rate)
    workers.expect([pusher], "ready", args.timeout)
    pusher.send("warm")
    workers.expect([pusher, puller], "warmed", args.timeout)
    pusher.send("go")
    sent = workers.expect([pusher], "done", timeout)["raw-push"]
    received = workers.expect([puller], "done", timeout)["raw-pull"]
    workers.join([pusher, puller])
    latency = LatencyRecorder.from_bytes(received["latency"]).summary()
    lag = LatencyRecorder.from_bytes(sent["send_lag"]).summary()
    return Result(
        name=f"raw pyzmq PUSH->PULL latency @ {args.rate:g}/s",
        unit=UNIT,
        value=latency.p50_us,
        count=args.count,
        seconds=(received["end_ns"] - sent["start_ns"]) / 1e9,
        durability=DURABILITY_NONE,
        latency=latency,
        extra={"achieved_msg_per_s": rate(args.count, sent["start_ns"], received["end_ns"]), "send_lag_p50_us": lag.p50_us, "send_lag_p99_us": lag.p99_us},
    )


def measure_herald(workers: Workers, admin: Client, endpoint: str, meter: CpuMeter, args: argparse.Namespace) -> list[Result]:
    """Herald publish -> deliver (consumer side) and publish -> ack (publisher side) on the schedule."""
    topic, subscription = "bench.latency", "bench-latency"
    admin.create_topic(topic, exist_ok=True)
    timeout = args.seconds + args.warmup_seconds + args.timeout
    reader = workers.spawn("consumer", consumer, endpoint, topic, subscription, args.count, args.warmup, True, args.ack)
    publisher = workers.spawn("publisher", open_loop_publisher, endpoint, topic, args.rate, args.count, args.warmup, args.size, args.max_in_flight)
    workers.expect([reader, publisher], "ready", args.timeout)  # the subscription exists before the first message
    meter.start()
    publisher.send("go")
    workers.expect([reader], "warmed", timeout)
    published = workers.expect([publisher], "done", timeout)["publisher"]
    consumed = workers.expect([reader], "done", timeout)["consumer"]
    server_cpu = meter.stop()  # warm-up included: the run is one continuous schedule
    workers.join([reader, publisher])
    deliver = LatencyRecorder.from_bytes(consumed["latency"]).summary()
    to_frontend = LatencyRecorder.from_bytes(consumed["to_frontend"]).summary()
    from_frontend = LatencyRecorder.from_bytes(consumed["from_frontend"]).summary()
    ack = LatencyRecorder.from_bytes(published["ack_latency"]).summary()
    lag = LatencyRecorder.from_bytes(published["send_lag"]).summary()
    start = published["start_ns"]
    common: dict[str, Any] = {
        "target_msg_per_s": args.rate,
        "publisher_send_lag_p50_us": lag.p50_us,
        "publisher_send_lag_p99_us": lag.p99_us,
        "publish_errors": published["errors"],
        "last_publish_error": published["last_error"],
        "pacer_waited_for_in_flight_slot": published["pacer_blocked"],
        "server_cpu_s_incl_warmup": server_cpu,
    }
    return [
        Result(
            name=f"herald publish->deliver latency @ {args.rate:g}/s",
            unit=UNIT,
            value=deliver.p50_us,
            count=consumed["unique"],
            seconds=(consumed["last_ns"] - start) / 1e9,
            durability=DURABILITY_FSYNC,
            latency=deliver,
            extra={
                **common,
                "achieved_delivery_msg_per_s": rate(consumed["unique"], start, consumed["last_ns"]),
                "duplicates": consumed["duplicates"],
                # The frontend's accept time splits each delivery (wall clock, so ~us apart between processes).
                "scheduled_to_accepted_p50_us": to_frontend.p50_us,
                "scheduled_to_accepted_p99_us": to_frontend.p99_us,
                "accepted_to_delivered_p50_us": from_frontend.p50_us,
                "accepted_to_delivered_p99_us": from_frontend.p99_us,
                "consumer_cpu_s": round(consumed["cpu_s"], 3),
            },
        ),
        Result(
            name=f"herald publish->durable ack latency @ {args.rate:g}/s",
            unit=UNIT,
            value=ack.p50_us,
            count=args.count,
            seconds=(published["end_ns"] - start) / 1e9,
            durability=DURABILITY_FSYNC,
            latency=ack,
            extra={**common, "achieved_publish_msg_per_s": rate(args.count, start, published["end_ns"])},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the raw baseline and the Herald figures, print the table, write the JSON.

    Returns:
        The process exit code.
    """
    args = parse_args(argv)
    exit_on_signals()
    results: list[Result] = []
    baseline: Result | None = None
    with HeraldServer(work_dir=args.work_dir) as server, Workers() as workers:
        machine = machine_description(server.data_dir)
        if not args.skip_raw:
            with stage(f"raw PUSH->PULL at {args.rate:g}/s for {args.seconds:g} s"):
                baseline = measure_raw(workers, args)
        with Client(server.endpoint, timeout=60.0) as admin, stage(f"herald at {args.rate:g}/s for {args.seconds:g} s"):
            results.extend(measure_herald(workers, admin, server.endpoint, CpuMeter(server), args))
    if baseline is not None:
        for result in results:
            result.ratio = result.value / baseline.value if baseline.value else None
        results.insert(0, baseline)
    print_table(results)
    for result in results:
        for key, value in result.extra.items():
            if key.startswith("achieved_"):
                verdict = "kept up" if value >= KEPT_UP * args.rate else "FELL BEHIND: the latency above is mostly queueing"
                print(f"{result.name}: {key} = {value:,.0f} of {args.rate:,.0f} scheduled ({verdict})")
    finish("latency", results, args, machine)
    return 0


if __name__ == "__main__":
    run_main(main)
