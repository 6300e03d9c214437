"""The protocol core both client flavours share: no sockets, no waiting.

:class:`Client` (blocking) and :class:`AsyncClient` (asyncio) differ only in
how they wait. Everything else lives here, once: building each request as a
:class:`Call` (frames plus the parser of its reply), turning replies into
values or :class:`HeraldError`, the publish retry policy, the message types,
and the consumer-side state machine that parses what a sender pushes on the
SUB socket (WELCOME, DELIVER, ACK_REPLY, ERROR), de-duplicates redeliveries
of messages this consumer has already acknowledged, and drops buffered copies
the sender has already taken back.

Frames are never built here by hand: every request goes through
``clients.protocol`` (``encode``, ``encode_publish``, ``encode_attach``,
``encode_acks``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Generic, Protocol, TypeVar

import orjson
import zmq

from clients.protocol import (
    ACK_OK,
    ACK_STALE,
    ACK_UNKNOWN,
    CONSUMER_EXPIRY_S,
    LIST_LIMIT_MAX,
    MAX_BATCH_MESSAGES,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_ID_BYTES,
    MAX_PAYLOAD_CEILING,
    SUBSCRIPTION_SETTINGS,
    TOPIC_SETTINGS,
    Command,
    Frames,
    HeraldError,
    IdSequence,
    ProtocolError,
    check_attributes,
    check_name,
    consumer_topic_frame,
    decode,
    decode_deliver_rows,
    encode,
    encode_acks,
    encode_attach,
    encode_publish,
    split_envelope,
)

log = logging.getLogger("herald.client")

T = TypeVar("T")

DEFAULT_ENDPOINT: Final = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_S: Final = 10.0
# Client sockets queue at most this many messages each way: enough for 10k+
# pipelined requests, finite so a dead peer cannot grow memory without bound.
CLIENT_SNDHWM: Final = 100_000
CLIENT_RCVHWM: Final = 100_000
# The consumer SUB socket's queue; the sender never has more than max_unacked
# deliveries out to one consumer, so this only matters for a misbehaving peer.
CONSUMER_RCVHWM: Final = 100_000
CONSUMER_SNDHWM: Final = 10_000
RECONNECT_IVL_MS: Final = 100  # first reconnect attempt after a peer vanished
RECONNECT_IVL_MAX_MS: Final = 2_000  # backoff cap, so a restarted server is found quickly
# A repeatable request (publish, reads) that got no reply is sent again after
# RESEND_FIRST_S, then after doubling pauses up to RESEND_MAX_S, until the
# call's deadline. A reply lost with a killed process is thus re-asked within
# seconds; message ids make a resent publish safe (the server de-duplicates).
RESEND_FIRST_S: Final = 1.0
RESEND_MAX_S: Final = 4.0
RETRY_PAUSE_S: Final = 0.05  # after a retriable error reply, before resending
RETRY_PAUSE_MAX_S: Final = 1.0
# Largest payload total of one PUBLISH request built by publish_batch; bigger
# batches are split (the count limit is protocol.MAX_BATCH_MESSAGES).
PUBLISH_BATCH_BYTES: Final = 32 * 1024 * 1024
# AsyncClient.publish sends at most this many coalesced PUBLISH requests per topic
# at once; later publishes gather into the next request until one returns. The
# server commits whatever arrived during an fsync in one batch, so more requests
# in flight only add per-request work: at 10,000 one-message publishes a second
# the publish->deliver p99 was 28-37 ms with 4 and 85-113 ms without a limit in a
# slow hour, and at 2,000/s the same within the noise (bench/README.md, thirteenth round).
PUBLISHES_IN_FLIGHT: Final = 4
# ...but a held publish goes after this long whatever is in flight, so that a
# slow or failing request cannot make it wait for its own timeout.
PUBLISH_HOLD_MAX_S: Final = 0.05
# Header budget of one PUBLISH: below the server's MAX_HEADER_BYTES with room for the envelope.
PUBLISH_HEADER_BYTES: Final = MAX_HEADER_BYTES - 64 * 1024
# Deliveries (refs) a consumer remembers as acknowledged, to drop their redeliveries.
ACKED_WINDOW: Final = 10_000
# Step 5 of the consumer checklist (docs/protocol.md §9): a consumer that has had
# no WELCOME for this long re-reads SUB_DESCRIBE, and it never re-reads more
# often. The sender answers every heartbeat (one per CONSUMER_HEARTBEAT_S) with
# a WELCOME, so this is CONSUMER_LIVENESS missed answers in a row: the same grace
# the sender gives a silent consumer before dropping it, CONSUMER_EXPIRY_S. A
# shorter wait would ask the broker about every hiccup (a sender restarting on
# its old port, which ZeroMQ reconnects to by itself, takes seconds); a longer
# one would leave a consumer whose sender moved stalled for longer.
REDISCOVER_AFTER_S: Final = CONSUMER_EXPIRY_S


# --------------------------------------------------------------------------- small helpers


# ack_nowait() sends queued acks in one ACK once this many are waiting, or once
# the oldest has waited ACK_FLUSH_DELAY_S: at low rates an ACK per message cost
# the sender (and this client) a wake-up per message.
ACK_FLUSH_COUNT: Final = 256
ACK_FLUSH_DELAY_S: Final = 0.005

# The ids this client makes: a random 64-bit prefix per process, then a
# number. A request whose messages all get made ids carries them as a PUBLISH
# ``sequence`` (the prefix and its first number, ids ``prefix~n``), which the
# server remembers per topic as ranges of numbers rather than an index entry
# per id. So each topic gets numbers of its own, counting up without gaps: one
# counter for all topics would leave a gap in a topic's record for every
# request to another, and the server keeps a record's newest 256 ranges only.
# A topic's counter is a block of SEQUENCE_BLOCK numbers, taken when the topic
# is first published to (or again once it dropped out of the newest
# SEQUENCE_TOPICS, or used its block up): a new block is one new range.
SEQUENCE_BLOCK: Final = 2**32
SEQUENCE_TOPICS: Final = 4096
_id_prefix = secrets.token_hex(8)
_id_lock = threading.Lock()
_id_blocks = itertools.count(0)
_id_counters: OrderedDict[str, list[int]] = OrderedDict()  # topic -> [next number, end of its block]
_loose_ids = itertools.count(1)  # new_message_id's


def _fresh_id_space() -> None:
    # A forked child must not repeat its parent's ids.
    global _id_prefix, _id_lock, _id_blocks, _id_counters, _loose_ids
    _id_prefix = secrets.token_hex(8)
    _id_lock = threading.Lock()
    _id_blocks = itertools.count(0)
    _id_counters = OrderedDict()
    _loose_ids = itertools.count(1)


os.register_at_fork(after_in_child=_fresh_id_space)


def reserve_ids(topic: str, count: int) -> IdSequence:
    """``count`` fresh ids in a row for ``topic`` (at most SEQUENCE_BLOCK), unique without coordination."""
    with _id_lock:
        counter = _id_counters.get(topic)
        if counter is None or counter[0] + count > counter[1]:
            start = next(_id_blocks) * SEQUENCE_BLOCK
            counter = _id_counters[topic] = [start, start + SEQUENCE_BLOCK]
            if len(_id_counters) > SEQUENCE_TOPICS:
                _id_counters.popitem(last=False)
        else:
            _id_counters.move_to_end(topic)
        first = counter[0]
        counter[0] += count
    return IdSequence(_id_prefix, first)


def new_message_id() -> str:
    """A fresh message id outside any sequence (no ``~``; the server indexes it as any id of the caller's):
    this process's random prefix, then a counter of its own, in hex."""
    return f"{_id_prefix}{next(_loose_ids):x}"


class RequestIds:
    """Request ids for one socket: an 8-byte big-endian counter from a random start.

    Ids never repeat on a socket, so a reply that arrives after its request
    timed out matches nothing and is dropped. The random start keeps another
    client from guessing the id of a consumer's next ACK (see docs/protocol.md §9).
    """

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count(secrets.randbits(62) + 1)

    def next(self) -> bytes:
        """The next unused request id."""
        return next(self._counter).to_bytes(8, "big")


def check_timeout(timeout: float) -> float:
    """Return ``timeout`` if it is a positive number of seconds.

    Raises:
        ValueError: for zero, negative or non-numeric timeouts.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout = {timeout!r} must be a positive number of seconds")
    return float(timeout)


def timeout_error(what: str, endpoint: str, timeout: float) -> HeraldError:
    """The error every client raises when a deadline passes."""
    return HeraldError(
        "timeout",
        f"no reply to {what} from {endpoint} within {timeout:g} s; is the server running (start it with `herald up`)?",
        {"endpoint": endpoint, "timeout": timeout},
    )


def closed_error(what: str) -> HeraldError:
    """The error raised when a closed client or subscription is used."""
    return HeraldError("closed", f"{what} is closed; create a new one")


# --------------------------------------------------------------------------- replies


def parse_reply(raw: list[bytes]) -> Frames:
    """Decode a reply read from a DEALER socket (``[b"", SIGNATURE, ...]``).

    Raises:
        ProtocolError: when the server sent something that is not a Herald message.
    """
    _envelope, body = split_envelope(raw)
    return decode(body)


def reply_header(frames: Frames) -> dict[str, Any]:
    """The header of an OK reply.

    Raises:
        HeraldError: the error an ERROR reply carries.
        ProtocolError: ``malformed`` when the reply is neither OK nor ERROR.
    """
    if frames.command is Command.OK:
        return frames.header
    if frames.command is Command.ERROR:
        raise HeraldError.from_header(frames.header)
    raise ProtocolError("malformed", f"expected an OK or ERROR reply, got {frames.command.name}")


def _field(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind):
        raise ProtocolError("malformed", f"reply field {key!r} is missing or not {kind}: {str(value)[:80]}")
    return value


# --------------------------------------------------------------------------- calls


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request: how to build its frames and how to read its reply.

    Attributes:
        command: the verb, for error messages and logs.
        build: frames for a given request id (without the empty delimiter).
        parse: the value of an OK reply's header.
        repeatable: whether sending the request twice does no harm (reads,
            publishes with their ids, creates with ``exist_ok``); only such
            requests are resent when a reply is late or a retriable error comes.
    """

    command: Command
    build: Callable[[bytes, str | None], list[bytes]]
    parse: Callable[[dict[str, Any]], T]
    repeatable: bool = False

    def frames(self, request_id: bytes, token: str | None = None) -> list[bytes]:
        """The frames to send on a DEALER socket: empty delimiter first, ``token`` in the header."""
        return [b"", *self.build(request_id, token)]


def simple_call(command: Command, header: dict[str, Any], parse: Callable[[dict[str, Any]], T], *, repeatable: bool = False) -> Call[T]:
    """A call whose frames are just ``encode(command, request_id, header)``."""

    def build(request_id: bytes, token: str | None) -> list[bytes]:
        return encode(command, request_id, {**header, "token": token} if token else header)

    return Call(command, build, parse, repeatable)


def attempt_deadline(now: float, deadline: float, attempt: int, repeatable: bool) -> float:
    """When attempt ``attempt`` (0-based) stops waiting for its reply and the request is resent.

    A request that is not repeatable waits for the whole deadline.
    """
    if not repeatable:
        return deadline
    return min(deadline, now + resend_pause(attempt))


def resend_pause(attempt: int) -> float:
    """How long attempt ``attempt`` (0-based) of a repeatable request waits for its reply before it is sent again."""
    return float(min(RESEND_MAX_S, RESEND_FIRST_S * 2.0**attempt))


def retry_pause(error: HeraldError, call: Call[Any], attempt: int, now: float, deadline: float) -> float | None:
    """Seconds to wait before resending after ``error``, or None to give up and raise it."""
    if not (error.retriable and call.repeatable):
        return None
    pause: float = min(RETRY_PAUSE_MAX_S, RETRY_PAUSE_S * 2.0**attempt)
    hint = error.details.get("retry_after")  # rate_limited says when the request would fit
    if isinstance(hint, int | float) and not isinstance(hint, bool) and hint > 0:
        pause = float(hint)
    return pause if now + pause < deadline else None


def settings_of(kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check setting names locally and drop the ones left unset (None).

    Values are checked by the server, which owns the rules; names are checked
    here so a typo fails before a round trip, naming the known settings.

    Raises:
        HeraldError: ``invalid_setting`` for an unknown name or a bad ``backoff`` tuple.
    """
    specs = TOPIC_SETTINGS if kind == "topic" else SUBSCRIPTION_SETTINGS
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if key == "backoff" and kind == "subscription":
            if not (isinstance(value, tuple | list) and len(value) == 2):
                raise HeraldError("invalid_setting", f"backoff must be a (min, max) pair of seconds, got {value!r}")
            out["backoff_min"], out["backoff_max"] = value[0], value[1]
            continue
        if key not in specs:
            known = ", ".join(sorted([*specs, "backoff"] if kind == "subscription" else specs))
            raise HeraldError("invalid_setting", f"unknown {kind} setting {key!r}; known: {known}")
        out[key] = dict(value) if key == "filter" and isinstance(value, Mapping) else value
    return out


def _topic(header: dict[str, Any]) -> dict[str, Any]:
    topic: dict[str, Any] = _field(header, "topic", dict)
    return topic


def _subscription(header: dict[str, Any]) -> dict[str, Any]:
    sub: dict[str, Any] = _field(header, "subscription", dict)
    return sub


def _none(_header: dict[str, Any]) -> None:
    return None


def _same(header: dict[str, Any]) -> dict[str, Any]:
    return header


def create_topic_call(name: str, exist_ok: bool, settings: Mapping[str, Any]) -> Call[dict[str, Any]]:
    """TOPIC_CREATE; the reply value is the topic record."""
    header = {"name": check_name(name, "topic"), "settings": settings_of("topic", settings), "exist_ok": bool(exist_ok)}
    # With exist_ok a repeat answers like the first; without, a repeat after a
    # lost reply would say topic_exists for a topic this very call created.
    return simple_call(Command.TOPIC_CREATE, header, _topic, repeatable=bool(exist_ok))


def delete_topic_call(name: str) -> Call[list[str]]:
    """TOPIC_DELETE; the names of the subscriptions deleted with the topic."""
    return simple_call(Command.TOPIC_DELETE, {"name": check_name(name, "topic")}, lambda h: [str(sub) for sub in _field(h, "subscriptions", list)])


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a TOPIC_LIST or SUB_LIST reply."""

    records: list[dict[str, Any]]
    more: bool

    @property
    def next_after(self) -> str | None:
        """The ``after`` that asks for the next page; None when this page was the last."""
        if not (self.more and self.records):
            return None
        return str(self.records[-1].get("name", "")) or None


def _page_of(header: dict[str, Any], key: str) -> ListPage:
    return ListPage(list(_field(header, key, list)), header.get("more") is True)


def _page_header(header: dict[str, Any], after: str | None, page_size: int | None) -> dict[str, Any]:
    """A list request for a page (always: a whole list may not fit one reply)."""
    if after is not None:
        header["after"] = after
    if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= LIST_LIMIT_MAX):
        raise ValueError(f"page_size must be an integer from 1 to {LIST_LIMIT_MAX}, got {page_size!r}")
    header["limit"] = page_size or LIST_LIMIT_MAX
    return header


def list_topics_call(prefix: str, after: str | None = None, page_size: int | None = None) -> Call[ListPage]:
    """One page of TOPIC_LIST, optionally only names starting with ``prefix``, after the name ``after``."""
    header = _page_header({"prefix": prefix} if prefix else {}, after, page_size)
    return simple_call(Command.TOPIC_LIST, header, lambda h: _page_of(h, "topics"), repeatable=True)


def describe_topic_call(name: str) -> Call[dict[str, Any]]:
    """TOPIC_DESCRIBE; the topic record with the names of its subscriptions."""
    return simple_call(Command.TOPIC_DESCRIBE, {"name": check_name(name, "topic")}, _topic, repeatable=True)


def create_subscription_call(topic: str, name: str, exist_ok: bool, settings: Mapping[str, Any]) -> Call[dict[str, Any]]:
    """SUB_CREATE; the reply value is the subscription record with its endpoints."""
    header = {
        "topic": check_name(topic, "topic"),
        "name": check_name(name, "subscription"),
        "settings": settings_of("subscription", settings),
        "exist_ok": bool(exist_ok),
    }
    return simple_call(Command.SUB_CREATE, header, _subscription, repeatable=bool(exist_ok))


def delete_subscription_call(name: str) -> Call[None]:
    """SUB_DELETE."""
    return simple_call(Command.SUB_DELETE, {"name": check_name(name, "subscription")}, _none)


def list_subscriptions_call(topic: str | None, after: str | None = None, page_size: int | None = None) -> Call[ListPage]:
    """One page of SUB_LIST, optionally of one topic, after the name ``after``."""
    header = _page_header({"topic": check_name(topic, "topic")} if topic is not None else {}, after, page_size)
    return simple_call(Command.SUB_LIST, header, lambda h: _page_of(h, "subscriptions"), repeatable=True)


def describe_subscription_call(name: str) -> Call[dict[str, Any]]:
    """SUB_DESCRIBE."""
    return simple_call(Command.SUB_DESCRIBE, {"name": check_name(name, "subscription")}, _subscription, repeatable=True)


def info_call() -> Call[dict[str, Any]]:
    """INFO: versions, limits and endpoints."""
    return simple_call(Command.INFO, {}, _same, repeatable=True)


def ping_call() -> Call[dict[str, Any]]:
    """PING; resent like a read, so a frontend that is stopped (the proxy hands it every other request) does not fail it."""
    return simple_call(Command.PING, {}, _same, repeatable=True)


def status_call() -> Call[dict[str, Any]]:
    """STATUS: the answering frontend's statistics."""
    return simple_call(Command.STATUS, {}, _same, repeatable=True)


# STATUS requests per frontend, at most, to hear from each one: the proxy hands
# requests to the frontends in turn, so one round mostly reaches every one.
BACKLOG_STATUS_ROUNDS: Final = 4


class BacklogTally:
    """Sums the ``backlog`` of every frontend's STATUS: each counts only the messages of its own shard."""

    def __init__(self, frontends: int) -> None:
        self.frontends = frontends
        self.requests = BACKLOG_STATUS_ROUNDS * frontends
        self._backlogs: dict[int, dict[str, int]] = {}

    def add(self, status: dict[str, Any]) -> None:
        frontend, backlog = status.get("frontend"), status.get("backlog")
        if type(frontend) is int and isinstance(backlog, dict):
            self._backlogs[frontend] = {name: count for name, count in backlog.items() if type(count) is int}

    @property
    def answered(self) -> int:
        return len(self._backlogs)

    @property
    def complete(self) -> bool:
        return self.answered >= self.frontends

    def totals(self) -> dict[str, int]:
        """Messages stored and not yet settled per subscription, over the frontends heard from."""
        totals: dict[str, int] = {}
        for backlog in self._backlogs.values():
            for name, count in backlog.items():
                totals[name] = totals.get(name, 0) + count
        return dict(sorted(totals.items()))

    def incomplete(self) -> HeraldError:
        return HeraldError("unavailable", f"only {self.answered} of {self.frontends} frontends answered STATUS in {self.requests} requests")


# --------------------------------------------------------------------------- publish


class PublishId(str):
    """The id of a published message, as a string.

    Attributes:
        duplicate: True when the server already stored a message with this id
            (within the topic's de-duplication window), so this publish stored nothing new.
    """

    duplicate: bool = False  # set on an instance only when True (see publish_call's parse)

    def __new__(cls, value: str, duplicate: bool = False) -> PublishId:
        self = super().__new__(cls, value)
        if duplicate:
            self.duplicate = True
        return self

    def __repr__(self) -> str:
        return f"PublishId({str(self)!r}, duplicate={self.duplicate})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PublishId, (str(self), self.duplicate))


# (payload, attributes, message id); an id of None is made when the request is built (see publish_call).
PublishItem = tuple[bytes, dict[str, str] | None, str | None]
ItemLike = bytes | tuple[bytes] | tuple[bytes, Mapping[str, str] | None] | tuple[bytes, Mapping[str, str] | None, str | None]


def publish_item(data: Any, attributes: Mapping[str, str] | None = None, message_id: str | None = None) -> PublishItem:
    """Check one message locally (an id of None is made when its request is built).

    Raises:
        TypeError: when ``data`` is not bytes-like, or ``attributes`` not a mapping.
        HeraldError: ``invalid_header`` for bad attributes or message id,
            ``payload_too_large`` above MAX_PAYLOAD_CEILING (64 MiB).
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"message data must be bytes, got {type(data).__name__}; encode text first, e.g. text.encode()")
    if len(data) > MAX_PAYLOAD_CEILING:
        # No server takes it, and one frame of it would be cut off by the server's frame limit without a reply.
        raise HeraldError("payload_too_large", f"a payload of {len(data)} bytes exceeds {MAX_PAYLOAD_CEILING} bytes, the most any Herald server accepts")
    if attributes is not None and not isinstance(attributes, Mapping):
        raise TypeError(f"attributes must be a mapping of strings to strings (a dict), got {type(attributes).__name__}")
    if attributes and not all(isinstance(key, str) for key in attributes):
        raise HeraldError("invalid_header", f"attribute names must be strings, got {sorted(map(repr, attributes))[:3]}")
    attrs = check_attributes(dict(attributes)) if attributes else None
    if message_id is not None and (not isinstance(message_id, str) or not message_id):
        raise HeraldError("invalid_header", f"message_id must be a non-empty string, got {message_id!r}")
    if message_id is not None and len(message_id.encode()) > MAX_MESSAGE_ID_BYTES:
        raise HeraldError("invalid_header", f"message_id of {len(message_id.encode())} bytes exceeds {MAX_MESSAGE_ID_BYTES} bytes")
    return (data, attrs, message_id)


def publish_items(items: Iterable[ItemLike]) -> list[PublishItem]:
    """Normalise ``publish_batch`` items: bytes, (bytes, attributes) or (bytes, attributes, id).

    Raises:
        TypeError: for an item of another shape.
        HeraldError: as :func:`publish_item`.
    """
    out: list[PublishItem] = []
    append = out.append
    for index, item in enumerate(items):
        if type(item) is bytes and len(item) <= MAX_PAYLOAD_CEILING:  # the common case, without publish_item's checks of what is not there
            append((item, None, None))
        elif isinstance(item, tuple):
            if not 1 <= len(item) <= 3:
                raise TypeError(f"item {index} must be bytes or (bytes, attributes[, message_id]), got a tuple of {len(item)}")
            out.append(_indexed(publish_item, index, *item))
        else:
            out.append(_indexed(publish_item, index, item))
    return out


def _indexed(check: Callable[..., PublishItem], index: int, *args: Any) -> PublishItem:
    """``check(*args)``, with a HeraldError's details naming the item, as the server's do."""
    try:
        return check(*args)
    except HeraldError as error:
        error.details.setdefault("index", index)
        raise


_MADE_ID_MAX: Final = "f" * 16 + "~" + "f" * 16  # the longest id this client makes: its prefix, ~ and a 64-bit number


def publish_header_bytes(item: PublishItem) -> int:
    """An upper estimate of one message's share of the PUBLISH header (JSON with quoting)."""
    _, attributes, message_id = item
    if message_id is None:
        message_id = _MADE_ID_MAX  # made when sent: in a sequence it takes no room at all
    # Encoded, not counted in characters: JSON escapes a control character to six
    # bytes, which made 40 messages of such attributes a 12 MB header. Plus the
    # entry's punctuation and its size in payload_sizes when the batch is packed.
    # Printable ASCII, as every generated id, escapes at most to two bytes a character.
    id_bytes = 2 * len(message_id) + 2 if message_id.isascii() and message_id.isprintable() else len(orjson.dumps(message_id))
    size = id_bytes + 24 + 9  # {"id":...,"attributes":...}, and "1048576,"
    if attributes:
        size += len(orjson.dumps(attributes))
    return size


# publish_header_bytes of an item without attributes whose id is the worst there can be:
# MAX_MESSAGE_ID_BYTES control characters, each escaped to six bytes.
_WORST_PLAIN_ITEM_HEADER_BYTES: Final = publish_header_bytes((b"", None, "\x01" * MAX_MESSAGE_ID_BYTES))


def split_batch(items: Sequence[PublishItem]) -> list[Sequence[PublishItem]]:
    """Split items into requests within the protocol's count and header limits and this client's byte bound."""
    # Most batches fit whole: items without attributes, whose ids at their worst
    # (six bytes a character) cannot reach the header limit, need no estimate each.
    if (
        len(items) * _WORST_PLAIN_ITEM_HEADER_BYTES <= PUBLISH_HEADER_BYTES
        and len(items) <= MAX_BATCH_MESSAGES  # implied by the bound today, kept in case the limits change
        and all(item[1] is None for item in items)
        and sum(len(item[0]) for item in items) <= PUBLISH_BATCH_BYTES
    ):
        return [items] if items else []
    chunks: list[Sequence[PublishItem]] = []
    start, size, header = 0, 0, 0
    for index, item in enumerate(items):
        item_header = publish_header_bytes(item)
        if index > start and (index - start >= MAX_BATCH_MESSAGES or size + len(item[0]) > PUBLISH_BATCH_BYTES or header + item_header > PUBLISH_HEADER_BYTES):
            chunks.append(items[start:index])
            start, size, header = index, 0, 0
        size += len(item[0])
        header += item_header
    if start < len(items):
        chunks.append(items[start:])
    return chunks


def make_ids(topic: str, items: Sequence[PublishItem]) -> tuple[list[PublishItem], IdSequence | None]:
    """The ids of ``items`` still to be made, made: as one sequence when every item's is (the items
    are then returned as they are), otherwise each in its item."""
    if all(item[2] is None for item in items):
        return list(items), reserve_ids(topic, len(items))
    if any(item[2] is None for item in items):
        return [(payload, attributes, new_message_id() if message_id is None else message_id) for payload, attributes, message_id in items], None
    return list(items), None


def publish_call(topic: str, items: Sequence[PublishItem], sequence: IdSequence | None = None) -> Call[list[PublishId]]:
    """PUBLISH of already-normalised items; safe to send twice (ids de-duplicate).

    The ids still to be made are made here (:func:`make_ids`), once: a resend
    carries the same. ``sequence``, if given, is the caller's own numbering
    of items that have no ids.
    """
    check_name(topic, "topic")
    new_id = str.__new__
    if sequence is None:
        wire_items, sequence = make_ids(topic, items)
    elif any(item[2] is not None for item in items):
        raise ValueError("a publish with a sequence takes its ids from it: give the items none of their own")
    else:
        wire_items = list(items)
    count = len(wire_items)

    def parse(header: dict[str, Any]) -> list[PublishId]:
        ids = _field(header, "ids", list)
        duplicate = header.get("duplicate")
        if not isinstance(duplicate, list):
            duplicate = [False] * len(ids)
        if len(ids) != count or len(duplicate) != count:
            raise ProtocolError("malformed", f"PUBLISH of {count} messages answered with {len(ids)} ids and {len(duplicate)} duplicate flags")
        # str.__new__ skips PublishId.__new__ (a Python call per message); duplicates get their flag after.
        made = [new_id(PublishId, str(i)) for i in ids]
        for publish_id, flag in zip(made, duplicate, strict=True):
            if flag:
                publish_id.duplicate = True
        return made

    return Call(Command.PUBLISH, lambda request_id, token: encode_publish(topic, wire_items, request_id, token, sequence), parse, repeatable=True)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of one client's request counters."""

    requests: int
    replies: int
    errors: int
    timeouts: int
    retries: int
    stray_replies: int
    malformed_replies: int
    in_flight: int


@dataclass(slots=True)
class ClientCounters:
    """The live counters behind :class:`ClientStatistics`."""

    requests: int = 0
    replies: int = 0
    errors: int = 0
    timeouts: int = 0
    retries: int = 0
    stray_replies: int = 0
    malformed_replies: int = 0

    def snapshot(self, in_flight: int) -> ClientStatistics:
        return ClientStatistics(self.requests, self.replies, self.errors, self.timeouts, self.retries, self.stray_replies, self.malformed_replies, in_flight)


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's consumer counters.

    Attributes:
        delivered: messages received and buffered for the application.
        duplicates_dropped: copies of deliveries already acknowledged, dropped
            (and acknowledged again) on arrival or when taken from the buffer.
        acked: acknowledgements sent (``ack_nowait``) or confirmed (``ack``).
        stale_acks: ``ack()`` calls the sender answered ``stale``.
        nacked: NACKs sent.
        malformed: messages or DELIVER entries from the sender that could not be read.
        buffered: messages received but not yet handed to the application.
        expired_dropped: buffered copies dropped unprocessed because they were
            received more than the subscription's ``ack_deadline`` ago: the
            sender has taken them back and delivers them again.
        foreign: messages for another subscription that reached this consumer's
            id (another client attached under it), dropped.
    """

    delivered: int
    duplicates_dropped: int
    acked: int
    stale_acks: int
    nacked: int
    malformed: int
    buffered: int
    expired_dropped: int
    foreign: int = 0


# --------------------------------------------------------------------------- messages


class SyncAcknowledger(Protocol):
    """What a blocking :class:`Message` acknowledges through."""

    def _ack(self, message: Message) -> bool: ...

    def _ack_nowait(self, message: MessageFields) -> None: ...

    def _nack(self, message: Message) -> None: ...


class AsyncAcknowledger(Protocol):
    """What an :class:`AsyncMessage` acknowledges through."""

    async def _ack(self, message: AsyncMessage) -> bool: ...

    def _ack_nowait(self, message: MessageFields) -> None: ...

    async def _nack(self, message: AsyncMessage) -> None: ...


@dataclass(frozen=True, slots=True)
class MessageFields:
    """The fields of a delivered message, shared by both flavours.

    Attributes:
        id: the message id, stable across redeliveries; not unique: a message
            published again with the same id after the topic's ``dedup_window``,
            and dead-letter copies (they keep the original id), are other messages.
        topic: the topic it was published to.
        data: the payload.
        attributes: the string attributes given at publish time.
        attempt: 1 for the first delivery, higher for redeliveries.
        ref: the delivery handle acknowledgements name (``shard.seq``): one per
            stored message, the same across its redeliveries (de-duplicate on it).
        subscription: the subscription it was delivered through.
        timestamp: when the server stored it, in seconds since the epoch.
    """

    id: str
    topic: str
    data: bytes = field(compare=False)  # equality and hash use the delivery's identity, not its body
    attributes: dict[str, str] = field(compare=False)
    attempt: int
    ref: str
    subscription: str
    timestamp: float


@dataclass(frozen=True, slots=True)
class Message(MessageFields):
    """A message delivered to a blocking :class:`~clients.Subscription`."""

    _owner: SyncAcknowledger = field(repr=False, compare=False)

    def ack(self) -> bool:
        """Acknowledge the message and wait for the sender to confirm.

        Returns:
            True when the acknowledgement settled the message, or this consumer
            had acknowledged it already (no second ACK is sent); False when it was
            stale (the message was already redelivered as a newer attempt, which
            will arrive again and must be acknowledged then).

        Raises:
            HeraldError: ``unknown_delivery`` when the sender does not know the
                delivery (e.g. it restarted); ``timeout`` when no confirmation came.
        """
        return self._owner._ack(self)

    def ack_nowait(self) -> None:
        """Acknowledge without waiting: acks are batched, and sent once 256 are
        queued or the oldest has waited 5 ms (a blocking Subscription sends
        them from ``receive()``, or on close).

        The fast path for throughput. A stale or lost ack is not reported: the
        message is redelivered and, being known as acknowledged, dropped and
        acknowledged again by this client.
        """
        self._owner._ack_nowait(self)

    def nack(self) -> None:
        """Give the message back for redelivery after the subscription's backoff.

        Raises:
            HeraldError: ``unavailable`` when the subscription is closed.
        """
        self._owner._nack(self)


@dataclass(frozen=True, slots=True)
class AsyncMessage(MessageFields):
    """A message delivered to an :class:`~clients.aio.AsyncSubscription`."""

    _owner: AsyncAcknowledger = field(repr=False, compare=False)

    async def ack(self) -> bool:
        """Acknowledge the message and wait for the sender to confirm.

        Returns:
            True when settled, False when stale (see :meth:`Message.ack`).

        Raises:
            HeraldError: ``unknown_delivery`` or ``timeout``.
        """
        return await self._owner._ack(self)

    def ack_nowait(self) -> None:
        """Acknowledge without waiting; batched and sent within a few milliseconds (see :meth:`Message.ack_nowait`)."""
        self._owner._ack_nowait(self)

    async def nack(self) -> None:
        """Give the message back for redelivery after the subscription's backoff.

        Raises:
            HeraldError: ``unavailable`` when the subscription is closed.
        """
        await self._owner._nack(self)


def ack_result(result: str, message: MessageFields) -> bool:
    """Map one ACK_REPLY result to ``ack()``'s value.

    Raises:
        HeraldError: ``unknown_delivery`` for "unknown" or an unexpected result.
    """
    if result == ACK_OK:
        return True
    if result == ACK_STALE:
        return False
    detail = "the sender does not know it (it may have restarted, or the message was already settled)"
    if result != ACK_UNKNOWN:
        detail = f"the sender answered {result!r}"
    raise HeraldError("unknown_delivery", f"ack of message {message.id} (ref {message.ref}, attempt {message.attempt}): {detail}")


# --------------------------------------------------------------------------- consumer state


class AckedWindow:
    """The refs of at least the last ``capacity`` deliveries acknowledged successfully.

    Keyed by ref (``shard.seq``), which names one stored message and stays the
    same across its redeliveries (a shard never hands a seq out twice, see
    ``frontend/store.py``'s ``SEQ_RESERVATION``). A message id does not: an id
    published again after the topic's ``dedup_window`` (or with a window of 0)
    is stored as another message, and dead-letter copies keep the original id,
    so a window of ids would skip (and settle) messages never processed.

    Two generations of sets, not an LRU: a consumer adds every delivery it
    acknowledges, and an ``OrderedDict`` cost 0.45 us per add where a set costs
    about a quarter of that. When the newer set fills, it becomes the older one
    and the oldest generation is forgotten, so between ``capacity`` and twice
    ``capacity`` refs are remembered.
    """

    __slots__ = ("_older", "_recent", "capacity")

    def __init__(self, capacity: int = ACKED_WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"acked window capacity = {capacity} must be at least 1")
        self.capacity = capacity
        self._recent: set[str] = set()
        self._older: set[str] = set()

    def add(self, ref: str) -> None:
        """Remember an acknowledged delivery, forgetting the oldest generation when the newer one is full."""
        recent = self._recent
        recent.add(ref)
        if len(recent) >= self.capacity:
            self._older, self._recent = recent, set()

    def generations(self) -> tuple[set[str], set[str]]:
        """Both generations, for a loop that checks many refs with plain ``in`` tests; valid until the next :meth:`add`."""
        return self._recent, self._older

    def __contains__(self, ref: object) -> bool:
        return ref in self._recent or ref in self._older

    def __len__(self) -> int:
        # Builds the union (up to 2 x capacity refs): for tests and inspection, not the hot path.
        return len(self._recent | self._older)


M = TypeVar("M", bound=MessageFields)


@functools.cache
def slot_constructor(cls: type[M]) -> Callable[..., M]:
    """A positional constructor for the frozen slots dataclass ``cls`` that sets each slot directly.

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` for
    every field; the slots' own descriptors do the same work in about half the
    time (0.89 against 1.64 us per message here, ``bench/test_micro.py``), a
    cost every consumer pays per delivery. Like the dataclass's own
    ``__init__``, it is compiled once from source built from the field names.
    Only for classes without defaults or ``__post_init__`` (the messages).
    """
    names = [f.name for f in fields(cls)]
    unsupported = [f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING or not f.init]
    if unsupported or hasattr(cls, "__post_init__") or {"new", "cls", "obj"} & set(names):
        raise TypeError(
            f"slot_constructor cannot build {cls.__name__}: fields with defaults or init=False ({unsupported}), __post_init__, or a field named new/cls/obj"
        )
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    namespace.update({f"set_{name}": getattr(cls, name).__set__ for name in names})
    source = f"def build({', '.join(names)}):\n    obj = new(cls)\n"
    source += "".join(f"    set_{name}(obj, {name})\n" for name in names)
    source += "    return obj\n"
    exec(source, namespace)  # noqa: S102 - the source holds only the class's own field names
    build: Callable[..., M] = namespace["build"]
    return build


@dataclass(slots=True)
class ConsumerEvents:
    """What one SUB message meant, for the flavour that read it to act on."""

    welcomed: bool = False
    # A WELCOME naming a new session (the sender restarted, or registered this
    # consumer again after an expiry): answer with a ready ATTACH naming it now,
    # rather than at the next heartbeat, since deliveries wait for it (protocol.md §9).
    session_changed: bool = False
    replies: dict[bytes, list[str]] = field(default_factory=dict)
    errors: dict[bytes, HeraldError] = field(default_factory=dict)
    fatal: HeraldError | None = None
    reacks: list[tuple[str, int]] = field(default_factory=list)


class SubscriptionView:
    """What both subscription flavours show of themselves; the state lives in ``_core``."""

    _core: ConsumerCore[Any]
    _closed: bool

    @property
    def name(self) -> str:
        """The subscription name."""
        return self._core.name

    @property
    def topic(self) -> str:
        """The topic the subscription reads."""
        return self._core.topic

    @property
    def consumer_id(self) -> str:
        """This consumer's id, unique per attach."""
        return self._core.consumer_id

    @property
    def info(self) -> dict[str, Any]:
        """The subscription record the server returned."""
        return self._core.info

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.topic} consumer={self.consumer_id}{' closed' if self._closed else ''}>"


def _endpoints_of(info: Mapping[str, Any]) -> tuple[str, str]:
    """The (deliver, ack) endpoints of a subscription record.

    Raises:
        ProtocolError: ``malformed`` when the record has none.
    """
    endpoints = _field(info, "endpoints", dict)
    return _field(endpoints, "deliver", str), _field(endpoints, "ack", str)


def _ack_deadline_of(info: Mapping[str, Any]) -> float | None:
    """The subscription's ``ack_deadline`` in seconds from its record, or None when the record has none."""
    settings = info.get("settings")
    value = settings.get("ack_deadline") if isinstance(settings, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return float(value)


class ConsumerCore(Generic[M]):
    """The consumer's protocol state, shared by both flavours: no sockets.

    It names the consumer, builds its ATTACH/ACK/NACK/DETACH frames, parses
    what the sender pushes, buffers deliveries in arrival order, and drops
    redeliveries of deliveries (refs) it acknowledged, re-acknowledging them
    so the sender stops redelivering a message whose first ack was lost.

    The sender never has more than the subscription's ``max_unacked``
    deliveries out to one consumer, but that alone does not bound the buffer:
    once a delivery's ``ack_deadline`` passes, the sender takes it back, frees
    its slot and sends more, while the old copy is still buffered here. An
    application slower than ``max_unacked / ack_deadline`` would then only
    ever process copies already taken back (every ack ``stale``) while the
    buffer grew. So buffered copies received more than ``ack_deadline`` ago
    are dropped unprocessed, without an ack (counted as ``expired_dropped``):
    the sender delivers them again. The buffer then holds only copies received
    within the last ``ack_deadline``. Arrival times are kept per DELIVER, not
    per message: :attr:`_arrivals` holds (``time.monotonic()``, messages ever
    buffered up to the end of that DELIVER), and the buffer's head is message
    number ``_buffered_total - len(buffer)``.
    """

    def __init__(self, info: dict[str, Any], consumer_id: str, make: Callable[..., M], *, window: int = ACKED_WINDOW, token: str | None = None) -> None:
        self.info = info
        self.token = token
        self.name: str = _field(info, "name", str)
        self.topic: str = _field(info, "topic", str)
        self.deliver_endpoint, self.ack_endpoint = _endpoints_of(info)
        self.consumer_id = consumer_id
        self.topic_frame = consumer_topic_frame(consumer_id)
        self.buffer: deque[M] = deque()
        self.ack_deadline = _ack_deadline_of(info)  # None: never drop a buffered copy as expired
        self._arrivals: deque[tuple[float, int]] = deque()  # oldest first; see the class docstring
        self._buffered_total = 0
        self._expires_at = math.inf  # when the oldest arrival's copies are older than ack_deadline
        self.acked = AckedWindow(window)
        self.welcomed = False
        # The session of the last WELCOME: named in every ATTACH, it proves to the sender that our SUB socket hears it.
        self.session: int | None = None
        # time.monotonic() of the last WELCOME, and of the last SUB_DESCRIBE
        # re-read: see rediscover_at(). Counted from creation until the first WELCOME.
        self.last_welcome = time.monotonic()
        self.described_at = -math.inf
        self.failure: HeraldError | None = None
        self._make = slot_constructor(make)
        self._acks_in_flight: dict[bytes, MessageFields] = {}
        self.pending_acks: list[tuple[str, int]] = []
        self.acks_due: float | None = None  # time.monotonic() by which the queued acks go out
        self.delivered = 0
        self.duplicates_dropped = 0
        self.acked_count = 0
        self.stale_acks = 0
        self.nacked = 0
        self.malformed = 0
        self.expired_dropped = 0
        self.foreign = 0

    def connect(self, sub: Any, push: Any, curve: CurveKeys | None) -> None:
        """Set up and connect fresh SUB (deliveries) and PUSH (attach, acks) sockets, for either client flavour."""
        self._connect(sub, push, self.deliver_endpoint, self.ack_endpoint, curve)

    def _connect(self, sub: Any, push: Any, deliver: str, ack: str, curve: CurveKeys | None) -> None:
        setup_socket(sub, connect=deliver, sndhwm=CONSUMER_SNDHWM, rcvhwm=CONSUMER_RCVHWM, subscribe=self.topic_frame, curve=curve)
        setup_socket(push, connect=ack, sndhwm=CONSUMER_SNDHWM, rcvhwm=CONSUMER_RCVHWM, curve=curve)

    # -- finding a sender that moved (protocol.md §9, step 5)

    def rediscover_at(self) -> float:
        """When (``time.monotonic()``) to re-read SUB_DESCRIBE: REDISCOVER_AFTER_S after
        both the last WELCOME and the last re-read."""
        return max(self.last_welcome, self.described_at) + REDISCOVER_AFTER_S

    def rediscovering(self) -> None:
        """Note that a re-read of SUB_DESCRIBE starts (see :meth:`rediscover_at`)."""
        log.info("no WELCOME from sender %s for %g s; re-reading subscription %s", self.deliver_endpoint, time.monotonic() - self.last_welcome, self.name)

    def rediscovered(self, info: dict[str, Any] | None, error: HeraldError | None) -> bool:
        """Conclude a re-read with its record or its error; True when the record names other endpoints (then :meth:`move`).

        The next re-read comes REDISCOVER_AFTER_S after this one ended. A
        ``subscription_not_found`` becomes :attr:`failure`; other errors, and a
        record without endpoints, are logged and the re-read is tried again later.
        """
        self.described_at = time.monotonic()
        if error is None and info is not None:
            try:
                return _endpoints_of(info) != (self.deliver_endpoint, self.ack_endpoint)
            except ProtocolError as malformed:
                error = malformed
        if error is not None and error.code == "subscription_not_found":
            self.failure = self.failure or error  # receive() raises it, as when the sender reports the deletion
        elif error is not None:
            log.warning("cannot re-read subscription %s (%s); trying again in %g s", self.name, error, REDISCOVER_AFTER_S)
        return False

    def move(self, info: dict[str, Any], context: zmq.Context[Any], curve: CurveKeys | None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]] | None:
        """Fresh SUB and PUSH sockets connected to the endpoints of ``info`` (a newer
        SUB_DESCRIBE record of this subscription), the record adopted; None, logged
        and nothing changed, when the record or an endpoint is unusable.

        Everything else is kept: the buffer, the acknowledged window, the queued
        acks and the counters. :attr:`welcomed` goes back to False: the caller
        swaps the sockets in and attaches again (ATTACH ready=false until a
        WELCOME, then ready=true).
        """
        sub: zmq.Socket[Any] = context.socket(zmq.SUB)
        push: zmq.Socket[Any] = context.socket(zmq.PUSH)
        try:
            if _field(info, "name", str) != self.name:
                raise ProtocolError("malformed", f"SUB_DESCRIBE of {self.name!r} answered with subscription {info.get('name')!r}")
            deliver, ack = _endpoints_of(info)
            self._connect(sub, push, deliver, ack, curve)
        except (ValueError, HeraldError) as error:
            sub.close(0)
            push.close(0)
            log.warning("cannot move subscription %s to %s (%s); trying again in %g s", self.name, info.get("endpoints"), error, REDISCOVER_AFTER_S)
            return None
        # welcomed first: a heartbeat thread that sees the new ack endpoint must also see it is not welcomed yet.
        self.welcomed = False
        self.info = info
        self.deliver_endpoint, self.ack_endpoint = deliver, ack
        self.ack_deadline = _ack_deadline_of(info)
        self._set_expiry()
        log.warning("subscription %s moved to sender deliver=%s ack=%s; attaching again", self.name, deliver, ack)
        return sub, push

    # -- frames to send

    def attach_frames(self, *, ready: bool, request_id: bytes = b"") -> list[bytes]:
        """ATTACH: before WELCOME with ready=False, then ready=True as heartbeat.

        A request id lets an ERROR answering this ATTACH be told apart.
        """
        return encode_attach(self.name, self.consumer_id, ready=ready, request_id=request_id, token=self.token, packed_payloads=True, session=self.session)

    def ack_frames(self, refs: list[tuple[str, int]], request_id: bytes = b"") -> list[bytes]:
        """ACK of (ref, attempt) pairs; a request id asks for an ACK_REPLY."""
        return encode_acks(Command.ACK, self.name, self.consumer_id, refs, request_id, self.token)

    def nack_frames(self, refs: list[tuple[str, int]]) -> list[bytes]:
        """NACK of (ref, attempt) pairs, without asking for a reply."""
        return encode_acks(Command.NACK, self.name, self.consumer_id, refs, token=self.token)

    def queue_ack(self, message: MessageFields) -> bool:
        """Queue a fire-and-forget ack; True when enough are queued to send now (else by :attr:`acks_due`)."""
        if self.acks_due is None:
            self.acks_due = time.monotonic() + ACK_FLUSH_DELAY_S
        self.pending_acks.append((message.ref, message.attempt))
        self.acked.add(message.ref)
        self.acked_count += 1
        return len(self.pending_acks) >= ACK_FLUSH_COUNT

    def _reack(self, message: MessageFields) -> None:
        """Queue the ack of a copy dropped as already acknowledged; it goes out with the next acks, by :attr:`acks_due`."""
        self.duplicates_dropped += 1
        self.pending_acks.append((message.ref, message.attempt))
        if self.acks_due is None:
            self.acks_due = time.monotonic() + ACK_FLUSH_DELAY_S

    def take_pending_acks(self) -> list[bytes] | None:
        """The ACK frames for every queued ack (no reply asked), or None when none are queued."""
        if not self.pending_acks:
            return None
        refs, self.pending_acks = self.pending_acks, []
        self.acks_due = None
        return self.ack_frames(refs)

    def settle_buffered_copies(self) -> None:
        """Before DETACH: drop the expired buffered copies, and queue the ack of each
        buffered copy of a delivery already acknowledged (as :meth:`next_message`
        would), so neither is named unseen and handed to another consumer."""
        self._drop_expired(time.monotonic())
        acked = self.acked
        kept: deque[M] = deque()
        arrivals: deque[tuple[float, int]] = deque()
        # Rebuild the arrival marks for what is kept: each kept copy keeps its DELIVER's time.
        position = self._buffered_total - len(self.buffer)
        marks = iter(self._arrivals)
        mark = next(marks, None)
        for message in self.buffer:
            position += 1
            while mark is not None and mark[1] < position:
                mark = next(marks, None)
            if message.ref in acked:
                self._reack(message)
                continue
            kept.append(message)
            if mark is None:
                continue
            if arrivals and arrivals[-1][0] == mark[0]:
                arrivals[-1] = (mark[0], len(kept))
            else:
                arrivals.append((mark[0], len(kept)))
        self.buffer, self._arrivals, self._buffered_total = kept, arrivals, len(kept)
        self._set_expiry()

    def detach_frames(self) -> list[bytes]:
        """DETACH: the sender hands this consumer's unacknowledged messages on at once.

        The buffered ones, which the application never saw, are named as
        ``unseen``: they keep their attempt number, so a consumer that reads a
        few messages and leaves does not use up the attempts of those it
        prefetched. Buffered copies older than ``ack_deadline`` are dropped
        first (the sender has taken them back). Call
        :meth:`settle_buffered_copies` and send the acks first.
        """
        self._drop_expired(time.monotonic())
        header: dict[str, Any] = {"subscription": self.name, "consumer": self.consumer_id, "unseen": [[m.ref, m.attempt] for m in self.buffer]}
        if self.token:
            header["token"] = self.token
        return encode(Command.DETACH, b"", header)

    # -- results of acks

    def expect_ack(self, request_id: bytes, message: MessageFields) -> None:
        """Note that the ACK sent with ``request_id`` is for ``message``.

        The result is recorded when the ACK_REPLY is parsed, before anything
        read after it, so a redelivery right behind the reply is already known
        to be acknowledged. Call :meth:`forget_ack` when done waiting.
        """
        self._acks_in_flight[request_id] = message

    def forget_ack(self, request_id: bytes) -> None:
        """Stop expecting the ACK_REPLY to ``request_id`` (answered or timed out)."""
        self._acks_in_flight.pop(request_id, None)

    def _on_ack_reply(self, request_id: bytes, results: list[str]) -> list[tuple[str, int]]:
        message = self._acks_in_flight.get(request_id)
        if message is None or len(results) != 1:
            return []
        if results[0] == ACK_STALE:
            self.stale_acks += 1
        if results[0] != ACK_OK:
            return []
        self.acked_count += 1
        # A copy already buffered behind this reply is dropped by next_message().
        self.acked.add(message.ref)
        return []

    def next_message(self) -> M | None:
        """The next buffered message, skipping redeliveries of deliveries already
        acknowledged, and copies received more than ``ack_deadline`` ago.

        A skipped copy of an acknowledged delivery is acknowledged again (its
        ref and attempt are queued like ack_nowait), so the sender stops
        sending it. An expired copy is dropped without an ack: the sender has
        taken it back and sends it again.
        """
        buffer = self.buffer
        if buffer and (now := time.monotonic()) > self._expires_at:
            self._drop_expired(now)
        acked = self.acked
        while buffer:
            message = buffer.popleft()
            if message.ref not in acked:
                return message
            self._reack(message)
        return None

    def _drop_expired(self, now: float) -> None:
        """Drop the buffered copies received more than ``ack_deadline`` before ``now``,
        forget the arrival marks of DELIVERs already taken whole, and set :attr:`_expires_at`."""
        deadline = self.ack_deadline
        arrivals, buffer = self._arrivals, self.buffer
        if deadline is None or not arrivals:
            self._expires_at = math.inf
            return
        head = self._buffered_total - len(buffer)  # the number of the buffer's first message
        horizon = now - deadline
        end = head
        while arrivals and arrivals[0][0] < horizon:
            end = arrivals.popleft()[1]
        count = min(end - head, len(buffer))
        if count > 0:
            if count == len(buffer):
                buffer.clear()
            else:
                for _ in range(count):
                    buffer.popleft()
            self.expired_dropped += count
            head += count
        while arrivals and arrivals[0][1] <= head:
            arrivals.popleft()
        self._set_expiry()

    def _set_expiry(self) -> None:
        arrivals, deadline = self._arrivals, self.ack_deadline
        self._expires_at = arrivals[0][0] + deadline if arrivals and deadline is not None else math.inf

    def _note_arrival(self, count: int) -> None:
        """Mark the ``count`` messages just buffered by one DELIVER with the time, and drop what expired."""
        now = time.monotonic()
        self._buffered_total = total = self._buffered_total + count
        arrivals = self._arrivals
        if len(self.buffer) == count:
            arrivals.clear()  # everything buffered before was taken
        arrivals.append((now, total))
        if now > self._expires_at or len(arrivals) == 1:
            self._drop_expired(now)

    @staticmethod
    def check_batch_size(max_messages: int) -> None:
        """Refuse a ``receive_batch`` size below 1, before any waiting."""
        if max_messages < 1:
            raise ValueError(f"max_messages = {max_messages} must be at least 1")

    def batch_behind(self, first: M, max_messages: int) -> list[M]:
        """``first`` and up to ``max_messages - 1`` buffered messages behind it: what ``receive_batch`` returns."""
        return [first, *self.next_messages(max_messages - 1)] if max_messages > 1 else [first]

    def next_messages(self, limit: int) -> list[M]:
        """Up to ``limit`` buffered messages, in order, skipping copies as :meth:`next_message` does."""
        buffer = self.buffer
        if buffer and (now := time.monotonic()) > self._expires_at:
            self._drop_expired(now)
        acked = self.acked
        recent, older = acked.generations()  # _reack adds nothing to them
        taken: list[M] = []
        while buffer and len(taken) < limit:
            message = buffer.popleft()
            ref = message.ref
            if ref not in recent and ref not in older:
                taken.append(message)
            else:
                self._reack(message)
        return taken

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this consumer's counters."""
        return SubscriptionStatistics(
            self.delivered,
            self.duplicates_dropped,
            self.acked_count,
            self.stale_acks,
            self.nacked,
            self.malformed,
            len(self.buffer),
            self.expired_dropped,
            self.foreign,
        )

    # -- what arrives

    def handle(self, raw: list[bytes], owner: Any) -> ConsumerEvents:
        """Parse one message read from the SUB socket and update the state.

        Deliveries go to :attr:`buffer`; replies, errors and ids to re-ack are
        returned for the caller to act on. Malformed input is counted and logged,
        never raised: a bad frame from the network must not kill a consumer.
        """
        events = ConsumerEvents()
        if not raw or raw[0] != self.topic_frame:
            self.malformed += 1
            return events
        try:
            frames = decode(raw[1:])
        except ProtocolError as error:
            self.malformed += 1
            log.warning("dropped a malformed message from sender %s: %s", self.deliver_endpoint, error)
            return events
        subject = frames.header.get("subscription", self.name)
        if subject != self.name:
            # Addressed by consumer id alone: another client naming our id in its own ATTACH
            # (ids can be read off the PUB socket) must not reach or fail this subscription.
            self.foreign += 1
            if self.foreign == 1 or self.foreign % 1000 == 0:  # another client can send these at will: not one log line each
                log.warning("dropped a %s for subscription %r sent to this consumer of %r (%d so far)", frames.command.name, subject, self.name, self.foreign)
            return events
        match frames.command:
            case Command.DELIVER:
                events.reacks.extend(self._on_deliver(frames, owner))
            case Command.ACK_REPLY:
                results = frames.header.get("results")
                if isinstance(results, list) and all(isinstance(r, str) for r in results):
                    events.replies[frames.request_id] = results
                    events.reacks.extend(self._on_ack_reply(frames.request_id, results))
                else:
                    self.malformed += 1
            case Command.WELCOME:
                session = frames.header.get("session")
                if isinstance(session, int) and not isinstance(session, bool) and session != self.session:
                    events.session_changed = self.session is not None and self.welcomed
                    self.session = session
                self.welcomed = events.welcomed = True
                self.last_welcome = time.monotonic()
            case Command.ERROR:
                reported = HeraldError.from_header(frames.header)
                if reported.code == "subscription_not_found":
                    # The subscription was deleted under us: nothing more will come.
                    self.failure = events.fatal = reported
                if frames.request_id:
                    events.errors[frames.request_id] = reported
                elif events.fatal is None:
                    log.warning("sender %s reported: %s", self.deliver_endpoint, reported)
            case _:
                self.malformed += 1
                log.warning("dropped unexpected %s from sender %s", frames.command.name, self.deliver_endpoint)
        return events

    def _on_deliver(self, frames: Frames, owner: Any) -> list[tuple[str, int]]:
        try:
            rows, skipped = decode_deliver_rows(frames)
        except ProtocolError as error:
            # Without a trustworthy pairing of headers and payloads nothing can
            # be delivered; the ack deadline brings the messages back.
            self.malformed += 1
            log.warning("dropped a DELIVER: %s", error)
            return []
        if skipped:
            self.malformed += skipped
            log.warning("dropped %d malformed DELIVER entries", skipped)
        reacks: list[tuple[str, int]] = []
        # Locals and plain tuples: this loop runs for every message a consumer receives.
        acked, make, name, buffer_append = self.acked, self._make, self.name, self.buffer.append
        recent, older = acked.generations()
        for message_id, topic, attempt, attributes, ts, ref, payload in rows:
            if ref in recent or ref in older:
                reacks.append((ref, attempt))
                continue
            buffer_append(make(message_id, topic, payload, attributes, attempt, ref, name, ts, owner))
        self.duplicates_dropped += len(reacks)
        buffered = len(rows) - len(reacks)
        self.delivered += buffered
        if buffered and self.ack_deadline is not None:
            self._note_arrival(buffered)
        return reacks


# --------------------------------------------------------------------------- sockets


@dataclass(frozen=True)
class CurveKeys:
    """What a client needs to reach a server that runs CURVE: the server's public
    key and this client's key pair (Z85-encoded, as in ZeroMQ certificate files).

    The server admits the client only if its public key is in the server's
    ``curve_clients_dir`` (when it has one).
    """

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_public_file: str, client_secret_file: str) -> CurveKeys:
        """Keys from certificate files, as ``herald keys generate`` writes them.

        Args:
            server_public_file: the server's ``.key`` file.
            client_secret_file: this client's ``.key_secret`` file (it holds both halves).
        """
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_public_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if not secret:
            raise ValueError(f"{client_secret_file} holds no secret key; pass the client's .key_secret file")
        return cls(server_public, public, secret)

    def apply(self, sock: Any) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def setup_socket(
    sock: Any,
    *,
    connect: str,
    sndhwm: int,
    rcvhwm: int,
    subscribe: bytes | None = None,
    immediate: bool = False,
    curve: CurveKeys | None = None,
) -> None:
    """Set a fresh socket's options, then connect it: one place for both flavours.

    Raises:
        ValueError: when ``connect`` is not an endpoint ZeroMQ accepts.

    Linger is 0 so closing never hangs on a dead peer; callers that must flush
    a last message (DETACH) raise it for that close only. ``immediate`` keeps a
    DEALER from queueing requests for a server that is not connected, so they
    time out instead of piling up for a server that may come back much later.
    """
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if subscribe is not None:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    if curve is not None:
        curve.apply(sock)
    try:
        sock.connect(connect)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ValueError(f"cannot connect to endpoint {connect!r} ({exc}); expected e.g. tcp://127.0.0.1:5555") from None
