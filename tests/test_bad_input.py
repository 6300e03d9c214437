"""Bad input never hurts: each case gets its error code, the system keeps
serving, and nothing stored changes (checked by counting the shards at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from clients import Client, HeraldError
from clients.protocol import ERROR_CATALOG, MAX_PAYLOAD_CEILING, MAX_REQUEST_FRAME_BYTES, SIGNATURE, Command, encode, encode_publish
from tests.conftest import HeraldSystem, RawClient, stored_messages, topic_for_shard

GOOD_TOPIC = "good.topic"


@pytest.fixture(scope="module")
def client(herald_module: HeraldSystem) -> Iterator[RawClient]:
    raw = RawClient(herald_module.endpoint)
    assert raw.request(Command.TOPIC_CREATE, {"name": GOOD_TOPIC}).command is Command.OK
    yield raw
    raw.close()


def expect_error(client: RawClient, frames: list[bytes], code: str) -> dict:
    client.send_raw([b"", *frames])
    reply = client.receive()
    assert reply.command is Command.ERROR, reply
    assert reply.header["code"] == code, reply.header
    assert isinstance(reply.header["message"], str) and reply.header["message"]
    # Still serving, and the topic list did not change.
    assert client.request(Command.PING).command is Command.OK
    topics = client.request(Command.TOPIC_LIST).header["topics"]
    assert [t["name"] for t in topics if not t["name"].startswith("ok.")] == [GOOD_TOPIC]
    return reply.header


def test_error_catalog_names_and_numbers_are_unique() -> None:
    names = [spec.name for spec in ERROR_CATALOG]
    numbers = [spec.number for spec in ERROR_CATALOG]
    assert len(set(names)) == len(names)
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize(
    "name",
    ["", "has space", "tab\there", "nul\x00", "newline\n", "x" * 256, "é" * 128, "emoji😀"],
    ids=["empty", "space", "tab", "nul", "newline", "too-long", "too-long-utf8", "emoji"],
)
def test_bad_topic_names(client: RawClient, name: str) -> None:
    expect_error(client, encode(Command.TOPIC_CREATE, b"r", {"name": name}), "invalid_name")


def test_non_string_name(client: RawClient) -> None:
    expect_error(client, encode(Command.TOPIC_CREATE, b"r", {"name": 5}), "invalid_header")


def test_non_utf8_header(client: RawClient) -> None:
    expect_error(client, [SIGNATURE, b"TOPIC_CREATE", b"r", b'{"name": "\xff\xfe"}'], "invalid_header")


def test_header_not_json(client: RawClient) -> None:
    expect_error(client, [SIGNATURE, b"TOPIC_LIST", b"r", b"{not json"], "invalid_header")


def test_header_not_an_object(client: RawClient) -> None:
    expect_error(client, [SIGNATURE, b"TOPIC_LIST", b"r", b"[1, 2]"], "invalid_header")


def test_header_wrong_types(client: RawClient) -> None:
    expect_error(client, encode(Command.PUBLISH, b"r", {"topic": GOOD_TOPIC, "messages": "nope"}, [b"x"]), "invalid_header")
    expect_error(client, encode(Command.PUBLISH, b"r", {"topic": GOOD_TOPIC, "messages": [{"attributes": {"k": 1}}]}, [b"x"]), "invalid_header")
    expect_error(client, encode(Command.PUBLISH, b"r", {"topic": GOOD_TOPIC, "messages": [{"id": 7}]}, [b"x"]), "invalid_header")


def test_missing_frames(client: RawClient) -> None:
    expect_error(client, [SIGNATURE, b"PING", b"r"], "malformed")
    expect_error(client, [SIGNATURE], "malformed")


def test_publish_frame_count_mismatch(client: RawClient) -> None:
    header = {"topic": GOOD_TOPIC, "messages": [{}]}
    expect_error(client, encode(Command.PUBLISH, b"r", header, [b"a", b"extra"]), "malformed")
    expect_error(client, encode(Command.PUBLISH, b"r", header, []), "malformed")


def test_packed_payloads_that_do_not_add_up(client: RawClient) -> None:
    """protocol.md §2, packed payloads: the sizes must be non-negative integers adding up to the one payload frame."""
    three = [{}, {}, {}]
    packed = [SIGNATURE, b"PUBLISH", b"r"]
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [1, 1, 1]}), b"abcd"], "malformed")
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [1, 1, 1]}), b"ab", b"c"], "malformed")
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [1, 1, 1]})], "malformed")
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [4, -1, 0]}), b"abc"], "invalid_header")
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [1, 1.0, True]}), b"abc"], "invalid_header")
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": "1,1,1"}), b"abc"], "invalid_header")
    # More sizes than a batch may hold are refused before the frame is cut.
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "payload_sizes": [0] * 10_001}), b""], "batch_too_large")
    # Sizes and entries must still pair up one to one.
    expect_error(client, [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": three, "payload_sizes": [1, 2]}), b"abc"], "malformed")
    # A packed payload over the limit is refused like any other, by its index.
    header = expect_error(
        client,
        [*packed, orjson.dumps({"topic": GOOD_TOPIC, "messages": [{}, {}], "payload_sizes": [1, 1024 * 1024 + 1]}), b"x" * (1024 * 1024 + 2)],
        "payload_too_large",
    )
    assert "messages[1]" in header["message"]


def test_unknown_command(client: RawClient) -> None:
    expect_error(client, [SIGNATURE, b"FROBNICATE", b"r", b"{}"], "unknown_command")


def test_internal_command_from_a_client(client: RawClient) -> None:
    expect_error(client, encode(Command.DISPATCH, b"r", {}), "unknown_command")


def test_unknown_protocol_version(client: RawClient) -> None:
    expect_error(client, [b"HRLD9", b"PING", b"r", b"{}"], "unsupported_version")


def test_not_herald_at_all(client: RawClient) -> None:
    expect_error(client, [b"GET / HTTP/1.1", b"", b"", b""], "malformed")


def test_oversized_payload(client: RawClient) -> None:
    header = expect_error(client, encode_publish(GOOD_TOPIC, [(b"x" * (1024 * 1024 + 1), None, None)], b"r"), "payload_too_large")
    assert "1048577" in header["message"] and "1048576" in header["message"]


def test_publish_to_missing_topic(client: RawClient) -> None:
    expect_error(client, encode_publish("no.such.topic", [(b"x", None, None)], b"r"), "topic_not_found")
    # On both shards (the owner of the topic answers).
    expect_error(client, encode_publish(topic_for_shard("missing", 0), [(b"x", None, None)], b"r"), "topic_not_found")
    expect_error(client, encode_publish(topic_for_shard("missing", 1), [(b"x", None, None)], b"r"), "topic_not_found")


def test_subscription_to_missing_topic(client: RawClient) -> None:
    expect_error(client, encode(Command.SUB_CREATE, b"r", {"topic": "absent", "name": "s1"}), "topic_not_found")


def test_bad_settings(client: RawClient) -> None:
    expect_error(client, encode(Command.TOPIC_CREATE, b"r", {"name": "t.bad", "settings": {"retention": -1}}), "invalid_setting")
    expect_error(client, encode(Command.TOPIC_CREATE, b"r", {"name": "t.bad", "settings": {"colour": "blue"}}), "invalid_setting")
    expect_error(
        client,
        encode(Command.SUB_CREATE, b"r", {"topic": GOOD_TOPIC, "name": "s.bad", "settings": {"backoff_min": 10, "backoff_max": 1}}),
        "invalid_setting",
    )


def test_backoff_shapes(client: RawClient) -> None:
    reply = client.request(Command.SUB_CREATE, {"topic": GOOD_TOPIC, "name": "ok.backoff", "settings": {"backoff": {"min": 0.5, "max": 8}}})
    assert reply.command is Command.OK, reply.header
    assert (reply.header["subscription"]["settings"]["backoff_min"], reply.header["subscription"]["settings"]["backoff_max"]) == (0.5, 8)
    expect_error(client, encode(Command.SUB_CREATE, b"r", {"topic": GOOD_TOPIC, "name": "s.bad2", "settings": {"backoff": 3}}), "invalid_setting")


def test_topic_exists(client: RawClient) -> None:
    expect_error(client, encode(Command.TOPIC_CREATE, b"r", {"name": GOOD_TOPIC}), "topic_exists")


def test_request_id_too_long(client: RawClient) -> None:
    expect_error(client, encode(Command.PING, b"r" * 65), "malformed")


def test_error_reply_echoes_request_id(client: RawClient) -> None:
    client.send_raw([b"", SIGNATURE, b"NOPE", b"my-request-7", b"{}"])
    reply = client.receive()
    assert reply.request_id == b"my-request-7"
    assert reply.header["code"] == "unknown_command"
    assert reply.header["number"] == 402


def test_null_settings_mean_defaults(client: RawClient) -> None:
    """An explicit null must never reach code that expects a number."""
    reply = client.request(Command.TOPIC_CREATE, {"name": "ok.nulls", "settings": {"retention": None, "dedup_window": None}})
    assert reply.command is Command.OK, reply.header
    assert reply.header["topic"]["settings"]["retention"] == 7 * 24 * 3600
    reply = client.request(
        Command.SUB_CREATE, {"topic": "ok.nulls", "name": "ok.nulls.sub", "settings": {"ack_deadline": None, "max_unacked": None, "backoff_min": None}}
    )
    assert reply.command is Command.OK, reply.header
    assert reply.header["subscription"]["settings"]["ack_deadline"] == 30.0
    published = client.request(Command.PUBLISH, {"topic": "ok.nulls", "messages": [{}]}, [b"x"])
    assert published.command is Command.OK, published.header
    assert client.request(Command.PING).command is Command.OK


def test_a_frame_over_the_limit_costs_its_sender_the_connection_and_nothing_else(herald_module: HeraldSystem, client: RawClient) -> None:
    """Found by a newcomer: a 200 MiB PING was read whole and answered. ZeroMQ now drops the
    connection of a peer whose frame is over the limit, before buffering it (ZMQ_MAXMSGSIZE)."""
    flooder = RawClient(herald_module.endpoint, timeout_s=2)
    try:
        flooder.send_raw([b"", *encode(Command.PING, b"big", {}), b"\0" * (MAX_REQUEST_FRAME_BYTES + 1)])
        with pytest.raises(AssertionError, match="no reply"):
            flooder.receive()
        # The socket reconnects by itself; the next request is served.
        flooder.timeout_ms = 10_000
        assert flooder.request(Command.PING).command is Command.OK
    finally:
        flooder.close()
    assert client.request(Command.PING).command is Command.OK
    with Client(herald_module.endpoint) as python_client, pytest.raises(HeraldError) as excinfo:
        python_client.publish(GOOD_TOPIC, b"\0" * (MAX_PAYLOAD_CEILING + 1))  # refused before it is sent
    assert excinfo.value.code == "payload_too_large"


def test_zzz_nothing_was_stored(herald_module: HeraldSystem, client: RawClient) -> None:
    """Runs last in this module: after all the abuse, one good publish is the only message."""
    reply = client.request(Command.PUBLISH, {"topic": GOOD_TOPIC, "messages": [{"id": "only"}]}, [b"payload"])
    assert reply.command is Command.OK, reply.header
    herald_module.stop()
    messages = [m for m in stored_messages(herald_module.data_dir) if not m.topic.startswith("ok.")]
    assert [(m.topic, m.message_id, m.payload) for m in messages] == [(GOOD_TOPIC, "only", b"payload")]
    assert orjson.loads((herald_module.data_dir / "herald-runtime.json").read_bytes())["max_payload_bytes"] == 1024 * 1024


def test_filters_no_message_can_pass_and_topics_too_full_to_look_up_are_refused(herald: HeraldSystem) -> None:
    """Every lookup of a topic carries all its subscription records in one header (at most 4 MiB). Three
    accepted filters of 1.7 MB had made every publish to their topic time out (found by fault experiments).
    Now a filter is bounded as a message's attributes are (64 entries of 1,024 bytes), and a topic's records
    by 2 MiB: both refused with a clear error, and the topic keeps working."""
    with Client(herald.endpoint, timeout=30) as client:
        client.create_topic("filtered.full")
        with pytest.raises(HeraldError) as too_many:
            client.create_subscription("filtered.full", "f.many", filter={f"k{i}": "v" for i in range(65)})
        assert too_many.value.code == "invalid_setting" and "at most 64" in str(too_many.value)
        with pytest.raises(HeraldError) as too_long:
            client.create_subscription("filtered.full", "f.long", filter={"k": "v" * 1024})
        assert too_long.value.code == "invalid_setting" and "1024 bytes" in str(too_long.value)
        widest = {f"k{i:02d}": "v" * 1000 for i in range(64)}  # the largest filter that can match: ~64 KiB
        created = 0
        with pytest.raises(HeraldError) as full:
            for index in range(100):
                client.create_subscription("filtered.full", f"f.wide.{index}", filter=widest)
                created += 1
        assert full.value.code == "quota_exceeded" and "filtered.full" in str(full.value), full.value
        assert 20 <= created < 40  # about 2 MiB of 64 KiB records
        assert client.publish("filtered.full", b"still served", attributes={"k00": "v" * 1000})
        assert len(client.list_subscriptions(topic="filtered.full")) == created
