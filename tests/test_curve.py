"""CURVE: encrypted endpoints, and only clients on the allow list get in.

`herald keys generate` makes the server's and the clients' certificates; the
server runs with `curve_secret_key_file` and `curve_clients_dir` in its config.
A client without keys, with a key not on the list, or with the wrong server
key gets no answer at all: its handshake fails in libzmq, so nothing of it
reaches a Herald process.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from clients import Client, CurveKeys, HeraldError
from tests.conftest import HeraldSystem, run_cli


def generate(keys: Path, name: str) -> None:
    result = run_cli("keys", "generate", str(keys), "--name", name)
    assert result.returncode == 0, result.stderr
    assert (keys / f"{name}.key").exists() and (keys / f"{name}.key_secret").stat().st_mode & 0o077 == 0


@pytest.fixture
def curve_herald(herald_factory: Callable[..., HeraldSystem], tmp_path: Path) -> tuple[HeraldSystem, Path]:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("server", "alice", "mallory"):
        generate(keys, name)
    allowed.mkdir()
    shutil.copy(keys / "alice.key", allowed)  # only alice's public key is on the list
    config = tmp_path / "herald.toml"
    config.write_text('curve_secret_key_file = "keys/server.key_secret"\ncurve_clients_dir = "allowed"\n')
    return herald_factory("--config", str(config)), keys


def test_an_allowed_client_works_end_to_end(curve_herald: tuple[HeraldSystem, Path]) -> None:
    herald, keys = curve_herald
    alice = CurveKeys.from_files(str(keys / "server.key"), str(keys / "alice.key_secret"))
    with Client(herald.endpoint, curve=alice) as client:
        client.create_topic("sealed")
        # Deliveries and acks go over the sender's endpoints, encrypted as well.
        with client.subscribe("sealed", "sealed-reader") as subscription:
            message_id = client.publish("sealed", b"for alice")
            message = subscription.receive(timeout=15)
            assert message is not None and message.id == message_id and message.data == b"for alice"
            assert message.ack()


@pytest.mark.parametrize("who", ["no keys", "not on the list", "wrong server key"])
def test_other_clients_get_no_answer(curve_herald: tuple[HeraldSystem, Path], who: str) -> None:
    herald, keys = curve_herald
    curve = {
        "no keys": None,
        "not on the list": CurveKeys.from_files(str(keys / "server.key"), str(keys / "mallory.key_secret")),
        "wrong server key": CurveKeys.from_files(str(keys / "mallory.key"), str(keys / "alice.key_secret")),
    }[who]
    with Client(herald.endpoint, timeout=2.0, curve=curve) as client, pytest.raises(HeraldError) as refused:
        client.list_topics()
    assert refused.value.code == "timeout"
    assert all(child["running"] and child["restarts"] == 0 for child in herald.status()["children"])


def test_the_servers_own_key_pair_is_always_admitted(curve_herald: tuple[HeraldSystem, Path]) -> None:
    """docs/operations.md warns that the server's key pair gets in without being on the allow list (the launcher's
    health PING uses it), so it must never be handed out as a client key."""
    herald, keys = curve_herald
    server_pair = CurveKeys.from_files(str(keys / "server.key"), str(keys / "server.key_secret"))
    with Client(herald.endpoint, timeout=5.0, curve=server_pair) as client:
        assert client.list_topics() == []
