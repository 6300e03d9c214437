"""One frontend's RocksDB shard, behind a narrow interface.

All keys and value encodings live here. Integers in keys are big-endian so
RocksDB's byte order is numeric order and a subscription's backlog is one
range scan.

======================================  =========================================
key                                     value
======================================  =========================================
``M`` seq                               message: u32 header length, JSON header
                                        (topic, id, attributes, ts, subs, exp =
                                        expiry in ms), raw payload
``P`` subscription id, seq              u32 attempts already handed out
``D`` topic id:topic NUL message id     u64 seq (de-duplication index, per
                                        topic incarnation)
``E`` expire_ms, first seq              u64 seqs of one batch that expire then
                                        (retention index, time-ordered)
``F`` expire_ms, last seq               JSON list of ``D`` keys that expire
                                        then (de-duplication expiry index)
``I`` first seq of a write              u64 pairs (seq, subscription id): the
                                        write's implicit entries (below)
``G`` topic id:topic NUL prefix         u64 expire_ms, then u64 pairs (start,
                                        end): the numbers stored of one id
                                        sequence (below), end exclusive
``H`` expire_ms, ``G`` key               empty: when to look at that sequence
                                        record again (its expiry index)
``Z``                                   u64 last seq used
``R``                                   u64 seqs reserved: none above it was
                                        ever handed out (see ShardStore.write)
======================================  =========================================

Id sequences. A PUBLISH may name its messages' ids by a prefix and the number
of its first message (docs/protocol.md, PUBLISH ``sequence``), as the Python
clients do for the ids they make. Such ids are remembered as ranges of numbers
in one ``G`` key per (topic incarnation, prefix), rewritten once per write that
adds to it, instead of a ``D`` key per message: a ``D`` key is a random key
that lives for the whole de-duplication window, and writing, flushing and
compacting those (and their ``F`` expiry lists) cost the owning frontend
1.8-1.9 us of CPU per message, about a fifth, in runs of a few minutes. A record lives until ``dedup_window``
after its last write; its ``H`` key brings it up for that check.

Implicit entries. An entry handed out as its message is written (the common
case: a consumer with room) gets no ``P`` key. The shard holds it in memory,
and one ``I`` key per write lists such entries. That spares a put and, worse,
a delete of a key still in the memtable (0.4-0.7 us, against 0.1 us for a put)
for every delivery. Whenever one must outlive its hand-out (a sender restarts
or refuses it, an attempt number must be kept, it is taken back) it is written
as a ``P`` key after all (:meth:`ShardStore.materialize`). An ``I`` key is
deleted once none of its entries is implicit any more. On open every entry
left in an ``I`` key whose message still exists becomes a ``P`` key (attempt
1, as it was handed out). With one subscription the message is deleted as the
entry is settled, so only unsettled entries are left; with several, an entry
settled while another subscription still held the message is left too, and
comes again after a crash (at least once: a crash also loses the settles not
yet applied, see :meth:`ShardStore.settle_later`).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, ReadOptions, WriteBatch, WriteOptions

log = logging.getLogger("herald.frontend.store")

# Pending entries of deleted subscriptions removed per poll-loop pass: about
# 3 ms of work when their bodies must be read back, so a purge never holds
# the loop for long (measured with frontend/store.py's purge on 100 000 entries).
PURGE_CHUNK: Final = 250
# Expired messages (and, separately, de-duplication ids) removed per retention
# pass, 10-20 ms of work; a sweep with more due runs again on the next
# poll-loop pass instead of holding the loop (200 000 messages expiring at
# once held it for 2.8 s in one pass).
EXPIRE_CHUNK: Final = 1000
# Pending entries counted at start, at most (about a second per million); see ShardStore.backlog.
BACKLOG_COUNT_LIMIT: Final = 5_000_000

_U64: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")
_PAIR: Final = struct.Struct(">QQ")
_MESSAGE: Final = b"M"
_PENDING: Final = b"P"
_DEDUP: Final = b"D"
_EXPIRY: Final = b"E"
_DEDUP_EXPIRY: Final = b"F"
_LAST_SEQ: Final = b"Z"
_RESERVED_SEQ: Final = b"R"
# Seqs reserved by one fsync'd write of the ``R`` key. Messages are handed out
# before their own fsync, so after losing the WAL's unsynced tail (a power
# loss, or an fsync that failed) ``Z`` may be below seqs a sender or consumer
# still holds; a new message must never take such a seq, or an ack of the lost
# one would settle it. A shard reopens above its reservation, so seqs jump by
# up to this much per restart, and one extra fsync per this many messages.
SEQ_RESERVATION: Final = 1_000_000
_IMPLICIT: Final = b"I"
_SEQUENCE: Final = b"G"
_SEQUENCE_EXPIRY: Final = b"H"
# Id-sequence records kept in memory (the rest are read from their G key when a
# PUBLISH names them): one per publishing client process and topic.
SEQUENCE_CACHE_ENTRIES: Final = 4096
# Ranges kept per record, at most. A client numbers each topic's messages
# upwards (clients/_core.py, reserve_ids), and a gap is left only by a request
# refused as a whole and never sent again, so a record is one range or a few;
# past this the lowest (oldest) ranges are forgotten: their numbers are no
# longer recognised as duplicates.
SEQUENCE_MAX_RANGES: Final = 256
_MESSAGE_KEY: Final = struct.Struct(">1sQ")  # _MESSAGE, seq
BODY_CACHE_BYTES: Final = 16 * 2**20  # decoded messages kept for backlog reads (see ShardStore._bodies)
BODY_OVERHEAD_BYTES: Final = 400  # a decoded message's objects, beyond its encoded bytes
SUBSCRIPTION_ID_BYTES: Final = 40  # one id in a decoded message's subscription list, not shared
# Cached bodies share one list per distinct subscription list (the messages of a
# topic mostly have the same one). The shared lists take at most this much in all,
# outside BODY_CACHE_BYTES, counted at SUBSCRIPTION_ID_BYTES an id (list slot, key
# tuple slot, int object) plus SHARED_LIST_BYTES a list; past it, a new list is not
# shared and its body pays for it. A deleted subscription's lists are dropped.
SHARED_SUBSCRIPTION_BYTES: Final = 4 * 2**20
SHARED_LIST_BYTES: Final = 200
# The in-memory fan-out map (see ShardStore.complete) is bounded by an estimate of
# its memory: about 200 bytes per message and 8 per subscription still holding it
# (measured with tracemalloc). A message settled after it left the map costs a
# read of its body and of its other subscriptions' entries: with ten
# subscriptions that made settling a backlog cost more than twice as much per
# delivery, so a subscription that fell behind by more than the map held (50,000
# messages, until the nineteenth round) fell further behind.
FANOUT_CACHE_BYTES: Final = 48 * 2**20  # 240,000 messages of one subscription, 50,000 of a hundred
FANOUT_ENTRY_BYTES: Final = 200
FANOUT_SLOT_BYTES: Final = 8
# RocksDB's memory is bounded on purpose (invariant: bounded memory): two
# memtables of WRITE_BUFFER_BYTES plus a block cache of BLOCK_CACHE_BYTES.
# At ~100k messages/s a 32 MiB memtable filled about every second, and its
# flush and the compactions after it ran beside the poll loop on a 2-core
# machine; a message settled within its memtable's life is not flushed at all.
# 64 MiB: five alternating S=1 runs, 79.7-102.7k against 75.4-100.9k msg/s
# (higher in four), the frontend at 7.2-8.4 against 7.8-10.0 us per message.
WRITE_BUFFER_BYTES: Final = 64 * 1024 * 1024
MEMTABLE_BLOOM_RATIO: Final = 0.05  # of the write buffer: 3.2 MiB of filter per 64 MiB memtable
MAX_WRITE_BUFFERS: Final = 2
BLOCK_CACHE_BYTES: Final = 32 * 1024 * 1024
# Table files (memtable flushes, compactions) are written back to disk as they
# grow, 1 MiB at a time, rather than all at their final fsync. On ext4's default
# data=ordered, a WAL fsync that commits the journal first writes out every
# dirty block of files in that transaction, a new table file's too: a group
# commit could wait for megabytes of someone else's data. RocksDB's tuning
# guide recommends 1 MiB. Measured here it is within the machine's noise: five
# alternating pairs of `python -m bench --scenarios fanout --fanout 1` gave end
# to end a median of 107.9k msg/s against 96.5k (higher in four pairs), three
# pairs of `--scenarios publish,fanout,latency` 86.2, 82.9 and 108.9k against
# 101.5, 84.5 and 107.4k.
TABLE_BYTES_PER_SYNC: Final = 1024 * 1024


class StorageError(Exception):
    """The shard refused a write; nothing in the failed batch is acknowledged."""


@dataclass(slots=True)
class StoredMessage:
    """A message as kept in the shard."""

    seq: int
    topic: str
    message_id: str
    attributes: dict[str, str]
    payload: bytes
    timestamp: float
    subscriptions: list[int]
    expire_ms: int


@dataclass(slots=True)
class _SequenceRecord:
    """The numbers stored of one id sequence, and until when they are remembered (see the module docstring)."""

    ranges: list[int]  # flat (start, end) pairs, end exclusive: sorted, disjoint, not touching
    expire_ms: int


def sequence_key(scope: str, prefix: str) -> bytes:
    """The ``G`` key of id sequence ``prefix`` in ``scope`` (topic id:topic name, a topic incarnation)."""
    return _SEQUENCE + scope.encode() + b"\0" + prefix.encode()


def merge_ranges(ranges: list[int], runs: list[int]) -> list[int]:
    """``ranges`` with the numbers of ``runs`` added (both flat (start, end) pairs); a new list."""
    if not ranges:
        pairs = sorted(zip(runs[0::2], runs[1::2], strict=True))
    elif len(runs) == 2 and runs[0] >= ranges[-2]:
        # The common case: a client's next numbers, at or after its last range.
        if runs[0] <= ranges[-1]:
            return [*ranges[:-1], max(ranges[-1], runs[1])]
        return [*ranges, *runs]
    else:
        pairs = sorted(zip(ranges[0::2] + runs[0::2], ranges[1::2] + runs[1::2], strict=True))
    merged: list[int] = []
    for start, end in pairs:
        if merged and start <= merged[-1]:
            merged[-1] = max(merged[-1], end)
        else:
            merged += (start, end)
    return merged


@dataclass(slots=True)
class _Purge:
    """Where the removal of one deleted subscription's backlog has got to."""

    after_seq: int  # its entries up to this seq are removed
    until_seq: int  # the highest seq that may carry it
    idle_at: int = -1  # finished_seq when a pass last found nothing left but writes still to come
    implicit_swept: bool = False  # its implicit entries are settled (once every write that may hand one out is over)


@dataclass(slots=True)
class _Settling:
    """Settles put in a write batch: how many, the subscriptions of those that existed, and how to undo
    the in-memory side if the batch is not written."""

    count: int
    existed: list[int]
    undo: Callable[[], None]


@dataclass(slots=True)
class DedupEntry:
    topic: str
    message_id: str
    expire_ms: int
    seq: int


def _message_key(seq: int) -> bytes:
    return _MESSAGE_KEY.pack(_MESSAGE, seq)


def _pending_key(sub_id: int, seq: int) -> bytes:
    return _PENDING + _PAIR.pack(sub_id, seq)


def _dedup_key(topic: str, message_id: str) -> bytes:
    return _DEDUP + topic.encode() + b"\0" + message_id.encode()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _shared_list_bytes(key: tuple[int, ...]) -> int:
    """What one shared subscription list is counted at (see SHARED_SUBSCRIPTION_BYTES)."""
    return SHARED_LIST_BYTES + SUBSCRIPTION_ID_BYTES * len(key)


def encode_message(message: StoredMessage) -> bytes:
    # A dict literal, not a method building it: this runs for every message stored.
    header = orjson.dumps(
        {
            "topic": message.topic,
            "id": message.message_id,
            "attributes": message.attributes,
            "ts": message.timestamp,
            "subs": message.subscriptions,
            "exp": message.expire_ms,
        }
    )
    return _U32.pack(len(header)) + header + message.payload


def decode_message(seq: int, raw: bytes) -> StoredMessage:
    (length,) = _U32.unpack_from(raw)
    header = orjson.loads(raw[4 : 4 + length])
    return StoredMessage(
        seq=seq,
        topic=header["topic"],
        message_id=header["id"],
        attributes=header["attributes"],
        payload=raw[4 + length :],
        timestamp=header["ts"],
        subscriptions=header["subs"],
        expire_ms=header["exp"],
    )


class ShardStore:
    """Messages, pending deliveries and indexes of one frontend shard.

    Args:
        path: the shard's folder.
        sync: fsync the WAL in :meth:`make_durable`, as :meth:`append` does (the durable default).
    """

    def __init__(self, path: Path, *, sync: bool = True) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        # Most de-duplication lookups miss: a bloom filter answers them without reading blocks.
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
        options.set_block_based_table_factory(table)
        options.set_write_buffer_size(WRITE_BUFFER_BYTES)
        # ...and so does a bloom filter on the memtable, where the recent ids are:
        # a MultiGet of 100 absent ids against 200k recent keys took 87 us
        # without it and 33 us with it (measured here with rocksdict).
        options.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
        options.set_memtable_whole_key_filtering(True)
        options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
        options.set_bytes_per_sync(TABLE_BYTES_PER_SYNC)
        self._db = Rdict(str(path), options)
        self._sync = sync
        self._lazy = WriteOptions()
        self._lazy.sync = False
        # seq -> the subscriptions whose entries of a recent message are still pending (see complete()).
        self._fanout: OrderedDict[int, list[int]] = OrderedDict()
        self._fanout_slots = 0  # the subscriptions in all its lists (see FANOUT_CACHE_BYTES)
        self._subscription_ids: dict[int, int] = {}  # one int object per subscription id (see _settle_unknown)
        # seq -> decoded message, for backlog reads: subscriptions of one topic
        # drain the same messages, each of which was read and decoded once per
        # subscription. Bounded by BODY_CACHE_BYTES, emptied of each message as
        # it is deleted.
        self._bodies: OrderedDict[int, tuple[StoredMessage, int]] = OrderedDict()  # seq -> (message, bytes counted)
        self._body_bytes = 0
        # tuple of a subscription list -> the one list cached bodies share (see _remember_body)
        self._shared_subscription_lists: dict[tuple[int, ...], list[int]] = {}
        self._shared_subscription_bytes = 0  # what those lists take (see SHARED_SUBSCRIPTION_BYTES)
        # (subscription id, seq) of each implicit entry (see the module docstring) ->
        # the first seq of its write, which names its I key; and per I key how many are left.
        self._implicit: dict[tuple[int, int], int] = {}
        self._implicit_left: dict[int, int] = {}
        # Id-sequence records by G key, the most recently used last (see SEQUENCE_CACHE_ENTRIES).
        self._sequences: OrderedDict[bytes, _SequenceRecord] = OrderedDict()
        # Settled entries not yet applied (see settle_later), and what applying them settled or failed.
        self._settles_waiting: list[tuple[int, int]] = []
        self.settled_total = 0
        self.settle_failures = 0
        self._materialize_left_at_open()
        raw_last, raw_reserved = self._db.get(_LAST_SEQ), self._db.get(_RESERVED_SEQ)
        self.last_seq: int = max(_U64.unpack(raw_last)[0] if raw_last else 0, _U64.unpack(raw_reserved)[0] if raw_reserved else 0)
        # Seqs up to here may be used (see SEQ_RESERVATION); a write past it reserves more first.
        self.reserved_seq: int = self.last_seq
        # The highest seq whose fsync has returned (make_durable): backlog scans stop there, so
        # they never read a message of a write whose fsync is still running (only the
        # fast dispatch, from memory, hands such a message out).
        self.durable_seq: int = self.last_seq
        # The highest seq whose append has ended, written or refused. Set after
        # durable_seq, so a reader that reads this first and durable_seq second
        # knows that every batch up to here that was written is visible below it.
        self.finished_seq: int = self.last_seq
        # The highest seq of a write that went through (durable or not yet).
        self.written_seq: int = self.last_seq
        # A refused write behind writes still being fsync'd, as (the highest seq
        # written before it, its own highest seq): it counts as over (finished_seq)
        # only once those are durable, or finished_seq would pass them.
        self._refused_behind: tuple[int, int] | None = None
        # Set when an fsync of the WAL failed. The batch it was for is already
        # readable (write, then sync), and the kernel may have dropped its pages,
        # so nothing written after it can be trusted to be durable either: every
        # later append is refused, and the frontend stops so that a restart
        # rebuilds the shard from what is really on disk.
        self.sync_failed: str | None = None
        # Pending entries per subscription (the backlog), counted once here and
        # then kept exact: +1 per fanned-out entry once its write returns
        # (count_appended), -1 per entry that existed when settled or expired.
        # Only the poll-loop thread touches it. Past BACKLOG_COUNT_LIMIT entries the
        # count at start would delay readiness too long: then there is no count.
        self.deleted_subscriptions: set[int] = set()
        self._purges: dict[int, _Purge] = {}
        # Set by expire() when more was due than one call removes.
        self.expiring = False
        self.backlog: dict[int, int] | None = self._count_backlog()

    def _count_backlog(self) -> dict[int, int] | None:
        counts: dict[int, int] = {}
        for seen, (key, _) in enumerate(self._scan(_PENDING, _prefix_end(_PENDING)), start=1):
            if seen > BACKLOG_COUNT_LIMIT:
                log.warning("more than %d pending entries: the backlog per subscription is not counted in this run", BACKLOG_COUNT_LIMIT)
                return None
            sub_id = _U64.unpack_from(key, 1)[0]
            counts[sub_id] = counts.get(sub_id, 0) + 1
        return counts

    def count_appended(self, seqs_of: dict[int, list[int]], implicit: list[tuple[int, int]] | None = None) -> None:
        """Add the pending entries of a written append, by subscription, to the backlog counts (:meth:`write` does).

        Args:
            seqs_of: the seqs of the entries written as ``P`` keys, by subscription.
            implicit: the (seq, subscription id) of the implicit ones.
        """
        backlog = self.backlog
        if backlog is None:
            return
        deleted = self.deleted_subscriptions
        for sub_id, seqs in seqs_of.items():  # one update per subscription, not per entry
            if sub_id not in deleted:  # a write that was in flight while its subscription was deleted
                backlog[sub_id] = backlog.get(sub_id, 0) + len(seqs)
        if implicit:
            for sub_id, count in Counter(sub_id for _, sub_id in implicit).items():
                if sub_id not in deleted:
                    backlog[sub_id] = backlog.get(sub_id, 0) + count

    def _existing(self, keys: list[tuple[int, int]]) -> list[int]:
        """The subscription ids of the entries among ``keys`` that exist now (read before deleting them)."""
        if not keys or self.backlog is None:
            return []
        values = self._get_many([_pending_key(sub_id, seq) for sub_id, seq in keys])
        implicit = self._implicit
        return [key[0] for key, value in zip(keys, values, strict=True) if value is not None or key in implicit]

    def _count_settled(self, sub_ids: list[int]) -> None:
        """Subtract entries that existed, once their deletion is written."""
        backlog = self.backlog
        if backlog is None:
            return
        for sub_id, count in Counter(sub_ids).items():  # one update per subscription, not per entry
            left = backlog.get(sub_id, 0) - count
            if left > 0:
                backlog[sub_id] = left
            else:
                backlog.pop(sub_id, None)

    def _materialize_left_at_open(self) -> None:
        """Make every implicit entry left in an ``I`` key whose message still exists a ``P`` key (attempt 1); drop the ``I`` keys."""
        index_keys: list[bytes] = []
        pairs: list[tuple[int, int]] = []  # (seq, subscription id)
        for key, value in self._scan(_IMPLICIT, _prefix_end(_IMPLICIT)):
            index_keys.append(key)
            numbers = [number for (number,) in _U64.iter_unpack(value)]
            pairs.extend(zip(numbers[0::2], numbers[1::2], strict=True))
        if not index_keys:
            return
        batch = WriteBatch(raw_mode=True)
        if pairs:
            bodies = self._get_many([_message_key(seq) for seq, _ in pairs])
            # One materialized while running may have a higher attempt number already: keep it.
            entries = self._get_many([_pending_key(sub_id, seq) for seq, sub_id in pairs])
            once = _U32.pack(1)
            for (seq, sub_id), body, entry in zip(pairs, bodies, entries, strict=True):
                if body is not None and entry is None:
                    batch.put(_pending_key(sub_id, seq), once)
        for key in index_keys:
            batch.delete(key)
        self._write(batch, self._lazy)
        if self._sync:
            self._sync_wal()

    def _forget_implicit(self, batch: WriteBatch, key: tuple[int, int], forgotten: list[tuple[tuple[int, int], int]]) -> None:
        """Stop holding the implicit entry ``key`` (subscription id, seq) in memory, if it is one, noting it in
        ``forgotten``; delete its write's ``I`` key (in ``batch``) once none is left."""
        first = self._implicit.pop(key, None)
        if first is None:
            return
        forgotten.append((key, first))
        left = self._implicit_left.get(first, 0) - 1
        if left > 0:
            self._implicit_left[first] = left
        else:
            self._implicit_left.pop(first, None)
            batch.delete(_IMPLICIT + _U64.pack(first))

    def _restore_implicit(self, forgotten: list[tuple[tuple[int, int], int]]) -> None:
        """Undo :meth:`_forget_implicit` for entries whose write failed: they are still implicit on disk."""
        for key, first in forgotten:
            self._implicit[key] = first
            self._implicit_left[first] = self._implicit_left.get(first, 0) + 1

    def settle_later(self, entries: list[tuple[int, int]]) -> None:
        """Queue settled (subscription id, seq) entries; :meth:`apply_settles` applies them (:meth:`complete`).

        Settling is clean-up (deleting the entry and, once no one needs it, the
        message): nothing waits on it, so the poll loop applies the queue when
        it has nothing more urgent to do, and publishes are answered sooner.
        Every method here that reads or changes pending entries or messages
        applies the queue first, so none of them sees a settled entry as
        pending. A crash loses the queue, and those messages are delivered
        again after the restart (at least once), as when a COMPLETE is lost.
        """
        self._settles_waiting.extend(entries)

    @property
    def settles_waiting(self) -> int:
        """Entries queued by :meth:`settle_later` and not applied yet."""
        return len(self._settles_waiting)

    def apply_settles(self) -> int:
        """Apply the entries queued by :meth:`settle_later`; the number settled (counted in :attr:`settled_total`).

        A failed write is counted in :attr:`settle_failures` and logged, not
        raised: those entries stay pending on disk and are delivered again
        after the next start, as with a failed :meth:`complete`.
        """
        entries = self._settles_waiting
        if not entries:
            return 0
        self._settles_waiting = []
        try:
            settled = self.complete(entries)
        except Exception as exc:  # a read inside complete() raises rocksdict's plain exceptions; this runs inside unrelated calls
            self.settle_failures += 1
            log.error("could not settle %d entries: %s; they are delivered again after the next start", len(entries), exc)
            return 0
        self.settled_total += settled
        return settled

    def is_implicit(self, sub_id: int, seq: int) -> bool:
        """Whether (subscription id, seq) is an implicit entry (see the module docstring)."""
        self.apply_settles()
        return (sub_id, seq) in self._implicit

    def materialize(self, entries: Iterable[tuple[int, int, int]]) -> int:
        """Write the implicit ones among (subscription id, seq, attempts) ``entries`` as ``P`` keys with that attempt number.

        For an entry that must outlive its hand-out: taken back, handed out
        again, or given an attempt number to keep. Others are left alone. Not
        fsync'd, like :meth:`record_attempts`.

        Returns:
            The number written.

        Raises:
            StorageError: the write failed; the entries stay implicit.
        """
        self.apply_settles()
        batch: WriteBatch | None = None
        forgotten: list[tuple[tuple[int, int], int]] = []
        implicit = self._implicit
        for sub_id, seq, attempts in entries:
            if (sub_id, seq) not in implicit:
                continue
            if batch is None:
                batch = WriteBatch(raw_mode=True)
            batch.put(_pending_key(sub_id, seq), _U32.pack(attempts))
            self._forget_implicit(batch, (sub_id, seq), forgotten)
        if batch is None:
            return 0
        try:
            self._write(batch, self._lazy)
        except StorageError:
            self._restore_implicit(forgotten)
            raise
        return len(forgotten)

    def holds(self, sub_id: int, seq: int) -> bool:
        """Whether the entry (subscription id, seq) is still pending: implicit, or a ``P`` key."""
        self.apply_settles()
        return self.is_implicit(sub_id, seq) or self._db.get(_pending_key(sub_id, seq)) is not None

    def property_int(self, name: str) -> int:
        """A RocksDB integer property (e.g. rocksdb.total-sst-files-size), 0 if unknown."""
        try:
            return int(self._db.property_int_value(name) or 0)
        except Exception:  # rocksdict raises plain Exception
            return 0

    def close(self) -> None:
        self.apply_settles()
        try:
            self._db.close()
        except Exception as exc:  # rocksdict raises plain Exception
            # After a failed write (disk full) RocksDB refuses a clean close; what was
            # acknowledged is in the fsync'd WAL and is replayed on the next open.
            log.warning("closing the shard store reported: %s", exc)

    # ------------------------------------------------------------------ writes

    def append(self, messages: list[StoredMessage], dedup: list[DedupEntry], first_attempts: Iterable[tuple[int, int]] = ()) -> None:
        """Write messages, their pending entries and indexes in one batch, one fsync: :meth:`write`, then :meth:`make_durable`."""
        self.make_durable(self.write(messages, dedup, first_attempts))

    def write(
        self,
        messages: list[StoredMessage],
        dedup: list[DedupEntry],
        first_attempts: Iterable[tuple[int, int]] | None = (),
        *,
        every_entry_handed_out: bool = False,
        sequences: dict[bytes, tuple[list[int], int]] | None = None,
        settles: list[tuple[int, int]] | None = None,
    ) -> int:
        """Write messages, their pending entries and indexes in one batch, not yet fsync'd.

        Once this returns the batch is in the WAL in the OS page cache: a
        SIGKILL of any process keeps it, a power loss may not. Call
        :meth:`make_durable` with the returned seq before acknowledging. The
        expiry indexes get one key per (expiry time, batch), not one per
        message: they are read only by the retention sweep.

        Args:
            messages: with ``seq`` already assigned by :meth:`next_seq`.
            dedup: client-given ids to remember until their ``expire_ms``.
            first_attempts: (subscription id, seq) pairs handed out right away:
                implicit entries, at attempt 1 (see the module docstring). The
                others are written as ``P`` keys at attempt 0.
            every_entry_handed_out: every entry of the write was handed out
                (``first_attempts`` is then not read).
            sequences: per id-sequence record (:func:`sequence_key`), the
                numbers this write stores (flat (start, end) pairs) and until
                when to remember them (see the module docstring).
            settles: (subscription id, seq) entries settled in the same write,
                as :meth:`complete` would: a dead-letter copy and the end of
                its original are one write, so no crash can leave both.

        Returns:
            The batch's highest seq (0 for a batch without messages).

        Raises:
            StorageError: the write failed, or an earlier fsync did (see
                :attr:`sync_failed`); the caller must not acknowledge. The
                batch is then over (see :attr:`finished_seq`).
        """
        batch_last_seq = max((message.seq for message in messages), default=0)
        try:
            if self.sync_failed is not None:
                raise StorageError(f"an earlier fsync of the WAL failed ({self.sync_failed}); nothing more is written until the frontend restarts")
            if batch_last_seq > self.reserved_seq:
                self._reserve_seqs(batch_last_seq + SEQ_RESERVATION)
            batch = WriteBatch(raw_mode=True)
            handed_out = set(first_attempts) if not every_entry_handed_out and first_attempts is not None else set()
            expiring: dict[int, list[int]] = {}
            not_yet = _U32.pack(0)
            fanout = self._fanout
            # Keys go into the batch grouped by kind and in key order (bodies, then each
            # subscription's entries): RocksDB inserts a run of adjacent keys into its
            # memtable far faster than keys that jump between ranges. Interleaved, a
            # message with one subscription and an id cost 5.5 us in the write, grouped
            # 3.7 us (batches of 200, measured here with rocksdict).
            seqs_of: dict[int, list[int]] = {}
            implicit: list[tuple[int, int]] = []  # (seq, subscription id): see the module docstring
            put, message_key = batch.put, _MESSAGE_KEY.pack  # _message_key without a call per message
            add_implicit = implicit.append
            for message in messages:
                seq = message.seq
                put(message_key(_MESSAGE, seq), encode_message(message))
                subscriptions = message.subscriptions
                fanout[seq] = list(subscriptions)  # complete() narrows it in place
                expiring.setdefault(message.expire_ms, []).append(seq)
                if every_entry_handed_out:
                    if len(subscriptions) == 1:  # the common case, without building a list
                        add_implicit((seq, subscriptions[0]))
                    else:
                        implicit.extend([(seq, sub_id) for sub_id in subscriptions])
                    continue
                for sub_id in subscriptions:
                    if (sub_id, seq) in handed_out:
                        implicit.append((seq, sub_id))
                        continue
                    seqs = seqs_of.get(sub_id)
                    if seqs is None:
                        seqs_of[sub_id] = [seq]
                    else:
                        seqs.append(seq)
            pack_pair = _PAIR.pack
            for sub_id in sorted(seqs_of):  # entries not handed out: the backlog scan finds them
                for seq in seqs_of[sub_id]:
                    put(_PENDING + pack_pair(sub_id, seq), not_yet)
            if implicit:
                pairs = [number for pair in implicit for number in pair]
                put(_IMPLICIT + _U64.pack(implicit[0][0]), struct.pack(f">{len(pairs)}Q", *pairs))
            for expire_ms, seqs in expiring.items():
                batch.put(_EXPIRY + _PAIR.pack(expire_ms, seqs[0]), struct.pack(f">{len(seqs)}Q", *seqs))
            forget: dict[int, list[bytes]] = {}
            prefixes: dict[str, bytes] = {}  # a batch's ids are of a few topics: encode each topic once
            pack_seq = _U64.pack
            for entry in dedup:
                prefix = prefixes.get(entry.topic)
                if prefix is None:
                    prefix = prefixes[entry.topic] = _dedup_key(entry.topic, "")
                key = prefix + entry.message_id.encode()
                batch.put(key, pack_seq(entry.seq))
                forget.setdefault(entry.expire_ms, []).append(key)
            # The batch's own highest seq, not self.last_seq: the poll loop may have
            # assigned later seqs already.
            for expire_ms, keys in forget.items():
                batch.put(_DEDUP_EXPIRY + _PAIR.pack(expire_ms, batch_last_seq), orjson.dumps([k.decode("utf-8", "surrogateescape") for k in keys]))
            updated = self._put_sequences(batch, sequences) if sequences else None
            if messages:
                batch.put(_LAST_SEQ, _U64.pack(batch_last_seq))
            self._fanout_slots += len(implicit) + sum(map(len, seqs_of.values()))  # every entry of the write
            self._trim_fanout()
            settling: _Settling | None = None
            try:
                if settles:
                    try:
                        settling = self._settle_into(batch, settles, known_pending=False)
                    except StorageError:
                        raise
                    except Exception as exc:  # rocksdict's plain exceptions, from the reads an old message's settle needs
                        raise StorageError(f"could not read what settling {len(settles)} entries needs: {exc}") from exc
                self._write(batch, self._lazy)
            except StorageError:
                if settling is not None:
                    settling.undo()
                for message in messages:  # complete() trusts the map: only stored entries may be in it
                    self._drop_fanout(message.seq)
                raise
            if settling is not None:
                self._count_settled(settling.existed)
            if messages:
                self.written_seq = max(self.written_seq, batch_last_seq)
            if updated:
                for key, record in updated:
                    self._cache_sequence(key, record)
            if implicit:
                first = implicit[0][0]
                self._implicit_left[first] = len(implicit)
                implicit_map = self._implicit
                for seq, sub_id in implicit:
                    implicit_map[sub_id, seq] = first
            # Counted now, not once durable: delivery starts before the fsync, so an
            # entry may be settled (and subtracted) before then.
            self.count_appended(seqs_of, implicit)
        except StorageError:
            # Refused: this batch is over, once every write before it is durable.
            if self.durable_seq >= self.written_seq:
                self.finished_seq = max(self.finished_seq, batch_last_seq)
            else:
                self._refused_behind = (self.written_seq, batch_last_seq)
            raise
        return batch_last_seq

    def _put_sequences(self, batch: WriteBatch, sequences: dict[bytes, tuple[list[int], int]]) -> list[tuple[bytes, _SequenceRecord]]:
        """Put the id-sequence records ``sequences`` adds to in ``batch``; the new records, to cache once it is written."""
        updated: list[tuple[bytes, _SequenceRecord]] = []
        for key, (runs, expire_ms) in sequences.items():
            record = self._sequence_record(key)
            if record is None:
                # A new record: its first expiry check (which moves itself on while the record is in use).
                batch.put(_SEQUENCE_EXPIRY + _U64.pack(expire_ms) + key, b"")
                ranges = merge_ranges([], runs)
            else:
                ranges = merge_ranges(record.ranges, runs)
                expire_ms = max(expire_ms, record.expire_ms)
            if len(ranges) > 2 * SEQUENCE_MAX_RANGES:
                ranges = ranges[-2 * SEQUENCE_MAX_RANGES :]
            batch.put(key, struct.pack(f">{len(ranges) + 1}Q", expire_ms, *ranges))
            updated.append((key, _SequenceRecord(ranges, expire_ms)))  # a new object: the cached one is unchanged if the write fails
        return updated

    def _sequence_record(self, key: bytes) -> _SequenceRecord | None:
        """The id-sequence record under ``key``: cached, or read (and cached); None if there is none."""
        record = self._sequences.get(key)
        if record is not None:
            self._sequences.move_to_end(key)
            return record
        raw = self._db.get(key)
        if raw is None:
            return None
        numbers = [number for (number,) in _U64.iter_unpack(raw)]
        record = _SequenceRecord(numbers[1:], numbers[0])
        self._cache_sequence(key, record)
        return record

    def _cache_sequence(self, key: bytes, record: _SequenceRecord) -> None:
        sequences = self._sequences
        sequences[key] = record
        sequences.move_to_end(key)
        while len(sequences) > SEQUENCE_CACHE_ENTRIES:
            sequences.popitem(last=False)

    def stored_in_sequence(self, key: bytes, first: int, count: int) -> list[int]:
        """The numbers from ``first`` to ``first + count - 1`` stored in the id sequence ``key`` (:func:`sequence_key`), ascending."""
        record = self._sequence_record(key)
        if record is None:
            return []
        ranges, end = record.ranges, first + count
        stored: list[int] = []
        for index in range(0, len(ranges), 2):
            low, high = max(ranges[index], first), min(ranges[index + 1], end)
            if low < high:
                stored.extend(range(low, high))
        return stored

    def make_durable(self, batch_last_seq: int) -> None:
        """fsync what :meth:`write` wrote (with ``sync``), then let backlog scans see it up to ``batch_last_seq``.

        Runs on the writer thread for large batches: it touches only the WAL and
        two integers that the poll loop reads (see :attr:`finished_seq`). One
        fsync covers every write before it, so ``batch_last_seq`` may be the
        last of several batches.

        Raises:
            StorageError: the fsync failed, now or earlier (see
                :attr:`sync_failed`); nothing written since the last good fsync
                may be acknowledged.
        """
        try:
            if self.sync_failed is not None:
                raise StorageError(f"an earlier fsync of the WAL failed ({self.sync_failed}); nothing written since is durable")
            if self._sync:
                self._sync_wal()
            if batch_last_seq:
                self.durable_seq = max(self.durable_seq, batch_last_seq)
        finally:
            finished = max(self.finished_seq, batch_last_seq)  # written or refused, this batch is over
            refused = self._refused_behind
            if refused is not None and self.durable_seq >= refused[0]:
                finished = max(finished, refused[1])
            self.finished_seq = finished

    def _reserve_seqs(self, upto: int) -> None:
        """Make ``upto`` the reserved seq, durably, before any seq above the old reservation is written."""
        reservation = WriteBatch(raw_mode=True)
        reservation.put(_RESERVED_SEQ, _U64.pack(upto))
        self._write(reservation, self._lazy)
        self._sync_wal()  # even without ``sync``: seqs must not repeat, whatever the durability mode
        self.reserved_seq = upto

    def next_seq(self) -> int:
        self.last_seq += 1
        return self.last_seq

    def _scan(self, start: bytes, upper: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        """(key, value) from ``start`` up to ``upper`` (exclusive), in key order, read lazily.

        The bound makes RocksDB stop at ``upper``. Without it, stepping past the
        last live key of a range walks every deleted key after it until the
        next live one: settled entries of the next subscription, or all the
        deleted messages after an empty index range (14 ms per scan past
        200 000 of them, measured here). rocksdict reads the bound from the
        bytes object itself, so this frame keeps it alive while it iterates.
        """
        bound = ReadOptions()
        bound.set_iterate_upper_bound(upper)
        # rocksdict's own (key, value) iterator: 0.86 us per entry against 1.0-1.2
        # stepping a raw iterator from Python (2,000 pending entries, measured here).
        items = self._db.items(from_key=start, read_opt=bound)
        try:
            yield from items
        finally:
            del items  # before the bound it reads

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Values of ``keys`` in one RocksDB MultiGet (None where absent)."""
        found: list[bytes | None] = self._db.get(keys)  # type: ignore[arg-type, assignment]
        return found

    def _sync_wal(self) -> None:
        """fsync the WAL (everything written so far), with the GIL released.

        A write with ``sync=True`` holds the GIL through its fsync in rocksdict,
        which froze the poll loop for every group commit; ``flush_wal`` does not.
        The fsync also runs outside RocksDB's write group, so the poll loop's own
        unsynced writes (settles, attempts) no longer queue behind it.
        """
        try:
            self._db.flush_wal(True)
        except Exception as exc:  # rocksdict raises plain exceptions for IO errors
            self.sync_failed = str(exc)
            raise StorageError(str(exc)) from exc

    def _write(self, batch: WriteBatch, options: WriteOptions) -> None:
        try:
            self._db.write(batch, options)
        except Exception as exc:  # rocksdict raises plain exceptions for IO errors
            raise StorageError(str(exc)) from exc

    def record_attempts(self, entries: Iterable[tuple[int, int, int]], *, known_pending: bool = False) -> None:
        """Remember (subscription id, seq, attempts) so attempts survive a restart.

        Not fsync'd: a lost update only makes an attempt number repeat after a
        power loss; a process crash keeps it (the WAL is in the OS cache).

        Args:
            entries: (subscription id, seq, attempts) triples.
            known_pending: the caller just read these entries; skip the check
                that they still exist (which keeps a late update from
                resurrecting an entry that was settled meanwhile).
        """
        self.apply_settles()
        entries = list(entries)
        if not entries:
            return
        if self._implicit and not known_pending:
            # Implicit entries become P keys with their count (a backlog scan, the known_pending caller, sees only P keys).
            implicit = [entry for entry in entries if self.is_implicit(entry[0], entry[1])]
            if implicit:
                self.materialize(implicit)
                written = set(implicit)
                entries = [entry for entry in entries if entry not in written]
                if not entries:
                    return
        batch = WriteBatch(raw_mode=True)
        put, pack_pair, pack_attempt = batch.put, _PAIR.pack, _U32.pack
        if known_pending:
            # Flat: the backlog path runs this for every entry it hands out.
            for sub_id, seq, attempt in entries:
                put(_PENDING + pack_pair(sub_id, seq), pack_attempt(attempt))
            self._write(batch, self._lazy)
            return
        keys = [_pending_key(sub_id, seq) for sub_id, seq, _ in entries]
        count = 0
        for key, (_, _, attempt), value in zip(keys, entries, self._get_many(keys), strict=True):
            if value is not None:
                put(key, pack_attempt(attempt))
                count += 1
        if count:
            self._write(batch, self._lazy)

    def complete(self, entries: Iterable[tuple[int, int]], *, known_pending: bool = False) -> int:
        """Delete settled (subscription id, seq) entries; free messages no one needs.

        Which subscriptions still hold a recent message comes from a bounded
        in-memory map, filled at append and narrowed here, so settling a recent
        message costs no read at all: only messages older than the map are read
        back (their body, and which of their other entries are left).

        Args:
            entries: (subscription id, seq) pairs.
            known_pending: the caller just read these entries; skip the read that
                tells which still existed (for the backlog counts).

        Returns:
            The number of entries settled (repeats included: deleting twice is harmless).
        """
        batch = WriteBatch(raw_mode=True)
        settling = self._settle_into(batch, entries, known_pending)
        if settling is None:
            return 0
        try:
            self._write(batch, self._lazy)
        except BaseException:
            settling.undo()
            raise
        self._count_settled(settling.existed)
        return settling.count

    def _settle_into(self, batch: WriteBatch, entries: Iterable[tuple[int, int]], known_pending: bool) -> _Settling | None:
        """Put the deletions that settle ``entries`` in ``batch`` and narrow the in-memory maps as if it were
        written (None: nothing to settle). The caller writes the batch, then counts the entries that existed
        (:meth:`_count_settled`), or calls the result's ``undo`` if the write failed."""
        # Written out flat, with bound methods held in locals: this runs for every
        # acknowledged message on the owning frontend's poll loop.
        delete = batch.delete
        pack_pair, pack_seq = _PAIR.pack, _U64.pack
        settled_by_seq: dict[int, list[int]] = {}
        settled = 0
        implicit, implicit_settled = self._implicit, []
        for entry in entries:
            sub_id, seq = entry
            subs = settled_by_seq.get(seq)
            if subs is None:
                settled_by_seq[seq] = [sub_id]
            elif sub_id in subs:
                continue
            else:
                subs.append(sub_id)
            if entry in implicit:
                implicit_settled.append(entry)  # no P key to delete
            else:
                delete(_PENDING + pack_pair(sub_id, seq))
            settled += 1
        if not settled:
            return None
        existed: list[int] = []
        unknown: list[int] = []
        fanout, bodies = self._fanout, self._bodies
        forgotten: list[tuple[tuple[int, int], int]] = []

        def undo() -> None:
            self._restore_implicit(forgotten)  # the write did not happen: still pending, still implicit
            # The map was narrowed for a write that did not happen: forget these
            # messages, so the next settle reads what is really left of them.
            for seq in settled_by_seq:
                self._drop_fanout(seq)

        try:
            for seq, subs in settled_by_seq.items():
                holders = fanout.get(seq)
                if holders is None:
                    unknown.append(seq)
                    continue
                # In place, one C-level remove per settle: rebuilding the list made
                # settling a message of N subscriptions cost N^2 in Python.
                for sub_id in subs:
                    if sub_id in holders:
                        holders.remove(sub_id)
                        existed.append(sub_id)
                if not holders:
                    fanout.pop(seq, None)  # an eviction may have removed it already
                    delete(_MESSAGE + pack_seq(seq))
                    cached = bodies.pop(seq, None)  # the body cache never outlives the message
                    if cached is not None:
                        self._body_bytes -= cached[1]
            self._fanout_slots -= len(existed)  # each one was removed from a list of the map
            if unknown:
                self._settle_unknown(batch, unknown, settled_by_seq, existed, known_pending)
                self._trim_fanout()  # an old backlog settling refills it too
            # After the reads above, which count an implicit entry as existing.
            for key in implicit_settled:
                self._forget_implicit(batch, key, forgotten)
        except BaseException:
            undo()
            raise
        return _Settling(settled, existed, undo)

    def _trim_fanout(self) -> None:
        """Evict the oldest messages of the fan-out map while it is over FANOUT_CACHE_BYTES."""
        fanout = self._fanout
        while fanout and len(fanout) * FANOUT_ENTRY_BYTES + self._fanout_slots * FANOUT_SLOT_BYTES > FANOUT_CACHE_BYTES:
            _, evicted = fanout.popitem(last=False)
            self._fanout_slots -= len(evicted)

    def _drop_fanout(self, seq: int) -> None:
        holders = self._fanout.pop(seq, None)
        if holders is not None:
            self._fanout_slots -= len(holders)

    def _settle_unknown(self, batch: WriteBatch, seqs: list[int], settled_by_seq: dict[int, list[int]], existed: list[int], known_pending: bool) -> None:
        """:meth:`complete` for messages the in-memory map no longer holds: read what is left of them."""
        keys = [(sub_id, seq) for seq in seqs for sub_id in settled_by_seq[seq]]
        existed.extend([sub_id for sub_id, _ in keys] if known_pending else self._existing(keys))
        others_by_seq: list[tuple[int, list[int]]] = []
        # A backlog's messages were read (and decoded) to be handed out: the body cache has most of them.
        # Those read back now are not kept: they are being settled.
        found = self._cached_or_read(seqs, keep=False)
        for seq in seqs:
            message = found.get(seq)
            if message is not None:
                subs = settled_by_seq[seq]
                others_by_seq.append((seq, [other for other in message.subscriptions if other not in subs]))
        # Which of the other subscriptions still hold each message: one MultiGet for all of them.
        holder_keys = [_pending_key(other, seq) for seq, others in others_by_seq for other in others]
        still_pending = iter(self._get_many(holder_keys) if holder_keys else ())
        implicit = self._implicit
        # Decoded ids are fresh int objects (28 bytes each past 256): share one per subscription, as
        # lists filled at write time do, so that FANOUT_SLOT_BYTES holds for these lists too.
        shared = self._subscription_ids.setdefault
        for seq, others in others_by_seq:
            # A holder's entry may be implicit (no P key): it holds the message all the same.
            left = [shared(other, other) for other in others if next(still_pending) is not None or (other, seq) in implicit]
            if left:
                self._fanout[seq] = left
                self._fanout_slots += len(left)
            else:
                batch.delete(_message_key(seq))
                self._forget_body(seq)

    def delete_subscription(self, sub_id: int) -> None:
        """Forget a deleted subscription at once; :meth:`purge` removes its backlog later, in chunks.

        Removing a large backlog in one go would hold the poll loop for as long
        as the backlog is big (it took 2.2 s for 100 000 entries, and grew with
        the square of the backlog, each chunk re-reading the deletions of the
        ones before it).
        """
        self.apply_settles()
        self.deleted_subscriptions.add(sub_id)
        # Its lists are no message's to come: make room for the lists of the subscriptions that are left.
        for key in [key for key in self._shared_subscription_lists if sub_id in key]:
            del self._shared_subscription_lists[key]
            self._shared_subscription_bytes -= _shared_list_bytes(key)
        if self.backlog is not None:
            self.backlog.pop(sub_id, None)
        # Messages accepted before the deletion was known have seqs up to last_seq:
        # the purge is not over until they are all durable (and so visible to it).
        self._purges.setdefault(sub_id, _Purge(after_seq=0, until_seq=self.last_seq))

    @property
    def purging(self) -> int:
        """Deleted subscriptions whose backlog :meth:`purge` is still removing."""
        return len(self._purges)

    def purge(self, limit: int = PURGE_CHUNK) -> int:
        """Remove up to ``limit`` pending entries of deleted subscriptions, and the bodies no one else needs.

        Each entry is settled as an ack would settle it. Each subscription's
        walk resumes after the last entry it removed, so it never re-reads its
        own deletions.

        Returns:
            The number of entries removed.

        Raises:
            StorageError: the write failed; nothing was removed, and a later
                call resumes where this one started.
        """
        self.apply_settles()
        removed = 0
        finished = self.finished_seq  # before durable_seq: see finished_seq
        durable = self.durable_seq
        for sub_id, state in list(self._purges.items()):
            if state.idle_at == finished:
                continue  # nothing new was written since it last looked
            if not state.implicit_swept and finished >= state.until_seq:
                # Handed out when written, so in memory only. Only writes up to until_seq can
                # hand one out: one walk over every subscription's implicit entries, once those are over.
                state.implicit_swept = True
                implicit = [key for key in self._implicit if key[0] == sub_id]
                if implicit:
                    removed += self.complete(implicit, known_pending=True)
                    if removed >= limit:
                        break  # its P keys on the next call (idle_at untouched: it looks again)
            found = self.pending(sub_id, state.after_seq, limit - removed, upto=durable)
            if found:
                removed += self.complete([(sub_id, seq) for seq, _ in found], known_pending=True)
                state.after_seq = found[-1][0]
                state.idle_at = -1
            elif finished >= state.until_seq and state.implicit_swept:
                del self._purges[sub_id]
            else:
                state.idle_at = finished
            if removed >= limit:
                break
        return removed

    @property
    def purge_runnable(self) -> bool:
        """Whether :meth:`purge` can make progress now (not only wait for writes in flight)."""
        finished = self.finished_seq
        return any(state.idle_at != finished for state in self._purges.values())

    def purge_orphans(self, known: set[int], unwritten: Iterable[int] = (), *, below: int | None = None) -> list[int]:
        """Queue the purge of every backlog whose subscription is not in ``known``: deleted while this
        frontend was down, before its purge finished, or while it missed the deletion event.

        ``known`` must be metadata's list of subscriptions, answered after every
        lookup whose subscriptions the shard now holds entries of (the caller's
        socket order guarantees it): a subscription id is never reused, so one
        that holds entries and is missing from that list was deleted.

        Args:
            known: the subscription ids metadata listed.
            unwritten: subscriptions of messages accepted but not yet written.
            below: only ids below this can be orphans (None: any), for a list
                in pages, which a subscription created meanwhile may miss.

        Returns:
            The orphaned subscription ids now being purged.
        """
        self.apply_settles()
        candidates = (self.subscriptions_with_entries() | set(unwritten)) - known - self.deleted_subscriptions
        orphans = sorted(sub_id for sub_id in candidates if below is None or sub_id < below)
        for sub_id in orphans:
            self.delete_subscription(sub_id)
        return orphans

    def subscriptions_with_entries(self) -> set[int]:
        """The ids of subscriptions with a pending entry: from the backlog counts, or (not counted) implicit
        entries and ``P`` keys found with one seek per subscription (which may step over many deleted keys)."""
        self.apply_settles()
        found = {sub_id for sub_id, _ in self._implicit}
        if self.backlog is not None:
            return found | set(self.backlog)
        start, end = _PENDING, _prefix_end(_PENDING)
        while True:
            scan = self._scan(start, end)
            try:
                first = next(scan, None)
            finally:
                scan.close()
            if first is None:
                return found
            sub_id = _U64.unpack_from(first[0], 1)[0]
            found.add(sub_id)
            if sub_id == 2**64 - 1:
                return found
            start = _PENDING + _U64.pack(sub_id + 1)

    def expire(self, now_ms: int, limit: int = EXPIRE_CHUNK) -> int:
        """Remove messages and dedup ids whose time is up, oldest first: about ``limit`` of each per call.

        Both indexes are ordered by expiry time, so this reads only what
        expires: no full scan. An index key holds one batch, so a call may go
        past ``limit`` by one batch. :attr:`expiring` says whether more was due
        than the call took (a frontend that was down, or an offline
        subscription's backlog expiring as fast as it was published, must not
        hold the poll loop for the whole of it).

        Returns:
            The number of messages removed.
        """
        self.apply_settles()
        self.expiring = False
        more = False
        index_keys: list[bytes] = []
        seqs: list[int] = []
        for key, value in self._scan(_EXPIRY, _EXPIRY + _U64.pack(now_ms)):
            if len(seqs) >= limit:
                more = True
                break
            index_keys.append(key)
            seqs.extend(seq for (seq,) in _U64.iter_unpack(value))
        batch = WriteBatch(raw_mode=True)
        removed = 0
        expiring: list[tuple[int, int]] = []
        for seq, raw in zip(seqs, self._get_many([_message_key(seq) for seq in seqs]) if seqs else (), strict=True):
            if raw is None:
                continue  # every subscription settled it already
            self._drop_fanout(seq)
            for sub_id in decode_message(seq, raw).subscriptions:
                batch.delete(_pending_key(sub_id, seq))
                expiring.append((sub_id, seq))
            batch.delete(_message_key(seq))
            self._forget_body(seq)
            removed += 1
        for key in index_keys:
            batch.delete(key)
        existed = self._existing(expiring)
        implicit_forgotten: list[tuple[tuple[int, int], int]] = []
        for entry in expiring:
            self._forget_implicit(batch, entry, implicit_forgotten)
        forgotten = 0
        for key, value in self._scan(_DEDUP_EXPIRY, _DEDUP_EXPIRY + _U64.pack(now_ms)):
            if forgotten >= limit:
                more = True
                break
            for dedup_key in orjson.loads(value):
                batch.delete(dedup_key.encode("utf-8", "surrogateescape"))
                forgotten += 1
            batch.delete(key)
        looked_at = 0
        dropped: list[bytes] = []
        for key, _ in self._scan(_SEQUENCE_EXPIRY, _SEQUENCE_EXPIRY + _U64.pack(now_ms)):
            if looked_at >= limit:
                more = True
                break
            looked_at += 1
            batch.delete(key)
            record_key = key[1 + _U64.size :]
            record = self._sequence_record(record_key)
            if record is None:
                continue
            if record.expire_ms <= now_ms:
                batch.delete(record_key)
                dropped.append(record_key)
            else:  # written to since this check was set: look again when it is due now
                batch.put(_SEQUENCE_EXPIRY + _U64.pack(record.expire_ms) + record_key, b"")
        try:
            if not batch.is_empty():  # nothing due: no WAL append (the sweep runs every second, idle or not)
                self._write(batch, self._lazy)
        except StorageError:
            self._restore_implicit(implicit_forgotten)
            raise
        for record_key in dropped:
            self._sequences.pop(record_key, None)
        self._count_settled(existed)
        self.expiring = more
        return removed

    # ------------------------------------------------------------------ reads

    def find_duplicate(self, topic: str, message_id: str) -> int | None:
        """The seq stored under a client-given id, or None if the id is new."""
        raw = self._db.get(_dedup_key(topic, message_id))
        return _U64.unpack(raw)[0] if raw is not None else None

    def find_duplicates(self, topic: str, message_ids: list[str]) -> set[str]:
        """The subset of ``message_ids`` already stored for ``topic`` (one multi-get)."""
        if not message_ids:
            return set()
        prefix = _dedup_key(topic, "")
        found = self._get_many([prefix + message_id.encode() for message_id in message_ids])
        return {message_id for message_id, value in zip(message_ids, found, strict=True) if value is not None}

    def read_message(self, seq: int) -> StoredMessage | None:
        self.apply_settles()
        raw = self._db.get(_message_key(seq))
        return decode_message(seq, raw) if raw is not None else None

    def read_messages(self, seqs: list[int]) -> list[StoredMessage | None]:
        """Messages by seq (None where settled or expired): from the body cache, the rest in one multi-get."""
        self.apply_settles()
        if not seqs:
            return []
        found = self._cached_or_read(seqs, keep=True)
        return [found.get(seq) for seq in seqs]

    def _cached_or_read(self, seqs: list[int], *, keep: bool) -> dict[int, StoredMessage]:
        """The messages of ``seqs`` that exist, by seq: from the body cache (as recently used), the rest in one
        multi-get, decoded (and cached when ``keep``)."""
        bodies = self._bodies
        found: dict[int, StoredMessage] = {}
        unread: list[int] = []
        for seq in seqs:
            cached = bodies.get(seq)
            if cached is None:
                unread.append(seq)
            else:
                bodies.move_to_end(seq)
                found[seq] = cached[0]
        if unread:
            for seq, raw in zip(unread, self._get_many([_message_key(seq) for seq in unread]), strict=True):
                if raw is not None:
                    message = found[seq] = decode_message(seq, raw)
                    if keep:
                        self._remember_body(message, len(raw))
        return found

    def _remember_body(self, message: StoredMessage, encoded_bytes: int) -> None:
        bodies = self._bodies
        if message.seq not in bodies:
            # The encoded size covers payload, id and attributes. A decoded id list
            # costs far more per subscription than its JSON text (40 bytes an id):
            # at 100 subscriptions the list was 4 KB of a 5 KB entry, and the cache
            # held 3,500 messages of a fan-out backlog. Messages of one topic mostly
            # have the same list, so cached ones share it and only the first pays.
            size = encoded_bytes + BODY_OVERHEAD_BYTES
            subscriptions = message.subscriptions
            if len(subscriptions) > 1:
                key = tuple(subscriptions)
                shared = self._shared_subscription_lists.get(key)
                if shared is not None:
                    message.subscriptions = shared  # nothing changes a stored message's list
                elif self._shared_subscription_bytes + (cost := _shared_list_bytes(key)) <= SHARED_SUBSCRIPTION_BYTES:
                    self._shared_subscription_lists[key] = subscriptions
                    self._shared_subscription_bytes += cost
                else:
                    size += SUBSCRIPTION_ID_BYTES * len(subscriptions)
            else:
                size += SUBSCRIPTION_ID_BYTES * len(subscriptions)
            bodies[message.seq] = (message, size)
            self._body_bytes += size
        while self._body_bytes > BODY_CACHE_BYTES and bodies:
            _, (_, evicted_size) = bodies.popitem(last=False)
            self._body_bytes -= evicted_size

    def _forget_body(self, seq: int) -> None:
        """Drop a message being deleted from the body cache, so the cache never outlives the message."""
        cached = self._bodies.pop(seq, None)
        if cached is not None:
            self._body_bytes -= cached[1]

    def pending(self, sub_id: int, after_seq: int, limit: int, *, upto: int | None = None) -> list[tuple[int, int]]:
        """Up to ``limit`` (seq, attempts) of a subscription's backlog after ``after_seq``, up to ``upto`` (default :attr:`durable_seq`)."""
        self.apply_settles()
        out: list[tuple[int, int]] = []
        last = self.durable_seq if upto is None else upto
        if after_seq >= last or limit <= 0:
            return out
        # Bounded at the last durable seq: entries after it are not handed out yet.
        for key, value in self._scan(_pending_key(sub_id, after_seq + 1), _pending_key(sub_id, last + 1)):
            out.append((_U64.unpack_from(key, 9)[0], _U32.unpack(value)[0]))
            if len(out) >= limit:
                break
        return out

    def count_pending(self, sub_id: int) -> int:
        self.apply_settles()
        prefix = _PENDING + _U64.pack(sub_id)
        return sum(1 for _ in self._iter_prefix(prefix)) + sum(1 for owner, _ in self._implicit if owner == sub_id)

    def count_messages(self) -> int:
        self.apply_settles()
        return sum(1 for _ in self._iter_prefix(_MESSAGE))

    def messages(self) -> list[StoredMessage]:
        self.apply_settles()
        return [decode_message(_U64.unpack_from(k, 1)[0], v) for k, v in self._iter_prefix(_MESSAGE)]

    def _iter_prefix(self, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
        yield from self._scan(prefix, _prefix_end(prefix))

    def approximate_size_bytes(self) -> int:
        value = self._db.property_int_value("rocksdb.total-sst-files-size")
        return int(value or 0)
