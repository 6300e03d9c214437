"""Fuzz input for Herald: hypothesis strategies, frame mutations, and oracles.

The oracles say what docs/protocol.md promises for a given input: which error
code a request must get (§2's check order, the per-command checks of §4) and
what a sender answers on a consumer's topic (§9). tests/test_fuzz.py sends the
frames and compares the replies with them. Nothing here opens a socket.

Every generated case carries its frames in an object whose ``repr`` shortens
big frames, so that a falsifying example stays readable: hypothesis prints it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from hypothesis import strategies as st

from clients.protocol import (
    CLIENT_COMMANDS,
    CONSUMER_HEARTBEAT_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_UNACKED,
    MAX_ATTRIBUTE_BYTES,
    MAX_ATTRIBUTES,
    MAX_BATCH_MESSAGES,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_ID_BYTES,
    MAX_NAME_BYTES,
    MAX_REQUEST_ID_BYTES,
    SIGNATURE,
    Command,
    IdSequence,
    ProtocolError,
    encode,
    encode_acks,
    encode_attach,
    encode_publish,
    parse_delivery_ref,
    shard_of,
)

MIB: Final = 1024 * 1024

# ---------------------------------------------------------------- what the fuzz may touch
# The fuzz creates and deletes nothing outside these names. Mutations change a
# few bytes at most, which cannot turn one of these into a guarded name.
FUZZ_TOPIC: Final = "fz.topic"  # exists, no subscriptions: a mutated PUBLISH that stays valid lands here
FUZZ_OTHER_TOPIC: Final = "fz.topic2"  # exists, holds FUZZ_SUBSCRIPTION
FUZZ_SUBSCRIPTION: Final = "fz.sub"
ABSENT_PREFIX: Final = "fz.absent."  # never created: names under it must give *_not_found
NEW_TOPIC_PREFIX: Final = "fz.new."  # only used in requests that must fail
NEW_SUBSCRIPTION_PREFIX: Final = "fz.newsub."
ACK_TOPIC: Final = "ackfz.topic"  # the consumer fuzz's subscriptions live here; it never gets messages
ACK_SUBSCRIPTION_PREFIX: Final = "ackfz.known."
ACK_ABSENT_PREFIX: Final = "ackfz.absent."

# ---------------------------------------------------------------- the documented rules
# §5: 1 to 255 bytes of ASCII letters, digits and . _ - / : @
NAME_CHARACTERS: Final = string.ascii_letters + string.digits + "._-/:@"
_NAME_RULE: Final = re.compile(r"[A-Za-z0-9._\-/:@]+")
# §4 lists the client verbs; every other verb the protocol knows is refused on the request endpoint.
CLIENT_VERBS: Final = frozenset(command.value for command in CLIENT_COMMANDS)
KNOWN_VERBS: Final = frozenset(command.value for command in Command)
NON_CLIENT_VERBS: Final = tuple(sorted(KNOWN_VERBS - CLIENT_VERBS))
INTERNAL_VERBS: Final = (b"REGISTER", b"LOOKUP_TOPIC", b"EVENT", b"EVENT_ACK", b"DISPATCH", b"CREDIT", b"COMPLETE", b"ATTEMPTED", b"DEAD", b"FORWARD")
CONSUMER_VERBS: Final = frozenset({b"ATTACH", b"ACK", b"NACK", b"DETACH"})
MAX_CONSUMER_ID_CHARACTERS: Final = 128
# The codes a request that passes §2's frame checks can still get from the §4 checks.
FIELD_LEVEL_CODES: Final = frozenset(
    {
        "malformed",
        "invalid_header",
        "invalid_name",
        "invalid_setting",
        "payload_too_large",
        "batch_too_large",
        "topic_not_found",
        "topic_exists",
        "subscription_not_found",
        "subscription_exists",
    }
)


def is_valid_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_NAME_BYTES and _NAME_RULE.fullmatch(value) is not None


def parse_header(raw: bytes) -> Any:
    """The header as the protocol reads it (§2: an empty frame counts as {}), or a ValueError."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    return orjson.loads(raw) if raw else {}


def is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(parse_header(raw), dict)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return False


def documented_request_id(body: list[bytes]) -> bytes:
    """§2: an error reply carries the request id whenever frame 2 exists and is at most 64 bytes."""
    return body[2] if len(body) >= 3 and len(body[2]) <= MAX_REQUEST_ID_BYTES else b""


def documented_frame_error(body: list[bytes], accepted_verbs: frozenset[bytes] = CLIENT_VERBS) -> str | None:
    """The code of the first of §2's frame checks that ``body`` fails, or None when it passes them all."""
    if len(body) < 4:
        return "malformed"
    if body[0] != SIGNATURE:
        return "unsupported_version" if body[0].startswith(SIGNATURE[:4]) else "malformed"
    if len(body[2]) > MAX_REQUEST_ID_BYTES:
        return "malformed"
    if body[1] not in accepted_verbs:
        return "unknown_command"
    if not is_json_object(body[3]):
        return "invalid_header"
    return None


def documented_request_codes(body: list[bytes]) -> tuple[frozenset[str], bool]:
    """The error codes the docs allow for a request on the request endpoint, and whether OK is allowed.

    One deviation is tolerated here: a non-client verb with a bad header gets
    ``invalid_header`` instead of §2's ``unknown_command``. That bug has its
    own strict xfail test (test_fuzz.py), so the properties keep hunting others.
    """
    code = documented_frame_error(body)
    if code is None:
        return FIELD_LEVEL_CODES, True
    if code == "unknown_command" and body[1] in KNOWN_VERBS and not is_json_object(body[3]):
        return frozenset({"unknown_command", "invalid_header"}), False
    return frozenset({code}), False


def split_at_first_empty_frame(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """§3: without the delimiter, the server ends the envelope at the first empty frame it finds.

    With no empty frame at all, the whole message is the request and the reply
    gets a delimiter of its own (split_envelope in clients/protocol.py).
    """
    for index, frame in enumerate(frames):
        if not frame:
            return frames[: index + 1], frames[index + 1 :]
    return [b""], frames


# ---------------------------------------------------------------- readable cases


def short_frame(frame: bytes) -> str:
    return repr(frame) if len(frame) <= 72 else f"{frame[:40]!r}+...({len(frame)} bytes)"


def short_frames(frames: list[bytes]) -> str:
    """Frames as a list literal, with big frames cut and runs of equal frames counted."""
    parts: list[str] = []
    index = 0
    while index < len(frames):
        run = 1
        while index + run < len(frames) and frames[index + run] == frames[index]:
            run += 1
        parts.append(short_frame(frames[index]) + (f" * {run}" if run > 2 else ""))
        if run <= 2:
            parts.extend([short_frame(frames[index])] * (run - 1))
        index += run
    return "[" + ", ".join(parts) + "]"


class Readable:
    """A ``repr`` (also for hypothesis' pretty printer) that shortens big frames."""

    frames: list[bytes]

    def describe(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.describe()
        return f"{type(self).__name__}({extra + ', ' if extra else ''}frames={short_frames(self.frames)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(repr=False)
class RequestCase(Readable):
    """One request for the request endpoint (without the delimiter) and what the docs allow as answer."""

    frames: list[bytes]
    codes: frozenset[str]
    ok_allowed: bool = False
    label: str = ""
    details: dict[str, int] | None = None  # the ERROR's documented ``details``, when the docs give them

    def describe(self) -> str:
        return f"{self.label!r}, codes={sorted(self.codes)}, ok_allowed={self.ok_allowed}"

    @classmethod
    def from_oracle(cls, frames: list[bytes], label: str) -> RequestCase:
        """A case for any frames, with the codes documented_request_codes gives them."""
        codes, ok_allowed = documented_request_codes(frames)
        return cls(frames, codes, ok_allowed, label)

    def with_request_id(self, request_id: bytes) -> RequestCase:
        """The same case with ``request_id`` in frame 2 (see with_request_id)."""
        return dataclasses.replace(self, frames=with_request_id(self.frames, request_id))


def with_request_id(frames: list[bytes], request_id: bytes) -> list[bytes]:
    """``frames`` with ``request_id`` in frame 2, where frame 2 can carry one.

    The generated cases keep their codes: frame 2 is their request id, or they
    fail a check that comes before the request id check (frame count,
    signature). A frame 2 over 64 bytes is kept, as the point of its case.
    """
    if len(frames) < 3 or len(frames[2]) > MAX_REQUEST_ID_BYTES:
        return frames
    return [*frames[:2], request_id, *frames[3:]]


@dataclass(repr=False)
class RequestBurst:
    """Requests sent back to back on one socket, before any reply is read."""

    cases: list[RequestCase]

    def __repr__(self) -> str:
        return "RequestBurst([\n" + "".join(f"    {case!r},\n" for case in self.cases) + "])"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(repr=False)
class MutatedFrames(Readable):
    """Frames made from a valid message by a few mutations."""

    frames: list[bytes]
    base: str
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"base={self.base!r}, steps={self.steps}"


@dataclass(repr=False)
class ConsumerCase(Readable):
    """One message for a sender's ack endpoint."""

    frames: list[bytes]
    sender: int
    label: str = ""

    def describe(self) -> str:
        return f"sender={self.sender}, {self.label!r}"


# ---------------------------------------------------------------- JSON building blocks


class _Missing:
    """A header field left out entirely (as opposed to sent as null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def json_bytes(value: Any) -> bytes:
    """JSON text for any value, including ints beyond 64 bits (which orjson cannot write)."""
    if isinstance(value, dict):
        value = {key: item for key, item in value.items() if item is not MISSING}
    return json.dumps(value, ensure_ascii=False).encode()


JSON_SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),  # beyond 64 bits orjson reads a float
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
# Deepest nesting a header may carry through the whole system: the frontend re-encodes admin
# headers for metadata, and orjson.dumps stops at 255 levels (a known bug, see test_fuzz.py).
MAX_SAFE_NESTING: Final = 250


def nested(depth: int, leaf: Any = 0, *, objects: bool = False) -> Any:
    """``leaf`` inside ``depth`` arrays (or objects), built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"a": value} if objects else [value]
    return value


JSON_VALUES: Final = st.one_of(
    st.recursive(
        JSON_SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=10,
    ),
    st.builds(nested, st.integers(min_value=11, max_value=MAX_SAFE_NESTING - 2), JSON_SCALARS, objects=st.booleans()),
)
NON_STRINGS: Final = JSON_VALUES.filter(lambda value: not isinstance(value, str))
PRESENT_NON_STRINGS: Final = JSON_VALUES.filter(lambda value: value is not None and not isinstance(value, str))
ABSENT_OR_NON_STRING: Final = st.one_of(st.just(MISSING), NON_STRINGS)
PRESENT_NON_BOOLEANS: Final = JSON_VALUES.filter(lambda value: value is not None and not isinstance(value, bool))
PRESENT_NON_LISTS: Final = JSON_VALUES.filter(lambda value: value is not None and not isinstance(value, list))
PRESENT_NON_OBJECTS: Final = JSON_VALUES.filter(lambda value: value is not None and not isinstance(value, dict))
NON_OBJECTS: Final = JSON_VALUES.filter(lambda value: not isinstance(value, dict))
NOT_NUMBERS: Final = JSON_VALUES.filter(lambda value: value is not None and (isinstance(value, bool) or not isinstance(value, int | float)))
INTEGRAL_FLOATS: Final = st.integers(min_value=-(10**6), max_value=10**6).map(float)
NOT_INTEGERS: Final = st.one_of(
    NOT_NUMBERS,
    INTEGRAL_FLOATS,  # 5.0 is a float in JSON, not an integer
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=2**64, max_value=2**80),  # read as a float
)
EXTRA_FIELDS: Final = st.dictionaries(st.text(max_size=6).map(lambda key: "x-" + key), JSON_VALUES, max_size=2)
# A field no admin command reads: a typo of a real one, or anything else.
UNKNOWN_ADMIN_FIELDS: Final = st.dictionaries(
    st.one_of(st.sampled_from(["setting", "exists_ok", "Name", "retention"]), st.text(max_size=6).map(lambda key: "x-" + key)),
    JSON_VALUES,
    min_size=1,
    max_size=2,
)
REQUEST_IDS: Final = st.binary(max_size=MAX_REQUEST_ID_BYTES)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from each strategy with the odds of its weight.

    st.one_of picks its branches about evenly, and collapses repeated ones, so
    listing a strategy twice does not make it twice as likely.
    """
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


def rarely(rare: st.SearchStrategy[Any], usual: st.SearchStrategy[Any], one_in: int = 12) -> st.SearchStrategy[Any]:
    """``rare`` about once in ``one_in`` draws."""
    return weighted((one_in - 1, usual), (1, rare))


def valid_names(prefix: str, max_suffix: int = 24) -> st.SearchStrategy[str]:
    return st.text(alphabet=NAME_CHARACTERS, min_size=1, max_size=max_suffix).map(lambda suffix: prefix + suffix)


BAD_NAMES: Final = st.one_of(
    st.just(""),
    st.text(alphabet=NAME_CHARACTERS, min_size=MAX_NAME_BYTES + 1, max_size=MAX_NAME_BYTES + 40),
    st.text(alphabet="éß€", min_size=MAX_NAME_BYTES // 2, max_size=MAX_NAME_BYTES),
    st.tuples(
        st.text(alphabet=NAME_CHARACTERS, max_size=8),
        st.characters().filter(lambda character: character not in NAME_CHARACTERS),
        st.text(alphabet=NAME_CHARACTERS, max_size=8),
    ).map("".join),
    st.text(max_size=24).filter(lambda text: not is_valid_name(text)),
)
HUGE_FRAMES: Final = st.sampled_from([2 * MIB, 3 * MIB + 7, 5 * MIB]).map(lambda size: b"\xa5" * size)
FRAMES: Final = rarely(HUGE_FRAMES, st.one_of(st.binary(max_size=48), st.just(b"")), one_in=40)
PAYLOAD_FRAMES: Final = rarely(st.integers(min_value=100, max_value=2000).map(lambda count: [b"p"] * count), st.lists(FRAMES, max_size=4), one_in=20)
# One byte over the 4 MiB limit, and otherwise a perfectly good JSON object.
OVERSIZED_HEADER: Final = b'{"pad":"' + b"x" * (MAX_HEADER_BYTES - 9) + b'"}'
assert len(OVERSIZED_HEADER) == MAX_HEADER_BYTES + 1


def _invalid_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


@st.composite
def truncated_headers(draw: st.DrawFn) -> bytes:
    text = json_bytes(draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)))
    # A proper prefix of a JSON object never parses: its closing brace is the last byte.
    return text[: draw(st.integers(min_value=1, max_value=len(text) - 1))]


BAD_HEADERS: Final = rarely(
    st.just(OVERSIZED_HEADER),
    st.one_of(
        st.binary(min_size=1, max_size=12).filter(_invalid_utf8).map(lambda garbage: b'{"name": "' + garbage + b'"}'),
        truncated_headers(),
        NON_OBJECTS.map(json_bytes),
        st.binary(min_size=1, max_size=64).filter(lambda raw: not is_json_object(raw)),
        st.sampled_from([b" ", b"\n", b"{}x", b"{} {}", b"{'a': 1}", b'{"a": NaN}', b'{"a": 1e400}', b'{"a": "\\ud800"}', b"\xef\xbb\xbf{}"]),
        # Deep, but far from the depth that crashes orjson 3.8 (a known bug, see test_fuzz.py).
        st.integers(min_value=MAX_SAFE_NESTING, max_value=20_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(min_value=MAX_SAFE_NESTING, max_value=20_000).map(lambda depth: b'[{"a":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}]"),
    ),
    one_in=25,
)
OBJECT_HEADERS: Final = st.one_of(st.just(b""), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(json_bytes))
ANY_HEADERS: Final = st.one_of(OBJECT_HEADERS, BAD_HEADERS)
ANY_VERBS: Final = st.one_of(st.sampled_from(sorted(KNOWN_VERBS)), st.binary(max_size=16))
UNKNOWN_VERBS: Final = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(sorted(CLIENT_VERBS)).flatmap(
        lambda verb: st.sampled_from([verb.lower(), verb + b" ", b" " + verb, verb + b"\x00", verb[:-1], verb + verb[-1:]])
    ),
).filter(lambda verb: verb not in KNOWN_VERBS)


# ---------------------------------------------------------------- frame-level cases (§2)


FRAME_CHECKS: Final = ("frame_count", "signature", "request_id", "unknown_verb", "internal_verb", "header")


@st.composite
def frame_level_cases(draw: st.DrawFn, kind: str) -> RequestCase:
    """A request that fails the §2 frame check ``kind`` (one of FRAME_CHECKS), with exactly the code the docs give."""
    request_id = draw(REQUEST_IDS)
    payloads: list[bytes] = draw(PAYLOAD_FRAMES)
    if kind == "frame_count":
        if draw(st.booleans()):
            frames: list[bytes] = draw(st.lists(FRAMES, max_size=3))
        else:  # the first frames of a good request
            good = [SIGNATURE, draw(st.sampled_from(sorted(CLIENT_VERBS))), request_id]
            frames = good[: draw(st.integers(min_value=0, max_value=3))]
        return RequestCase(frames, frozenset({"malformed"}), label=f"{len(frames)} frames")
    if kind == "signature":
        signature = draw(
            st.one_of(
                st.binary(max_size=16),
                st.binary(max_size=8).map(lambda tail: SIGNATURE[:4] + tail),
                st.sampled_from([b"HRLD", b"HRLD0", b"HRLD2", b"HRLD10", b"hrld1", b"HRLD1 ", b" HRLD1", b"HRL", b"HRLD\x00"]),
            ).filter(lambda candidate: candidate != SIGNATURE)
        )
        rest = [draw(ANY_VERBS), draw(st.one_of(REQUEST_IDS, st.binary(min_size=65, max_size=100))), draw(ANY_HEADERS)]
        code = "unsupported_version" if signature.startswith(SIGNATURE[:4]) else "malformed"
        return RequestCase([signature, *rest, *payloads], frozenset({code}), label=f"signature {signature[:16]!r}")
    if kind == "request_id":
        long_id = draw(rarely(st.just(b"r" * (3 * MIB)), st.integers(min_value=MAX_REQUEST_ID_BYTES + 1, max_value=300).map(lambda size: b"r" * size)))
        frames = [SIGNATURE, draw(ANY_VERBS), long_id, draw(ANY_HEADERS), *payloads]
        return RequestCase(frames, frozenset({"malformed"}), label=f"request id of {len(long_id)} bytes")
    if kind == "unknown_verb":
        verb = draw(UNKNOWN_VERBS)
        return RequestCase([SIGNATURE, verb, request_id, draw(ANY_HEADERS), *payloads], frozenset({"unknown_command"}), label=f"verb {verb[:24]!r}")
    if kind == "internal_verb":
        # With a good header: the bad-header variant is a known bug (see documented_request_codes).
        verb = draw(st.one_of(st.sampled_from(INTERNAL_VERBS), st.sampled_from(NON_CLIENT_VERBS)))
        return RequestCase([SIGNATURE, verb, request_id, draw(OBJECT_HEADERS), *payloads], frozenset({"unknown_command"}), label=f"verb {verb!r}")
    header = draw(BAD_HEADERS)
    verb = draw(st.sampled_from(sorted(CLIENT_VERBS)))
    return RequestCase([SIGNATURE, verb, request_id, header, *payloads], frozenset({"invalid_header"}), label=f"{verb.decode()} with a bad header")


# ---------------------------------------------------------------- field-level cases (§4, §6)

# Valid values, so that a case's one bad field is the only thing wrong with it.
VALID_TOPIC_SETTINGS: Final = st.fixed_dictionaries(
    {},
    optional={
        "retention": st.one_of(st.none(), st.floats(min_value=1.0, max_value=315360000.0), st.integers(min_value=1, max_value=315360000)),
        "dedup_window": st.one_of(st.none(), st.floats(min_value=0.0, max_value=604800.0)),
        "max_payload": st.one_of(st.none(), st.integers(min_value=0, max_value=64 * MIB)),
    },
)
VALID_SUBSCRIPTION_SETTINGS: Final = st.fixed_dictionaries(
    {},
    optional={
        "ack_deadline": st.one_of(st.none(), st.floats(min_value=0.01, max_value=86400.0)),
        "max_attempts": st.one_of(st.none(), st.integers(min_value=1, max_value=1000)),
        "max_unacked": st.one_of(st.none(), st.integers(min_value=1, max_value=100_000)),
        "filter": st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
    },
)
VALID_ENTRIES: Final = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.none(), st.text(min_size=1, max_size=32)),  # at most 128 UTF-8 bytes
        "attributes": st.one_of(st.none(), st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)),
    },
)


def out_of_range_numbers(minimum: float, maximum: float, *, integer: bool) -> st.SearchStrategy[Any]:
    below: st.SearchStrategy[Any] = st.integers(max_value=int(minimum) - 1) if integer else st.floats(max_value=minimum - 1e-6, allow_infinity=False)
    above: st.SearchStrategy[Any] = st.integers(min_value=int(maximum) + 1) if integer else st.floats(min_value=maximum + 1e-3, allow_infinity=False)
    return st.one_of(below, above)


def bad_setting_values(minimum: float, maximum: float, *, integer: bool) -> st.SearchStrategy[Any]:
    wrong_type = NOT_INTEGERS if integer else NOT_NUMBERS
    return st.one_of(wrong_type, out_of_range_numbers(minimum, maximum, integer=integer))


NUMBER_SETTINGS: Final[dict[str, tuple[float, float, bool]]] = {
    "retention": (1.0, 315360000.0, False),
    "dedup_window": (0.0, 604800.0, False),
    "max_payload": (0, 64 * MIB, True),
}
SUBSCRIPTION_NUMBER_SETTINGS: Final[dict[str, tuple[float, float, bool]]] = {
    "ack_deadline": (0.01, 86400.0, False),
    "max_attempts": (1, 1000, True),
    "backoff_min": (0.0, 3600.0, False),
    "backoff_max": (0.0, 86400.0, False),
    "max_unacked": (1, 100_000, True),
}
SUBSCRIPTION_KEYS: Final = frozenset({*SUBSCRIPTION_NUMBER_SETTINGS, "dead_letter_topic", "filter", "backoff"})


@st.composite
def bad_topic_settings(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["not_an_object", "unknown_key", "bad_value"]))
    if kind == "not_an_object":
        return draw(PRESENT_NON_OBJECTS)
    settings = dict(draw(VALID_TOPIC_SETTINGS))
    if kind == "unknown_key":
        settings[draw(st.text(max_size=12).filter(lambda key: key not in NUMBER_SETTINGS))] = draw(JSON_VALUES)
    else:
        key = draw(st.sampled_from(sorted(NUMBER_SETTINGS)))
        minimum, maximum, integer = NUMBER_SETTINGS[key]
        settings[key] = draw(bad_setting_values(minimum, maximum, integer=integer))
    return settings


@st.composite
def bad_subscription_settings(draw: st.DrawFn) -> tuple[Any, frozenset[str]]:
    """Bad subscription settings, and the codes the docs allow for them."""
    invalid = frozenset({"invalid_setting"})
    kind = draw(st.sampled_from(["not_an_object", "unknown_key", "bad_value", "backoff_order", "backoff_shape", "dead_letter_topic", "filter"]))
    if kind == "not_an_object":
        return draw(PRESENT_NON_OBJECTS), invalid
    settings: dict[str, Any] = dict(draw(VALID_SUBSCRIPTION_SETTINGS))
    if kind == "unknown_key":
        settings[draw(st.text(max_size=12).filter(lambda key: key not in SUBSCRIPTION_KEYS))] = draw(JSON_VALUES)
    elif kind == "bad_value":
        key = draw(st.sampled_from(sorted(SUBSCRIPTION_NUMBER_SETTINGS)))
        minimum, maximum, integer = SUBSCRIPTION_NUMBER_SETTINGS[key]
        settings[key] = draw(bad_setting_values(minimum, maximum, integer=integer))
    elif kind == "backoff_order":
        backoff_max = draw(st.floats(min_value=0.0, max_value=3599.0))
        backoff_min = draw(st.floats(min_value=backoff_max, max_value=3600.0).filter(lambda value: value > backoff_max))
        if draw(st.booleans()):
            settings.update(backoff_min=backoff_min, backoff_max=backoff_max)
        else:
            settings["backoff"] = draw(st.sampled_from([[backoff_min, backoff_max], {"min": backoff_min, "max": backoff_max}]))
    elif kind == "backoff_shape":
        settings["backoff"] = draw(
            st.one_of(
                PRESENT_NON_OBJECTS.filter(lambda value: not isinstance(value, list)),
                st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=5).filter(lambda value: len(value) != 2),
                st.dictionaries(st.text(max_size=5), JSON_VALUES, min_size=1, max_size=3).filter(lambda value: not set(value) <= {"min", "max"}),
                st.tuples(NOT_NUMBERS, st.floats(min_value=1.0, max_value=10.0)).map(list),
            )
        )
    elif kind == "dead_letter_topic":
        if draw(st.booleans()):
            settings["dead_letter_topic"] = draw(PRESENT_NON_STRINGS)
        else:
            # Docs §6 call it a cross-field setting rule; the name check says invalid_name. Either is fair.
            settings["dead_letter_topic"] = draw(BAD_NAMES)
            return settings, frozenset({"invalid_setting", "invalid_name"})
    elif draw(st.booleans()):
        settings["filter"] = draw(PRESENT_NON_OBJECTS)
    else:
        good = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
        settings["filter"] = {**good, draw(st.text(max_size=8)): draw(NON_STRINGS)}
    return settings, invalid


def bad_name_field(draw: st.DrawFn) -> tuple[Any, str]:
    """A bad value for a required name field, and its code: the wrong JSON type, or a string that breaks §5."""
    if draw(st.booleans()):
        return draw(ABSENT_OR_NON_STRING), "invalid_header"
    return draw(BAD_NAMES), "invalid_name"


FieldCase = tuple[bytes, dict[str, Any], frozenset[str], list[bytes], str, dict[str, int] | None]


def topic_create_case(draw: st.DrawFn, target: str) -> FieldCase:
    fields: dict[str, Any] = {
        "name": draw(valid_names(NEW_TOPIC_PREFIX)),
        "settings": draw(st.one_of(st.just(MISSING), st.none(), VALID_TOPIC_SETTINGS)),
        "exist_ok": draw(st.one_of(st.just(MISSING), st.none(), st.booleans())),
    }
    if target == "name":
        fields["name"], code = bad_name_field(draw)
    elif target == "settings":
        fields["settings"], code = draw(bad_topic_settings()), "invalid_setting"
    elif target == "exist_ok":
        fields["exist_ok"], code = draw(PRESENT_NON_BOOLEANS), "invalid_header"
    elif target == "unknown_field":
        fields.update(draw(UNKNOWN_ADMIN_FIELDS))
        code = "invalid_header"
    else:
        fields["name"], fields["exist_ok"], code = FUZZ_TOPIC, draw(st.sampled_from([MISSING, None, False])), "topic_exists"
    return b"TOPIC_CREATE", fields, frozenset({code}), [], f"TOPIC_CREATE bad {target}", None


def name_only_case(draw: st.DrawFn, target: str) -> FieldCase:
    verb = draw(st.sampled_from([b"TOPIC_DELETE", b"TOPIC_DESCRIBE", b"SUB_DELETE", b"SUB_DESCRIBE"]))
    if target == "name":
        name, code = bad_name_field(draw)
    else:
        name, code = draw(valid_names(ABSENT_PREFIX)), ("topic_not_found" if verb.startswith(b"TOPIC") else "subscription_not_found")
    return verb, {"name": name}, frozenset({code}), [], f"{verb.decode()} {code}", None


def list_case(draw: st.DrawFn, target: str) -> FieldCase:
    if target == "prefix_type":
        return b"TOPIC_LIST", {"prefix": draw(PRESENT_NON_STRINGS)}, frozenset({"invalid_header"}), [], "TOPIC_LIST bad prefix", None
    if target == "topic_type":
        return b"SUB_LIST", {"topic": draw(PRESENT_NON_STRINGS)}, frozenset({"invalid_header"}), [], "SUB_LIST bad topic type", None
    return b"SUB_LIST", {"topic": draw(BAD_NAMES)}, frozenset({"invalid_name"}), [], "SUB_LIST bad topic name", None


def subscription_create_case(draw: st.DrawFn, target: str) -> FieldCase:
    fields: dict[str, Any] = {
        "topic": FUZZ_TOPIC,
        "name": draw(valid_names(NEW_SUBSCRIPTION_PREFIX)),
        "settings": draw(st.one_of(st.just(MISSING), st.none(), VALID_SUBSCRIPTION_SETTINGS)),
        "exist_ok": draw(st.one_of(st.just(MISSING), st.none(), st.booleans())),
    }
    codes: frozenset[str]
    if target == "topic":
        fields["topic"], code = bad_name_field(draw)
        codes = frozenset({code})
    elif target == "absent_topic":
        fields["topic"], codes = draw(valid_names(ABSENT_PREFIX)), frozenset({"topic_not_found"})
    elif target == "name":
        fields["name"], code = bad_name_field(draw)
        codes = frozenset({code})
    elif target == "dead_letter_name":
        # §4 SUB_CREATE: the default dead-letter topic '<name>.dead' would exceed 255 bytes.
        fields["name"] = draw(st.text(alphabet=NAME_CHARACTERS, min_size=MAX_NAME_BYTES - 4, max_size=MAX_NAME_BYTES))
        codes = frozenset({"invalid_name"})
    elif target == "settings":
        fields["settings"], codes = draw(bad_subscription_settings())
    elif target == "exist_ok":
        fields["exist_ok"], codes = draw(PRESENT_NON_BOOLEANS), frozenset({"invalid_header"})
    elif target == "exists_elsewhere":
        fields["name"], codes = FUZZ_SUBSCRIPTION, frozenset({"subscription_exists"})  # it lives on FUZZ_OTHER_TOPIC
    elif target == "unknown_field":
        fields.update(draw(UNKNOWN_ADMIN_FIELDS))
        codes = frozenset({"invalid_header"})
    else:
        fields.update(topic=FUZZ_OTHER_TOPIC, name=FUZZ_SUBSCRIPTION, exist_ok=draw(st.sampled_from([MISSING, None, False])))
        codes = frozenset({"subscription_exists"})
    return b"SUB_CREATE", fields, codes, [], f"SUB_CREATE bad {target}", None


def publish_case(draw: st.DrawFn, target: str) -> FieldCase:
    count = draw(st.integers(min_value=1, max_value=4))
    payloads: list[bytes] = draw(st.lists(st.binary(max_size=32), min_size=count, max_size=count))
    messages: Any = draw(st.one_of(st.just(MISSING), st.none(), st.lists(VALID_ENTRIES, min_size=count, max_size=count)))
    fields: dict[str, Any] = {"topic": FUZZ_TOPIC, "messages": messages}
    entries: list[Any] = list(messages) if isinstance(messages, list) else [{} for _ in payloads]
    index = draw(st.integers(min_value=0, max_value=count - 1))
    details = None
    code = "invalid_header"
    if target == "topic":
        fields["topic"], code = bad_name_field(draw)
    elif target == "absent_topic":
        fields["topic"], code = draw(valid_names(ABSENT_PREFIX)), "topic_not_found"
    elif target == "messages_type":
        fields["messages"] = draw(PRESENT_NON_LISTS)
    elif target == "count":
        fields["messages"] = draw(st.lists(VALID_ENTRIES, max_size=6).filter(lambda listed: len(listed) != count))
        code = "malformed"
    elif target == "no_payloads":
        payloads, code = [], "malformed"
    elif target == "batch_size":
        payloads = [b""] * draw(st.integers(min_value=MAX_BATCH_MESSAGES + 1, max_value=MAX_BATCH_MESSAGES + 50))
        fields["messages"], code = draw(st.sampled_from([MISSING, None])), "batch_too_large"
    elif target == "payload_size":
        size = draw(st.integers(min_value=DEFAULT_MAX_PAYLOAD_BYTES + 1, max_value=5 * MIB))
        payloads[index] = b"\x5a" * size
        code, details = "payload_too_large", {"index": index, "size": size, "limit": DEFAULT_MAX_PAYLOAD_BYTES}
    else:
        if target == "entry_type":
            entries[index] = draw(NON_OBJECTS)
        elif target == "id":
            entries[index] = {
                **entries[index],
                "id": draw(st.one_of(PRESENT_NON_STRINGS, st.just(""), st.text(min_size=MAX_MESSAGE_ID_BYTES + 1, max_size=MAX_MESSAGE_ID_BYTES + 20))),
            }
        else:
            entries[index] = {**entries[index], "attributes": draw(bad_attributes())}
        fields["messages"] = entries
    return b"PUBLISH", fields, frozenset({code}), payloads, f"PUBLISH bad {target}", details


@st.composite
def bad_attributes(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["not_an_object", "value_type", "too_many", "too_long"]))
    if kind == "not_an_object":
        return draw(PRESENT_NON_OBJECTS)
    if kind == "value_type":
        return {draw(st.text(max_size=8)): draw(NON_STRINGS)}
    if kind == "too_many":
        return {f"k{number}": "v" for number in range(draw(st.integers(min_value=MAX_ATTRIBUTES + 1, max_value=MAX_ATTRIBUTES + 20)))}
    key_size = draw(st.integers(min_value=0, max_value=MAX_ATTRIBUTE_BYTES + 1))
    value_size = draw(st.integers(min_value=max(0, MAX_ATTRIBUTE_BYTES + 1 - key_size), max_value=MAX_ATTRIBUTE_BYTES + 40))
    return {"k" * key_size: "v" * value_size}


FIELD_CASE_BUILDERS: Final[dict[str, tuple[Callable[[st.DrawFn, str], FieldCase], tuple[str, ...]]]] = {
    "TOPIC_CREATE": (topic_create_case, ("name", "settings", "exist_ok", "exists", "unknown_field")),
    "TOPIC_DELETE|TOPIC_DESCRIBE|SUB_DELETE|SUB_DESCRIBE": (name_only_case, ("name", "absent")),
    "TOPIC_LIST|SUB_LIST": (list_case, ("prefix_type", "topic_type", "topic_name")),
    "SUB_CREATE": (
        subscription_create_case,
        ("topic", "absent_topic", "name", "dead_letter_name", "settings", "exist_ok", "exists_elsewhere", "exists", "unknown_field"),
    ),
    "PUBLISH": (
        publish_case,
        ("topic", "absent_topic", "messages_type", "count", "no_payloads", "entry_type", "id", "attributes", "payload_size", "batch_size"),
    ),
}
# (command family, the field that is wrong): one stratum of the field-level property each.
FIELD_TARGETS: Final = tuple((family, target) for family, (_, targets) in FIELD_CASE_BUILDERS.items() for target in targets)


@st.composite
def field_level_cases(draw: st.DrawFn, family: str, target: str) -> RequestCase:
    """A request that passes §2's frame checks and has exactly one thing wrong: ``target`` of a ``family`` command."""
    build = FIELD_CASE_BUILDERS[family][0]
    verb, fields, codes, payloads, label, details = build(draw, target)
    # PUBLISH ignores unknown fields; admin commands refuse them (the "unknown_field" targets).
    extra = draw(EXTRA_FIELDS) if verb == b"PUBLISH" else {}
    header = json_bytes({**extra, **fields})
    return RequestCase([SIGNATURE, verb, draw(REQUEST_IDS), header, *payloads], codes, label=label, details=details)


# ---------------------------------------------------------------- mutations of valid frames


def valid_requests(request_id: bytes) -> dict[str, list[bytes]]:
    """Good requests to mutate. None of them, however mutated, can reach a guarded name."""
    return {
        "PING": encode(Command.PING, request_id),
        "INFO": encode(Command.INFO, request_id),
        "STATUS": encode(Command.STATUS, request_id),
        "TOPIC_LIST": encode(Command.TOPIC_LIST, request_id, {"prefix": "fz."}),
        "TOPIC_DESCRIBE": encode(Command.TOPIC_DESCRIBE, request_id, {"name": FUZZ_TOPIC}),
        "SUB_LIST": encode(Command.SUB_LIST, request_id, {"topic": FUZZ_OTHER_TOPIC}),
        "SUB_DESCRIBE": encode(Command.SUB_DESCRIBE, request_id, {"name": FUZZ_SUBSCRIPTION}),
        "PUBLISH": encode_publish(FUZZ_TOPIC, [(b"body", {"k": "v"}, "fz-id-1"), (b"", None, None)], request_id),
        "PUBLISH sequence": encode_publish(FUZZ_TOPIC, [(b"body", {"k": "v"}, None), (b"", None, None)], request_id, sequence=IdSequence("fz", 2**62)),
        "TOPIC_CREATE": encode(Command.TOPIC_CREATE, request_id, {"name": "fz.mut.topic", "exist_ok": True, "settings": {"retention": 3600}}),
        "SUB_CREATE": encode(
            Command.SUB_CREATE,
            request_id,
            {"topic": FUZZ_OTHER_TOPIC, "name": "fz.mut.sub", "exist_ok": True, "settings": {"ack_deadline": 5, "filter": {"k": "v"}}},
        ),
        "TOPIC_DELETE": encode(Command.TOPIC_DELETE, request_id, {"name": "fz.mut.gone"}),
        "SUB_DELETE": encode(Command.SUB_DELETE, request_id, {"name": "fz.mut.gone"}),
    }


def valid_consumer_messages(subscription: str, consumers: list[str], request_id: bytes) -> dict[str, list[bytes]]:
    """Good consumer messages to mutate (from the encoders in clients/protocol.py)."""
    first, second = consumers[0], consumers[1 % len(consumers)]
    return {
        "ATTACH": encode_attach(subscription, first, ready=False, request_id=request_id, max_unacked=5),
        "ATTACH ready": encode_attach(subscription, second, ready=True, request_id=request_id),
        "ACK": encode_acks(Command.ACK, subscription, first, [("0.1", 1), ("1.99", 2)], request_id),
        "NACK": encode_acks(Command.NACK, subscription, second, [("0.7", 3)], request_id),
        "DETACH": encode(Command.DETACH, b"", {"subscription": subscription, "consumer": consumers[-1]}),
    }


Mutation = Callable[[st.DrawFn, list[bytes]], tuple[list[bytes], str]]


def _pick(draw: st.DrawFn, frames: list[bytes], *, non_empty: bool = False) -> int | None:
    candidates = [index for index, frame in enumerate(frames) if frame or not non_empty]
    return draw(st.sampled_from(candidates)) if candidates else None


def _flip_bit(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames, non_empty=True)
    if index is None:
        return frames, "flip: nothing to flip"
    frame = bytearray(frames[index])
    position = draw(st.integers(min_value=0, max_value=len(frame) - 1))
    bit = draw(st.integers(min_value=0, max_value=7))
    frame[position] ^= 1 << bit
    return [*frames[:index], bytes(frame), *frames[index + 1 :]], f"flip bit {bit} of byte {position} in frame {index}"


def _set_byte(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames, non_empty=True)
    if index is None:
        return frames, "set: nothing to set"
    frame = bytearray(frames[index])
    position = draw(st.integers(min_value=0, max_value=len(frame) - 1))
    frame[position] = draw(st.sampled_from([0x00, 0x22, 0x5C, 0x7B, 0x7D, 0x80, 0xC0, 0xFF, 0x30, 0x2E]))
    return [*frames[:index], bytes(frame), *frames[index + 1 :]], f"set byte {position} of frame {index} to {frame[position]:#04x}"


def _truncate(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames, non_empty=True)
    if index is None:
        return frames, "truncate: nothing to truncate"
    size = draw(st.integers(min_value=0, max_value=len(frames[index]) - 1))
    return [*frames[:index], frames[index][:size], *frames[index + 1 :]], f"truncate frame {index} to {size} bytes"


def _extend(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames)
    if index is None:
        return frames, "extend: no frame"
    tail = draw(st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from([b"\xff", b"}", b"]", b"\x00", b" ", b'"'])))
    return [*frames[:index], frames[index] + tail, *frames[index + 1 :]], f"append {tail!r} to frame {index}"


def _drop(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames)
    if index is None:
        return frames, "drop: no frame"
    return [*frames[:index], *frames[index + 1 :]], f"drop frame {index}"


def _duplicate(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames)
    if index is None:
        return frames, "duplicate: no frame"
    copies = draw(st.sampled_from([1, 1, 2, 500]))
    return [*frames[: index + 1], *[frames[index]] * copies, *frames[index + 1 :]], f"repeat frame {index} {copies} more times"


def _insert(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = draw(st.integers(min_value=0, max_value=len(frames)))
    frame = draw(st.one_of(st.just(b""), FRAMES, st.sampled_from([SIGNATURE, b"PUBLISH", b"{}"])))
    return [*frames[:index], frame, *frames[index:]], f"insert {short_frame(frame)} at {index}"


def _swap(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    if len(frames) < 2:
        return frames, "swap: too few frames"
    first, second = draw(st.lists(st.integers(min_value=0, max_value=len(frames) - 1), min_size=2, max_size=2, unique=True))
    swapped = list(frames)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    return swapped, f"swap frames {first} and {second}"


def _replace(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    index = _pick(draw, frames)
    if index is None:
        return frames, "replace: no frame"
    frame = draw(FRAMES)
    return [*frames[:index], frame, *frames[index + 1 :]], f"replace frame {index} by {short_frame(frame)}"


def _rewrite_json(draw: st.DrawFn, frames: list[bytes]) -> tuple[list[bytes], str]:
    """Change one field of the header (frame 3) to a value of another JSON type, or drop it."""
    if len(frames) < 4 or not is_json_object(frames[3]):
        return frames, "rewrite: no header"
    header: dict[str, Any] = parse_header(frames[3])
    keys = sorted(header)
    # Mostly a field the header has; sometimes a new one.
    pick_existing = bool(keys) and draw(st.integers(min_value=0, max_value=4)) > 0
    key = draw(st.sampled_from(keys)) if pick_existing else draw(st.text(max_size=8))
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        header.pop(key, None)
        step = f"header: drop {key!r}"
    else:
        value = draw(JSON_VALUES)
        if isinstance(header.get(key), list) and header[key] and draw(st.booleans()):
            value = [value, *header[key][1:]]  # the first entry of a list (messages, acks)
        header[key] = value
        step = f"header: {key!r} = {value!r}"[:200]
    return [*frames[:3], json_bytes(header), *frames[4:]], step


MUTATIONS: Final[tuple[Mutation, ...]] = (_flip_bit, _set_byte, _truncate, _extend, _drop, _duplicate, _insert, _swap, _replace, _rewrite_json, _rewrite_json)


@st.composite
def mutations_of(draw: st.DrawFn, bases: dict[str, list[bytes]]) -> MutatedFrames:
    """One of ``bases`` after one to four random mutations."""
    name = draw(st.sampled_from(sorted(bases)))
    frames = list(bases[name])
    steps: list[str] = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        frames, step = draw(st.sampled_from(MUTATIONS))(draw, frames)
        steps.append(step)
    return MutatedFrames(frames, name, steps)


@st.composite
def request_bursts(draw: st.DrawFn, bases: dict[str, list[bytes]], max_size: int = 24) -> RequestBurst:
    """A mix of frame-level, field-level and mutated requests, each with the id of its place in the burst."""
    any_case = weighted(
        (2, st.sampled_from(FRAME_CHECKS).flatmap(frame_level_cases)),
        (3, st.sampled_from(FIELD_TARGETS).flatmap(lambda target: field_level_cases(*target))),
        (3, mutations_of(bases)),
    )
    burst: list[RequestCase] = []
    for number, case in enumerate(draw(st.lists(any_case, min_size=2, max_size=max_size))):
        request_id = b"burst-%d" % number
        if isinstance(case, MutatedFrames):  # judged after the change: frame 2 may no longer be its request id
            burst.append(RequestCase.from_oracle(with_request_id(case.frames, request_id), f"{case.base}: {'; '.join(case.steps)}"))
        else:
            burst.append(case.with_request_id(request_id))
    return RequestBurst(burst)


# ---------------------------------------------------------------- consumer messages (§9)


@dataclass(frozen=True)
class ConsumerWorld:
    """What a consumer oracle needs to know about the running system."""

    sender_count: int
    known: dict[str, int]  # subscription -> the sender that serves it and already knows it
    listened: tuple[bytes, ...]  # the SUB prefixes the test listens on

    def hears(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.listened)


@dataclass(frozen=True)
class ExpectedReply:
    """A message a sender must publish on a consumer's topic."""

    topic: bytes
    command: bytes
    request_id: bytes
    code: str | None = None  # for ERROR
    header: dict[str, Any] | None = None  # for WELCOME and ACK_REPLY: the whole header
    asynchronous: bool = False  # sent once metadata answered, not in turn with later messages


def is_ack_entry(entry: Any) -> bool:
    """§9 ACK: a two-element array of the ref string from DELIVER and the integer attempt."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
        return False
    try:
        parse_delivery_ref(entry[0])
    except ProtocolError:
        return False
    return True


def documented_consumer_reply(frames: list[bytes], sender: int, world: ConsumerWorld) -> ExpectedReply | None:
    """What §9 says the sender answers to ``frames``, or None for no answer (dropped, or nothing to say).

    The subscriptions in ``world.known`` have no deliveries, so every valid ack
    entry is ``unknown``. A leading empty frame is tolerated and skipped, as
    the sender does (a DEALER-style consumer).
    """
    body = frames[1:] if frames and frames[0] == b"" else frames
    if documented_frame_error(body, accepted_verbs=KNOWN_VERBS) is not None:
        return None  # no readable consumer id: counted and dropped
    header = parse_header(body[3])
    consumer = header.get("consumer")
    if not isinstance(consumer, str) or not consumer:
        return None
    topic, request_id = consumer.encode() + b"\x00", body[2]

    def error(code: str, *, asynchronous: bool = False) -> ExpectedReply:
        return ExpectedReply(topic, b"ERROR", request_id, code=code, asynchronous=asynchronous)

    if len(consumer) > MAX_CONSUMER_ID_CHARACTERS or "\x00" in consumer:
        return None  # not addressable: an id with NUL would reach another consumer's SUB prefix
    subscription = header.get("subscription")
    if not isinstance(subscription, str):
        return error("invalid_header")
    if not is_valid_name(subscription):
        return error("invalid_name")
    verb = body[1]
    if verb not in CONSUMER_VERBS:
        return error("unknown_command")
    if verb == b"ATTACH":
        # "max_unacked (optional, an integer of at least 1)"; ready and packed_payloads are
        # booleans; "a field of another type or range gets ERROR invalid_header" (null: absent).
        requested = header.get("max_unacked")
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            return error("invalid_header")
        if any(header.get(flag) is not None and not isinstance(header.get(flag), bool) for flag in ("ready", "packed_payloads")):
            return error("invalid_header")
        session = header.get("session")  # "the session of the last WELCOME": an integer
        if session is not None and (isinstance(session, bool) or not isinstance(session, int)):
            return error("invalid_header")
        if world.known.get(subscription) == sender:
            effective = min(DEFAULT_MAX_UNACKED, requested) if requested is not None else DEFAULT_MAX_UNACKED
            welcome = {"subscription": subscription, "consumer": consumer, "max_unacked": effective, "heartbeat_s": CONSUMER_HEARTBEAT_S}
            return ExpectedReply(topic, b"WELCOME", request_id, header=welcome)
        if shard_of(subscription, world.sender_count) != sender:
            return error("wrong_sender")  # "a subscription served by another sender"
        return error("subscription_not_found", asynchronous=True)  # the sender asks metadata first
    if verb in (b"ACK", b"NACK"):
        entries = header.get("acks" if verb == b"ACK" else "nacks")
        if not isinstance(entries, list) or not all(is_ack_entry(entry) for entry in entries):
            return error("invalid_header")
        if not request_id:
            return None  # "empty for no reply"
        return ExpectedReply(topic, b"ACK_REPLY", request_id, header={"results": ["unknown"] * len(entries)})
    return None  # DETACH has no reply


DELIVERY_REFS: Final = st.from_regex(r"[0-9]{1,9}\.[0-9]{1,19}", fullmatch=True)
GOOD_ACK_ENTRIES: Final = st.one_of(
    st.tuples(DELIVERY_REFS, st.integers(min_value=-(2**63), max_value=2**64 - 1)).map(list),
    st.tuples(DELIVERY_REFS, st.integers(min_value=1, max_value=10)).map(list),
)
BAD_ACK_ENTRIES: Final = st.one_of(
    JSON_VALUES,
    st.tuples(DELIVERY_REFS, st.one_of(st.booleans(), INTEGRAL_FLOATS, st.text(max_size=3), st.integers(min_value=2**64, max_value=2**70))).map(list),
    st.tuples(st.one_of(st.text(max_size=12), st.sampled_from(["1", "1.", ".1", "1.2.3", "-1.2", "1.2 ", "\u0661.\u0662", "0x1.2"])), st.just(1)).map(list),
    st.lists(DELIVERY_REFS, max_size=3).filter(lambda refs: len(refs) != 2),
)
ACK_LISTS: Final = rarely(
    st.integers(min_value=200, max_value=3000).map(lambda count: [["0.1", 1]] * count),
    weighted(
        (2, st.lists(GOOD_ACK_ENTRIES, max_size=5)),
        (
            1,
            st.tuples(st.lists(GOOD_ACK_ENTRIES, max_size=3), BAD_ACK_ENTRIES, st.lists(GOOD_ACK_ENTRIES, max_size=3)).map(
                lambda parts: [*parts[0], parts[1], *parts[2]]
            ),
        ),
    ),
    one_in=30,
)
MAX_UNACKED_VALUES: Final = weighted(
    (2, st.just(MISSING)),
    (1, st.none()),
    (2, st.integers(min_value=-3, max_value=2000)),
    (1, st.integers(min_value=-(2**70), max_value=2**70)),
    (2, NOT_INTEGERS),
)


CONSUMER_SHAPES: Final = ("ATTACH", "ACK", "NACK", "DETACH", "other verb", "unknown verb", "junk")


@st.composite
def consumer_message_cases(draw: st.DrawFn, world: ConsumerWorld, consumers: list[str], shape: str) -> ConsumerCase:
    """A message for a sender's ack endpoint: a ``shape`` (one of CONSUMER_SHAPES) command with odd fields, or junk."""
    if shape == "junk":
        junk = draw(
            st.one_of(
                st.lists(FRAMES, min_size=1, max_size=3),
                st.tuples(st.binary(max_size=8), ANY_VERBS, REQUEST_IDS, ANY_HEADERS).map(list),
                st.tuples(st.sampled_from(sorted(CONSUMER_VERBS)), REQUEST_IDS, BAD_HEADERS).map(lambda rest: [SIGNATURE, *rest]),
                st.tuples(st.sampled_from(sorted(CONSUMER_VERBS)), st.binary(min_size=65, max_size=90), OBJECT_HEADERS).map(lambda rest: [SIGNATURE, *rest]),
            )
        )
        return ConsumerCase(junk, draw(st.integers(min_value=0, max_value=world.sender_count - 1)), "junk")
    if shape == "other verb":
        verb = draw(st.sampled_from(sorted(KNOWN_VERBS - CONSUMER_VERBS)))
    elif shape == "unknown verb":
        verb = draw(UNKNOWN_VERBS)
    else:
        verb = shape.encode()
    known = sorted(world.known)
    subscription = draw(weighted((4, st.sampled_from(known)), (2, valid_names(ACK_ABSENT_PREFIX)), (1, ABSENT_OR_NON_STRING), (1, BAD_NAMES)))
    if isinstance(subscription, str) and subscription in world.known:  # mostly to the sender that serves it
        own = world.known[subscription]
        sender = draw(st.sampled_from([own, own, own, (own + 1) % world.sender_count]))
    else:
        sender = draw(st.integers(min_value=0, max_value=world.sender_count - 1))
    ours = st.sampled_from(consumers)
    fields: dict[str, Any] = {
        "subscription": subscription,
        "consumer": draw(
            weighted(
                (8, ours),
                (1, ABSENT_OR_NON_STRING),
                (1, st.just("")),
                (1, st.text(min_size=MAX_CONSUMER_ID_CHARACTERS + 1, max_size=MAX_CONSUMER_ID_CHARACTERS + 40)),
                (1, st.tuples(ours, st.text(max_size=6)).map(lambda parts: parts[0] + "\x00" + parts[1])),
                (1, st.tuples(st.text(max_size=6), st.text(max_size=6)).map(lambda parts: parts[0] + "\x00" + parts[1])),
            )
        ),
    }
    if verb == b"ATTACH":
        fields["ready"] = draw(weighted((1, st.just(MISSING)), (3, st.booleans()), (1, JSON_VALUES)))
        fields["max_unacked"] = draw(MAX_UNACKED_VALUES)
    elif verb in (b"ACK", b"NACK"):
        right = "acks" if verb == b"ACK" else "nacks"
        key = draw(st.sampled_from([right, right, right, "nacks" if right == "acks" else "acks"]))
        fields[key] = draw(weighted((6, ACK_LISTS), (1, st.just(MISSING)), (1, NON_STRINGS.filter(lambda value: not isinstance(value, list)))))
    header = draw(rarely(BAD_HEADERS, st.just(json_bytes({**draw(EXTRA_FIELDS), **fields})), one_in=15))
    request_id = draw(
        weighted((2, st.just(b"")), (6, st.binary(min_size=1, max_size=MAX_REQUEST_ID_BYTES)), (1, st.binary(min_size=MAX_REQUEST_ID_BYTES + 1, max_size=80)))
    )
    frames = [SIGNATURE, verb, request_id, header]
    if draw(st.integers(min_value=0, max_value=15)) == 7:
        frames.extend(draw(PAYLOAD_FRAMES))
    if draw(st.integers(min_value=0, max_value=15)) == 7:
        frames.insert(0, b"")
    return ConsumerCase(frames, sender, f"{verb[:16].decode(errors='replace')}")
