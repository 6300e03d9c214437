"""The fault harness: a real workload, injected faults, and a check of the history.

In the manner of Jepsen: publishers (AsyncClient, in a thread of this process)
and consumers (one killable process per subscription, :mod:`tests.consumer_process`)
run against a real ``herald up`` while faults are injected one round at a time.
Every publish attempt, every acknowledged publish and every delivery is recorded;
at the end the history must show

- no acknowledged message missing from any subscription of its topic (at least once),
- no delivery of an id that was never published,

and it reports duplicates (deliveries beyond the first) and, per fault kind, the
longest time from the fault to the moment publishing and every subscription's
delivery had both moved past it (recovery).

Used by tests/test_faults.py (a short seeded run, and one run per fault kind)
and tests/test_soak.py (minutes of random rounds, ``-m soak``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients import AsyncClient, Client, HeraldError, PublishId
from clients._core import publish_call
from clients.protocol import IdSequence, shard_of
from tests.conftest import PROJECT_ROOT, HeraldSystem, topic_for_shard, wait_for

ACK_DEADLINE_S = 2.0
# SIGSTOP lasts longer than the ack deadline, so the frontend hands the stopped
# sender's deliveries out again only after it comes back, and the sender's own
# deadlines all pass while it is stopped.
STOP_SENDER_S = ACK_DEADLINE_S + 1.0
RECOVERY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0

FAULT_KINDS = (
    "kill_frontend",
    "kill_sender",
    "kill_metadata",
    "kill_proxy",
    "kill_all",
    "stop_sender",
    "kill_consumer",
    "graceful_restart",
)


def sequence_of(message_id: str) -> int:
    """Ids are ``p<publisher>-<sequence>``, or ``p<publisher>~<sequence in hex>`` from a PUBLISH ``sequence``
    (odd publishers); the sequence is global and increasing."""
    if "~" in message_id:
        return int(message_id.rsplit("~", 1)[1], 16)
    return int(message_id.rsplit("-", 1)[1])


@dataclass(frozen=True)
class SubscriptionSpec:
    topic: str
    name: str


@dataclass
class FaultRecord:
    kind: str
    target: str
    started_s: float
    recovery_s: float


@dataclass
class Report:
    seed: int
    rounds: int
    faults: list[FaultRecord]
    attempted: int
    acknowledged: int
    publish_errors: dict[str, int]
    client_resends: int
    deliveries: dict[str, int]
    duplicates: dict[str, int]
    missing: dict[str, int]
    unknown: dict[str, int]
    elapsed_s: float

    @property
    def duplicate_rate(self) -> float:
        delivered = sum(self.deliveries.values())
        return sum(self.duplicates.values()) / delivered if delivered else 0.0

    def longest_recovery(self) -> dict[str, float]:
        longest: dict[str, float] = {}
        for fault in self.faults:
            longest[fault.kind] = max(longest.get(fault.kind, 0.0), fault.recovery_s)
        return longest

    def summary(self) -> str:
        recovery = ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in sorted(self.longest_recovery().items()))
        return (
            f"seed {self.seed}: {self.rounds} fault rounds in {self.elapsed_s:.0f} s; published {self.attempted}, acknowledged {self.acknowledged}; "
            f"lost {sum(self.missing.values())}; unknown deliveries {sum(self.unknown.values())}; "
            f"duplicates {sum(self.duplicates.values())} of {sum(self.deliveries.values())} deliveries ({self.duplicate_rate:.2%}); "
            f"publish errors {self.publish_errors}; client resends {self.client_resends}; longest recovery: {recovery}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rounds": self.rounds,
            "elapsed_s": round(self.elapsed_s, 1),
            "attempted": self.attempted,
            "acknowledged": self.acknowledged,
            "publish_errors": self.publish_errors,
            "client_resends": self.client_resends,
            "deliveries": self.deliveries,
            "duplicates": self.duplicates,
            "duplicate_rate": self.duplicate_rate,
            "missing": self.missing,
            "unknown": self.unknown,
            "longest_recovery_s": self.longest_recovery(),
            "faults": [fault.__dict__ for fault in self.faults],
        }


class Publishers:
    """Several AsyncClients in one event loop (in a thread), each publishing small concurrent batches.

    A publish that fails (the client's deadline passed) is tried again with the
    same id, as an application would; the id is in ``attempted`` from its first
    send, in ``acked`` once any attempt succeeded. Even publishers publish each
    message with an id of its own (de-duplicated by ``D`` keys); odd ones send
    each batch as one PUBLISH with a ``sequence`` (de-duplicated by its record).
    """

    def __init__(self, endpoint: str, topics: list[str], *, count: int = 3, batch: int = 10, pause_s: float = 0.02, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.topics = topics
        self.count = count
        self.batch = batch
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self.sequence = itertools.count(1)
        self.attempted: dict[str, str] = {}  # id -> topic
        self.acked: set[str] = set()
        self.last_acked_sequence = 0
        self.last_sent_sequence = 0
        self.errors: Counter[str] = Counter()
        self.resends = 0  # requests the clients sent again by themselves (a reply lost in a fault)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publishers", daemon=True)
        self._failure: BaseException | None = None
        self._clients: list[AsyncClient] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s * 4 + 10)
        assert not self._thread.is_alive(), "publishers did not stop"
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by stop()
            self._failure = exc

    async def _main(self) -> None:
        await asyncio.gather(*(self._publisher(index) for index in range(self.count)))

    async def _publisher(self, index: int) -> None:
        async with AsyncClient(self.endpoint, timeout=self.timeout_s) as client:
            self._clients.append(client)
            for round_number in itertools.count():
                if self._stop.is_set():
                    return
                topic = self.topics[(index + round_number) % len(self.topics)]
                if index % 2:
                    await self._publish_sequence(client, index, topic)
                    continue
                ids = [f"p{index}-{next(self.sequence)}" for _ in range(self.batch)]
                with self.lock:
                    for message_id in ids:
                        self.attempted[message_id] = topic
                    self.last_sent_sequence = max(self.last_sent_sequence, sequence_of(ids[-1]))
                pending = ids
                while pending and not self._stop.is_set():
                    results = await asyncio.gather(
                        *(client.publish(topic, message_id.encode(), message_id=message_id) for message_id in pending), return_exceptions=True
                    )
                    failed = []
                    for message_id, result in zip(pending, results, strict=True):
                        if isinstance(result, PublishId):
                            with self.lock:
                                self.acked.add(message_id)
                                self.last_acked_sequence = max(self.last_acked_sequence, sequence_of(message_id))
                        elif isinstance(result, HeraldError):
                            self.errors[result.code] += 1
                            failed.append(message_id)
                        else:
                            raise result
                    pending = failed
                self.resends = sum(c.statistics().retries for c in self._clients)
                await asyncio.sleep(self.pause_s)

    async def _publish_sequence(self, client: AsyncClient, index: int, topic: str) -> None:
        """One batch as one PUBLISH with a ``sequence``, sent again whole until it is acknowledged."""
        numbers = [next(self.sequence) for _ in range(self.batch)]  # consecutive: nothing else runs between these
        sequence = IdSequence(f"p{index}", numbers[0])
        ids = [sequence.message_id(offset) for offset in range(self.batch)]
        with self.lock:
            for message_id in ids:
                self.attempted[message_id] = topic
            self.last_sent_sequence = max(self.last_sent_sequence, numbers[-1])
        call = publish_call(topic, [(message_id.encode(), None, None) for message_id in ids], sequence)
        while not self._stop.is_set():
            try:
                stored = await client._request(call)
            except HeraldError as error:
                self.errors[error.code] += 1
                continue
            assert [str(message_id) for message_id in stored] == ids, (stored, ids)
            with self.lock:
                self.acked.update(ids)
                self.last_acked_sequence = max(self.last_acked_sequence, numbers[-1])
            break
        self.resends = sum(c.statistics().retries for c in self._clients)
        await asyncio.sleep(self.pause_s)


class ConsumerProcess:
    """One subscription's consumer as a child process, restartable after a kill."""

    def __init__(self, endpoint: str, spec: SubscriptionSpec, out_path: Path, log_path: Path) -> None:
        self.endpoint = endpoint
        self.spec = spec
        self.out_path = out_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.consumer_process", self.endpoint, self.spec.topic, self.spec.name, str(self.out_path)],
                cwd=PROJECT_ROOT,
                env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def new_ids(self) -> list[str]:
        """Ids written since the last call (complete lines only)."""
        try:
            with open(self.out_path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode() for line in lines if line]


@dataclass
class FaultHarness:
    """Workload, faults and history for one running :class:`HeraldSystem`."""

    herald: HeraldSystem
    work_dir: Path
    seed: int = 1
    publishers: int = 3
    frontends: int = 2
    senders: int = 2
    rng: random.Random = field(init=False)
    specs: list[SubscriptionSpec] = field(init=False)
    received: dict[str, Counter[str]] = field(init=False)
    last_received_sequence: dict[str, int] = field(init=False)
    faults: list[FaultRecord] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # One topic per frontend, so every shard owns traffic; subscriptions spread over the senders.
        topics = [topic_for_shard("chaos.topic", shard, self.frontends) for shard in range(self.frontends)]
        per_topic = (2, 1)
        names = self._subscription_names(sum(per_topic[: len(topics)]))
        self.specs = [SubscriptionSpec(topic, next(names)) for topic, count in zip(topics, per_topic, strict=False) for _ in range(count)]
        self.received = {spec.name: Counter() for spec in self.specs}
        self.last_received_sequence = dict.fromkeys(self.received, 0)
        with Client(self.herald.endpoint) as client:
            for topic in topics:
                client.create_topic(topic, exist_ok=True)
            for spec in self.specs:
                # A short deadline so deliveries lost with a dead sender come back quickly.
                client.create_subscription(spec.topic, spec.name, exist_ok=True, ack_deadline=ACK_DEADLINE_S, backoff=(0.1, 0.5), max_attempts=1000)
        self.workload = Publishers(self.herald.endpoint, topics, count=self.publishers)
        self.consumers = {
            spec.name: ConsumerProcess(self.herald.endpoint, spec, self.work_dir / f"{spec.name}.ids", self.work_dir / f"{spec.name}.log")
            for spec in self.specs
        }

    def _subscription_names(self, count: int) -> Iterator[str]:
        """Names that take turns among the senders (a subscription's sender is shard_of(name))."""
        chosen = 0
        for n in itertools.count():
            name = f"chaos-sub-{n}"
            if shard_of(name, self.senders) == chosen % self.senders:
                chosen += 1
                yield name
                if chosen == count:
                    return

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        for consumer in self.consumers.values():
            consumer.start()
        self.workload.start()
        self._started = time.monotonic()
        self.wait_flowing()

    def wait_flowing(self, since: int = 0) -> None:
        """Until an ack and a delivery on every subscription of a message published after ``since``."""

        def flowing() -> bool:
            self.collect()
            with self.workload.lock:
                acked = self.workload.last_acked_sequence
            return acked > since and all(last > since for last in self.last_received_sequence.values())

        wait_for(flowing, timeout=RECOVERY_TIMEOUT_S, interval=0.05, message=f"publishing and every subscription past message {since}")

    def collect(self) -> None:
        for name, consumer in self.consumers.items():
            ids = consumer.new_ids()
            if ids:
                self.received[name].update(ids)
                self.last_received_sequence[name] = max(self.last_received_sequence[name], *map(sequence_of, ids))

    def run_rounds(self, kinds: list[str], *, steady_s: tuple[float, float] = (0.3, 1.0)) -> None:
        for kind in kinds:
            time.sleep(self.rng.uniform(*steady_s))
            self.inject(kind)

    def inject(self, kind: str) -> FaultRecord:
        """One fault; returns once the system has recovered from it."""
        with self.workload.lock:
            before = self.workload.last_sent_sequence
        started = time.monotonic()
        target = getattr(self, f"_{kind}")()
        self.wait_flowing(since=before)
        record = FaultRecord(kind, target, round(started - self._started, 2), round(time.monotonic() - started, 3))
        self.faults.append(record)
        print(f"fault {kind} on {target}: recovered in {record.recovery_s:.2f} s", flush=True)
        return record

    def finish(self) -> Report:
        """Stop publishing, wait for every acknowledged message to arrive everywhere, and check."""
        self.workload.stop()

        def missing() -> dict[str, int]:
            self.collect()
            return {name: count for name, count in self._missing().items() if count}

        with contextlib.suppress(AssertionError):
            wait_for(lambda: not missing(), timeout=DRAIN_TIMEOUT_S, interval=0.2, message="every acknowledged message delivered")
        for consumer in self.consumers.values():
            consumer.stop()
        self.collect()
        attempted = self.workload.attempted
        return Report(
            seed=self.seed,
            rounds=len(self.faults),
            faults=list(self.faults),
            attempted=len(attempted),
            acknowledged=len(self.workload.acked),
            publish_errors=dict(self.workload.errors),
            client_resends=self.workload.resends,
            deliveries={name: sum(counts.values()) for name, counts in self.received.items()},
            duplicates={name: sum(counts.values()) - len(counts) for name, counts in self.received.items()},
            missing=self._missing(),
            unknown={spec.name: sum(1 for i in self.received[spec.name] if attempted.get(i) != spec.topic) for spec in self.specs},
            elapsed_s=time.monotonic() - self._started,
        )

    def close(self) -> None:
        """Stop everything the harness started (safe after a failure)."""
        with contextlib.suppress(BaseException):
            self.workload.stop()
        for consumer in self.consumers.values():
            consumer.kill()

    def _missing(self) -> dict[str, int]:
        expected: dict[str, set[str]] = defaultdict(set)
        with self.workload.lock:
            for message_id in self.workload.acked:
                expected[self.workload.attempted[message_id]].add(message_id)
        return {spec.name: len(expected[spec.topic] - self.received[spec.name].keys()) for spec in self.specs}

    # ------------------------------------------------------------------ faults (each returns its target)

    def _kill_role(self, role: str, count: int) -> str:
        name = f"{role}-{self.rng.randrange(count)}" if count else role
        old_pid = self.herald.kill_child(name, signal.SIGKILL)
        self.herald.wait_restarted(name, old_pid)
        return name

    def _kill_frontend(self) -> str:
        return self._kill_role("frontend", self.frontends)

    def _kill_sender(self) -> str:
        return self._kill_role("sender", self.senders)

    def _kill_metadata(self) -> str:
        return self._kill_role("metadata", 0)

    def _kill_proxy(self) -> str:
        return self._kill_role("proxy", 0)

    def _kill_all(self) -> str:
        self.herald.kill_all()
        self.herald.start()
        return "launcher and every child"

    def _graceful_restart(self) -> str:
        assert self.herald.stop() == 0, self.herald.log_tail()
        self.herald.start()
        return "herald up (SIGTERM, then start)"

    def _stop_sender(self) -> str:
        name = f"sender-{self.rng.randrange(self.senders)}"
        pid = self.herald.kill_child(name, signal.SIGSTOP)
        try:
            time.sleep(STOP_SENDER_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        return name

    def _kill_consumer(self) -> str:
        name = self.rng.choice(sorted(self.consumers))
        self.consumers[name].kill()
        self.consumers[name].start()
        return f"consumer of {name}"
