"""The frontend role: validate, de-duplicate, persist, acknowledge, dispatch.

One frontend owns one RocksDB shard. A client publish is stored by the shard
that owns its topic (``shard_of(topic, frontends)``): a frontend that receives
a publish for another shard forwards it, and the owner replies through the
proxy directly. Keeping a topic in one shard makes the de-duplication window
exact (a retried publish lands where the first one did) and keeps per-topic
order.

Each pass of the poll loop drains every ready socket, validates what arrived,
writes all accepted messages in one WriteBatch with one fsync (group commit),
then replies to every publisher of the batch and dispatches to the senders.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import zmq

from broker.auth import TOKEN_HEADER, Authorizer
from broker.config import HEARTBEAT_INTERVAL_S, PEER_EXPIRY_S, HeraldConfig
from broker.metrics import SNAPSHOT_INTERVAL_S, CommitHistogram, SnapshotWriter
from broker.runtime import Hwm, LRUCache, StopFlag, Timer, announce_ready, configure_logging, drain, make_socket, tune_gc
from clients.protocol import (
    CLIENT_COMMANDS,
    LIST_LIMIT_MAX,
    NOBLOCK,
    PROTOCOL_VERSION,
    RELAY_ONLY_EXISTING_FIELD,
    RELAY_QUOTA_FIELD,
    SEQUENCE_SEPARATOR,
    SERVER_VERSION,
    Command,
    Frames,
    HeraldError,
    IdSequence,
    ProtocolError,
    PublishItem,
    check_admin_fields,
    check_name,
    decode,
    decode_attempted,
    decode_complete,
    decode_credit,
    decode_dead,
    decode_publish,
    encode,
    encode_error,
    encode_live,
    encode_ok,
    get_field,
    live_topic_frame,
    matches_filter,
    request_id_of,
    send_frames,
    shard_of,
    split_envelope,
    split_sequence_id,
)
from frontend.store import PURGE_CHUNK, DedupEntry, ShardStore, StorageError, StoredMessage, sequence_key
from metadata.link import MetadataLink

log = logging.getLogger("herald.frontend")

TOPIC_CACHE_ENTRIES: Final = 100_000
RETENTION_SWEEP_INTERVAL_S: Final = 1.0
PURGE_RETRY_S: Final = 5.0  # after a failed purge write (a full disk)
DISPATCH_SCAN_LIMIT: Final = 2000  # backlog entries read per subscription per pass
DISPATCH_PASS_LIMIT: Final = 2000  # ...and for all subscriptions together
# A DISPATCH message is cut at this many entries or this estimated header size,
# far below the protocol's MAX_HEADER_BYTES (4 MiB) that the sender enforces.
DISPATCH_MAX_ENTRIES: Final = 1000
DISPATCH_MAX_HEADER_BYTES: Final = 1 * 2**20
DISPATCH_MESSAGE_BYTES: Final = 100  # a message's JSON without its id, topic and attributes
DISPATCH_ENTRY_BYTES: Final = 50  # one [sub, index, attempt] entry
REFILL_FRACTION: Final = 4  # refill a backlog once a quarter of the window is free...
REFILL_MAX: Final = 256  # ...or this many slots, whichever is fewer
# Group commit limits: past GROUP_COMMIT_BYTES of messages waiting for the writer
# the loop stops taking client requests (they wait in ZeroMQ queues); past
# OVERLOAD_BYTES even forwarded publishes are refused with `unavailable`.
GROUP_COMMIT_BYTES: Final = 8 * 2**20
OVERLOAD_BYTES: Final = 32 * 2**20
# What a waiting message costs beyond its payload (its StoredMessage, id and reply
# entries: about 390 bytes measured), charged against the limits above so that
# a flood of empty payloads is bounded too: counted by payload alone, a pass
# took in 2,000 requests of 10,000 empty messages and held the loop for seconds.
MESSAGE_OVERHEAD_BYTES: Final = 512
# Publishes for another frontend's topic wait here while that frontend's queue is
# full. While the owner keeps taking them, FORWARD_WAITING_MAX waiting makes the
# loop stop taking client requests (back-pressure, in arrival order); once the
# owner has taken nothing for FORWARD_STALL_S (it is down or stuck) the waiting
# ones are refused with `unavailable` and this frontend serves its own topics on.
FORWARD_WAITING_MAX: Final = 64
FORWARD_STALL_S: Final = 1.0
FORWARD_RETRY_MS: Final = 2
# Every batch is written on the poll-loop thread (building and writing it
# holds the GIL, so another thread gained nothing there), and fsync'd there
# too (up to INLINE_SYNC_BYTES of payload and MESSAGE_OVERHEAD_BYTES per message). Handing the fsync to the writer thread and back costs
# two thread wake-ups and GIL hand-overs: under load the thread took 0.74 ms
# (p50) to start a 0.2 ms fsync, and a publisher's answer waited for both. With
# publishers keeping a few requests in flight, that wait is the throughput:
# fsyncing batches of more than 16 messages inline raised the end-to-end rate
# with one subscription by 8-16% (alternating runs), and the loop used less CPU
# per message. Only a slow disk, or a batch of more than INLINE_SYNC_BYTES of
# payload (whose fsync takes long enough to stall CREDIT and COMPLETE behind it),
# sends fsyncs to the thread.
INLINE_SYNC_BYTES: Final = 1024 * 1024
#
# A slow disk changes the plan. While one batch's fsync runs inline, the whole
# loop waits it out: a publish that arrives then is read, written and delivered
# only after that fsync. Once the median
# of recent fsyncs (FSYNCS_REMEMBERED, timed from the loop's side, so a
# thread's wait for the GIL is in them) reaches SLOW_FSYNC_S, every fsync goes
# to the writer thread, and the loop writes and delivers further batches while
# it runs, up to MAX_UNSYNCED_WRITES of them; one fsync then covers them all.
# With 1.5 ms added to every WAL fsync, publish->deliver at 2,000/s went from
# p50 2.9 ms, p99 4.6 ms to p50 1.3 ms, p99 2.9 ms (`python -m bench.latency
# --rate 2000`). With a fast disk the hand-overs cost more than they save:
# every fsync on the thread, pipelined, gave p99 2.1-3.3 ms against 1.5-2.2 ms.
SLOW_FSYNC_S: Final = 0.001
FSYNCS_REMEMBERED: Final = 9
MAX_UNSYNCED_WRITES: Final = 8
# Settled entries (COMPLETE) wait at most this many before the poll loop applies
# them even while publishes keep coming; a crash delivers them again.
SETTLES_WAITING_MAX: Final = 2_000
SETTLES_QUEUE_LIMIT: Final = 50_000  # applied at once, even within a pass, past this many (~4 MiB)
# After its fsync the writer thread must take the GIL back from a busy poll
# loop, which by default lets go only every 5 ms: that wait would be added to
# every commit. A shorter interval hands it over sooner (alternating runs of
# `python -m bench --scenarios fanout --fanout 1`: 20.8-23.3k against
# 17.8-21.2k deliveries/s, with the GIL released during the fsync as well).
GIL_SWITCH_INTERVAL_S: Final = 0.0005
SHUTDOWN_PURGE_S: Final = 2.0  # a graceful stop spends at most this long removing deleted backlogs
_CHANGE_COMMANDS: Final = frozenset({Command.TOPIC_CREATE, Command.TOPIC_DELETE, Command.SUB_CREATE, Command.SUB_DELETE})
_TOKEN_ONLY: Final = frozenset({TOKEN_HEADER})  # the one field every admin command may carry besides its own
_ADMIN_COMMANDS: Final = frozenset(
    {
        Command.TOPIC_CREATE,
        Command.TOPIC_DELETE,
        Command.TOPIC_LIST,
        Command.TOPIC_DESCRIBE,
        Command.SUB_CREATE,
        Command.SUB_DELETE,
        Command.SUB_LIST,
        Command.SUB_DESCRIBE,
    }
)


@dataclass
class PendingPublish:
    """An accepted publish waiting for the group commit that makes it durable."""

    envelope: list[bytes]
    request_id: bytes
    message_ids: list[str]
    duplicate: list[bool]
    # Ids answered "duplicate" because the write in flight carries them.
    relied_on: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CommitJob:
    """One group commit: what to write, and whom to answer once it is durable."""

    messages: list[StoredMessage]
    dedup: list[DedupEntry]
    replies: list[PendingPublish]
    ids: dict[tuple[str, str], str]
    after: list[Callable[[], None]]
    after_failure: list[Callable[[], None]]
    # Id-sequence records this write adds to: G key -> (flat (start, end) runs of numbers, remember until then).
    sequences: dict[bytes, tuple[list[int], int]] = field(default_factory=dict)
    plan: list[tuple[int, StoredMessage, int]] = field(default_factory=list)  # (subscription id, message, attempt 1)
    # Subscriptions with messages in this job that were not handed out: until
    # the job is durable, a backlog scan cannot see them, so it must not
    # conclude that such a subscription has caught up.
    left_on_disk: set[int] = field(default_factory=set)
    # (subscription id, seq) entries settled in the same write: originals of the dead-letter copies it carries.
    settles: list[tuple[int, int]] = field(default_factory=list)
    error: StorageError | None = None
    submitted_at: float = 0.0
    last_seq: int = 0  # the batch's highest seq, once written
    written: bool = False  # set by the writer thread once the job's fsync has returned (see CommitWriter.finished)


class CommitWriter:
    """Writes the shard's group commits on the poll-loop thread and fsyncs them there, or on a thread of their own (a slow disk, a batch over INLINE_SYNC_BYTES).

    :meth:`write` puts a job's batch in the WAL (not yet fsync'd). Then
    :meth:`sync_now` fsyncs it on the calling thread, or (a slow disk, see
    SLOW_FSYNC_S, or a large batch) :meth:`submit` hands the fsync to the writer thread. There it runs with the GIL released
    (``flush_wal``), so the poll loop keeps draining and validating meanwhile,
    and may write further batches: one fsync makes every batch written before
    it durable, so the thread takes all the jobs submitted by then and syncs
    them once. It signals completion on an inproc PAIR socket that the poll
    loop watches; jobs finish in the order they were written.
    """

    def __init__(self, store: ShardStore, context: zmq.Context[Any], name: str) -> None:
        self.store = store
        address = f"inproc://commit-{name}"
        self.done = context.socket(zmq.PAIR)
        self.done.bind(address)
        self._signal = context.socket(zmq.PAIR)
        self._signal.connect(address)
        self._jobs: queue.SimpleQueue[CommitJob | None] = queue.SimpleQueue()
        # Written jobs whose fsync has not been collected yet, oldest first. A
        # publish looks its ids up in each one's ``ids`` (usually one job, at
        # most MAX_UNSYNCED_WRITES): merging them into one map cost a dict insert
        # and a delete per message.
        self.in_flight: deque[CommitJob] = deque()
        # How long recent fsyncs took, inline or on the thread, and their median (see SLOW_FSYNC_S).
        self._fsync_seconds: deque[float] = deque(maxlen=FSYNCS_REMEMBERED)
        self.fsync_median_s = 0.0
        self._thread = threading.Thread(target=self._run, name=f"writer-{name}", daemon=True)
        self._thread.start()

    def write(self, job: CommitJob) -> None:
        """Put ``job`` in the WAL, not yet fsync'd; a failure lands in ``job.error``."""
        job.submitted_at = time.monotonic()
        try:
            # Without subscriptions left on disk every entry of the write is handed out: no set of them to build.
            handed_out = None if not job.left_on_disk else [(sub_id, message.seq) for sub_id, message, _ in job.plan]
            job.last_seq = self.store.write(
                job.messages, job.dedup, handed_out, every_entry_handed_out=handed_out is None, sequences=job.sequences, settles=job.settles
            )
        except StorageError as exc:
            job.error = exc

    def submit(self, job: CommitJob) -> None:
        """fsync the written ``job`` on the writer thread; :meth:`collect` it once ``done`` is readable."""
        self.in_flight.append(job)
        self._jobs.put(job)

    def sync_now(self, job: CommitJob) -> CommitJob:
        """fsync the written ``job`` on the calling thread (only while no job is in flight)."""
        self._sync([job])
        return job

    def _sync(self, jobs: list[CommitJob]) -> None:
        started = time.monotonic()
        try:
            self.store.make_durable(max(job.last_seq for job in jobs))
        except StorageError as exc:
            for job in jobs:
                job.error = exc
        # Only one thread syncs at a time (inline only while nothing is in flight).
        timings = self._fsync_seconds
        timings.append(time.monotonic() - started)
        self.fsync_median_s = sorted(timings)[len(timings) // 2]

    @property
    def disk_is_slow(self) -> bool:
        """Whether recent fsyncs took SLOW_FSYNC_S or more (their median): then writes do not wait for them."""
        return self.fsync_median_s >= SLOW_FSYNC_S

    def may_write(self) -> bool:
        """Whether the poll loop may write a batch now: nothing is in flight, or the disk is slow and there is room."""
        in_flight = len(self.in_flight)
        return not in_flight or (in_flight < MAX_UNSYNCED_WRITES and self.disk_is_slow)

    def collect(self) -> list[CommitJob]:
        """The jobs whose fsync has returned, oldest first (call when ``done`` is readable, or :attr:`finished`)."""
        try:
            while True:
                self.done.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        finished: list[CommitJob] = []
        in_flight = self.in_flight
        while in_flight and in_flight[0].written:
            finished.append(in_flight.popleft())
        return finished

    @property
    def finished(self) -> bool:
        """Whether the oldest job in flight is done: a plain read, cheap enough to ask between two requests."""
        in_flight = self.in_flight
        return bool(in_flight) and in_flight[0].written

    def wait(self) -> list[CommitJob]:
        """Block until the oldest job in flight is done; the jobs done by then (none if nothing is in flight)."""
        if not self.in_flight:
            return []
        while not self.in_flight[0].written:
            self.done.poll(50)
        return self.collect()

    def _run(self) -> None:
        stopping = False
        while not stopping and (job := self._jobs.get()) is not None:
            jobs = [job]
            # Everything submitted by now is written: one fsync makes all of it durable.
            while True:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                jobs.append(more)
            self._sync(jobs)
            for done in jobs:
                done.written = True  # before the signal: a poll loop woken by it must see the flag
            self._signal.send(b"")

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self.done.close(0)
        self._signal.close(0)


@dataclass
class SubscriptionCursor:
    """Dispatch state of one subscription in this shard (memory only).

    ``outstanding`` holds seqs handed to the sender and not yet settled; the
    sender's credit bounds it, so the rest of a backlog stays on disk.
    ``scanned_to`` is the highest seq already handed out or skipped, and
    ``backlog`` says whether entries after it may be waiting on disk.
    """

    sub_id: int
    sender: int
    window: int = 0
    outstanding: set[int] = field(default_factory=set)
    scanned_to: int = 0
    backlog: bool = True

    @property
    def free(self) -> int:
        return self.window - len(self.outstanding)

    def reset(self) -> None:
        self.outstanding.clear()
        self.scanned_to = 0
        self.backlog = True


@dataclass(slots=True)
class DispatchChunk:
    """The DISPATCH being filled for one sender: each message once, then one entry per subscription that gets it."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    index_of: dict[int, int] = field(default_factory=dict)  # seq -> its place in messages
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (subscription id, message index, attempt)
    size: int = 0

    def add_message(self, message: StoredMessage, size: int) -> int:
        """Put ``message`` in (``size``: its estimated share of the header); its index."""
        index = self.index_of[message.seq] = len(self.messages)
        self.messages.append({"seq": message.seq, "id": message.message_id, "topic": message.topic, "attributes": message.attributes, "ts": message.timestamp})
        self.payloads.append(message.payload)
        self.size += size
        return index


@dataclass
class SubscriptionListing:
    """A SUB_LIST read page by page: the ids so far, the name the next page starts after, and the
    first page's ``next_id`` (a subscription created while the pages come may be on none of them)."""

    ids: set[int] = field(default_factory=set)
    after: str | None = None
    below: int | None = None
    version: int | None = None  # metadata's change counter when the first page was made
    pages: int = 0


@dataclass
class SenderPeer:
    epoch: int = 0
    last_seen: float = 0.0
    silent: bool = False  # reported as "stopped answering", not heard from since


class FrontendServer:
    """The frontend role's poll loop and handlers."""

    def __init__(self, config: HeraldConfig, index: int) -> None:
        if not 0 <= index < config.frontends:
            raise ValueError(f"frontend index {index} is outside 0..{config.frontends - 1}")
        self.config = config
        self.index = index
        self.epoch = secrets.randbits(63)
        self.store = ShardStore(Path(config.data_dir) / f"shard-{index}", sync=config.durability == "fsync")
        self.auth = Authorizer(config.credentials, share=config.frontends)
        self.snapshots = SnapshotWriter(config.data_dir, f"frontend-{index}")
        self.commit_seconds = CommitHistogram()
        self.requests_by_command: Counter[str] = Counter()
        # Subscription names by id, learnt from topic lookups, to label the backlog
        # (a subscription this frontend has not looked up since it started shows as "id:N").
        self.sub_names: dict[int, str] = {}
        self.errors_by_code: Counter[str] = Counter()
        self.topics: LRUCache[str, dict[str, Any]] = LRUCache(TOPIC_CACHE_ENTRIES)
        self.context: zmq.Context[Any] = zmq.Context()
        hwm: Hwm = {"sndhwm": config.sndhwm, "rcvhwm": config.rcvhwm}
        requests: Hwm = {"sndhwm": config.sndhwm, "rcvhwm": config.request_hwm}
        self.backend = make_socket(self.context, zmq.DEALER, connect=config.proxy_backend_endpoint, **requests)
        self.control = make_socket(self.context, zmq.PULL, bind=config.frontend_control_endpoints[index], **requests)
        self.peers = {
            i: make_socket(self.context, zmq.PUSH, connect=endpoint, sndhwm=config.request_hwm, rcvhwm=config.rcvhwm)
            for i, endpoint in enumerate(config.frontend_control_endpoints)
            if i != index
        }
        self.senders = [make_socket(self.context, zmq.PUSH, connect=endpoint, **hwm) for endpoint in config.sender_intake_endpoints]
        self.metadata = MetadataLink(self.context, config, hwm)
        # XPUB rather than PUB: it hears the live feed's subscriptions, see _on_live_subscription.
        # Not connected when the proxy does not serve the live feed: nothing binds its intake
        # port then, and whatever else bound it would hear every message.
        self.live = make_socket(self.context, zmq.XPUB, connect=config.live_intake_endpoint if config.live_feed_served else None, **hwm)
        self.live_prefixes: dict[bytes, int] = {}
        self.stop = StopFlag()
        self.exit_code = 0
        self.meta_version = 0
        self.waiting_for_topic: dict[str, list[Callable[[dict[str, Any] | None], None]]] = {}
        self.batch_bytes = 0  # what batch_messages hold: payload bytes plus MESSAGE_OVERHEAD_BYTES each
        self.held_bytes = 0  # the same for publishes waiting for their topic's lookup
        self.forwards_waiting: dict[int, deque[tuple[float, list[bytes], list[bytes]]]] = {owner: deque() for owner in self.peers}
        self.forward_progress: dict[int, float] = dict.fromkeys(self.peers, 0.0)  # when each owner last took a forward
        self.batch_messages: list[StoredMessage] = []
        self.batch_dedup: list[DedupEntry] = []
        self.batch_replies: list[PendingPublish] = []
        self.batch_ids: dict[tuple[str, str], str] = {}
        self.batch_sequences: dict[bytes, tuple[list[int], int]] = {}
        self.batch_after: list[Callable[[], None]] = []
        self.batch_settles: list[tuple[int, int]] = []  # settled by the batch's own write (see CommitJob.settles)
        self.batch_after_failure: list[Callable[[], None]] = []
        self.dead_in_progress: set[tuple[int, int]] = set()
        self.unmaterialized: list[tuple[int, int, int]] = []  # taken-back implicit entries whose write failed (see _materialize)
        self.expired_in_sweep = 0  # messages the retention sweep under way has removed
        self.dispatch_turn = 0  # which ready subscription the next backlog pass starts with
        self.dispatch_more = False  # the last backlog pass stopped at DISPATCH_PASS_LIMIT
        self.purge_retry_at = 0.0  # monotonic time before which a failed purge is not tried again
        self.refused_writes = 0  # batches refused since the last write that succeeded
        self.subscription_list: Literal["asked", "wanted", "done"] = "asked"  # the SUB_LIST at start (see _on_subscription_list)
        self.list_again = False  # events were missed while a SUB_LIST was in flight: ask once more when it is answered
        self.closing = False
        self.writer = CommitWriter(self.store, self.context, f"shard-{index}")
        self.cursors: dict[int, SubscriptionCursor] = {}
        self.sender_peers = [SenderPeer() for _ in config.sender_intake_endpoints]
        self.counters: dict[str, int] = {
            "requests": 0,
            "errors": 0,
            "published": 0,
            # Of those, the messages whose id is an index key of its own (set by the caller), and those
            # whose id a PUBLISH sequence gave (kept as ranges: docs/operations.md says why it matters).
            "ids_indexed": 0,
            "ids_in_sequences": 0,
            "duplicates": 0,
            "forwarded": 0,
            "dispatched": 0,
            "dispatches_refused": 0,
            "completed": 0,
            "dead_lettered": 0,
            "commits": 0,
            "storage_failures": 0,
            "shed": 0,
            "purged": 0,
            "bad_control_messages": 0,
            "metadata_resyncs": 0,  # times missed metadata events cleared the topic cache and re-listed the subscriptions
        }

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self.metadata.send(Command.REGISTER, {"frontend": self.index, "version": self.meta_version})
        self._list_subscriptions()
        announce_ready("frontend", index=self.index, shard=self.store.last_seq, control=self.config.frontend_control_endpoints[self.index])
        timers = [
            Timer(HEARTBEAT_INTERVAL_S, self._heartbeat),
            Timer(SNAPSHOT_INTERVAL_S, self._write_snapshot),
            Timer(RETENTION_SWEEP_INTERVAL_S, self._sweep_retention),
        ]
        # While the batch waiting for the writer is full, client requests stay in
        # their ZeroMQ queues (back-pressure to the proxy and the clients), so the
        # loop polls without the backend rather than spinning on it.
        poller = zmq.Poller()
        full_poller = zmq.Poller()
        for sock in (self.control, *self.metadata.sockets, self.live, self.writer.done):
            poller.register(sock, zmq.POLLIN)
            full_poller.register(sock, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        try:
            while not self.stop.stopping:
                forwards_waiting = any(self.forwards_waiting.values())
                paused = self.waiting_bytes >= GROUP_COMMIT_BYTES or self._forwards_backed_up
                # With forwards waiting for room, look again soon: a peer's free slot raises no event here.
                # Likewise while a backlog pass stopped at its limit, a deleted backlog
                # is being purged or expired messages removed: one chunk per pass,
                # between requests.
                chunked_work = self.dispatch_more or self._purge_due or self.store.expiring
                timeout = 0 if chunked_work else FORWARD_RETRY_MS if forwards_waiting else 50
                ready = dict((full_poller if paused else poller).poll(timeout=timeout))
                if self.metadata.events in ready:
                    for event in self.metadata.drain_events():
                        self._on_metadata_event(event)
                if self.live in ready:
                    for frames in drain(self.live):
                        self._on_live_subscription(frames)
                if self.metadata.rpc in ready:
                    self.metadata.on_replies()
                # A pass also ends as soon as the writer is done, so that its replies
                # go out and the next batch goes in without waiting for the rest of
                # a burst: under load that wait was ~0.5 ms of a ~2.7 ms commit.
                writer = self.writer
                if self.control in ready:
                    for frames in drain(self.control, self.config.drain_burst_requests):
                        self._on_control(frames)
                        if self.waiting_bytes >= GROUP_COMMIT_BYTES or writer.finished:
                            break  # a pass must end for the writer to take the batch
                if self.backend in ready:
                    for frames in drain(self.backend, self.config.drain_burst_requests):
                        self._on_client_request(frames)
                        if self.waiting_bytes >= GROUP_COMMIT_BYTES or writer.finished or self._forwards_backed_up:
                            break
                if writer.done in ready or writer.finished:
                    for job in writer.collect():
                        self._finish_commit(job)
                if any(self.forwards_waiting.values()):
                    self._flush_forwards()
                self._commit_batch()
                # Settles wait while publishes are coming in or a write's replies are due:
                # in a closed loop of publishers, replying sooner is throughput. They are
                # applied in a pass without either, or once SETTLES_WAITING_MAX wait.
                store = self.store
                if store.settles_waiting and (store.settles_waiting >= SETTLES_WAITING_MAX or (self.backend not in ready and not writer.finished)):
                    store.apply_settles()
                self._dispatch_backlogs()
                if self._purge_due:
                    self._purge_deleted()
                if self.store.expiring:
                    self._sweep_retention()
                now = time.monotonic()
                for timer in timers:
                    timer.run_if_due(now)
                self.metadata.expire(now)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.closing = True
        # Drain: whatever was accepted is committed and acknowledged; requests
        # still waiting for metadata are refused cleanly.
        self.metadata.fail_all(HeraldError("unavailable", "frontend is shutting down; retry"))
        for waiting in self.forwards_waiting.values():
            for _, envelope, body in waiting:
                self._reply_error(envelope, request_id_of(body), HeraldError("unavailable", "frontend is shutting down; retry"))
            waiting.clear()
        self._commit_batch()
        while finished := self.writer.wait():
            for job in finished:
                self._finish_commit(job)  # submits the next batch, if any
        # What is left of a deleted backlog after this is purged at the next start.
        deadline = time.monotonic() + SHUTDOWN_PURGE_S
        while self._purge_due and time.monotonic() < deadline:
            self._purge_deleted()
        self.writer.close()
        for sock in (self.backend, self.control, self.live, *self.senders, *self.peers.values()):
            sock.close(linger=200)
        self.metadata.close()
        self.context.term()
        self.store.close()
        log.info("stopped")

    def _missed_events(self) -> None:
        """Events were missed (a SUB socket reconnecting to a restarted metadata): forget every cached
        lookup, and list the subscriptions again, which purges the backlogs of any deleted meanwhile
        (their deletion event, which names them, was among those missed).

        The list is safe to purge by: an entry for a subscription is stored only after a lookup reply
        that names it, and that reply travels on the same socket as the list's, behind it when the list
        was made before the subscription was.
        """
        if self.meta_version:  # not the first heartbeat after this frontend's start, which sets the version
            self.counters["metadata_resyncs"] += 1
        self.topics.clear()
        if self.subscription_list == "done":
            self._list_subscriptions()
        elif self.subscription_list == "asked":
            self.list_again = True  # the list in flight may have been made before the missed deletion

    def _list_subscriptions(self, listed: SubscriptionListing | None = None) -> None:
        """Ask for the subscription list: its first page, or the page after those ``listed`` so far."""
        self.subscription_list = "asked"
        listing = listed or SubscriptionListing()
        header: dict[str, Any] = {"limit": LIST_LIMIT_MAX} if listing.after is None else {"limit": LIST_LIMIT_MAX, "after": listing.after}
        self.metadata.call(Command.SUB_LIST, header, lambda reply: self._on_subscription_list(reply, listing), self._on_subscription_list_failed)

    def _on_subscription_list_failed(self, error: HeraldError) -> None:
        # A metadata that is down when this frontend starts must not leave the
        # orphaned backlogs until the next restart. Asked again on its next
        # heartbeat rather than at once: requests sent while it is stopped wait
        # in the socket, and would all be answered when it comes back.
        self.subscription_list = "wanted"
        if not self.closing:
            log.warning("metadata did not list the subscriptions (%s); asking again when it is back", error.message)

    def _on_subscription_list(self, reply: Frames, listing: SubscriptionListing) -> None:
        """Label the backlog metrics, and purge the backlogs of subscriptions deleted while this shard was not listening.

        A long list comes in pages. A subscription created while they come may be on none of them, but its
        id is at least the ``next_id`` of the first page: only backlogs of older ids can be orphans.
        """
        listed = reply.header.get("subscriptions")
        if reply.command is not Command.OK or not isinstance(listed, list):
            self._subscription_list_done()
            # Only a full list may decide that a backlog is an orphan: an error would make every backlog look like one.
            log.warning(
                "metadata did not list the subscriptions (%s); orphaned backlogs are not purged in this run", reply.header.get("message", reply.command.name)
            )
            return
        listing.pages += 1
        if listing.pages == 1:
            next_id, version = reply.header.get("next_id"), reply.header.get("version")
            listing.below = next_id if isinstance(next_id, int) else None
            listing.version = version if isinstance(version, int) else None
        listing.after = None
        for sub in listed:
            if not (isinstance(sub, dict) and isinstance(sub.get("id"), int) and isinstance(sub.get("name"), str)):
                listing.after = None  # an id it names may be left out: no verdict on orphans from this list
                break
            listing.ids.add(sub["id"])
            listing.after = self.sub_names[sub["id"]] = sub["name"]
        else:
            if reply.header.get("more") is not True:
                self._purge_listed_orphans(listing)
                return
        if listing.after is None or listing.below is None:  # pages need next_id: one may miss a new subscription
            self._subscription_list_done()
            log.warning("metadata's list of subscriptions had a malformed page; orphaned backlogs are not purged in this run")
            return
        self._list_subscriptions(listing)

    def _purge_listed_orphans(self, listing: SubscriptionListing) -> None:
        """Purge the backlogs of subscriptions the complete ``listing`` does not name."""
        # Messages accepted and not yet written hold entries too: their lookups were answered before this list.
        unwritten = (sub_id for message in self.batch_messages for sub_id in message.subscriptions)
        orphans = self.store.purge_orphans(listing.ids, unwritten, below=listing.below)
        if self.list_again and listing.version is not None and listing.version >= self.meta_version:
            self.list_again = False  # the gap seen meanwhile is older than this list: nothing to list again
        self._subscription_list_done()
        for sub_id in orphans:
            self.cursors.pop(sub_id, None)  # one a sender's credit created before this list came
        if orphans:
            log.info("purging the backlogs of %d deleted subscriptions (ids %s)", len(orphans), ", ".join(map(str, orphans[:10])))

    def _subscription_list_done(self) -> None:
        self.subscription_list = "done"
        if self.list_again:
            self.list_again = False
            self._list_subscriptions()

    @property
    def _purge_due(self) -> bool:
        return self.store.purge_runnable and time.monotonic() >= self.purge_retry_at

    def _purge_deleted(self, limit: int = PURGE_CHUNK) -> None:
        try:
            self.counters["purged"] += self.store.purge(limit)
        except StorageError as exc:
            # A full disk: the purges wait and try again, so the space they free comes back once there is room to write.
            self.counters["storage_failures"] += 1
            self.purge_retry_at = time.monotonic() + PURGE_RETRY_S
            log.error("could not remove the backlog of deleted subscriptions: %s; trying again in %.0f s", exc, PURGE_RETRY_S)

    def _write_snapshot(self) -> None:
        self.snapshots.write(
            {
                **self.statistics(),
                "commit_seconds": self.commit_seconds.snapshot(),
                "rocksdb_sst_bytes": self.store.property_int("rocksdb.total-sst-files-size"),
                "rocksdb_memtable_bytes": self.store.property_int("rocksdb.cur-size-all-mem-tables"),
            }
        )

    def _heartbeat(self) -> None:
        self.metadata.send(Command.EVENT_ACK, {"frontend": self.index, "version": self.meta_version})
        if self.unmaterialized:
            self._retry_materialize()
        cutoff = time.monotonic() - PEER_EXPIRY_S
        for sender_index, peer in enumerate(self.sender_peers):
            if peer.epoch and peer.last_seen < cutoff:
                log.warning("sender %d stopped answering; its deliveries will be handed out again", sender_index)
                peer.epoch = 0
                peer.silent = True
                for cursor in self.cursors.values():
                    if cursor.sender == sender_index:
                        self._reset_cursor(cursor)
                        cursor.window = 0

    def _sweep_retention(self) -> None:
        """One pass of the retention sweep; the loop runs the next one at once while ``store.expiring``."""
        try:
            removed = self.store.expire(int(time.time() * 1000))
        except StorageError as exc:
            self.counters["storage_failures"] += 1
            log.error("retention sweep failed: %s", exc)
            return
        if removed:
            self.expired_in_sweep += removed
            for cursor in self.cursors.values():
                cursor.backlog = True
        if self.expired_in_sweep and not self.store.expiring:
            log.info("retention removed %d expired messages", self.expired_in_sweep)
            self.expired_in_sweep = 0

    # ------------------------------------------------------------------ client requests

    def _reply(self, envelope: list[bytes], frames: list[bytes]) -> None:
        send_frames(self.backend, envelope + frames)

    def _reply_error(self, envelope: list[bytes], request_id: bytes, error: HeraldError) -> None:
        self.counters["errors"] += 1
        self.errors_by_code[error.code] += 1
        self._reply(envelope, encode_error(request_id, error))

    def _on_client_request(self, raw: list[bytes], *, forwarded: bool = False) -> None:
        envelope, body = split_envelope(raw)
        self.counters["requests"] += 1
        try:
            frames = decode(body, accept=CLIENT_COMMANDS)
            if not forwarded:
                self.requests_by_command[frames.command.name] += 1
            if frames.command in _ADMIN_COMMANDS:
                # Before _authorize adds a field of its own for metadata.
                check_admin_fields(frames.command, frames.header, _TOKEN_ONLY)
            self._authorize(frames, forwarded)
            self._handle_client_frames(envelope, body, frames)
        except HeraldError as error:
            self._reply_error(envelope, request_id_of(body), error)
        except Exception as exc:
            log.exception("internal error")
            self._reply_error(envelope, request_id_of(body), HeraldError("internal", f"{type(exc).__name__}: {exc}"))

    def _authorize(self, frames: Frames, forwarded: bool) -> None:
        """Refuse a request its credential may not make; charge a publish to its rate limits.

        A forwarded publish was checked and charged by the frontend that took it
        from the proxy; the owner checks it again (cheap) but does not charge it twice.
        """
        if self.auth.open or frames.command is Command.PING:
            return
        credential = self.auth.identify(frames.header)
        command = frames.command
        if command is Command.PUBLISH:
            self.auth.require(credential, "publish", check_name(get_field(frames.header, "topic", str), "topic"))
            if not forwarded:
                self.auth.charge_publish(credential, len(frames.payloads), sum(map(len, frames.payloads)))
        elif command is Command.SUB_CREATE and credential is not None and not credential.admin:
            # Subscribing to an existing subscription is allowed with subscribe
            # permission; metadata refuses to create or change one for it.
            self.auth.require(credential, "subscribe", check_name(get_field(frames.header, "topic", str), "topic"))
            frames.header[RELAY_ONLY_EXISTING_FIELD] = True
        elif command in _CHANGE_COMMANDS:
            self.auth.require(credential, "admin")

    def _handle_client_frames(self, envelope: list[bytes], body: list[bytes], frames: Frames) -> None:
        match frames.command:
            case Command.PUBLISH:
                self._on_publish(envelope, body, frames)
            case Command.PING:
                self._reply(envelope, encode_ok(frames.request_id, {"frontend": self.index}))
            case Command.INFO:
                self._reply(envelope, encode_ok(frames.request_id, self._info()))
            case Command.STATUS:
                self._reply(envelope, encode_ok(frames.request_id, self.statistics()))
            case command if command in _ADMIN_COMMANDS:
                self._relay_to_metadata(envelope, frames)
            case _:
                raise ProtocolError("unknown_command", f"unknown command {frames.command.name}")

    def _info(self) -> dict[str, Any]:
        config = self.config
        live = config.live_endpoint if config.live_feed_served else ""  # "": not served (see HeraldConfig.live_feed)
        return {
            "version": SERVER_VERSION,
            "protocol": PROTOCOL_VERSION,
            "frontend": self.index,
            "frontends": config.frontends,
            "durability": config.durability,
            "max_payload": config.max_payload_bytes,
            "endpoints": {
                "requests": config.client_endpoint,
                "live": live,
                "senders": [{"deliver": d, "ack": a} for d, a in zip(config.sender_deliver_endpoints, config.sender_ack_endpoints, strict=True)],
            },
            "live": live,
        }

    def statistics(self) -> dict[str, Any]:
        """A snapshot of this frontend's counters."""
        self.store.apply_settles()  # the backlog counts and "completed" include every COMPLETE received
        self.counters["completed"] = self.store.settled_total
        return {
            "frontend": self.index,
            "pid": os.getpid(),
            "last_seq": self.store.last_seq,
            "meta_version": self.meta_version,
            "topic_cache": self.topics.statistics(),
            "subscriptions_dispatching": len(self.cursors),
            "outstanding": sum(len(c.outstanding) for c in self.cursors.values()),
            "refused": dict(self.auth.refused),
            "requests_by_command": dict(self.requests_by_command),
            "backlog": {self.sub_names.get(sub_id, f"id:{sub_id}"): count for sub_id, count in (self.store.backlog or {}).items()},
            "purging": self.store.purging,
            "errors_by_code": dict(self.errors_by_code),
            **self.counters,
            "storage_failures": self.counters["storage_failures"] + self.store.settle_failures,
        }

    def _relay_to_metadata(self, envelope: list[bytes], frames: Frames) -> None:
        client_rid = frames.request_id

        def on_reply(reply: Frames) -> None:
            if reply.command is Command.OK:
                self._reply(envelope, encode_ok(client_rid, reply.header))
            else:
                # Passed on as metadata wrote it, and counted like the frontend's own errors.
                self.counters["errors"] += 1
                self.errors_by_code[str(reply.header.get("code", "unknown"))] += 1
                self._reply(envelope, encode(Command.ERROR, client_rid, reply.header))

        def on_failure(error: HeraldError) -> None:
            self._reply_error(envelope, client_rid, error)

        # The token stays here (metadata needs no secrets); quotas apply to clients.
        header = {key: value for key, value in frames.header.items() if key != TOKEN_HEADER}
        header[RELAY_QUOTA_FIELD] = True
        try:
            self.metadata.call(frames.command, header, on_reply, on_failure)
        except (TypeError, orjson.JSONEncodeError) as exc:
            # orjson parses deeper nesting than it will write back.
            raise HeraldError("invalid_header", f"the header cannot be relayed: {exc}") from None

    # ------------------------------------------------------------------ publish

    def _on_publish(self, envelope: list[bytes], body: list[bytes], frames: Frames) -> None:
        # Route on the topic alone; the owner validates the rest, once.
        owner = shard_of(check_name(get_field(frames.header, "topic", str), "topic"), self.config.frontends)
        if owner != self.index:
            self._forward(owner, envelope, body)
            return
        topic, items, sequence = decode_publish(frames, self.config.max_payload_bytes)
        cached = self.topics.get(topic)
        if cached is not None:
            self._accept_publish(envelope, frames.request_id, topic, items, sequence, cached)
            return
        # Held until metadata answers, and counted against the group-commit limit
        # meanwhile: nothing else ended a pass that read publishes for a topic not
        # yet looked up, and one took in 2,000 requests of 10,000 messages (GBs)
        # before the answer could be read.
        held = sum(len(item.payload) for item in items) + MESSAGE_OVERHEAD_BYTES * len(items)
        if self.waiting_bytes >= OVERLOAD_BYTES:
            # A paused loop still takes a forwarded publish per pass (the control
            # socket also carries CREDIT and COMPLETE): past this, refuse them.
            self.counters["shed"] += 1
            raise HeraldError("unavailable", f"frontend {self.index} has {self.waiting_bytes // 2**20} MiB waiting; retry")
        self.held_bytes += held

        def accept(info: dict[str, Any] | None) -> None:
            self.held_bytes -= held
            self._accept_publish(envelope, frames.request_id, topic, items, sequence, info)

        self._look_up_topic(topic, accept)

    def _forward(self, owner: int, envelope: list[bytes], body: list[bytes]) -> None:
        """Send a publish to the frontend that owns its topic, in arrival order.

        When the owner's queue is full the request waits here rather than being
        refused: a refusal would make every client race for the next free slot,
        and a flooding client wins races. A stalled owner is another matter:
        see FORWARD_STALL_S.
        """
        waiting = self.forwards_waiting[owner]
        if not waiting and self._send_forward(owner, envelope, body):
            return
        if len(waiting) >= FORWARD_WAITING_MAX:
            raise HeraldError("unavailable", f"frontend {owner}, which owns this topic, is not keeping up; retry")
        waiting.append((time.monotonic(), envelope, body))

    def _send_forward(self, owner: int, envelope: list[bytes], body: list[bytes]) -> bool:
        try:
            send_frames(self.peers[owner], encode(Command.FORWARD, b"", {"envelope": len(envelope)}, envelope + body), NOBLOCK)
        except zmq.Again:
            return False
        self.counters["forwarded"] += 1
        self.forward_progress[owner] = time.monotonic()
        return True

    def _flush_forwards(self) -> None:
        now = time.monotonic()
        for owner, waiting in self.forwards_waiting.items():
            while waiting and self._send_forward(owner, waiting[0][1], waiting[0][2]):
                waiting.popleft()
            if waiting and now - max(self.forward_progress[owner], waiting[0][0]) > FORWARD_STALL_S:
                # The owner is down or stuck: say so rather than hold the clients (or this loop).
                error = HeraldError("unavailable", f"frontend {owner}, which owns this topic, took nothing for {FORWARD_STALL_S:g} s; retry")
                for _, envelope, body in waiting:
                    self._reply_error(envelope, request_id_of(body), error)
                waiting.clear()

    @property
    def waiting_bytes(self) -> int:
        """What the publishes not yet written hold (payload plus MESSAGE_OVERHEAD_BYTES each), looked up or not."""
        return self.batch_bytes + self.held_bytes

    @property
    def _forwards_backed_up(self) -> bool:
        """True while some owner is slow but alive: then wait for it instead of reading more requests."""
        now = time.monotonic()
        return any(
            len(waiting) >= FORWARD_WAITING_MAX and now - self.forward_progress[owner] <= FORWARD_STALL_S for owner, waiting in self.forwards_waiting.items()
        )

    def _with_topic(self, topic: str, then: Callable[[dict[str, Any] | None], None]) -> None:
        """Run ``then`` with the topic's lookup (topic and subscriptions), from cache or metadata."""
        cached = self.topics.get(topic)
        if cached is not None:
            then(cached)
            return
        self._look_up_topic(topic, then)

    def _look_up_topic(self, topic: str, then: Callable[[dict[str, Any] | None], None]) -> None:
        """Ask metadata for a topic the cache does not hold; ``then`` runs with the answer (see :meth:`_with_topic`)."""
        waiters = self.waiting_for_topic.get(topic)
        if waiters is not None:
            waiters.append(then)
            return
        self.waiting_for_topic[topic] = [then]
        asked_at_version = self.meta_version

        def on_reply(reply: Frames) -> None:
            waiting = self.waiting_for_topic.pop(topic, [])
            if self.meta_version != asked_at_version:
                # A change arrived while we asked: the answer may predate it, so ask again.
                for waiter in waiting:
                    self._with_topic(topic, waiter)
                return
            if reply.command is not Command.OK:
                error = HeraldError.from_header(reply.header)
                for waiter in waiting:
                    self._safely(waiter, None, error)
                return
            info = reply.header
            self.topics.put(topic, info)
            for sub in info.get("subscriptions") or ():
                self.sub_names[int(sub["id"])] = str(sub["name"])
            for waiter in waiting:
                self._safely(waiter, info, None)

        def on_failure(error: HeraldError) -> None:
            for waiter in self.waiting_for_topic.pop(topic, []):
                self._safely(waiter, None, error)

        self.metadata.call(Command.LOOKUP_TOPIC, {"name": topic}, on_reply, on_failure)

    @staticmethod
    def _safely(waiter: Callable[[dict[str, Any] | None], None], info: dict[str, Any] | None, error: HeraldError | None) -> None:
        # A waiter gets the lookup, or None plus an error it reports itself.
        if error is not None:
            waiter({"error": error})
        else:
            waiter(info)

    def _accept_publish(
        self, envelope: list[bytes], request_id: bytes, topic_name: str, items: list[PublishItem], sequence: IdSequence | None, info: dict[str, Any] | None
    ) -> None:
        try:
            if info is not None and "error" in info:
                raise info["error"]
            topic = info["topic"] if info else None
            if topic is None:
                raise HeraldError("topic_not_found", f"topic {topic_name!r} does not exist; create it first (publishing never creates topics)")
            settings = topic["settings"]
            limit = settings.get("max_payload")
            if limit is None:
                limit = self.config.max_payload_bytes
            for index, item in enumerate(items):
                if len(item.payload) > limit:
                    raise HeraldError(
                        "payload_too_large",
                        f"the payload of messages[{index}] is {len(item.payload)} bytes, over topic {topic_name!r}'s max_payload ({limit} bytes)",
                    )
            if self.batch_bytes >= OVERLOAD_BYTES:
                # Forwarded publishes bypass the back-pressure above; past this much
                # unwritten data they are refused rather than queued without bound.
                self.counters["shed"] += 1
                raise HeraldError(
                    "unavailable",
                    f"frontend {self.index} has {self.batch_bytes // 2**20} MiB waiting to be written; retry",
                )
        except HeraldError as error:
            self._reply_error(envelope, request_id, error)
            return
        now = time.time()
        expire_ms = int((now + settings["retention"]) * 1000)
        dedup_expire_ms = int((now + settings["dedup_window"]) * 1000)
        subscriptions = info["subscriptions"] if info else []
        # Without filters every message of the request goes to the same subscriptions:
        # one shared list (nothing changes a message's list after this).
        everyone = None if any(s["settings"].get("filter") for s in subscriptions) else [s["id"] for s in subscriptions]
        ids: list[str] = []
        duplicate: list[bool] = []
        relied_on: list[tuple[str, str]] = []
        # Ids are remembered per topic incarnation: a deleted and re-created
        # topic must not answer "duplicate" for ids of its predecessor.
        dedup_scope = f"{topic['id']}:{topic_name}"
        record_key: bytes | None = None
        accepted: list[int] = []  # with a sequence: the indexes of the messages this request stores
        if sequence is None:
            given = [item.message_id for item in items if item.message_id is not None]
            stored = self.store.find_duplicates(dedup_scope, given)
            # An id given as a sequence gives it (say one a client made, sent again as its own) may
            # be stored in that sequence's record, not under a D key.
            for given_id in given:
                parts = split_sequence_id(given_id) if SEQUENCE_SEPARATOR in given_id else None
                if parts is not None and self.store.stored_in_sequence(sequence_key(dedup_scope, parts[0]), parts[1], 1):
                    stored.add(given_id)
        else:
            # Ids of a sequence are looked up in its record, by number: no read per message (see frontend/store.py).
            record_key = sequence_key(dedup_scope, sequence.prefix)
            stored = {sequence.message_id(number - sequence.first) for number in self.store.stored_in_sequence(record_key, sequence.first, len(items))}
        # Per message, with bound methods in locals: this loop runs for every message published.
        # The (topic incarnation, id) keys of the writes in flight (a key is never in two of them: a
        # later publish of one is answered "duplicate" and not written again).
        in_flight_ids = [job.ids for job in self.writer.in_flight]
        batch_ids, next_seq = self.batch_ids, self.store.next_seq
        add_dedup, add_message = self.batch_dedup.append, self.batch_messages.append
        duplicates = added_bytes = 0
        for index, item in enumerate(items):
            message_id = item.message_id
            if message_id is not None:
                key = (dedup_scope, message_id)  # per incarnation, as on disk: a re-created topic starts afresh
                in_flight = False
                for job_ids in in_flight_ids:
                    if key in job_ids:
                        relied_on.append(key)  # stored only once that write succeeds: see _finish_commit
                        in_flight = True
                        break
                if in_flight or key in batch_ids or message_id in stored:
                    ids.append(message_id)
                    duplicate.append(True)
                    duplicates += 1
                    continue
                batch_ids[key] = message_id
                seq = next_seq()
                if record_key is None:
                    add_dedup(DedupEntry(dedup_scope, message_id, dedup_expire_ms, seq))
                else:
                    accepted.append(index)
            else:
                message_id = secrets.token_hex(12)
                seq = next_seq()
            subs = everyone if everyone is not None else [s["id"] for s in subscriptions if matches_filter(item.attributes, s["settings"].get("filter"))]
            add_message(StoredMessage(seq, topic_name, message_id, item.attributes, item.payload, now, subs, expire_ms))
            added_bytes += len(item.payload) + MESSAGE_OVERHEAD_BYTES
            ids.append(message_id)
            duplicate.append(False)
        self.counters["duplicates"] += duplicates
        if accepted and record_key is not None and sequence is not None:
            self._add_to_sequence(record_key, sequence.first, accepted, len(items), dedup_expire_ms)
        self.batch_bytes += added_bytes
        self.batch_replies.append(PendingPublish(envelope, request_id, ids, duplicate, relied_on))

    def _add_to_sequence(self, record_key: bytes, first: int, accepted: list[int], count: int, expire_ms: int) -> None:
        """Note in the batch that it stores numbers ``first`` + ``accepted`` (indexes of a request of ``count``) of an id sequence."""
        if len(accepted) == count:
            runs = [first, first + count]  # the common case: nothing of the request was a duplicate
        else:
            runs = []
            for index in accepted:
                if runs and runs[-1] == first + index:
                    runs[-1] += 1
                else:
                    runs += (first + index, first + index + 1)
        noted = self.batch_sequences.get(record_key)
        if noted is None:
            self.batch_sequences[record_key] = (runs, expire_ms)
        else:
            noted[0].extend(runs)
            self.batch_sequences[record_key] = (noted[0], max(noted[1], expire_ms))

    def _commit_batch(self) -> None:
        """Write the accumulated batch and start its delivery; its fsync follows (see CommitWriter).

        The requests that arrive while a batch is written and fsync'd (inline)
        make the next batch: that is the group commit. Once the disk is slow
        (see SLOW_FSYNC_S) the fsync runs on the writer thread, and the next
        batch is written and delivered at once, without waiting for that
        fsync; its publishers are answered once an fsync that started after
        its write has returned.
        """
        writer = self.writer
        if (not self.batch_replies and not self.batch_messages) or not writer.may_write():
            return
        job = CommitJob(
            self.batch_messages, self.batch_dedup, self.batch_replies, self.batch_ids, self.batch_after, self.batch_after_failure, self.batch_sequences
        )
        self.batch_messages, self.batch_dedup, self.batch_replies, self.batch_ids, self.batch_sequences = [], [], [], {}, {}
        self.batch_after, self.batch_after_failure = [], []
        if self.batch_settles:
            job.settles, self.batch_settles = self.batch_settles, []
        batch_bytes, self.batch_bytes = self.batch_bytes, 0
        job.plan, job.left_on_disk = self._plan_fast_dispatch(job.messages)
        writer.write(job)
        if job.error is not None:
            self._finish_commit(job)
            return
        inline = not writer.in_flight and not writer.disk_is_slow and batch_bytes <= INLINE_SYNC_BYTES
        if not inline:
            # The fsync starts now, and the job is in flight before any of it is
            # handed out: an entry taken back meanwhile (a refused DISPATCH) is then
            # marked as not yet visible to backlog scans (see _release).
            writer.submit(job)
        # Delivery starts once the batch is written, while its fsync runs: the WAL
        # is then in the OS page cache, which a SIGKILL of any process keeps. The
        # publishers are answered only after the fsync (see docs/architecture.md,
        # "Delivery starts before the fsync").
        if self.live_prefixes:
            self._publish_live(job.messages)
        self._send_dispatches(job.plan, fresh=True)
        if inline:
            self._finish_commit(writer.sync_now(job))

    def _finish_commit(self, job: CommitJob) -> None:
        if job.error is not None:
            self.counters["storage_failures"] += 1
            self.refused_writes += 1
            log.error("write of %d messages failed, refusing them: %s", len(job.messages), job.error)
            for sub_id, message, _ in job.plan:
                cursor = self.cursors.get(sub_id)
                if cursor is not None:
                    cursor.outstanding.discard(message.seq)
                    cursor.backlog = True
            if self.store.sync_failed is None:
                error = HeraldError("storage_failed", f"the shard could not write the batch ({job.error}); nothing was stored, retry later")
            else:
                # The batch may be on disk or not: a retry with the same ids is answered correctly either way.
                error = HeraldError("storage_failed", f"the shard could not fsync the batch ({job.error}); it is restarting, retry with the same message ids")
            for pending in job.replies:
                self._reply_error(pending.envelope, pending.request_id, error)
            # Later publishes told "duplicate" of an id in this failed write would
            # be a false acknowledgement: refuse them too (a retry is safe).
            still_good: list[PendingPublish] = []
            for pending in self.batch_replies:
                if any(key in job.ids for key in pending.relied_on):
                    self._reply_error(pending.envelope, pending.request_id, error)
                else:
                    still_good.append(pending)
            self.batch_replies = still_good
            for action in job.after_failure:
                action()
            if self.store.sync_failed is not None and not self.stop.stopping:
                log.critical(
                    "the WAL could not be fsync'd (%s); stopping so that a restart rebuilds shard %d from what is on disk", self.store.sync_failed, self.index
                )
                self.stop.stopping = True
                self.exit_code = 1
        else:
            if self.refused_writes:
                # The counterpart of the ERROR lines above, for whoever is watching a full disk.
                log.warning("the shard writes again, after %d refused batches", self.refused_writes)
                self.refused_writes = 0
            self.counters["commits"] += 1
            self.commit_seconds.observe(time.monotonic() - job.submitted_at)
            self.counters["published"] += len(job.messages)
            self.counters["ids_indexed"] += len(job.dedup)
            for runs, _ in job.sequences.values():
                self.counters["ids_in_sequences"] += sum(runs[1::2]) - sum(runs[0::2])
            for pending in job.replies:
                self._reply(pending.envelope, encode_ok(pending.request_id, {"ids": pending.message_ids, "duplicate": pending.duplicate}))
            if log.isEnabledFor(logging.DEBUG):
                # With HERALD_LOG_LEVEL=DEBUG a message can be followed by its shard:seq
                # from here through the sender's "delivered" and "acked" lines.
                for message in job.messages:
                    log.debug("stored id=%s seq=%d:%d topic=%s", message.message_id, self.index, message.seq, message.topic)
                for pending in job.replies:
                    log.debug("acknowledged request=%s ids=%s", pending.request_id.hex(), pending.message_ids)
            for action in job.after:
                action()
        self._commit_batch()

    def _publish_live(self, messages: list[StoredMessage]) -> None:
        # One MESSAGE per topic of the write, not one per message: a message of
        # several frames cost about as much to send as to store and fan out.
        prefixes = tuple(self.live_prefixes)
        batches: dict[str, tuple[list[dict[str, Any]], list[bytes]] | None] = {}
        for message in messages:
            topic = message.topic
            if topic not in batches:
                batches[topic] = ([], []) if live_topic_frame(topic).startswith(prefixes) else None
            batch = batches[topic]
            if batch is not None:
                batch[0].append({"id": message.message_id, "topic": topic, "attributes": message.attributes, "ts": message.timestamp})
                batch[1].append(message.payload)
        for topic, wanted in batches.items():
            if wanted is not None:
                for frames in encode_live(topic, *wanted):
                    send_frames(self.live, frames)

    def _on_live_subscription(self, raw: list[bytes]) -> None:
        # XPUB reports each subscribe (0x01 + prefix) and unsubscribe (0x00 + prefix)
        # from the live-feed proxy, so messages nobody listens to cost nothing.
        frame = raw[0]
        if not frame:
            return
        prefix = frame[1:]
        if frame[0] == 1:
            self.live_prefixes[prefix] = self.live_prefixes.get(prefix, 0) + 1
        elif frame[0] == 0 and prefix in self.live_prefixes:
            self.live_prefixes[prefix] -= 1
            if self.live_prefixes[prefix] <= 0:
                del self.live_prefixes[prefix]

    def _plan_fast_dispatch(self, messages: list[StoredMessage]) -> tuple[list[tuple[int, StoredMessage, int]], set[int]]:
        """Hand new messages straight to senders when their subscription has credit and no older backlog.

        Returns:
            The (subscription id, message, attempt 1) entries to dispatch once the
            write is made, and the subscriptions whose new messages stay on disk.
        """
        plan: list[tuple[int, StoredMessage, int]] = []
        left_on_disk: set[int] = set()
        for message in messages:
            for sub_id in message.subscriptions:
                cursor = self.cursors.get(sub_id)
                if cursor is None or cursor.backlog or cursor.free <= 0:
                    if cursor is not None:
                        cursor.backlog = True
                    left_on_disk.add(sub_id)
                    continue
                cursor.outstanding.add(message.seq)
                cursor.scanned_to = message.seq
                plan.append((sub_id, message, 1))
        return plan, left_on_disk

    # ------------------------------------------------------------------ dispatch to senders

    def _send_dispatches(self, entries: list[tuple[int, StoredMessage, int]], *, fresh: bool = False) -> list[tuple[int, int, int]]:
        """Send ``entries`` (subscription id, message, attempt) to their senders; the (sub, seq, attempt) of those sent (none listed when ``fresh``).

        One write fans out to (messages x subscriptions) entries. A DISPATCH
        carries each message (fields and body) once and one small entry per
        subscription that gets it, so a fan-out to many subscriptions is
        encoded, sent and decoded once per message, not once per delivery.
        Chunks stay well below MAX_HEADER_BYTES. ``fresh``: new messages of the
        write just made, implicit entries at attempt 1 already: nobody needs the list of
        those sent, so it is not built.
        """
        sent: list[tuple[int, int, int]] = []
        chunks: dict[int, DispatchChunk] = {}
        message_bytes_of: dict[int, int] = {}  # per seq
        cursors = self.cursors
        for sub_id, message, attempt in entries:
            cursor = cursors.get(sub_id)
            if cursor is None:
                continue  # the subscription was deleted while its write was in flight
            sender_index = cursor.sender
            chunk = chunks.get(sender_index)
            if chunk is None:
                chunk = chunks[sender_index] = DispatchChunk()
            index = chunk.index_of.get(message.seq)
            added = DISPATCH_ENTRY_BYTES
            if index is None:
                message_bytes = message_bytes_of.get(message.seq)
                if message_bytes is None:
                    # Ids are bounded, not escaped here: count each character at its worst (6 bytes).
                    # Attributes are encoded, not counted in characters: JSON escapes a control character to 6 bytes.
                    message_bytes = DISPATCH_MESSAGE_BYTES + 6 * len(message.message_id) + len(message.topic)
                    if message.attributes:
                        message_bytes += len(orjson.dumps(message.attributes))
                    message_bytes_of[message.seq] = message_bytes
                added += message_bytes
            if chunk.size + added > DISPATCH_MAX_HEADER_BYTES or len(chunk.entries) >= DISPATCH_MAX_ENTRIES:
                self._send_dispatch(sender_index, chunk, sent, fresh)
                chunk = chunks[sender_index] = DispatchChunk()
                index = None  # a new DISPATCH carries the message again
            if index is None:
                index = chunk.add_message(message, message_bytes_of[message.seq])
            chunk.entries.append((sub_id, index, attempt))
            chunk.size += DISPATCH_ENTRY_BYTES
        for sender_index, chunk in chunks.items():
            self._send_dispatch(sender_index, chunk, sent, fresh)
        return sent

    def _send_dispatch(self, sender_index: int, chunk: DispatchChunk, sent: list[tuple[int, int, int]], fresh: bool) -> None:
        # sender_epoch: a DISPATCH queued for a sender that then restarted reaches its successor, which
        # drops it; the new epoch's CREDIT makes this frontend hand those entries out again anyway.
        dispatch = {
            "shard": self.index,
            "epoch": self.epoch,
            "sender_epoch": self.sender_peers[sender_index].epoch,
            "meta_version": self.meta_version,
            "messages": chunk.messages,
            "entries": chunk.entries,
        }
        messages = chunk.messages
        try:
            send_frames(self.senders[sender_index], encode(Command.DISPATCH, b"", dispatch, chunk.payloads, packed=True), NOBLOCK)
            self.counters["dispatched"] += len(chunk.entries)
            if not fresh:
                sent.extend((sub_id, messages[index]["seq"], attempt) for sub_id, index, attempt in chunk.entries)
        except zmq.Again:
            # The sender is not draining; take the entries back, they stay on disk.
            # Nor may the next backlog pass follow at once: it would only spin.
            self.dispatch_more = False
            self.counters["dispatches_refused"] += len(chunk.entries)
            refused = [(sub_id, messages[index]["seq"]) for sub_id, index, _ in chunk.entries]
            if fresh:
                # New messages' entries are implicit entries of the write just made, at attempt 1
                # (see ShardStore.write), but only what a sender took is an attempt: they become
                # pending entries at attempt 0. Written by the heartbeat's retry, not now: the
                # write's fsync may still be to come, and a write that fails here (a full disk)
                # leaves RocksDB's WAL in error, which failed that fsync too and restarted the
                # frontend. Until then they stay implicit; a crash makes them pending entries.
                self.unmaterialized.extend((sub_id, seq, 0) for sub_id, seq in refused)
            else:
                # Pending entries already, whose count is raised only once a sender took them.
                # One write for the chunk: on a full disk, one failure to retry, not one per entry.
                self._materialize([(sub_id, seq, 1) for sub_id, seq in refused])
            for sub_id, seq in refused:
                self._rewind(sub_id, seq)

    def _release(self, sub_id: int, seq: int) -> None:
        """Take back a handed-out entry so the backlog scan hands it out again."""
        self._materialize([(sub_id, seq, 1)])
        self._rewind(sub_id, seq)

    def _rewind(self, sub_id: int, seq: int) -> None:
        """Make the backlog scan of ``sub_id`` go back to a taken-back entry (already written as a ``P`` key, or queued to be)."""
        cursor = self.cursors.get(sub_id)
        if cursor is not None:
            cursor.outstanding.discard(seq)
            cursor.scanned_to = min(cursor.scanned_to, seq - 1)
            cursor.backlog = True
            self._not_yet_scannable(sub_id, seq)

    def _reset_cursor(self, cursor: SubscriptionCursor) -> None:
        """Forget what was handed out (its sender is gone), so the backlog scan hands it all out again."""
        self._materialize([(cursor.sub_id, seq, 1) for seq in cursor.outstanding])
        cursor.reset()
        self._not_yet_scannable(cursor.sub_id, self.store.last_seq)

    def _materialize(self, entries: list[tuple[int, int, int]]) -> None:
        """Write taken-back entries that were implicit (see frontend/store.py) as pending entries, so a backlog scan finds them.

        If the write fails they stay implicit, where no scan sees them: they are
        kept for :meth:`_retry_materialize`, which the heartbeat runs until the
        write goes through.
        """
        try:
            self.store.materialize(entries)
        except StorageError as exc:
            self.counters["storage_failures"] += 1
            self.unmaterialized.extend(entries)
            log.error("could not write %d taken-back entries as pending entries; retrying with the heartbeat (every 0.5 s): %s", len(entries), exc)

    def _retry_materialize(self) -> None:
        entries, self.unmaterialized = self.unmaterialized, []
        self._materialize(entries)
        if not self.unmaterialized:
            for sub_id, seq, _ in entries:  # now on disk: the next backlog pass must look again
                cursor = self.cursors.get(sub_id)
                if cursor is not None and seq not in cursor.outstanding:
                    cursor.scanned_to = min(cursor.scanned_to, seq - 1)
                    cursor.backlog = True

    def _not_yet_scannable(self, sub_id: int, seq: int) -> None:
        """A backlog scan stops at the last durable seq: while ``seq`` is above it, keep the subscription's
        cursor from concluding that it has caught up until the write in flight is durable.

        Delivery starts before the fsync, so an entry of the batch being fsync'd
        can be taken back (a refused DISPATCH, a restarted sender, a failed
        dead-letter) before any scan can see it; without this the cursor would
        pass over it for good.
        """
        in_flight = self.writer.in_flight
        if in_flight and seq > self.store.durable_seq:
            in_flight[-1].left_on_disk.add(sub_id)  # the newest: the others are durable before it

    def _dispatch_backlogs(self) -> None:
        """Hand out stored backlog to subscriptions with credit: at most DISPATCH_PASS_LIMIT entries per pass.

        Many subscriptions draining at once (consumers back after an outage)
        would otherwise make one pass read every subscription's whole window:
        100 subscriptions of 2 000 credit each is 200 000 entries, a second or
        more in which nothing is published or settled. Past the limit the
        rest waits for the next pass, which follows at once (``dispatch_more``);
        each pass starts one subscription further on, so all of them progress.
        """
        self.dispatch_more = False
        ready = [
            cursor
            for cursor in self.cursors.values()
            # Refill a backlog in chunks, not one message per ack: each scan and
            # DISPATCH has a fixed cost that a larger batch shares.
            if cursor.backlog and cursor.free >= max(1, min(cursor.window // REFILL_FRACTION, REFILL_MAX))
        ]
        if not ready:
            return
        first = self.dispatch_turn % len(ready)
        self.dispatch_turn += 1
        budget = DISPATCH_PASS_LIMIT
        entries: list[tuple[int, StoredMessage, int]] = []
        for cursor in ready[first:] + ready[:first]:
            if budget <= 0:
                self.dispatch_more = True
                break
            wanted = min(cursor.free, DISPATCH_SCAN_LIMIT, budget)
            found = self.store.pending(cursor.sub_id, cursor.scanned_to, wanted)
            budget -= max(1, len(found))
            if len(found) < wanted and not any(cursor.sub_id in job.left_on_disk for job in self.writer.in_flight):
                cursor.backlog = False
            if found:
                cursor.scanned_to = found[-1][0]
            wanted_seqs = [(seq, previous) for seq, previous in found if seq not in cursor.outstanding]
            messages = self.store.read_messages([seq for seq, _ in wanted_seqs])  # cached: subscriptions of a topic share them
            for (seq, previous_attempts), message in zip(wanted_seqs, messages, strict=True):
                if message is None:
                    continue
                cursor.outstanding.add(seq)
                entries.append((cursor.sub_id, message, previous_attempts + 1))
        if entries:
            # Only what a sender took counts as an attempt: one refused because the
            # sender is not draining is handed out again later with the same number.
            sent = self._send_dispatches(entries)
            try:
                self.store.record_attempts(sent, known_pending=True)
            except StorageError as exc:
                self.counters["storage_failures"] += 1
                log.error("could not record attempts: %s", exc)

    # ------------------------------------------------------------------ control socket

    def _on_control(self, raw: list[bytes]) -> None:
        try:
            frames = decode(raw)
            match frames.command:
                case Command.FORWARD:
                    count = get_field(frames.header, "envelope", int)
                    if not 0 <= count <= len(frames.payloads):
                        raise ProtocolError("invalid_header", f"FORWARD envelope of {count} frames, but it carries {len(frames.payloads)}")
                    envelope, body = frames.payloads[:count], frames.payloads[count:]
                    self._on_client_request(envelope + body, forwarded=True)
                    self.counters["requests"] -= 1  # counted by the frontend that received it
                case Command.CREDIT:
                    self._on_credit(frames.header)
                case Command.COMPLETE:
                    self._on_complete(frames.header)
                case Command.ATTEMPTED:
                    self.store.record_attempts(decode_attempted(frames.header))
                case Command.DEAD:
                    self._on_dead(frames.header)
                case _:
                    raise ProtocolError("unknown_command", f"control socket does not take {frames.command.name}")
        except StorageError as exc:
            # An ATTEMPTED (or the settles applied before it) the shard could not
            # write: the entries stay on disk, so those messages are delivered again
            # after this frontend's next start (a lost attempt number only repeats).
            self.counters["storage_failures"] += 1
            log.error("could not write a control message to the shard: %s", exc)
        except Exception as exc:
            # Internal peers only, but a bad message must cost one message, never
            # the process, and each is parsed whole before any of it is applied.
            self.counters["bad_control_messages"] += 1
            log.error("dropped a bad control message: %s", exc if isinstance(exc, HeraldError) else repr(exc))

    def _on_credit(self, header: dict[str, Any]) -> None:
        sender_index, epoch, windows = decode_credit(header, len(self.sender_peers))
        peer = self.sender_peers[sender_index]
        if peer.silent:
            peer.silent = False
            log.warning("sender %d is answering again; handing its deliveries out again", sender_index)
        if peer.epoch != epoch:
            if peer.epoch:
                log.info("sender %d restarted; handing its deliveries out again", sender_index)
            for cursor in self.cursors.values():
                if cursor.sender == sender_index:
                    self._reset_cursor(cursor)
            peer.epoch = epoch
        peer.last_seen = time.monotonic()
        deleted = self.store.deleted_subscriptions
        for sub_id, window in windows.items():
            if sub_id in deleted:
                continue  # a sender that has not heard of the deletion yet; its backlog is being purged
            credited = self.cursors.get(sub_id)
            if credited is None:
                credited = self.cursors[sub_id] = SubscriptionCursor(sub_id, sender_index)
            credited.sender = sender_index
            credited.window = window
        for cursor in self.cursors.values():
            if cursor.sender == sender_index and cursor.sub_id not in windows:
                cursor.window = 0

    def _on_complete(self, header: dict[str, Any]) -> None:
        # The credit comes back at once; the store applies the settles when the
        # loop has nothing more urgent (see the poll loop and ShardStore.settle_later).
        entries = decode_complete(header)
        store = self.store
        store.settle_later(entries)
        if store.settles_waiting >= SETTLES_QUEUE_LIMIT:
            store.apply_settles()  # a long drain of COMPLETEs within one pass: the queue's memory stays bounded
        for sub_id, seq in entries:
            cursor = self.cursors.get(sub_id)
            if cursor is not None:
                cursor.outstanding.discard(seq)

    def _on_dead(self, header: dict[str, Any]) -> None:
        for sub_id, seq, attempts, dead_topic in decode_dead(header):
            self._ensure_topic(dead_topic, functools.partial(self._dead_letter, sub_id, seq, attempts))

    def _ensure_topic(self, topic: str, then: Callable[[dict[str, Any] | None], None]) -> None:
        cached = self.topics.get(topic)
        if cached is not None and cached.get("topic") is not None:
            then(cached)
            return

        def created(_reply: Frames) -> None:
            self.topics.discard(topic)
            self._with_topic(topic, then)

        def failed(error: HeraldError) -> None:
            log.error("could not create dead-letter topic %r: %s", topic, error)
            then({"error": error})

        self.metadata.call(Command.TOPIC_CREATE, {"name": topic, "exist_ok": True}, created, failed)

    def _dead_letter(self, sub_id: int, seq: int, attempts: int, info: dict[str, Any] | None) -> None:
        if (sub_id, seq) in self.dead_in_progress:
            return  # being settled: a repeated DEAD must not copy twice
        if info is None or "error" in info or info.get("topic") is None:
            # Hand it out again rather than hold its credit forever; the sender
            # delivers it once more and dead-letters it again.
            log.error("dead-letter topic unavailable for seq %d (%s); it will be handed out again", seq, info.get("error") if info else None)
            self._release(sub_id, seq)
            return
        original = self.store.read_message(seq)
        # Its entry, durable or not: delivery starts before the fsync, so a message
        # can reach its last attempt while its batch is still being fsync'd (the
        # copy is written after that batch in any case).
        if original is None or not self.store.holds(sub_id, seq):
            cursor = self.cursors.get(sub_id)
            if cursor is not None:
                cursor.outstanding.discard(seq)  # already settled or expired: nothing left to move
            return
        topic = info["topic"]
        now = time.time()
        attributes = {
            **original.attributes,
            "herald.original_id": original.message_id,
            "herald.original_topic": original.topic,
            "herald.attempts": str(attempts),
        }
        subs = [s["id"] for s in info["subscriptions"] if matches_filter(attributes, s["settings"].get("filter"))]
        copy = StoredMessage(
            self.store.next_seq(),
            topic["name"],
            original.message_id,
            attributes,
            original.payload,
            now,
            subs,
            int((now + topic["settings"]["retention"]) * 1000),
        )
        self.dead_in_progress.add((sub_id, seq))

        def settle_original() -> None:
            # Runs once the copy, and the original's settle written with it, are durable.
            self.dead_in_progress.discard((sub_id, seq))
            cursor = self.cursors.get(sub_id)
            if cursor is not None:
                cursor.outstanding.discard(seq)
            self.counters["dead_lettered"] += 1

        def retry_later() -> None:
            self.dead_in_progress.discard((sub_id, seq))
            self._release(sub_id, seq)

        # The copy goes through the writer like any publish, so appends stay in seq order. The original
        # is settled by the same write: a crash between two writes left both, and the original, handed
        # out again after the restart, was copied a second time.
        self.batch_messages.append(copy)
        self.batch_settles.append((sub_id, seq))
        self.batch_after.append(settle_original)
        self.batch_after_failure.append(retry_later)

    # ------------------------------------------------------------------ metadata

    def _on_metadata_event(self, event: dict[str, Any]) -> None:
        version = int(event.get("version", 0))
        if event.get("kind") == "heartbeat":
            if self.subscription_list == "wanted":
                self._list_subscriptions()
            if version != self.meta_version:
                # Missed events (or metadata restarted): trust nothing cached.
                self._missed_events()
                self.meta_version = version
            return
        if version != self.meta_version + 1:
            self._missed_events()
        else:
            self.topics.discard(str(event.get("topic")))
        for doomed in event.get("deleted_subscriptions", []):
            sub_id = int(doomed["id"])
            self.cursors.pop(sub_id, None)
            self.store.delete_subscription(sub_id)  # its backlog goes in chunks, see _purge_deleted
        self.meta_version = version
        self.metadata.send(Command.EVENT_ACK, {"frontend": self.index, "version": version})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frontend", description="Run one Herald frontend (one RocksDB shard).")
    parser.add_argument("--config", required=True, help="config file (JSON from the launcher, or TOML)")
    parser.add_argument("--index", type=int, required=True, help="which frontend (and shard) this is, from 0")
    args = parser.parse_args(argv)
    configure_logging(f"frontend-{args.index}")
    server = FrontendServer(HeraldConfig.load(args.config), args.index)
    tune_gc()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server.run()
    return server.exit_code
