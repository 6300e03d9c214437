"""The Herald wire protocol: the one place that knows how frames are laid out.

Every Herald process and the client library import this module; no call site
builds frames by hand. docs/protocol.md is the prose version of this file.

A Herald message is a ZeroMQ multipart message::

    [SIGNATURE, command, request_id, header, *payloads]

- ``SIGNATURE`` is ``b"HRLD1"``: the protocol name and version in one frame.
- ``command`` is an ASCII verb (``b"PUBLISH"``) or, in replies, ``b"OK"`` /
  ``b"ERROR"``.
- ``request_id`` is 0-64 opaque bytes chosen by the requester and echoed in the
  reply, so many requests can be in flight on one DEALER socket (give each a
  distinct id). Unsolicited messages (deliveries, events) carry an empty one.
- ``header`` is a JSON object (orjson-encoded) with the command's fields.
- ``payloads`` are raw bytes, one frame per message body, never inside JSON.

Requests through the proxy are preceded by an empty delimiter frame (a REQ
socket adds it by itself; a DEALER client sends it explicitly), and messages on
PUB sockets are preceded by a topic frame that SUB sockets filter on.
"""

from __future__ import annotations

import enum
import re
import zlib
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final, NamedTuple

import orjson
import zmq

SIGNATURE: Final = b"HRLD1"
PROTOCOL_VERSION: Final = 1
SERVER_VERSION: Final = "0.1.0"

MAX_REQUEST_ID_BYTES: Final = 64
MAX_NAME_BYTES: Final = 255
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024  # 1 MiB, the usual broker default
MAX_PAYLOAD_CEILING: Final = 64 * 1024 * 1024  # the most max_payload_bytes or a topic's max_payload may allow
# The largest frame the request endpoint takes (ZMQ_MAXMSGSIZE): one payload at
# the ceiling, packed with others, has room. ZeroMQ drops the connection of a
# peer that sends more, before the bytes are buffered; no reply is possible.
MAX_REQUEST_FRAME_BYTES: Final = 2 * MAX_PAYLOAD_CEILING
MAX_HEADER_BYTES: Final = 4 * 1024 * 1024  # a batch header of ~10k messages fits
# The same for the endpoints that take no payloads (a sender's ack endpoint, the live feed).
MAX_CONTROL_FRAME_BYTES: Final = MAX_HEADER_BYTES + 64 * 1024
# Header fields a frontend adds to an admin request it relays to metadata:
# the request came from a client (quotas apply), and the credential may only
# attach to an existing subscription (it has subscribe, not admin, permission).
RELAY_QUOTA_FIELD: Final = "quota"
RELAY_ONLY_EXISTING_FIELD: Final = "only_existing"
MAX_BATCH_MESSAGES: Final = 10_000  # bounds one request's memory and fsync size
# Packed payloads (protocol.md §2): every frame costs about 2 us of CPU per hop
# (send, libzmq's I/O threads, receive), against ~0.3 us for a 100-byte slice of
# one packed frame; above this many bytes in all, the copy into one frame
# costs more than the frames it saves, so the payloads stay one frame each.
PACK_MAX_BYTES: Final = 1024 * 1024
PAYLOAD_SIZES_FIELD: Final = "payload_sizes"
MAX_ATTRIBUTES: Final = 64
MAX_ATTRIBUTE_BYTES: Final = 1024
MAX_MESSAGE_ID_BYTES: Final = 128
# A PUBLISH ``sequence`` (§4, PUBLISH): its prefix, and the bound every number of it stays below
# (the server keeps ranges with an exclusive end as u64).
MAX_SEQUENCE_PREFIX_CHARS: Final = 64
_SEQUENCE_PREFIX_PATTERN: Final = re.compile(r"[A-Za-z0-9._\-]+")
_HEX_NUMBER_PATTERN: Final = re.compile(r"0|[1-9a-f][0-9a-f]{0,15}")
SEQUENCE_SEPARATOR: Final = "~"
SEQUENCE_NUMBER_LIMIT: Final = 2**63
LIVE_TOPIC_TERMINATOR: Final = b"\x00"

# Names: printable, no spaces or control characters; dots, dashes, underscores
# and slashes allowed so families of topics ("orders.eu") can share a prefix.
_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._\-/:@]+")


class Command(bytes, enum.Enum):
    """Every command verb on the wire. Replies use OK and ERROR."""

    # client -> frontend (through the proxy)
    INFO = b"INFO"
    PING = b"PING"
    TOPIC_CREATE = b"TOPIC_CREATE"
    TOPIC_DELETE = b"TOPIC_DELETE"
    TOPIC_LIST = b"TOPIC_LIST"
    TOPIC_DESCRIBE = b"TOPIC_DESCRIBE"
    PUBLISH = b"PUBLISH"
    SUB_CREATE = b"SUB_CREATE"
    SUB_DELETE = b"SUB_DELETE"
    SUB_LIST = b"SUB_LIST"
    SUB_DESCRIBE = b"SUB_DESCRIBE"
    STATUS = b"STATUS"
    # replies
    OK = b"OK"
    ERROR = b"ERROR"
    # consumer -> sender (PUSH to the sender's ack endpoint)
    ATTACH = b"ATTACH"
    DETACH = b"DETACH"
    ACK = b"ACK"
    NACK = b"NACK"
    # sender -> consumer (PUB, topic frame = consumer id + NUL)
    WELCOME = b"WELCOME"
    DELIVER = b"DELIVER"
    ACK_REPLY = b"ACK_REPLY"
    # live feed (PUB, topic frame = topic name + NUL)
    MESSAGE = b"MESSAGE"
    # internal: frontend <-> metadata
    REGISTER = b"REGISTER"
    LOOKUP_TOPIC = b"LOOKUP_TOPIC"
    EVENT = b"EVENT"
    EVENT_ACK = b"EVENT_ACK"
    # internal: frontend -> sender, sender -> frontend
    DISPATCH = b"DISPATCH"
    CREDIT = b"CREDIT"
    COMPLETE = b"COMPLETE"
    ATTEMPTED = b"ATTEMPTED"
    DEAD = b"DEAD"
    # internal: frontend -> frontend (publish forwarded to the topic's shard)
    FORWARD = b"FORWARD"


_COMMANDS_BY_VALUE: Final = {c.value: c for c in Command}

CLIENT_COMMANDS: Final = frozenset(
    {
        Command.INFO,
        Command.PING,
        Command.TOPIC_CREATE,
        Command.TOPIC_DELETE,
        Command.TOPIC_LIST,
        Command.TOPIC_DESCRIBE,
        Command.PUBLISH,
        Command.SUB_CREATE,
        Command.SUB_DELETE,
        Command.SUB_LIST,
        Command.SUB_DESCRIBE,
        Command.STATUS,
    }
)


# --------------------------------------------------------------------------- errors


class ErrorSpec(NamedTuple):
    """One row of the error catalog: stable name, unique number, retriable, text."""

    name: str
    number: int
    retriable: bool
    description: str


# The catalog is data: exceptions and the table in docs/protocol.md derive
# from it, and tests reject duplicate names or numbers. Never renumber.
ERROR_CATALOG: Final[tuple[ErrorSpec, ...]] = (
    ErrorSpec("malformed", 400, False, "the message does not have the frames the protocol requires"),
    ErrorSpec("unsupported_version", 401, False, "the signature frame names a protocol version this server does not speak"),
    ErrorSpec("unknown_command", 402, False, "the command frame is not a command this endpoint accepts"),
    ErrorSpec("invalid_header", 403, False, "the header frame is not a JSON object, or a field is missing, of the wrong type or out of range"),
    ErrorSpec("invalid_name", 404, False, "a topic or subscription name is empty, too long or has forbidden characters"),
    ErrorSpec("invalid_setting", 405, False, "a topic or subscription setting is unknown or out of range"),
    ErrorSpec("payload_too_large", 406, False, "a payload exceeds the configured maximum"),
    ErrorSpec("batch_too_large", 407, False, "a publish carries more messages than allowed in one request"),
    ErrorSpec("list_too_large", 408, False, "a TOPIC_LIST or SUB_LIST without limit or after would not fit one reply; ask for it in pages"),
    ErrorSpec("topic_not_found", 410, False, "the topic does not exist"),
    ErrorSpec("topic_exists", 411, False, "a topic with this name already exists"),
    ErrorSpec("subscription_not_found", 412, False, "the subscription does not exist"),
    ErrorSpec("subscription_exists", 413, False, "a subscription with this name already exists (and exist_ok is not set), or exists on another topic"),
    ErrorSpec("unknown_delivery", 414, False, "an ack or nack names a delivery this sender does not know"),
    ErrorSpec("wrong_sender", 415, False, "the subscription is served by another sender; use the endpoints SUB_DESCRIBE returns"),
    ErrorSpec("consumer_in_use", 416, False, "the consumer id is attached to another subscription of this sender; use a fresh id per subscription"),
    ErrorSpec("unauthenticated", 420, False, "the request carries no valid credential"),
    ErrorSpec("forbidden", 421, False, "the credential may not do this"),
    ErrorSpec("rate_limited", 429, True, "the client sends faster than its limit allows"),
    ErrorSpec(
        "quota_exceeded", 430, False, "a server-wide limit (max_topics, max_subscriptions) is reached, or a topic's subscription records would pass 2 MiB"
    ),
    ErrorSpec("internal", 500, True, "the server failed while handling the request"),
    ErrorSpec("unavailable", 503, True, "a process the request needs is not answering; retry later"),
    ErrorSpec("storage_failed", 507, True, "the store refused the write (disk full or not writable); nothing was acknowledged"),
    ErrorSpec("timeout", 504, True, "no reply arrived before the deadline (raised by clients, never sent)"),
    ErrorSpec("closed", 499, False, "the client or subscription was closed (raised by clients, never sent)"),
)

ERRORS_BY_NAME: Final = {spec.name: spec for spec in ERROR_CATALOG}


class HeraldError(Exception):
    """An error reply from Herald, or a client-side failure with a catalog code.

    Attributes:
        code: the stable error name, e.g. ``"topic_not_found"``.
        number: the stable error number from the catalog, e.g. ``410``.
        retriable: whether the same request may succeed if sent again later.
        details: extra fields from the error header.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *, number: int | None = None, retriable: bool | None = None) -> None:
        spec = ERRORS_BY_NAME.get(code)
        super().__init__(f"{code}: {message}")
        self.code = code
        # A code this side does not know (a newer server) is not retried blindly.
        self.number = number if number is not None else (spec.number if spec else 0)
        self.retriable = retriable if retriable is not None else (spec.retriable if spec else False)
        self.message = message
        self.details = details or {}

    def to_header(self) -> dict[str, Any]:
        """The header of the ERROR reply that carries this error."""
        return {
            "code": self.code,
            "number": self.number,
            "retriable": self.retriable,
            "message": self.message,
            **({"details": self.details} if self.details else {}),
        }

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> HeraldError:
        """Rebuild the error carried by an ERROR reply's header."""
        code = header.get("code")
        message = header.get("message")
        details = header.get("details")
        number = header.get("number")
        retriable = header.get("retriable")
        return cls(
            code if isinstance(code, str) else "internal",
            message if isinstance(message, str) else "error reply without a message",
            details if isinstance(details, dict) else None,
            number=number if isinstance(number, int) and not isinstance(number, bool) else None,
            retriable=retriable if isinstance(retriable, bool) else None,
        )


class ProtocolError(HeraldError):
    """Raised by :func:`decode` and the validators when a peer breaks the protocol."""


# --------------------------------------------------------------------------- codec


class Frames(NamedTuple):
    """A decoded Herald message (without envelope or PUB topic frame)."""

    command: Command
    request_id: bytes
    header: dict[str, Any]
    payloads: list[bytes]


def encode(
    command: Command,
    request_id: bytes = b"",
    header: dict[str, Any] | None = None,
    payloads: list[bytes] | tuple[bytes, ...] = (),
    *,
    packed: bool = False,
) -> list[bytes]:
    """Build the frames of one Herald message.

    Args:
        command: the verb.
        request_id: echoed by the peer in its reply; empty for unsolicited messages.
        header: the JSON header fields.
        payloads: raw payload frames.
        packed: pack two or more payloads of at most PACK_MAX_BYTES together into
            one frame, with their sizes in the header's ``payload_sizes``
            (protocol.md §2); otherwise, and by default, a frame each.

    Returns:
        The frames, ready for ``send_multipart``.
    """
    if packed and len(payloads) > 1:
        sizes = [len(payload) for payload in payloads]
        if sum(sizes) <= PACK_MAX_BYTES:
            packed_header = {**header} if header else {}
            packed_header[PAYLOAD_SIZES_FIELD] = sizes
            return [SIGNATURE, command.value, request_id, orjson.dumps(packed_header), b"".join(payloads)]
    return [SIGNATURE, command.value, request_id, orjson.dumps(header or {}), *payloads]


def encode_ok(request_id: bytes, header: dict[str, Any] | None = None, payloads: list[bytes] | tuple[bytes, ...] = ()) -> list[bytes]:
    """An OK reply to the request ``request_id``."""
    return encode(Command.OK, request_id, header, payloads)


def encode_error(request_id: bytes, error: HeraldError, *, subscription: str | None = None) -> list[bytes]:
    """An ERROR reply carrying ``error``; a sender names the ``subscription`` the command it answers named."""
    header = error.to_header()
    if subscription is not None:
        header["subscription"] = subscription
    return encode(Command.ERROR, request_id, header)


def decode(frames: list[bytes], *, max_header_bytes: int = MAX_HEADER_BYTES, accept: frozenset[Command] | None = None, unpack_payloads: bool = True) -> Frames:
    """Parse and check the fixed part of a Herald message.

    Validation runs in a fixed order: frame count, signature, request id,
    command (one of ``accept``, when given), header, packed payloads. The
    request id is recovered as early as possible so that an error reply can
    still be matched by the peer. ``unpack_payloads=False`` leaves a
    ``payload_sizes`` field alone, for endpoints whose commands carry no payload.

    Raises:
        ProtocolError: with a catalog code naming the first thing wrong.
    """
    if len(frames) < 4:
        raise ProtocolError("malformed", f"message has {len(frames)} frames; at least 4 are required (signature, command, request id, header)")
    signature, raw_command, request_id, raw_header = frames[0], frames[1], frames[2], frames[3]
    if signature != SIGNATURE:
        if signature[:4] == SIGNATURE[:4]:
            raise ProtocolError(
                "unsupported_version", f"protocol version {signature[4:].decode('latin-1')!r} is not supported; this server speaks {SIGNATURE.decode()}"
            )
        raise ProtocolError("malformed", f"first frame must be the signature {SIGNATURE!r}, got {signature[:16]!r}")
    if len(request_id) > MAX_REQUEST_ID_BYTES:
        raise ProtocolError("malformed", f"request id of {len(request_id)} bytes exceeds {MAX_REQUEST_ID_BYTES} bytes")
    command = _COMMANDS_BY_VALUE.get(raw_command)
    if command is None:
        raise ProtocolError("unknown_command", f"unknown command {raw_command[:32]!r}")
    if accept is not None and command not in accept:
        raise ProtocolError("unknown_command", f"{command.name} is not a command this endpoint accepts; see docs/protocol.md")
    if len(raw_header) > max_header_bytes:
        raise ProtocolError("invalid_header", f"header of {len(raw_header)} bytes exceeds {max_header_bytes} bytes")
    try:
        header = orjson.loads(raw_header) if raw_header else {}
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid_header", f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("invalid_header", f"header must be a JSON object, got {json_type_of(header)}")
    if unpack_payloads and PAYLOAD_SIZES_FIELD in header:
        sizes = header.pop(PAYLOAD_SIZES_FIELD)
        if sizes is not None:  # null means absent, as for every header field
            return Frames(command, request_id, header, _unpack_payloads(sizes, frames[4:]))
    return Frames(command, request_id, header, frames[4:])


_INTS_ONLY: Final = frozenset({int})


def _unpack_payloads(sizes: Any, frames: list[bytes]) -> list[bytes]:
    """The payloads of a packed message: ``frames`` must be one frame, cut at ``sizes``."""
    if not isinstance(sizes, list) or not _INTS_ONLY.issuperset(map(type, sizes)) or (sizes and min(sizes) < 0):
        raise ProtocolError("invalid_header", "header field 'payload_sizes' must be a list of non-negative integers")
    if len(sizes) > MAX_BATCH_MESSAGES:  # before any slicing: no message carries more
        raise ProtocolError("batch_too_large", f"{len(sizes)} packed payloads exceed {MAX_BATCH_MESSAGES}; split the batch")
    if len(frames) != 1:
        raise ProtocolError("malformed", f"a message with payload_sizes carries exactly one payload frame, not {len(frames)}")
    packed = frames[0]
    total = sum(sizes)
    if total != len(packed):
        raise ProtocolError("malformed", f"payload_sizes add up to {total} bytes, but the payload frame has {len(packed)}")
    payloads: list[bytes] = []
    start = 0
    for size in sizes:  # a plain loop beats map(slice) and memoryviews here (17 against 31 us per 100)
        end = start + size
        payloads.append(packed[start:end])
        start = end
    return payloads


def request_id_of(frames: list[bytes]) -> bytes:
    """The request id of a possibly broken message, or b"" when there is none usable."""
    if len(frames) >= 3 and len(frames[2]) <= MAX_REQUEST_ID_BYTES:
        return frames[2]
    return b""


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split routing frames (up to and including the empty delimiter) from the body.

    A message without a delimiter keeps its first frame (the routing identity
    the proxy added) as envelope, so an error can still be routed back.
    """
    for index, frame in enumerate(frames):
        if not frame:
            return frames[: index + 1], frames[index + 1 :]
    return [*frames[:1], b""], frames[1:]


def live_topic_frame(topic: str) -> bytes:
    """The first frame of a live-feed message: the topic name and one NUL byte."""
    return topic.encode() + LIVE_TOPIC_TERMINATOR


MAX_MESSAGES_PER_LIVE: Final = 500  # one live-feed MESSAGE carries at most this many


def encode_live(topic: str, entries: list[dict[str, Any]], payloads: list[bytes]) -> list[list[bytes]]:
    """The live-feed MESSAGEs for messages of one topic, in order.

    Each carries up to MAX_MESSAGES_PER_LIVE messages, and is split further
    while its header would exceed MAX_HEADER_BYTES (what readers accept).

    Args:
        entries: ``{id, topic, attributes, ts}`` per message.
        payloads: one body per entry.
    """
    topic_frame = live_topic_frame(topic)
    out: list[list[bytes]] = []
    pending = [(start, min(start + MAX_MESSAGES_PER_LIVE, len(entries))) for start in range(0, len(entries), MAX_MESSAGES_PER_LIVE)]
    while pending:
        start, end = pending.pop(0)
        frames = encode(Command.MESSAGE, b"", {"messages": entries[start:end]}, payloads[start:end])
        if len(frames[3]) > MAX_HEADER_BYTES and end - start > 1:
            middle = (start + end) // 2
            pending[:0] = [(start, middle), (middle, end)]
            continue
        out.append([topic_frame, *frames])
    return out


def consumer_topic_frame(consumer_id: str) -> bytes:
    """The first frame of a message a sender directs at one consumer."""
    return consumer_id.encode() + LIVE_TOPIC_TERMINATOR


# --------------------------------------------------------------------------- validation


def check_name(value: Any, what: str = "name") -> str:
    """Return ``value`` if it is a valid topic or subscription name.

    Raises:
        ProtocolError: ``invalid_name`` with the value and the rule it breaks.
    """
    if not isinstance(value, str):
        raise ProtocolError("invalid_name", f"{what} must be a string, got {json_type_of(value)}")
    if not value:
        raise ProtocolError("invalid_name", f"{what} must not be empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ProtocolError("invalid_name", f"{what} of {size} bytes exceeds {MAX_NAME_BYTES} bytes")
    if not _NAME_PATTERN.fullmatch(value):
        raise ProtocolError(
            "invalid_name",
            f"{what} {value[:64]!r} may only contain letters, digits and . _ - / : @ (no spaces or control characters)",
        )
    return value


def get_field(header: dict[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
    """Read a typed header field, raising ``invalid_header`` when it is missing or mistyped."""
    if key not in header or header[key] is None:
        if required:
            raise ProtocolError("invalid_header", f"header field {key!r} is required")
        return default
    value = header[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float or (isinstance(kind, tuple) and bool not in kind)):
        raise ProtocolError("invalid_header", f"header field {key!r} must be {_kind_name(kind)}, got {json_type_of(value)}")
    if not isinstance(value, kind):
        raise ProtocolError("invalid_header", f"header field {key!r} must be {_kind_name(kind)}, got {json_type_of(value)}")
    return value


_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    """A Python type (or types) as the JSON a client should send: "an integer or a number"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def json_type_of(value: Any) -> str:
    """What JSON ``value`` was decoded from, for error messages: "a string", "null"..."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def check_attributes(value: Any) -> dict[str, str]:
    """Return message attributes if they are a small dict of strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("invalid_header", f"attributes must be an object of strings, got {json_type_of(value)}")
    if len(value) > MAX_ATTRIBUTES:
        raise ProtocolError("invalid_header", f"{len(value)} attributes exceed the limit of {MAX_ATTRIBUTES}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ProtocolError("invalid_header", f"attribute {key[:64]!r} must be a string, got {json_type_of(item)}")
        if len(key.encode()) + len(item.encode()) > MAX_ATTRIBUTE_BYTES:
            raise ProtocolError("invalid_header", f"attribute {key[:64]!r} is longer than {MAX_ATTRIBUTE_BYTES} bytes")
    return value


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One topic or subscription setting: type, default, bounds, meaning."""

    kind: type | tuple[type, ...]
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


DEFAULT_RETENTION_S: Final = 7 * 24 * 3600.0  # a week: long enough to ride out a weekend outage
DEFAULT_DEDUP_WINDOW_S: Final = 600.0  # ten minutes covers any sane client retry loop

TOPIC_SETTINGS: Final[dict[str, SettingSpec]] = {
    "retention": SettingSpec((int, float), DEFAULT_RETENTION_S, 1.0, 10 * 365 * 86400.0, "seconds an unacknowledged message is kept"),
    "dedup_window": SettingSpec((int, float), DEFAULT_DEDUP_WINDOW_S, 0.0, 7 * 86400.0, "seconds a client-given message id is remembered"),
    "max_payload": SettingSpec(int, None, 0, MAX_PAYLOAD_CEILING, "largest payload accepted, in bytes; default: the server's max_payload_bytes"),
}

DEFAULT_ACK_DEADLINE_S: Final = 30.0
DEFAULT_MAX_ATTEMPTS: Final = 5  # a poison message must not loop forever
DEFAULT_BACKOFF_MIN_S: Final = 1.0
DEFAULT_BACKOFF_MAX_S: Final = 60.0
DEFAULT_MAX_UNACKED: Final = 1000

SUBSCRIPTION_SETTINGS: Final[dict[str, SettingSpec]] = {
    "ack_deadline": SettingSpec((int, float), DEFAULT_ACK_DEADLINE_S, 0.01, 86400.0, "seconds before an unacknowledged delivery is redelivered"),
    "max_attempts": SettingSpec(int, DEFAULT_MAX_ATTEMPTS, 1, 1000, "deliveries before a message goes to the dead-letter topic"),
    "backoff_min": SettingSpec((int, float), DEFAULT_BACKOFF_MIN_S, 0.0, 3600.0, "first redelivery delay, seconds"),
    "backoff_max": SettingSpec((int, float), DEFAULT_BACKOFF_MAX_S, 0.0, 86400.0, "largest redelivery delay, seconds"),
    "max_unacked": SettingSpec(int, DEFAULT_MAX_UNACKED, 1, 100_000, "unacknowledged deliveries one consumer may hold"),
    "dead_letter_topic": SettingSpec(str, None, description="topic for messages that exhaust max_attempts; default '<subscription>.dead'"),
    "filter": SettingSpec(dict, None, description="attribute values a message must carry to be delivered"),
}


# TOPIC_LIST and SUB_LIST with ``limit`` or ``after`` answer in pages: at most ``limit`` records
# (LIST_LIMIT_MAX at most, and by default) and about LIST_PAGE_BYTES of them, whichever comes
# first; ``more`` says whether to ask again with ``after`` set to the last name. Without either
# field the whole list comes in one reply, as it did before pages (~16,000 subscriptions or ~40,000
# topics passed MAX_HEADER_BYTES), or ``list_too_large`` where it cannot: never a silent part of it.
LIST_PAGE_BYTES: Final = 1024 * 1024
LIST_LIMIT_MAX: Final = 10_000
LIST_WHOLE_BYTES: Final = MAX_HEADER_BYTES - 64 * 1024  # an unpaged list's records, leaving room for the rest of the reply


# The header fields each admin command reads, besides a credential's ``token``.
# Any other field is refused: a typo such as ``setting`` for ``settings`` would
# otherwise create a topic with default settings without a word.
ADMIN_FIELDS: Final[dict[Command, frozenset[str]]] = {
    Command.TOPIC_CREATE: frozenset({"name", "settings", "exist_ok"}),
    Command.TOPIC_DELETE: frozenset({"name"}),
    Command.TOPIC_LIST: frozenset({"prefix", "after", "limit"}),
    Command.TOPIC_DESCRIBE: frozenset({"name"}),
    Command.SUB_CREATE: frozenset({"topic", "name", "settings", "exist_ok"}),
    Command.SUB_DELETE: frozenset({"name"}),
    Command.SUB_LIST: frozenset({"topic", "after", "limit"}),
    Command.SUB_DESCRIBE: frozenset({"name"}),
}


def check_admin_fields(command: Command, header: dict[str, Any], ignored: frozenset[str]) -> None:
    """Refuse an admin command's header field that the command does not read (``ignored`` are let through).

    Raises:
        ProtocolError: ``invalid_header`` naming the field and the known ones.
    """
    known = ADMIN_FIELDS[command]
    unknown = sorted(key for key in header if key not in known and key not in ignored)
    if unknown:
        raise ProtocolError("invalid_header", f"{command.name} has no field {unknown[0][:64]!r}; its fields are {', '.join(sorted(known))}")


def check_settings(raw: Any, specs: dict[str, SettingSpec], what: str) -> dict[str, Any]:
    """Validate settings against their specs and fill in defaults.

    Raises:
        ProtocolError: ``invalid_setting`` naming the setting, the value and the rule.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_setting", f"{what} settings must be an object, got {json_type_of(raw)}")
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise ProtocolError("invalid_setting", f"unknown {what} setting {unknown[0]!r}; known: {', '.join(sorted(specs))}")
    settings: dict[str, Any] = {}
    for key, spec in specs.items():
        value = raw.get(key)
        if value is None:
            # Absent and explicit null both mean the default: a null must never
            # reach code that expects a number.
            settings[key] = spec.default
            continue
        if isinstance(value, bool) or not isinstance(value, spec.kind):
            raise ProtocolError("invalid_setting", f"{what} setting {key!r} must be {_kind_name(spec.kind)}, got {value!r}")
        if spec.minimum is not None and isinstance(value, int | float) and value < spec.minimum:
            raise ProtocolError("invalid_setting", f"{what} setting {key!r} = {value} is below the minimum {spec.minimum}")
        if spec.maximum is not None and isinstance(value, int | float) and value > spec.maximum:
            raise ProtocolError("invalid_setting", f"{what} setting {key!r} = {value} exceeds the maximum {spec.maximum}")
        settings[key] = value
    return settings


def check_subscription_settings(raw: Any) -> dict[str, Any]:
    """Subscription settings with cross-field rules checked.

    ``backoff`` may be given as ``[min, max]`` or ``{"min": .., "max": ..}``
    (seconds); it is stored as ``backoff_min`` and ``backoff_max``.
    """
    if isinstance(raw, dict) and "backoff" in raw:
        raw = dict(raw)
        backoff = raw.pop("backoff")
        if backoff is None:
            backoff = [None, None]  # null means the defaults, as for every setting
        if isinstance(backoff, dict) and set(backoff) <= {"min", "max"}:
            backoff = [backoff.get("min"), backoff.get("max")]
        if not (isinstance(backoff, list | tuple) and len(backoff) == 2):
            raise ProtocolError("invalid_setting", f"backoff must be [min, max] or {{'min': s, 'max': s}} in seconds, got {str(backoff)[:60]}")
        raw.setdefault("backoff_min", backoff[0])
        raw.setdefault("backoff_max", backoff[1])
    settings = check_settings(raw, SUBSCRIPTION_SETTINGS, "subscription")
    if settings["backoff_min"] > settings["backoff_max"]:
        raise ProtocolError(
            "invalid_setting",
            f"backoff_min = {settings['backoff_min']} must not exceed backoff_max = {settings['backoff_max']}",
        )
    if settings["dead_letter_topic"] is not None:
        check_name(settings["dead_letter_topic"], "dead_letter_topic")
    if settings["filter"] is not None:
        # A filter no message can pass (more entries than a message has attributes, or an entry
        # longer than an attribute may be) is refused: every lookup of the topic carries it.
        if len(settings["filter"]) > MAX_ATTRIBUTES:
            raise ProtocolError("invalid_setting", f"a filter of {len(settings['filter'])} attributes can never match: messages carry at most {MAX_ATTRIBUTES}")
        for key, item in settings["filter"].items():
            if not isinstance(item, str):
                raise ProtocolError("invalid_setting", f"filter value for {key!r} must be a string, got {item!r}")
            if len(key.encode()) + len(item.encode()) > MAX_ATTRIBUTE_BYTES:
                raise ProtocolError("invalid_setting", f"filter entry {key[:64]!r} can never match: an attribute is at most {MAX_ATTRIBUTE_BYTES} bytes")
    return settings


def dead_letter_topic_of(subscription: str, settings: dict[str, Any]) -> str:
    """The dead-letter topic of a subscription: its setting, or '<name>.dead'."""
    configured = settings.get("dead_letter_topic")
    return configured if isinstance(configured, str) else f"{subscription}.dead"


def matches_filter(attributes: dict[str, str], subscription_filter: dict[str, str] | None) -> bool:
    """Whether a message with ``attributes`` passes a subscription's filter."""
    if not subscription_filter:
        return True
    return all(attributes.get(key) == value for key, value in subscription_filter.items())


def shard_of(name: str, count: int) -> int:
    """The owner index of a topic (frontend shard) or subscription (sender).

    crc32 is stable across processes and languages, unlike Python's hash().
    """
    return zlib.crc32(name.encode()) % count if count > 0 else 0


@dataclass(slots=True)
class PublishItem:
    """One message of a publish request, as the frontend validated it."""

    message_id: str | None
    attributes: dict[str, str]
    payload: bytes


@dataclass(frozen=True, slots=True)
class IdSequence:
    """A PUBLISH's ``sequence``: message ``i`` of the request has the id ``prefix~n``, ``n`` = ``first + i`` in lowercase hex."""

    prefix: str
    first: int

    def message_id(self, index: int) -> str:
        return f"{self.prefix}~{self.first + index:x}"


def split_sequence_id(message_id: str) -> tuple[str, int] | None:
    """(prefix, number) of an id of the form an id sequence gives (``prefix~n``), else None."""
    prefix, separator, digits = message_id.rpartition(SEQUENCE_SEPARATOR)
    if not separator or not _HEX_NUMBER_PATTERN.fullmatch(digits):
        return None
    if len(prefix) > MAX_SEQUENCE_PREFIX_CHARS or not _SEQUENCE_PREFIX_PATTERN.fullmatch(prefix):
        return None
    return prefix, int(digits, 16)


def encode_publish(
    topic: str,
    items: list[tuple[bytes, dict[str, str] | None, str | None]],
    request_id: bytes,
    token: str | None = None,
    sequence: IdSequence | None = None,
) -> list[bytes]:
    """Frames of a PUBLISH request for ``items`` of (payload, attributes, message id).

    With ``sequence`` the ids come from it, and the items' own must be None.
    """
    messages: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    for payload, attributes, message_id in items:
        entry: dict[str, Any] = {}
        if message_id is not None:
            entry["id"] = message_id
        if attributes:
            entry["attributes"] = attributes
        messages.append(entry)
        payloads.append(payload)
    header: dict[str, Any] = {"topic": topic}
    if sequence is not None:
        header["sequence"] = {"prefix": sequence.prefix, "first": sequence.first}
    if sequence is None or any(messages):
        header["messages"] = messages  # without ids or attributes there is nothing to list
    if token:
        header["token"] = token
    return encode(Command.PUBLISH, request_id, header, payloads, packed=True)


def decode_sequence(header: dict[str, Any], count: int) -> IdSequence | None:
    """A PUBLISH's ``sequence`` field, checked for a request of ``count`` messages (None when absent).

    Raises:
        ProtocolError: ``invalid_header`` naming what is wrong.
    """
    sequence = header.get("sequence")
    if sequence is None:
        return None
    if type(sequence) is not dict:
        raise ProtocolError("invalid_header", f"header field 'sequence' must be an object {{prefix, first}}, got {json_type_of(sequence)}")
    prefix, first = sequence.get("prefix"), sequence.get("first")
    if type(prefix) is not str or not 0 < len(prefix) <= MAX_SEQUENCE_PREFIX_CHARS or not _SEQUENCE_PREFIX_PATTERN.fullmatch(prefix):
        raise ProtocolError("invalid_header", f"sequence.prefix must be 1 to {MAX_SEQUENCE_PREFIX_CHARS} letters, digits and . _ -, got {str(prefix)[:80]!r}")
    if type(first) is not int or first < 0 or first + count > SEQUENCE_NUMBER_LIMIT:
        raise ProtocolError(
            "invalid_header", f"sequence.first must be an integer from 0 to 2**63 - {count} (every number of the request below 2**63), got {str(first)[:40]}"
        )
    return IdSequence(prefix, first)


def decode_publish(frames: Frames, max_payload: int) -> tuple[str, list[PublishItem], IdSequence | None]:
    """Validate a PUBLISH request: topic name, one header entry per payload, sizes, and its id sequence if it has one.

    With a ``sequence`` every item's ``message_id`` is the id the sequence gives it.

    Raises:
        ProtocolError: the first problem found, with the offending index.
    """
    topic = check_name(get_field(frames.header, "topic", str), "topic")
    messages = frames.header.get("messages")
    payloads = frames.payloads
    if messages is None:
        messages = [{}] * len(payloads)
    if not isinstance(messages, list):
        raise ProtocolError("invalid_header", f"header field 'messages' must be a list, got {json_type_of(messages)}")
    if not payloads:
        raise ProtocolError("malformed", "PUBLISH carries no payload frame; send one frame per message (an empty frame is an empty payload)")
    if len(messages) != len(payloads):
        raise ProtocolError("malformed", f"PUBLISH header lists {len(messages)} messages but {len(payloads)} payload frames follow")
    if len(payloads) > MAX_BATCH_MESSAGES:
        raise ProtocolError("batch_too_large", f"{len(payloads)} messages in one PUBLISH exceed {MAX_BATCH_MESSAGES}; split the batch")
    sequence = decode_sequence(frames.header, len(payloads))
    items: list[PublishItem] = []
    for index, (entry, payload) in enumerate(zip(messages, payloads, strict=True)):
        if len(payload) > max_payload:
            raise ProtocolError(
                "payload_too_large",
                f"the payload of messages[{index}] is {len(payload)} bytes, over max_payload ({max_payload} bytes)",
                {"index": index, "size": len(payload), "limit": max_payload},
            )
        if type(entry) is not dict:
            raise ProtocolError("invalid_header", f"messages[{index}] must be an object, got {json_type_of(entry)}")
        message_id = entry.get("id")
        if sequence is not None:
            if message_id is not None:
                raise ProtocolError("invalid_header", f"messages[{index}] has an id of its own in a request with a sequence, which gives every message its id")
            message_id = sequence.message_id(index)
        elif message_id is not None:
            if type(message_id) is not str or not message_id:
                raise ProtocolError("invalid_header", f"messages[{index}].id must be a non-empty string")
            # A character is at most 4 bytes of UTF-8: short ids need no encoding to be measured.
            if len(message_id) > MAX_MESSAGE_ID_BYTES // 4 and len(message_id.encode()) > MAX_MESSAGE_ID_BYTES:
                raise ProtocolError("invalid_header", f"messages[{index}].id exceeds {MAX_MESSAGE_ID_BYTES} bytes")
        attributes = entry.get("attributes")
        items.append(PublishItem(message_id, check_attributes(attributes) if attributes is not None else {}, payload))
    return topic, items, sequence


# --------------------------------------------------------------------------- consumers

# A consumer re-sends ATTACH every CONSUMER_HEARTBEAT_S; a sender that hears
# nothing from it for CONSUMER_EXPIRY_S hands its unacknowledged messages to
# the subscription's other consumers.
CONSUMER_HEARTBEAT_S: Final = 1.0
CONSUMER_LIVENESS: Final = 5
CONSUMER_EXPIRY_S: Final = CONSUMER_HEARTBEAT_S * CONSUMER_LIVENESS
# Until its first WELCOME arrives, a consumer re-sends ATTACH this often: the
# SUB socket's subscription may not have reached the sender yet (slow joiner).
ATTACH_RETRY_S: Final = 0.1

ACK_OK: Final = "ok"
ACK_STALE: Final = "stale"
ACK_UNKNOWN: Final = "unknown"


def delivery_ref(shard: int, seq: int) -> str:
    """The handle a consumer acknowledges a delivery by: '<shard>.<seq>'."""
    return f"{shard}.{seq}"


def parse_delivery_ref(ref: Any) -> tuple[int, int]:
    """(shard, seq) of a delivery ref, or ProtocolError ``invalid_header``.

    A ref is 1-9 ASCII digits, a dot, 1-19 ASCII digits. Checked with string
    methods rather than a regex, which cost a third of this call's time, paid
    per acknowledged message in the sender.
    """
    if isinstance(ref, str):
        shard, dot, seq = ref.partition(".")
        if dot and 0 < len(shard) <= 9 and 0 < len(seq) <= 19 and ref.isascii() and shard.isdigit() and seq.isdigit():
            return int(shard), int(seq)
    raise ProtocolError("invalid_header", f"delivery ref {str(ref)[:40]!r} is not '<shard>.<seq>'")


def parse_acked_refs(items: Any, what: str) -> list[tuple[int, int, int]]:
    """The [ref, attempt] pairs of an ACK, NACK or DETACH as (shard, seq, attempt); all checked before any is used.

    :func:`parse_delivery_ref`'s checks, written out in one loop: a sender runs
    this for every acknowledged message.

    Raises:
        ProtocolError: ``invalid_header`` for the first entry that is not ``[ref, attempt]``.
    """
    if type(items) is not list:
        raise ProtocolError("invalid_header", f"{what} must be a list of [ref, attempt], got {json_type_of(items)}")
    parsed: list[tuple[int, int, int]] = []
    append = parsed.append
    for item in items:
        if type(item) is list and len(item) == 2:
            ref, attempt = item
            if type(attempt) is int:
                if type(ref) is str:
                    shard, dot, seq = ref.partition(".")
                    if dot and 0 < len(shard) <= 9 and 0 < len(seq) <= 19 and ref.isascii() and shard.isdigit() and seq.isdigit():
                        append((int(shard), int(seq), attempt))
                        continue
                parse_delivery_ref(ref)  # raises, naming the ref
        raise ProtocolError("invalid_header", f"each {what} entry must be [ref, attempt], got {str(item)[:60]}")
    return parsed


def encode_attach(
    subscription: str,
    consumer: str,
    *,
    ready: bool,
    request_id: bytes = b"",
    max_unacked: int | None = None,
    token: str | None = None,
    packed_payloads: bool = False,
    session: int | None = None,
) -> list[bytes]:
    """ATTACH (also the consumer heartbeat), sent on the consumer's PUSH socket.

    ``packed_payloads``: DELIVERs may pack their payloads into one frame
    (:func:`decode` unpacks them), which costs the sender and the consumer
    far less per message than a frame each.

    ``session``: the ``session`` of the last WELCOME this consumer received.
    It proves to the sender that the consumer's SUB socket hears it, so a ready
    ATTACH carrying it starts deliveries; one naming another session (sent
    before a sender restart or a consumer expiry was noticed) starts none.
    """
    header: dict[str, Any] = {"subscription": subscription, "consumer": consumer, "ready": ready}
    if packed_payloads:
        header["packed_payloads"] = True
    if session is not None:
        header["session"] = session
    if max_unacked is not None:
        header["max_unacked"] = max_unacked
    if token:
        header["token"] = token
    return encode(Command.ATTACH, request_id, header)


def encode_acks(
    command: Command, subscription: str, consumer: str, refs: list[tuple[str, int]], request_id: bytes = b"", token: str | None = None
) -> list[bytes]:
    """ACK or NACK of (ref, attempt) pairs; a non-empty request id asks for an ACK_REPLY."""
    key = "acks" if command is Command.ACK else "nacks"
    header: dict[str, Any] = {"subscription": subscription, "consumer": consumer, key: [[ref, attempt] for ref, attempt in refs]}
    if token:
        header["token"] = token
    return encode(command, request_id, header)


# --------------------------------------------------------------------------- transport helpers

# pyzmq's send_multipart combines enum flags per frame, which costs more than
# the send itself for small frames; plain ints halve it.
_SNDMORE: Final = 2
NOBLOCK: Final = 1


# pyzmq's Python-level Socket.send only adds DRAFT routing-id and group handling
# before calling the compiled send beneath it; calling that directly costs a
# third less per frame (2.1 against 3.3 us for a 6-frame message here), which
# matters where every message is several frames (DELIVER, the live feed).
_PLAIN_SEND: Final = zmq.Socket.send
_COMPILED_SEND: Final = zmq.backend.Socket.send


def send_frames(sock: Any, frames: list[bytes], flags: int = 0) -> None:
    """Send a multipart message; ``flags`` may be :data:`NOBLOCK` (raises zmq.Again)."""
    last = len(frames) - 1
    if type(sock).send is _PLAIN_SEND:  # not a zmq.asyncio socket, whose send must stay its own
        send = _COMPILED_SEND
        for index, frame in enumerate(frames):
            send(sock, frame, flags | _SNDMORE if index < last else flags)
        return
    for index, frame in enumerate(frames):
        sock.send(frame, flags | _SNDMORE if index < last else flags)


def recv_frames(sock: Any, flags: int = 0) -> list[bytes]:
    """Receive one multipart message; ``flags`` may be :data:`NOBLOCK` (raises zmq.Again).

    Receiving Frame objects and reading ``more`` from each is twice as fast as
    ``recv`` plus a RCVMORE socket option per frame (4.7 against 10.8 us for a
    5-frame message here): the option goes through pyzmq's enum conversion.
    """
    recv = sock.recv
    frame = recv(flags, copy=False)
    parts: list[bytes] = [frame.bytes]
    while frame.more:
        frame = recv(flags, copy=False)
        parts.append(frame.bytes)
    return parts


class DeliveredMessage(NamedTuple):
    """One message of a DELIVER: what a consumer sees and acknowledges by ``ref``."""

    id: str
    topic: str
    attempt: int
    attributes: dict[str, str]
    ts: float
    ref: str
    payload: bytes


def encode_deliver(consumer_id: str, subscription: str, messages: list[DeliveredMessage]) -> list[bytes]:
    """A DELIVER on a sender's PUB socket, addressed to one consumer."""
    entries = [{"id": m.id, "topic": m.topic, "attempt": m.attempt, "attributes": m.attributes, "ts": m.ts, "ref": m.ref} for m in messages]
    return encode_deliver_entries(consumer_id, subscription, entries, [m.payload for m in messages])


def encode_deliver_entries(consumer_id: str, subscription: str, entries: list[dict[str, Any]], payloads: list[bytes], *, packed: bool = False) -> list[bytes]:
    """A DELIVER from entries that already hold exactly the fields of a DELIVER message (the sender's hot path).

    ``packed``: the consumer asked for packed payloads (ATTACH ``packed_payloads``).
    """
    header = {"subscription": subscription, "messages": entries}
    return [consumer_topic_frame(consumer_id), *encode(Command.DELIVER, b"", header, payloads, packed=packed)]


# One checked DELIVER entry: id, topic, attempt, attributes, ts, ref, payload (DeliveredMessage's order).
DeliverRow = tuple[str, str, int, dict[str, str], float, str, bytes]


def decode_deliver(frames: Frames) -> tuple[list[DeliveredMessage], int]:
    """The well-formed messages of a DELIVER and the number of malformed entries skipped.

    Raises:
        ProtocolError: when headers and payload frames cannot be paired at all.
    """
    rows, skipped = decode_deliver_rows(frames)
    return [DeliveredMessage._make(row) for row in rows], skipped


def decode_deliver_rows(frames: Frames) -> tuple[list[DeliverRow], int]:
    """:func:`decode_deliver` as plain tuples: what a consumer runs for every delivery.

    The checks compare exact types: orjson gives exactly ``str``, ``int``,
    ``float``, ``dict`` (and ``bool``, which is not an ``int`` here), and an
    exact type test costs less than ``isinstance`` per field per message.

    Raises:
        ProtocolError: when headers and payload frames cannot be paired at all.
    """
    entries = frames.header.get("messages")
    if type(entries) is not list or len(entries) != len(frames.payloads):
        raise ProtocolError(
            "malformed", f"DELIVER lists {len(entries) if isinstance(entries, list) else 'no'} messages for {len(frames.payloads)} payload frames"
        )
    rows: list[DeliverRow] = []
    append = rows.append
    skipped = 0
    for entry, payload in zip(entries, frames.payloads, strict=True):
        if type(entry) is not dict:
            skipped += 1
            continue
        message_id, topic, attempt, ref = entry.get("id"), entry.get("topic"), entry.get("attempt"), entry.get("ref")
        attributes, ts = entry.get("attributes") or {}, entry.get("ts") or 0.0
        if type(message_id) is str and type(topic) is str and type(ref) is str and type(attempt) is int and type(attributes) is dict:
            if type(ts) is float:
                append((message_id, topic, attempt, attributes, ts, ref, payload))
                continue
            if type(ts) is int:
                append((message_id, topic, attempt, attributes, float(ts), ref, payload))
                continue
        skipped += 1
    return rows, skipped


# --------------------------------------------------------------------------- internal messages (§12)
#
# Only Herald's own processes send these, but a version mix-up or a stray
# writer on the loopback must cost one message, never a process or its state:
# each is read whole, with exact types and ranges, before any of it is applied.

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1
_STRINGS_ONLY: Final = frozenset({str})


def _bounded(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError("invalid_header", f"{what} must be an integer in {low}..{high}, got {str(value)[:40]!r}")
    return value


_LISTS_ONLY: Final = frozenset({list})


def _entries(header: dict[str, Any], command: Command, width: int) -> list[list[Any]]:
    entries = header.get("entries", [])
    # Checked with C-level loops over the whole list: a COMPLETE per 250 acks reaches the owning frontend.
    if not isinstance(entries, list) or not _LISTS_ONLY.issuperset(map(type, entries)) or not {width}.issuperset(map(len, entries)):
        raise ProtocolError("invalid_header", f"{command.name} entries must be a list of {width}-element lists")
    return entries


def decode_credit(header: dict[str, Any], senders: int) -> tuple[int, int, dict[int, int]]:
    """CREDIT ``{sender, epoch, windows}`` as (sender index, epoch, {subscription id: window})."""
    sender = _bounded(header.get("sender"), "CREDIT sender", 0, senders - 1)
    epoch = _bounded(header.get("epoch"), "CREDIT epoch", 1, U64_MAX)
    raw = header.get("windows", {})
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_header", "CREDIT windows must be an object")
    windows: dict[int, int] = {}
    for key, window in raw.items():
        if not (key.isascii() and key.isdigit()):
            raise ProtocolError("invalid_header", f"CREDIT window key {key[:40]!r} is not a subscription id")
        windows[_bounded(int(key), "CREDIT subscription id", 0, U64_MAX)] = _bounded(window, "CREDIT window", 0, U32_MAX)
    return sender, epoch, windows


def decode_complete(header: dict[str, Any]) -> list[tuple[int, int]]:
    """COMPLETE ``{entries: [[sub, seq], …]}``."""
    entries = _entries(header, Command.COMPLETE, 2)
    values = list(chain.from_iterable(entries))
    if not _INTS_ONLY.issuperset(map(type, values)) or (values and (min(values) < 0 or max(values) > U64_MAX)):
        raise ProtocolError("invalid_header", f"COMPLETE entries must be [sub, seq] integers in 0..{U64_MAX}")
    return list(zip(values[0::2], values[1::2], strict=True))


def decode_attempted(header: dict[str, Any]) -> list[tuple[int, int, int]]:
    """ATTEMPTED ``{entries: [[sub, seq, attempt], …]}``."""
    return [
        (_bounded(sub, "ATTEMPTED sub", 0, U64_MAX), _bounded(seq, "ATTEMPTED seq", 0, U64_MAX), _bounded(attempt, "ATTEMPTED attempt", 1, U32_MAX))
        for sub, seq, attempt in _entries(header, Command.ATTEMPTED, 3)
    ]


def decode_dead(header: dict[str, Any]) -> list[tuple[int, int, int, str]]:
    """DEAD ``{entries: [[sub, seq, attempts, dead_letter_topic], …]}``."""
    return [
        (
            _bounded(sub, "DEAD sub", 0, U64_MAX),
            _bounded(seq, "DEAD seq", 0, U64_MAX),
            _bounded(attempts, "DEAD attempts", 1, U32_MAX),
            check_name(topic, "DEAD dead-letter topic"),
        )
        for sub, seq, attempts, topic in _entries(header, Command.DEAD, 4)
    ]


def decode_dispatch(header: dict[str, Any], payloads: list[bytes]) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, int, int]]]:
    """The messages and entries of a DISPATCH, every one checked before any is used.

    Returns:
        ``messages``: (seq, the fields a DELIVER carries on), one per payload
        frame; ``entries``: (subscription id, message index, attempt).

    Raises:
        ProtocolError: ``invalid_header`` for anything malformed; the whole DISPATCH is refused.
    """
    messages = get_field(header, "messages", list)
    entries = get_field(header, "entries", list)
    if len(messages) != len(payloads):
        raise ProtocolError("invalid_header", f"DISPATCH lists {len(messages)} messages for {len(payloads)} payload frames")
    count = len(messages)
    checked_entries: list[tuple[int, int, int]] = []
    for entry in entries:
        if not (type(entry) is list and len(entry) == 3):
            raise ProtocolError("invalid_header", f"a DISPATCH entry must be [sub, message index, attempt], got {str(entry)[:60]}")
        sub, index, attempt = entry
        if not (type(sub) is int and type(index) is int and type(attempt) is int and 0 <= sub <= U64_MAX and 0 <= index < count and 1 <= attempt <= U32_MAX):
            raise ProtocolError(
                "invalid_header", f"a DISPATCH entry needs a subscription id, an index below {count} and an attempt >= 1, got {str(entry)[:60]}"
            )
        checked_entries.append((sub, index, attempt))
    return [decode_dispatch_message(message) for message in messages], checked_entries


def decode_dispatch_message(message: Any) -> tuple[int, dict[str, Any]]:
    """One message of a DISPATCH as (seq, the fields a DELIVER carries on).

    The fields are rebuilt from exact types rather than passed on: a sender
    re-encodes them for its consumers, and must never hold what it cannot
    encode. Written out flat: a sender runs it for every message.
    """
    try:
        seq, message_id, topic, attributes, timestamp = message["seq"], message["id"], message["topic"], message["attributes"], message["ts"]
    except (KeyError, TypeError):
        raise ProtocolError("invalid_header", "a DISPATCH message must be an object with seq, id, topic, attributes and ts") from None
    if not (
        type(seq) is int
        and 0 <= seq <= U64_MAX
        and type(message_id) is str
        and type(topic) is str
        and type(attributes) is dict
        and (type(timestamp) is float or type(timestamp) is int)
        and (not attributes or _STRINGS_ONLY.issuperset(map(type, attributes.values())))
    ):
        raise ProtocolError("invalid_header", "a DISPATCH message needs an integer seq in range, a string id and topic, string attributes and a numeric ts")
    return seq, {"id": message_id, "topic": topic, "attributes": attributes, "ts": timestamp}
