"""Tokens, per-topic permissions, rate limits, quotas and the config file.

Each refusal is checked against a real `herald up --config FILE` with
credentials: no token, a wrong token, the wrong topic, a missing admin right,
over the rate, over a quota; and the config file's checker names the line of
each mistake.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from clients import Client, HeraldError
from clients.protocol import Command, consumer_topic_frame, decode, encode_acks, encode_attach, shard_of
from tests.conftest import HeraldSystem, RawClient, run_cli, wait_for

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ORDERS_TOKEN = "orders-token-0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef"
LIMITED_TOKEN = "limited-token-0123456789abcdef"

CONFIG = f"""
max_topics = 6

[[credentials]]
name = "ops"
token = "{ADMIN_TOKEN}"
admin = true

[[credentials]]
name = "orders-service"
token = "{ORDERS_TOKEN}"
publish = ["orders."]

[[credentials]]
name = "orders-reader"
token = "{READER_TOKEN}"
subscribe = ["orders."]

[[credentials]]
name = "noisy"
token = "{LIMITED_TOKEN}"
publish = [""]
publish_rate = 200
"""


@pytest.fixture
def secured(herald_factory: Callable[..., HeraldSystem], tmp_path: Path) -> HeraldSystem:
    config = tmp_path / "herald.toml"
    config.write_text(CONFIG)
    herald = herald_factory("--config", str(config))
    with Client(herald.endpoint, token=ADMIN_TOKEN) as admin:
        admin.create_topic("orders.eu")
        admin.create_topic("billing")
        admin.create_subscription("orders.eu", "orders-audit")
    return herald


def refusal(call: Callable[[], Any]) -> HeraldError:
    with pytest.raises(HeraldError) as caught:
        call()
    return caught.value


def test_requests_without_a_valid_token_are_refused(secured: HeraldSystem) -> None:
    raw = RawClient(secured.endpoint)
    try:
        assert raw.request(Command.PING).command is Command.OK  # health checks need no token
        for token in (None, "not-a-known-token-at-all"):
            header: dict[str, Any] = {"topic": "orders.eu", "messages": [{}]}
            if token:
                header["token"] = token
            reply = raw.request(Command.PUBLISH, header, [b"x"])
            assert reply.command is Command.ERROR and reply.header["code"] == "unauthenticated", reply.header
        reply = raw.request(Command.TOPIC_LIST)
        assert reply.header["code"] == "unauthenticated"
    finally:
        raw.close()


def test_status_without_a_token_reports_the_server_up_and_asks_for_one(secured: HeraldSystem) -> None:
    """PING needs no token, so `herald status` is a usable health check on a secured server."""
    anonymous = run_cli("--endpoint", secured.endpoint, "status")
    assert anonymous.returncode == 0, anonymous.stderr
    assert "up, ping" in anonymous.stdout and "details need a token: unauthenticated" in anonymous.stdout
    with_token = run_cli("--endpoint", secured.endpoint, "--token", ADMIN_TOKEN, "status")
    assert with_token.returncode == 0, with_token.stderr
    assert "durability" in with_token.stdout and "details need a token" not in with_token.stdout


def test_permissions_are_per_topic_prefix_and_admin(secured: HeraldSystem) -> None:
    with Client(secured.endpoint, token=ORDERS_TOKEN) as orders:
        assert orders.publish("orders.eu", b"ok")
        error = refusal(lambda: orders.publish("billing", b"no"))
        assert error.code == "forbidden" and "orders-service" in error.message
        assert refusal(lambda: orders.create_topic("orders.us")).code == "forbidden"
        assert refusal(lambda: orders.delete_topic("orders.eu")).code == "forbidden"
        assert [t["name"] for t in orders.list_topics()] == ["billing", "orders.eu"]  # reading needs only a token
    with Client(secured.endpoint, token=READER_TOKEN) as reader:
        assert refusal(lambda: reader.publish("orders.eu", b"no")).code == "forbidden"
        # Subscribing to an existing subscription needs subscribe permission, not admin...
        with reader.subscribe("orders.eu", "orders-audit") as subscription:
            message = subscription.receive(timeout=10)
            assert message is not None and message.data == b"ok"
            assert message.ack()
        # ...but creating one, or changing its settings, needs admin.
        assert refusal(lambda: reader.subscribe("orders.eu", "orders-new")).code == "forbidden"
        assert refusal(lambda: reader.subscribe("orders.eu", "orders-audit", ack_deadline=5)).code == "forbidden"
        assert refusal(lambda: reader.subscribe("billing", "billing-audit")).code == "forbidden"


def test_the_sender_checks_the_token_of_a_native_consumer(secured: HeraldSystem) -> None:
    with Client(secured.endpoint, token=ADMIN_TOKEN) as admin:
        admin.create_topic("secret")
        endpoints = admin.create_subscription("secret", "secret-sub")["endpoints"]
    context: zmq.Context[Any] = zmq.Context()
    inbox, push = context.socket(zmq.SUB), context.socket(zmq.PUSH)
    try:
        for consumer in ("anonymous", "reader"):
            inbox.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(consumer))
        inbox.connect(endpoints["deliver"])
        push.connect(endpoints["ack"])

        def answer(consumer: str, token: str | None) -> str:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                push.send_multipart(encode_attach("secret-sub", consumer, ready=False, request_id=b"a", token=token))
                if inbox.poll(200):
                    frames = decode(inbox.recv_multipart()[1:])
                    return str(frames.header.get("code", frames.command.name))
            raise AssertionError("no answer from the sender")

        assert answer("anonymous", None) == "unauthenticated"
        assert answer("reader", READER_TOKEN) == "forbidden"  # subscribe is for orders.* only
        # Settling someone else's deliveries is refused too, once the sender knows the subscription.
        push.send_multipart(encode_acks(Command.ACK, "secret-sub", "reader", [("0.1", 1)], b"k", token=ORDERS_TOKEN))
        deadline = time.monotonic() + 15
        code = None
        while code is None and time.monotonic() < deadline:
            if inbox.poll(200):
                frames = decode(inbox.recv_multipart()[1:])
                if frames.request_id == b"k":
                    code = frames.header.get("code")
        assert code == "forbidden"
    finally:
        inbox.close(0)
        push.close(0)
        context.term()


def test_rate_limit_refuses_the_flooder_and_spares_the_others(secured: HeraldSystem) -> None:
    raw = RawClient(secured.endpoint)
    try:
        codes: list[str] = []
        for _ in range(30):  # 30 x 20 messages, far past 200 msg/s
            header = {"topic": "billing", "messages": [{}] * 20, "token": LIMITED_TOKEN}
            reply = raw.request(Command.PUBLISH, header, [b"x"] * 20)
            codes.append("ok" if reply.command is Command.OK else reply.header["code"])
            if reply.command is Command.ERROR:
                assert reply.header["retriable"] is True and reply.header["details"]["retry_after"] > 0
    finally:
        raw.close()
    assert "ok" in codes and "rate_limited" in codes, codes

    # The limited client keeps flooding (its client retries by itself, honouring retry_after)
    # while an unlimited one publishes: the unlimited one is never refused.
    stop = threading.Event()
    limited_sent = 0

    def flood() -> None:
        nonlocal limited_sent
        with Client(secured.endpoint, token=LIMITED_TOKEN, timeout=30) as noisy:
            while not stop.is_set():
                limited_sent += len(noisy.publish_batch("billing", [b"n"] * 50))

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    started = time.monotonic()
    polite_sent = 0
    with Client(secured.endpoint, token=ADMIN_TOKEN) as polite:
        while time.monotonic() - started < 3.0:  # any refusal would raise here
            polite_sent += len(polite.publish_batch("billing", [b"p"] * 50))
    elapsed = time.monotonic() - started
    stop.set()
    thread.join(60)
    print(f"in {elapsed:.1f} s: unlimited credential {polite_sent} messages, limited credential {limited_sent} (limit 200/s)")
    assert polite_sent > 0 and limited_sent > 0
    # The bucket allows one second's burst on top of the rate.
    assert limited_sent <= 200 * (time.monotonic() - started) + 200 + 50


def test_topic_quota(secured: HeraldSystem) -> None:
    with Client(secured.endpoint, token=ADMIN_TOKEN) as admin:
        created = 2  # orders.eu and billing
        while created < 6:
            admin.create_topic(f"quota.{created}")
            created += 1
        error = refusal(lambda: admin.create_topic("quota.over"))
        assert error.code == "quota_exceeded" and "max_topics" in error.message
        admin.delete_topic("quota.2")
        admin.create_topic("quota.again")


def test_tokens_never_reach_logs_or_files(secured: HeraldSystem) -> None:
    with Client(secured.endpoint, token=ORDERS_TOKEN) as orders:
        orders.publish("orders.eu", b"x")
        refusal(lambda: orders.publish("billing", b"x"))
    with Client(secured.endpoint, token="wrong-token-0123456789abcdef") as stranger:
        refusal(lambda: stranger.list_topics())
    secured.stop()
    for path in [secured.log_path, *secured.data_dir.glob("*.json")]:
        text = path.read_text(errors="replace")
        for token in (ADMIN_TOKEN, ORDERS_TOKEN, READER_TOKEN, LIMITED_TOKEN, "wrong-token-0123456789abcdef"):
            assert token not in text, f"{token} in {path}"
    assert "credentials configured" in secured.log_path.read_text()


def test_an_open_server_says_so(herald: HeraldSystem) -> None:
    assert "no credentials configured" in herald.log_path.read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_topics = \n", ":1: not valid TOML"),
        ("max_topics = 10\nnot_a_key = 1\n", ":2: unknown key 'not_a_key'"),
        ("max_topics = -1\n", ":1: max_topics = -1 must be a positive integer"),
        ("max_topics = 5\nmax_payload_bytes = 100000000000\n", ":2: max_payload_bytes = 100000000000 exceeds 67108864 (64 MiB)"),
        ("sndhwm = 100000000000\n", ":1: sndhwm = 100000000000 exceeds 2147483647"),
        ('curve_clients_dir = "."\n', ":1: curve_clients_dir needs curve_secret_key_file too"),
        ('[[credentials]]\nname = "a"\ntoken = "short"\n', ":3: credential 'a': token must be a string of at least 16 characters"),
        (
            '[[credentials]]\nname = "a"\ntoken = "0123456789abcdef0"\n\n[[credentials]]\nname = "b"\ntoken = "0123456789abcdef0"\n',
            ":7: credential 'b' has the same token as 'a'",
        ),
        ('[[credentials]]\nname = "a"\ntoken = "0123456789abcdef0"\npublish = "orders."\n', ":4: credential 'a': publish must be a list"),
        ('[[credentials]]\nname = "a"\ntoken = "0123456789abcdef0"\nsecret = 1\n', ":4: unknown credential key 'secret'"),
        ('max_topics = 10\ncurve_secret_key_file = "keys/server.key_secret"\n', ":2: curve_secret_key_file = 'keys/server.key_secret' does not exist"),
        ("live_feed = 1\n", ":1: live_feed = 1 must be true or false"),
    ],
)
def test_config_check_names_the_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(text)
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1, result
    assert f"{path}{expected}" in result.stderr, result.stderr


def test_config_check_accepts_a_valid_file_and_herald_up_refuses_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CONFIG)
    result = run_cli("config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "orders-service" in result.stdout and ORDERS_TOKEN not in result.stdout
    assert result.stdout.rstrip().endswith("live feed: off"), result.stdout  # credentials, and no live_feed = true
    bad = tmp_path / "bad.toml"
    bad.write_text('[[credentials]]\nname = "a"\nadmin = "yes"\ntoken = "0123456789abcdef0"\n')
    result = run_cli("up", "--data-dir", str(tmp_path / "data"), "--port", "0", "--config", str(bad))
    assert result.returncode == 2, result
    assert f"{bad}:3: credential 'a': admin must be true or false" in result.stderr


def test_a_client_naming_another_consumers_id_neither_reaches_nor_fails_it(secured: HeraldSystem) -> None:
    """Deliveries and errors are addressed by consumer id, which anyone who can reach a sender's PUB socket can read.
    Another credential attaching under that id to an unknown subscription (whose subscription_not_found had failed
    the victim for good), or to a subscription of its own (whose messages had then reached the victim), is refused
    with ``consumer_in_use`` and reaches nothing: the victim drops what names another subscription."""
    with Client(secured.endpoint, token=ADMIN_TOKEN) as admin, admin.subscribe("billing", "billing-audit") as victim:
        sender = shard_of("billing-audit", 2)
        own = next(f"orders-tap-{i}" for i in itertools.count() if shard_of(f"orders-tap-{i}", 2) == sender)
        unknown = next(f"orders-none-{i}" for i in itertools.count() if shard_of(f"orders-none-{i}", 2) == sender)
        admin.create_subscription("orders.eu", own)
        endpoints = victim.info["endpoints"]
        context: zmq.Context[Any] = zmq.Context()
        watch, push = context.socket(zmq.SUB), context.socket(zmq.PUSH)
        try:
            watch.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(victim.consumer_id))  # what the victim is sent
            watch.connect(endpoints["deliver"])
            push.connect(endpoints["ack"])
            seen: dict[str, str] = {}
            deadline = time.monotonic() + 15
            while len(seen) < 2 and time.monotonic() < deadline:
                for name in (unknown, own):
                    for ready in (False, True):
                        push.send_multipart(encode_attach(name, victim.consumer_id, ready=ready, token=READER_TOKEN))
                while watch.poll(100):
                    frames = decode(watch.recv_multipart()[1:])
                    if frames.command is Command.ERROR and frames.header.get("subscription") in (unknown, own):
                        seen[frames.header["subscription"]] = frames.header["code"]
            assert seen == {unknown: "subscription_not_found", own: "consumer_in_use"}
            # Under its own subscription's name, with a bad token or none: a consumer attached here
            # authenticated already, so no such error goes to its id.
            forged = [
                encode_attach("billing-audit", victim.consumer_id, ready=True, request_id=b"f1", token="not-a-known-token-at-all"),
                encode_acks(Command.ACK, "billing-audit", victim.consumer_id, [("0.1", 1)], b"f2"),
            ]
            for frames in forged:
                push.send_multipart(frames)
            quiet_until = time.monotonic() + 1.5
            while (left := quiet_until - time.monotonic()) > 0:
                if watch.poll(int(left * 1000) + 1):
                    frames = decode(watch.recv_multipart()[1:])
                    assert frames.request_id not in (b"f1", b"f2"), (frames.command, frames.header)
            admin.publish("orders.eu", b"for the tap only")
            admin.publish("billing", b"for the victim")
            message = victim.receive(timeout=10)
            assert message is not None and message.data == b"for the victim" and message.subscription == "billing-audit"
            assert message.ack()
            assert victim.receive(timeout=1) is None, "nothing of the other subscription arrives"
            assert victim.statistics().foreign >= 2
        finally:
            watch.close(0)
            push.close(0)
            context.term()


@pytest.mark.parametrize("served", [False, True])
def test_the_live_feed_is_off_with_credentials_unless_the_config_turns_it_on(herald_factory: Callable[..., HeraldSystem], tmp_path: Path, served: bool) -> None:
    """A SUB socket sends no token, so the live feed would hand every topic to anyone who can reach its port (found in
    a security review): with credentials it is off, its port unbound and INFO's ``live`` empty, unless
    ``live_feed = true`` turns it on knowingly."""
    config = tmp_path / "herald.toml"
    config.write_text(("live_feed = true\n" if served else "") + CONFIG)
    herald = herald_factory("--config", str(config))
    live_endpoint = herald.config["live_endpoint"]
    context: zmq.Context[Any] = zmq.Context()
    reader = context.socket(zmq.SUB)
    try:
        reader.setsockopt(zmq.SUBSCRIBE, b"")
        reader.connect(live_endpoint)
        with Client(herald.endpoint, token=ADMIN_TOKEN) as admin:
            admin.create_topic("orders.eu")
            assert admin.info()["live"] == (live_endpoint if served else "")

            def heard() -> bool:
                admin.publish("orders.eu", b"secret")
                return bool(reader.poll(100))

            if served:
                wait_for(heard, timeout=10, message="the live feed reached the reader")
            else:
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    assert not heard(), "the live feed reached a reader without a token"
                host, _, port = live_endpoint.removeprefix("tcp://").rpartition(":")
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((host, int(port)), timeout=1).close()
                # Nor do the frontends connect to the unbound intake port: whatever bound it would hear everything.
                intake = context.socket(zmq.XSUB)
                try:
                    intake.bind(herald.config["live_intake_endpoint"])
                    intake.send(b"\x01")  # subscribe to every topic
                    deadline = time.monotonic() + 2
                    while time.monotonic() < deadline:
                        admin.publish("orders.eu", b"secret")
                        assert not intake.poll(100), "a frontend published the live feed to whoever bound its intake"
                finally:
                    intake.close(0)
    finally:
        reader.close(0)
        context.term()
