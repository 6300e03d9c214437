"""Fuzzed input (issue 4, item 4): random and mutated frames never hurt Herald.

Two endpoints take input from anyone who can reach them:

- the request endpoint (the proxy's ROUTER). Every message there, however
  broken, carries the routing identity the ROUTER adds, so nothing is too
  broken to answer: each request gets exactly the ERROR docs/protocol.md
  §2-§6 give it (code, number, retriable, echoed request id) within a
  timeout, never ``internal``. Cases: §2's frame checks one by one, each
  command with one bad field, mutated valid requests, requests without the
  delimiter (§3: answered behind the frames up to the first empty one), and
  bursts of all of these in flight at once;
- a sender's ack endpoint (PULL), one-way: §9 says what comes back on the
  consumer's topic (WELCOME, ACK_REPLY or ERROR) and that a message without a
  readable consumer id is dropped. After each message a probe ATTACH proves
  the sender is alive, and that it said exactly what the docs promise.

The cases and the oracles live in tests/fuzz_frames.py. One Herald serves the
fuzzing; the last test checks that no process died or restarted, that
messages stored before the fuzzing are still there and deliverable, and that
a publish/subscribe/ack round trip with the client library works. The bugs
the fuzzing found (all fixed) have regression tests near the end, the ones
that used to crash a process on a Herald of their own.

Runs are derandomized, so CI sees the same examples every time. Each property
is parametrized over its strata (a frame check, a command's bad field, a
consumer verb, a base message) and splits HERALD_FUZZ_EXAMPLES (default 200)
between them. ``HERALD_FUZZ_EXAMPLES=2000`` hunts longer (the per-test timeout
grows with it); ``HERALD_FUZZ_SEED=<int>`` draws a different, seeded set.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, seed, settings

from clients import Client
from clients.protocol import ERROR_CATALOG, SIGNATURE, Command, encode, encode_attach, shard_of
from tests.conftest import HeraldSystem, process_alive, wait_for
from tests.fuzz_frames import (
    ACK_SUBSCRIPTION_PREFIX,
    ACK_TOPIC,
    CONSUMER_SHAPES,
    FIELD_LEVEL_CODES,
    FIELD_TARGETS,
    FRAME_CHECKS,
    FUZZ_OTHER_TOPIC,
    FUZZ_SUBSCRIPTION,
    FUZZ_TOPIC,
    ConsumerCase,
    ConsumerWorld,
    ExpectedReply,
    MutatedFrames,
    RequestBurst,
    RequestCase,
    consumer_message_cases,
    documented_consumer_reply,
    documented_request_codes,
    documented_request_id,
    field_level_cases,
    frame_level_cases,
    mutations_of,
    request_bursts,
    short_frames,
    split_at_first_empty_frame,
    valid_consumer_messages,
    valid_requests,
)

EXAMPLES: Final = int(os.environ.get("HERALD_FUZZ_EXAMPLES", "200"))  # per property, split over its strata
MIN_EXAMPLES_PER_STRATUM: Final = 5
SEED: Final = os.environ.get("HERALD_FUZZ_SEED")
REPLY_TIMEOUT_S: Final = 10.0
# pyproject's 120 s per test fits the default count; longer runs get longer.
TEST_TIMEOUT_S: Final = max(120, EXAMPLES // 2)
CATALOG: Final = {spec.name: spec for spec in ERROR_CATALOG}

# Stored before the fuzzing, read after it. No fuzzed request names these.
GUARD_TOPIC: Final = "guard-q8w.orders"
GUARD_SUBSCRIPTION: Final = "guard-q8w.billing"
GUARD_MESSAGES: Final = [(f"guard-{number}", f"order {number}".encode(), {"n": str(number)}) for number in range(5)]

# Consumer ids the consumer properties listen on (one SUB socket each).
EXACT_CONSUMERS: Final = ["fz-c0", "fz-c1", "fz-c2"]
MUTATION_CONSUMERS: Final = ["fz-m0", "fz-m1", "fz-m2"]

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


def fuzz(strata: int, share: float = 1.0) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings for one stratum of a property: reproducible, no deadline, no database.

    A property runs once per stratum (a frame check, a command's bad field, a
    consumer verb, a mutated base message) and gets ``share`` of EXAMPLES,
    split evenly: hypothesis alone picks a few branches far more often than
    others, so without strata some documented rules would get no example.
    """
    examples = max(MIN_EXAMPLES_PER_STRATUM, -(-int(EXAMPLES * share) // strata))

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(
            max_examples=examples,
            deadline=None,
            derandomize=SEED is None,
            database=None,
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
                HealthCheck.filter_too_much,
            ],
        )(test)
        return seed(int(SEED))(configured) if SEED is not None else configured

    return decorate


# ---------------------------------------------------------------- the system under fuzz


@dataclass
class FuzzWorld:
    system: HeraldSystem
    senders: list[dict[str, str]]  # INFO endpoints.senders: {deliver, ack} by sender index
    ack_subscriptions: dict[str, int]  # one subscription per sender, for the consumer properties


def assert_every_process_healthy(system: HeraldSystem, *, fresh: bool = False) -> None:
    """The launcher's status file: every child running, none restarted."""
    assert system.process is not None and system.process.poll() is None, "the launcher exited"
    if fresh:
        # The launcher rewrites the file every second; read one written after a crash would show.
        asked_at = time.time()
        status_file = system.data_dir / "herald-status.json"
        wait_for(lambda: status_file.stat().st_mtime > asked_at + 0.2, timeout=10, message="a fresh status file")
    children = system.status()["children"]
    unhealthy = [child for child in children if not child["running"] or child["restarts"] != 0]
    assert not unhealthy, f"processes died or restarted: {unhealthy}\nlog:\n{system.log_tail()}"


@pytest.fixture(scope="module")
def world(herald_module: HeraldSystem) -> FuzzWorld:
    with Client(herald_module.endpoint, timeout=15) as client:
        client.create_topic(FUZZ_TOPIC)
        client.create_topic(FUZZ_OTHER_TOPIC)
        client.create_subscription(FUZZ_OTHER_TOPIC, FUZZ_SUBSCRIPTION)
        client.create_topic(GUARD_TOPIC)
        client.create_subscription(GUARD_TOPIC, GUARD_SUBSCRIPTION)
        for message_id, payload, attributes in GUARD_MESSAGES:
            client.publish(GUARD_TOPIC, payload, attributes, message_id=message_id)
        senders: list[dict[str, str]] = client.info()["endpoints"]["senders"]
        client.create_topic(ACK_TOPIC)
        ack_subscriptions: dict[str, int] = {}
        for number in itertools.count():
            name = f"{ACK_SUBSCRIPTION_PREFIX}{number}"
            index = shard_of(name, len(senders))
            if index in ack_subscriptions.values():
                continue
            record = client.create_subscription(ACK_TOPIC, name)
            assert record["endpoints"] == senders[index], (record, senders)
            ack_subscriptions[name] = index
            if len(ack_subscriptions) == len(senders):
                break
    return FuzzWorld(herald_module, senders, ack_subscriptions)


# ---------------------------------------------------------------- the request endpoint


class RequestLink:
    """A DEALER on the request endpoint that sends raw frames and waits for one reply."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def receive(self, waiting_for: str) -> list[bytes]:
        if not self.socket.poll(int(REPLY_TIMEOUT_S * 1000)):
            # A late reply must not be taken for the answer to the next request.
            self.socket.close(0)
            self.socket = self._connect()
            raise AssertionError(f"no reply within {REPLY_TIMEOUT_S} s to {waiting_for}")
        return self.socket.recv_multipart()

    def exchange(self, frames: list[bytes]) -> list[bytes]:
        self.send(frames)
        return self.receive(short_frames(frames))

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture(scope="module")
def requests(world: FuzzWorld) -> Iterator[RequestLink]:
    link = RequestLink(world.system.endpoint)
    yield link
    link.close()


def check_error_header(header: dict[str, Any], codes: frozenset[str]) -> None:
    """§4's ERROR header, with a code the docs allow and the catalog's number and retriable."""
    code = header.get("code")
    assert code in CATALOG, f"code {code!r} is not in the error catalog: {header}"
    assert code in codes, f"got {code!r}, the docs say {sorted(codes)}: {header}"
    assert header.get("number") == CATALOG[code].number, header
    assert header.get("retriable") is CATALOG[code].retriable, header
    assert isinstance(header.get("message"), str) and header["message"], header
    assert isinstance(header.get("details", {}), dict), header


def check_reply(reply: list[bytes], body: list[bytes], codes: frozenset[str], *, ok_allowed: bool, details: dict[str, int] | None = None) -> None:
    """A reply is [SIGNATURE, OK|ERROR, request id, header] (§4: no payload frames) to the request ``body``."""
    assert len(reply) == 4, f"reply has {len(reply)} frames: {short_frames(reply)}"
    signature, status, request_id, raw_header = reply
    assert signature == SIGNATURE, short_frames(reply)
    assert request_id == documented_request_id(body), f"request id {request_id!r} is not the one §2 says to echo"
    header = orjson.loads(raw_header)
    assert isinstance(header, dict), raw_header
    if status == b"OK":
        assert ok_allowed, f"OK where the docs say {sorted(codes)}: {header}"
        return
    assert status == b"ERROR", short_frames(reply)
    check_error_header(header, codes)
    if details is not None:
        assert header.get("details") == details, header


def check_request(requests: RequestLink, case: RequestCase) -> None:
    reply = requests.exchange([b"", *case.frames])
    assert reply[:1] == [b""], f"the reply lost its delimiter: {short_frames(reply)}"
    check_reply(reply[1:], case.frames, case.codes, ok_allowed=case.ok_allowed, details=case.details)


@pytest.mark.parametrize("check", FRAME_CHECKS)
def test_frame_level_garbage_gets_the_documented_error(world: FuzzWorld, requests: RequestLink, check: str) -> None:
    """Wrong frame counts, signatures, request ids, verbs (unknown and internal) and headers (§2)."""

    @fuzz(len(FRAME_CHECKS))
    @given(case=frame_level_cases(check))
    def property_(case: RequestCase) -> None:
        check_request(requests, case)

    property_()
    assert_every_process_healthy(world.system)


@pytest.mark.parametrize(("command", "field"), FIELD_TARGETS, ids=[f"{command}.{field}" for command, field in FIELD_TARGETS])
def test_one_bad_field_gets_the_documented_error(world: FuzzWorld, requests: RequestLink, command: str, field: str) -> None:
    """Each client command with one field of the wrong JSON type, out of range or naming nothing (§4-§6)."""

    @fuzz(len(FIELD_TARGETS))
    @given(case=field_level_cases(command, field))
    def property_(case: RequestCase) -> None:
        check_request(requests, case)

    property_()
    assert_every_process_healthy(world.system)


REQUEST_BASES: Final = valid_requests(b"\x00\x00\x00\x00\x00\x00\x00\x2a")
# Without the delimiter: with an empty request id the first empty frame is the id; with one, an empty header or payload.
UNDELIMITED_BASES: Final = {**valid_requests(b""), **{f"{name} with an id": frames for name, frames in valid_requests(b"id-9").items()}}


@pytest.mark.parametrize("base", sorted(REQUEST_BASES))
def test_mutated_requests_get_a_documented_reply(world: FuzzWorld, requests: RequestLink, base: str) -> None:
    """Valid requests with frames flipped, cut, repeated, dropped, swapped or re-typed.

    A mutation can leave a request valid, so OK is fine when §2 has nothing
    against it; an ERROR must carry a code the checks of §2 and §4 can give.
    """

    @fuzz(len(REQUEST_BASES))
    @given(case=mutations_of({base: REQUEST_BASES[base]}))
    def property_(case: MutatedFrames) -> None:
        codes, ok_allowed = documented_request_codes(case.frames)
        reply = requests.exchange([b"", *case.frames])
        assert reply[:1] == [b""], f"the reply lost its delimiter: {short_frames(reply)}"
        check_reply(reply[1:], case.frames, codes, ok_allowed=ok_allowed)

    property_()
    assert_every_process_healthy(world.system)


@pytest.mark.parametrize("base", sorted(UNDELIMITED_BASES))
def test_requests_without_the_delimiter_are_answered_garbled_but_answered(world: FuzzWorld, requests: RequestLink, base: str) -> None:
    """§3: a DEALER that forgets the delimiter gets its frames up to the first empty one back in front of the reply.

    The server takes that first empty frame as the end of the envelope and
    answers the rest as the request, so even this is never dropped.
    """

    @fuzz(len(UNDELIMITED_BASES), share=0.5)
    @given(case=mutations_of({base: UNDELIMITED_BASES[base]}))
    def property_(case: MutatedFrames) -> None:
        if not case.frames:
            return  # ZeroMQ cannot send a message of no frames
        envelope, body = split_at_first_empty_frame(case.frames)
        codes, ok_allowed = documented_request_codes(body)
        reply = requests.exchange(case.frames)
        assert reply[: len(envelope)] == envelope, f"expected {short_frames(envelope)} in front of the reply, got {short_frames(reply)}"
        check_reply(reply[len(envelope) :], body, codes, ok_allowed=ok_allowed)

    property_()
    assert_every_process_healthy(world.system)


def test_bursts_of_bad_requests_each_get_their_own_reply(world: FuzzWorld, requests: RequestLink) -> None:
    """Many mixed requests in flight on one DEALER: spread over the frontends, forwarded to the
    owner of their topic, batched together. Each gets exactly one reply, with its own request id."""

    @fuzz(1, share=0.25)
    @given(burst=request_bursts(REQUEST_BASES))
    def property_(burst: RequestBurst) -> None:
        for case in burst.cases:
            requests.send([b"", *case.frames])
        replies = [requests.receive(f"{len(burst.cases) - index} of the burst's requests") for index in range(len(burst.cases))]
        unanswered = list(burst.cases)
        for reply in replies:
            assert reply[:1] == [b""] and len(reply) == 5, f"not a reply: {short_frames(reply)}"
            # Cases without a usable request id get b"" back; any of them may be the one answered.
            candidates = [case for case in unanswered if documented_request_id(case.frames) == reply[3]]
            assert candidates, f"a reply with request id {reply[3]!r} answers none of the requests still waiting"
            failures: list[str] = []
            for case in candidates:
                try:
                    check_reply(reply[1:], case.frames, case.codes, ok_allowed=case.ok_allowed, details=case.details)
                except AssertionError as failure:
                    failures.append(f"{case!r}: {failure}")
                else:
                    unanswered.remove(case)
                    break
            else:
                raise AssertionError("\n".join(failures))
        assert not unanswered

    property_()
    assert_every_process_healthy(world.system)


# ---------------------------------------------------------------- the ack endpoint


class ConsumerLink:
    """A PUSH per sender and one SUB on all of them, like a native consumer (§9) with several ids.

    After each fuzzed message a probe consumer sends ATTACH to the same sender
    and waits for its WELCOME: the sender handles its PULL socket in order and
    publishes on one PUB socket, so everything it said about the fuzzed
    message came before that WELCOME.
    """

    def __init__(self, world: FuzzWorld, consumers: list[str]) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.pushes: list[zmq.Socket[Any]] = []
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.probes = {index: (name, f"{consumers[0]}-probe-{index}") for name, index in world.ack_subscriptions.items()}
        self.prefixes = tuple(consumer.encode() + b"\x00" for consumer in [*consumers, *(probe for _, probe in self.probes.values())])
        for prefix in self.prefixes:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        for endpoints in world.senders:
            self.sub.connect(endpoints["deliver"])
            push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(endpoints["ack"])
            self.pushes.append(push)
        self.oracle_world = ConsumerWorld(len(world.senders), dict(world.ack_subscriptions), self.prefixes)
        self._probe_ids = (f"probe-{number}".encode() for number in itertools.count())

    def attach_probes(self) -> None:
        """ATTACH ready=false until WELCOME (§9 step 3): the SUB's subscriptions have reached every sender."""
        for index, (subscription, probe) in self.probes.items():
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while True:
                assert time.monotonic() < deadline, f"sender {index} never welcomed the probe"
                self.pushes[index].send_multipart(encode_attach(subscription, probe, ready=False))
                if self.sub.poll(100) and self.sub.recv_multipart()[2:3] == [b"WELCOME"]:
                    break

    def send(self, sender: int, frames: list[bytes]) -> None:
        self.pushes[sender].send_multipart(frames)

    def _receive(self, deadline: float, what: str) -> list[bytes]:
        if not self.sub.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise AssertionError(f"waited {REPLY_TIMEOUT_S} s for {what}")
        return self.sub.recv_multipart()

    def replies(self, sender: int, awaited: ExpectedReply | None) -> list[list[bytes]]:
        """What the sender published for our consumers since the last probe, ending with a fresh probe."""
        collected: list[list[bytes]] = []
        probe_topics = {probe.encode() + b"\x00" for _, probe in self.probes.values()}
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        if awaited is not None:  # sent once metadata answered: may come after the probe's WELCOME
            while not any(is_reply_to(message, awaited) for message in collected):
                message = self._receive(deadline, f"the asynchronous {awaited}; got {collected}")
                if message[0] not in probe_topics:
                    collected.append(message)
        subscription, probe = self.probes[sender]
        probe_id = next(self._probe_ids)
        self.pushes[sender].send_multipart(encode_attach(subscription, probe, ready=True, request_id=probe_id))
        while True:
            message = self._receive(deadline, f"the probe's WELCOME: sender {sender} crashed or hangs")
            if message[0] not in probe_topics:
                collected.append(message)
            elif message[2:4] == [b"WELCOME", probe_id]:
                return collected  # other WELCOMEs of the probe are answers to its earlier ATTACHes

    def close(self) -> None:
        for sock in (self.sub, *self.pushes):
            sock.close(0)
        self.context.term()


def is_reply_to(message: list[bytes], expected: ExpectedReply) -> bool:
    return message[:1] == [expected.topic] and message[2:4] == [expected.command, expected.request_id]


def check_consumer_message(link: ConsumerLink, case: ConsumerCase) -> None:
    expected = documented_consumer_reply(case.frames, case.sender, link.oracle_world)
    heard = expected if expected is not None and link.oracle_world.hears(expected.topic) else None
    link.send(case.sender, case.frames)
    replies = link.replies(case.sender, heard if heard is not None and heard.asynchronous else None)
    if heard is None:
        assert replies == [], f"the docs promise no answer we can hear (expected {expected}), got {[short_frames(reply) for reply in replies]}"
        return
    assert len(replies) == 1, f"expected exactly {heard}, got {[short_frames(reply) for reply in replies]}"
    [reply] = replies
    assert len(reply) == 5 and reply[1] == SIGNATURE and is_reply_to(reply, heard), f"expected {heard}, got {short_frames(reply)}"
    header = orjson.loads(reply[4])
    if heard.code is not None:
        check_error_header(header, frozenset({heard.code}))
    else:
        if heard.command == b"WELCOME":
            # "session, an integer from 1 to 2^52" that the sender draws: any such value is as documented.
            session = header.pop("session", None)
            assert isinstance(session, int) and not isinstance(session, bool) and 1 <= session <= 2**52, f"WELCOME session {session!r}"
        assert header == heard.header, f"expected {heard}, got {header}"


@contextlib.contextmanager
def consumer_link(world: FuzzWorld, consumers: list[str]) -> Iterator[ConsumerLink]:
    link = ConsumerLink(world, consumers)
    try:
        link.attach_probes()
        yield link
    finally:
        link.close()


@pytest.mark.parametrize("shape", CONSUMER_SHAPES)
def test_consumer_messages_get_the_documented_answer_and_the_sender_survives(world: FuzzWorld, shape: str) -> None:
    """ATTACH/ACK/NACK/DETACH with odd consumers, subscriptions, limits and ack lists, other verbs, junk frames."""
    with consumer_link(world, EXACT_CONSUMERS) as link:

        @fuzz(len(CONSUMER_SHAPES))
        @given(case=consumer_message_cases(link.oracle_world, EXACT_CONSUMERS, shape))
        def property_(case: ConsumerCase) -> None:
            check_consumer_message(link, case)

        property_()
    assert_every_process_healthy(world.system)


CONSUMER_BASES: Final = tuple(valid_consumer_messages("s", MUTATION_CONSUMERS, b""))


@pytest.mark.parametrize("base", CONSUMER_BASES)
def test_mutated_consumer_messages_get_the_documented_answer_and_the_sender_survives(world: FuzzWorld, base: str) -> None:
    """encode_attach/encode_acks output with frames flipped, cut, repeated, dropped, swapped or re-typed."""
    bases: dict[str, list[bytes]] = {}
    sender_of: dict[str, int] = {}
    for subscription, index in world.ack_subscriptions.items():
        bases[f"{base} to sender {index}"] = valid_consumer_messages(subscription, MUTATION_CONSUMERS, b"rid-7")[base]
        sender_of[f"{base} to sender {index}"] = index
    with consumer_link(world, MUTATION_CONSUMERS) as link:

        @fuzz(len(CONSUMER_BASES))
        @given(mutated=mutations_of(bases))
        def property_(mutated: MutatedFrames) -> None:
            if mutated.frames:  # ZeroMQ cannot send a message of no frames
                check_consumer_message(link, ConsumerCase(mutated.frames, sender_of[mutated.base], mutated.base))

        property_()
    assert_every_process_healthy(world.system)


# ---------------------------------------------------------------- bugs the fuzzing found (all fixed)
# Each one keeps the smallest input that showed it. The ones that used to crash
# a process run against a system of their own (``victim``), never the fuzzed one.

# Nested arrays, 280 KB: orjson before 3.9.15 recursed without a limit and
# overflowed the C stack at ~130,000 levels (CVE-2024-27454); pyproject now
# requires a fixed orjson. MAX_HEADER_BYTES (4 MiB) lets such a header in.
DEEP_JSON: Final = b"[" * 140_000 + b"]" * 140_000


def running_pids(system: HeraldSystem, prefix: str) -> dict[str, int]:
    """The pids of the children whose name starts with ``prefix``, once all of them run."""

    def read() -> dict[str, int] | None:
        try:
            children = [child for child in system.status()["children"] if child["name"].startswith(prefix)]
        except (OSError, ValueError):  # not written yet, or caught mid-replace
            return None
        return {child["name"]: child["pid"] for child in children} if children and all(child["running"] for child in children) else None

    pids: dict[str, int] = wait_for(read, timeout=30, message=f"every {prefix} running")
    return pids


def answer_or_death(sock: zmq.Socket[Any], pids: dict[str, int], wanted: Callable[[list[bytes]], bool]) -> list[bytes]:
    """Wait for a message on ``sock`` that ``wanted`` accepts; fail at once if one of ``pids`` dies."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [name for name, pid in pids.items() if not process_alive(pid)]
        assert not dead, f"{dead} died"
        if sock.poll(50):
            message = sock.recv_multipart()
            if wanted(message):
                return message
    raise AssertionError(f"no answer within {REPLY_TIMEOUT_S} s, and {sorted(pids)} still run")


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldSystem]:
    """A Herald for the bugs that kill processes: the launcher restarts them between tests."""
    system = HeraldSystem(tmp_path_factory.mktemp("victim") / "data", []).start()
    yield system
    system.stop()


@contextlib.contextmanager
def native_consumer_sockets(deliver: str, ack: str, *consumers: str) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A SUB on ``deliver`` listening for ``consumers`` and a PUSH to ``ack``."""
    context: zmq.Context[Any] = zmq.Context()
    inbox, push = context.socket(zmq.SUB), context.socket(zmq.PUSH)
    try:
        for sock in (inbox, push):
            sock.setsockopt(zmq.LINGER, 0)
        for consumer in consumers:
            inbox.setsockopt(zmq.SUBSCRIBE, consumer.encode() + b"\x00")
        inbox.connect(deliver)
        push.connect(ack)
        yield inbox, push
    finally:
        inbox.close(0)
        push.close(0)
        context.term()


def join(inbox: zmq.Socket[Any], push: zmq.Socket[Any], subscription: str, consumer: str) -> None:
    """Slow joiner: ATTACH ``consumer`` to an absent ``subscription`` until its ERROR gets through the SUB."""

    def answered() -> bool:
        push.send_multipart(encode_attach(subscription, consumer, ready=False))
        return bool(inbox.poll(100))

    wait_for(answered, timeout=REPLY_TIMEOUT_S, message="the SUB socket joined")
    while inbox.poll(300):
        inbox.recv_multipart()


def test_internal_verb_with_a_bad_header_gets_unknown_command(requests: RequestLink) -> None:
    body = [SIGNATURE, b"DISPATCH", b"r1", b"{not json"]
    reply = requests.exchange([b"", *body])
    check_reply(reply[1:], body, frozenset({"unknown_command"}), ok_allowed=False)


def test_deeply_nested_setting_in_an_admin_request_is_not_an_internal_error(requests: RequestLink) -> None:
    # The frontend relays settings to metadata unread: orjson parses deeper nesting than it writes back.
    body = [SIGNATURE, b"TOPIC_CREATE", b"r1", b'{"name": "fz.nested", "settings": {"retention": ' + b"[" * 300 + b"]" * 300 + b"}}"]
    reply = requests.exchange([b"", *body])
    check_reply(reply[1:], body, FIELD_LEVEL_CODES, ok_allowed=True)


def test_deeply_nested_header_on_the_request_endpoint_gets_invalid_header(victim: HeraldSystem) -> None:
    frontends = running_pids(victim, "frontend-")
    link = RequestLink(victim.endpoint)
    try:
        body = [SIGNATURE, b"PING", b"r1", DEEP_JSON]
        link.send([b"", *body])
        reply = answer_or_death(link.socket, frontends, lambda _: True)
        check_reply(reply[1:], body, frozenset({"invalid_header"}), ok_allowed=False)
    finally:
        link.close()


def test_deeply_nested_header_on_the_ack_endpoint_is_dropped_and_the_sender_survives(victim: HeraldSystem) -> None:
    senders = running_pids(victim, "sender-")
    endpoints = orjson.loads((victim.data_dir / "herald-runtime.json").read_bytes())
    absent = next(name for name in (f"absent{number}" for number in itertools.count()) if shard_of(name, len(senders)) == 0)
    with native_consumer_sockets(endpoints["sender_deliver_endpoints"][0], endpoints["sender_ack_endpoints"][0], "c0") as (inbox, push):
        join(inbox, push, absent, "c0")
        push.send_multipart([SIGNATURE, b"ACK", b"", DEEP_JSON])
        # The PULL socket is read in order: the answer to this ATTACH comes after the deep message was handled.
        push.send_multipart(encode_attach(absent, "c0", ready=False, request_id=b"after"))
        answer_or_death(inbox, {"sender-0": senders["sender-0"]}, lambda message: message[2:4] == [b"ERROR", b"after"])


def test_first_attach_with_a_bad_max_unacked_gets_an_error_and_the_sender_survives(victim: HeraldSystem) -> None:
    with Client(victim.endpoint, timeout=15) as client:
        client.create_topic("jobs", exist_ok=True)
        endpoints = client.create_subscription("jobs", "workers", exist_ok=True)["endpoints"]
    senders = running_pids(victim, "sender-")
    index = shard_of("workers", len(senders))
    sender = f"sender-{index}"
    absent = next(name for name in (f"absent{number}" for number in itertools.count()) if shard_of(name, len(senders)) == index)
    with native_consumer_sockets(endpoints["deliver"], endpoints["ack"], "c0", "c1") as (inbox, push):
        join(inbox, push, absent, "c0")  # about a subscription that does not exist: the sender still has not looked up "workers"
        pid = running_pids(victim, sender)[sender]
        push.send_multipart(encode(Command.ATTACH, b"a1", {"subscription": "workers", "consumer": "c1", "ready": False, "max_unacked": "lots"}))
        reply = answer_or_death(inbox, {sender: pid}, lambda message: message[0] == b"c1\x00")
    assert reply[2:4] == [b"ERROR", b"a1"], reply
    check_error_header(orjson.loads(reply[4]), frozenset({"invalid_header"}))


# ---------------------------------------------------------------- after the fuzzing


def test_zz_after_the_fuzzing_every_process_lives_and_messages_flow(world: FuzzWorld) -> None:
    """Runs last in this module (tests run in file order): nothing died, nothing stored was lost."""
    assert_every_process_healthy(world.system, fresh=True)
    with Client(world.system.endpoint, timeout=15) as client:
        # Everything stored before the fuzzing is still there and deliverable.
        received: dict[str, tuple[bytes, dict[str, str]]] = {}
        with client.subscribe(GUARD_TOPIC, GUARD_SUBSCRIPTION) as subscription:
            deadline = time.monotonic() + 20
            while len(received) < len(GUARD_MESSAGES) and time.monotonic() < deadline:
                message = subscription.receive(timeout=1)
                if message is not None:
                    received[message.id] = (message.data, message.attributes)
                    assert message.ack() is True
        assert received == {message_id: (payload, attributes) for message_id, payload, attributes in GUARD_MESSAGES}
        # And a new message makes the whole round trip.
        client.create_topic("fz.roundtrip")
        client.create_subscription("fz.roundtrip", "fz.roundtrip.sub")
        message_id = client.publish("fz.roundtrip", b"after the fuzzing", {"k": "v"})
        with client.subscribe("fz.roundtrip", "fz.roundtrip.sub") as subscription:
            message = subscription.receive(timeout=15)
            assert message is not None, "the round-trip message never came"
            assert (message.id, message.data, message.attributes, message.attempt) == (message_id, b"after the fuzzing", {"k": "v"}, 1)
            assert message.ack() is True
    assert_every_process_healthy(world.system, fresh=True)
