"""Durability is measured, not claimed: kill processes mid-stream and count."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from broker.config import PEER_EXPIRY_S
from clients import Client
from clients.protocol import Command, decode, encode, encode_publish, split_envelope
from tests.conftest import PROJECT_ROOT, HeraldSystem, RawClient, launcher_env, process_alive, stored_messages, topic_for_shard, wait_for


def run_launcher(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `herald up` to its end, for starts that must be refused: its exit code and output."""
    command = [sys.executable, "-m", "broker.launcher", "--data-dir", str(data_dir), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env=launcher_env(**(env or {})))


class PipelinedPublisher:
    """Keeps up to ``window`` PUBLISH requests in flight on one DEALER and records what was acknowledged."""

    def __init__(self, endpoint: str, topics: list[str], batch: int = 10, window: int = 32) -> None:
        self.context: zmq.Context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.topics = topics
        self.batch = batch
        self.window = window
        self.in_flight: dict[bytes, tuple[float, str, list[str]]] = {}
        self.acked: set[tuple[str, str]] = set()
        self.failed = 0
        self.counter = itertools.count()

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            while len(self.in_flight) < self.window:
                n = next(self.counter)
                topic = self.topics[n % len(self.topics)]
                ids = [f"m{n}-{i}" for i in range(self.batch)]
                request_id = n.to_bytes(8, "big")
                self.socket.send_multipart([b"", *encode_publish(topic, [(b"x" * 100, None, i) for i in ids], request_id)])
                self.in_flight[request_id] = (time.monotonic(), topic, ids)
            if self.socket.poll(50):
                while True:
                    try:
                        raw = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = decode(split_envelope(raw)[1])
                    sent = self.in_flight.pop(reply.request_id, None)
                    if sent is None:
                        continue
                    if reply.command is Command.OK:
                        self.acked.update((sent[1], i) for i in reply.header["ids"])
                    else:
                        self.failed += 1
            now = time.monotonic()
            for request_id in [r for r, (t, _, _) in self.in_flight.items() if now - t > 2.0]:
                del self.in_flight[request_id]  # lost with a dead process; never acknowledged
                self.failed += 1

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def test_topic_survives_restart(herald: HeraldSystem) -> None:
    raw = RawClient(herald.endpoint)
    assert raw.request(Command.TOPIC_CREATE, {"name": "durable", "settings": {"retention": 3600}}).command is Command.OK
    raw.close()
    herald.restart()
    raw = RawClient(herald.endpoint)
    reply = raw.request(Command.TOPIC_DESCRIBE, {"name": "durable"})
    raw.close()
    assert reply.command is Command.OK
    assert reply.header["topic"]["settings"]["retention"] == 3600


def test_topic_and_messages_survive_sigkill_of_everything(herald: HeraldSystem) -> None:
    raw = RawClient(herald.endpoint)
    raw.request(Command.TOPIC_CREATE, {"name": "crash"})
    reply = raw.request(Command.PUBLISH, {"topic": "crash", "messages": [{"id": f"k{i}"} for i in range(50)]}, [b"p"] * 50)
    assert reply.command is Command.OK
    raw.close()
    herald.kill_all()
    herald.start()
    raw = RawClient(herald.endpoint)
    assert raw.request(Command.TOPIC_DESCRIBE, {"name": "crash"}).command is Command.OK
    # The de-duplication index survived too: the same ids are reported as duplicates.
    again = raw.request(Command.PUBLISH, {"topic": "crash", "messages": [{"id": f"k{i}"} for i in range(50)]}, [b"p"] * 50)
    assert again.header["duplicate"] == [True] * 50
    raw.close()
    herald.stop()
    assert sorted(m.message_id for m in stored_messages(herald.data_dir) if m.topic == "crash") == sorted(f"k{i}" for i in range(50))


def test_acknowledged_publishes_survive_sigkill_of_a_frontend(herald: HeraldSystem) -> None:
    topics = [topic_for_shard("kill", 0), topic_for_shard("kill", 1)]
    raw = RawClient(herald.endpoint)
    for topic in topics:
        assert raw.request(Command.TOPIC_CREATE, {"name": topic}).command is Command.OK
    raw.close()
    publisher = PipelinedPublisher(herald.endpoint, topics)
    try:
        publisher.pump(1.0)
        before_kill = len(publisher.acked)
        old_pid = herald.kill_child("frontend-0", signal.SIGKILL)
        publisher.pump(1.0)
        herald.wait_restarted("frontend-0", old_pid)
        publisher.pump(1.5)
    finally:
        publisher.close()
    # Metadata knows the restarted frontend as a new instance of the old one, and does not report the
    # old one as "stopped answering" once its heartbeats would have expired (a false alert, found by an operator).
    time.sleep(PEER_EXPIRY_S)
    log = herald.log_path.read_text()
    assert "frontend 0 registered (a new instance)" in log, herald.log_tail()
    assert "frontend 0 stopped answering" not in log, herald.log_tail()
    herald.stop()
    stored = {(m.topic, m.message_id) for m in stored_messages(herald.data_dir)}
    lost = publisher.acked - stored
    assert before_kill > 0
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
    # Both shards kept taking writes around the kill.
    assert {topic for topic, _ in publisher.acked} == set(topics)


def test_duplicate_publish_is_stored_once(herald: HeraldSystem) -> None:
    first, second = RawClient(herald.endpoint), RawClient(herald.endpoint)
    first.request(Command.TOPIC_CREATE, {"name": "dedup"})
    one = first.request(Command.PUBLISH, {"topic": "dedup", "messages": [{"id": "same"}]}, [b"a"])
    # Several tries from another connection land on whichever frontend; the topic's owner decides.
    replies = [second.request(Command.PUBLISH, {"topic": "dedup", "messages": [{"id": "same"}]}, [b"a"]) for _ in range(4)]
    within_batch = first.request(Command.PUBLISH, {"topic": "dedup", "messages": [{"id": "twin"}, {"id": "twin"}]}, [b"b", b"b"])
    first.close()
    second.close()
    assert one.header == {"ids": ["same"], "duplicate": [False]}
    assert all(r.header == {"ids": ["same"], "duplicate": [True]} for r in replies)
    assert within_batch.header == {"ids": ["twin", "twin"], "duplicate": [False, True]}
    herald.stop()
    ids = sorted(m.message_id for m in stored_messages(herald.data_dir) if m.topic == "dedup")
    assert ids == ["same", "twin"]


def test_dedup_window_expires(herald: HeraldSystem) -> None:
    raw = RawClient(herald.endpoint)
    raw.request(Command.TOPIC_CREATE, {"name": "short.window", "settings": {"dedup_window": 0.5}})
    assert raw.request(Command.PUBLISH, {"topic": "short.window", "messages": [{"id": "x"}]}, [b"1"]).header["duplicate"] == [False]
    assert raw.request(Command.PUBLISH, {"topic": "short.window", "messages": [{"id": "x"}]}, [b"1"]).header["duplicate"] == [True]

    def accepted_again() -> bool:
        return raw.request(Command.PUBLISH, {"topic": "short.window", "messages": [{"id": "x"}]}, [b"1"]).header["duplicate"] == [False]

    wait_for(accepted_again, timeout=10, interval=0.3, message="dedup id forgotten after its window")
    raw.close()


def test_status_and_info(herald: HeraldSystem) -> None:
    raw = RawClient(herald.endpoint)
    info = raw.request(Command.INFO).header
    status = raw.request(Command.STATUS).header
    raw.close()
    assert info["live"] == herald.config["live_endpoint"]
    assert info["protocol"] == 1
    assert len(info["endpoints"]["senders"]) == 2
    assert status["frontend"] in (0, 1)
    launcher_status = herald.status()
    assert {c["name"] for c in launcher_status["children"]} == {"metadata", "sender-0", "sender-1", "frontend-0", "frontend-1", "proxy"}


def test_second_launcher_on_same_data_dir_fails_fast(herald: HeraldSystem) -> None:

    result = run_launcher(herald.data_dir, "--port", "0")
    assert result.returncode == 2
    assert "in use" in result.stderr
    raw = RawClient(herald.endpoint)
    assert raw.request(Command.PING).command is Command.OK
    raw.close()


def test_sigterm_drains_and_exits_zero(herald: HeraldSystem) -> None:
    raw = RawClient(herald.endpoint)
    raw.request(Command.TOPIC_CREATE, {"name": "drain"})
    raw.close()
    publisher = PipelinedPublisher(herald.endpoint, ["drain"])
    publisher.pump(0.5)
    assert herald.process is not None
    herald.process.send_signal(signal.SIGTERM)
    publisher.pump(1.0)
    publisher.close()
    assert herald.process.wait(30) == 0
    stored = {(m.topic, m.message_id) for m in stored_messages(herald.data_dir)}
    assert publisher.acked and publisher.acked <= stored
    _ = encode  # frames are built by the protocol module only


def test_sigterm_while_starting_stops_without_a_ready_line(tmp_path: Path) -> None:
    """Found by an operator: a SIGTERM 0.4 s after start went on starting every role and printed the ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.launcher", "--data-dir", str(tmp_path / "data"), "--port", "0"],
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )
    planned = tmp_path / "data" / "herald-runtime.json"  # written just before the first role starts
    wait_for(lambda: planned.exists(), timeout=30, interval=0.02, message="the launcher is starting its roles")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert b"herald ready" not in stdout, stdout
    assert "started proxy" not in stderr.decode(), "went on starting roles after SIGTERM"


def test_client_port_in_use_fails_fast_with_a_clear_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = run_launcher(tmp_path / "data", "--port", str(port))
    assert result.returncode == 2
    assert f"tcp://127.0.0.1:{port} is already in use" in result.stderr
    assert not (tmp_path / "data").exists(), "a refused start leaves no folder of its own behind"


def test_metrics_port_in_use_fails_fast_and_leaves_a_new_folder_unmade(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its FRONTENDS file, written before the port was tried, fixed the frontend count of a folder that never held data."""
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = run_launcher(tmp_path / "new" / "data", "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists(), "both folders made for the refused start are gone"


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (["--port", "99999"], {}, "argument --port: 99999 is outside 0..65535"),
        (["--port", "-1"], {}, "argument --port: -1 is outside 0..65535"),
        (["--metrics-port", "70000"], {}, "argument --metrics-port: 70000 is outside 0..65535"),
        (["--frontends", "0"], {}, "argument --frontends: 0 is outside 1..1024"),
        ([], {"HERALD_PORT": "abc"}, "argument --port: 'abc' is not a whole number (from the flag or $HERALD_PORT)"),
        ([], {"HERALD_DURABILITY": "sync"}, "argument --durability: 'sync' is neither fsync nor async (from the flag or $HERALD_DURABILITY)"),
    ],
)
def test_out_of_range_flags_get_a_usage_error_not_a_traceback(tmp_path, flags: list[str], env: dict[str, str], expected: str) -> None:  # type: ignore[no-untyped-def]

    result = run_launcher(tmp_path / "data", *flags, env=env)
    assert (result.returncode, "Traceback" in result.stderr) == (2, False), result.stderr
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_new_data_folder_is_its_owners_alone_and_an_open_one_is_warned_of(herald_factory) -> None:  # type: ignore[no-untyped-def]
    """Messages are stored in the clear (docs/operations.md, security): the launcher makes a new data folder
    0700 whatever the umask, and says so when it finds an existing one open to other users."""
    fresh = herald_factory()
    assert fresh.data_dir.stat().st_mode & 0o777 == 0o700
    fresh.stop()
    assert "open to other users" not in fresh.log_path.read_text()
    fresh.data_dir.chmod(0o755)
    reopened = herald_factory(data_dir=fresh.data_dir)
    assert f"data folder {fresh.data_dir} is open to other users (mode 755)" in reopened.log_path.read_text()
    assert fresh.data_dir.stat().st_mode & 0o777 == 0o755  # the operator's choice: warned of, not changed
    reopened.stop()


def test_the_frontend_count_defaults_to_the_machine_then_stays_the_folders(herald_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without --frontends, a new folder gets half the CPUs (at least one) and an existing folder
    keeps the count it was created with, even where the machine's default differs, and even with
    its FRONTENDS file or its runtime config gone; a conflicting flag or a damaged FRONTENDS file is a usage error, not a
    stranded shard or a traceback."""

    from broker.config import default_frontends

    def frontends_running(system: HeraldSystem) -> int:
        return sum(1 for child in system.status()["children"] if child["name"].startswith("frontend-"))

    fresh = herald_factory(env={})
    assert frontends_running(fresh) == default_frontends() == int((fresh.data_dir / "FRONTENDS").read_text())
    fresh.stop()

    three = default_frontends() + 2  # differs from the machine's default, whatever the machine
    created = herald_factory("--frontends", str(three), env={})
    created.stop()
    (created.data_dir / "FRONTENDS").unlink()  # the last run's config still tells
    reopened = herald_factory(data_dir=created.data_dir, env={})
    assert frontends_running(reopened) == three == int((created.data_dir / "FRONTENDS").read_text())
    reopened.stop()
    for record in ("FRONTENDS", "herald-runtime.json"):  # as when the roles were started by hand
        (created.data_dir / record).unlink()
    by_shards = herald_factory(data_dir=created.data_dir, env={})
    assert frontends_running(by_shards) == three  # one shard-<i> folder each
    by_shards.stop()

    def launch(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
        return run_launcher(data_dir, "--port", "0", *flags)

    conflicting = launch(created.data_dir, "--frontends", str(three + 1))
    assert (conflicting.returncode, "Traceback" in conflicting.stderr) == (2, False), conflicting.stderr
    assert f"was created with {three} frontends; --frontends (or $HERALD_FRONTENDS) {three + 1} would strand its messages" in conflicting.stderr
    for name, content in (("damaged", "two\n"), ("huge", "99999")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "FRONTENDS").write_text(content)
        refused = launch(folder)
        assert (refused.returncode, "Traceback" in refused.stderr) == (2, False), refused.stderr
        assert f"should hold the folder's frontend count, a whole number in 1..1024, not {content.strip()!r}" in refused.stderr


def test_every_endpoint_of_a_config_is_distinct(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ports are drawn at random and kept across restarts; no two roles may ever share one."""
    import dataclasses

    from broker.config import build_local_config

    previous = None
    for n in range(400):
        config = build_local_config(data_dir=str(tmp_path), port=0, frontends=2, previous=previous if n % 2 else None)
        endpoints = [v for v in dataclasses.asdict(config).values() if isinstance(v, str) and v.startswith("tcp://")]
        endpoints += [e for v in dataclasses.asdict(config).values() if isinstance(v, tuple | list) for e in v]
        assert len(endpoints) == len(set(endpoints)) == 14, endpoints
        previous = config


def test_internal_endpoints_listen_on_loopback_whatever_the_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Only what clients and consumers reach follows --host; nothing else may be reachable
    from another machine (a stranger could pose as a frontend, past CURVE and tokens)."""
    from broker.config import build_local_config

    host = "127.0.0.2"  # a loopback address other than 127.0.0.1 stands in for the machine's address
    config = build_local_config(data_dir=str(tmp_path), host=host, port=0)
    public = [config.client_endpoint, config.live_endpoint, *config.sender_deliver_endpoints, *config.sender_ack_endpoints]
    internal = [
        config.proxy_backend_endpoint,
        config.live_intake_endpoint,
        config.metadata_rpc_endpoint,
        config.metadata_events_endpoint,
        *config.frontend_control_endpoints,
        *config.sender_intake_endpoints,
    ]
    assert all(endpoint.startswith(f"tcp://{host}:") for endpoint in public), public
    assert all(endpoint.startswith("tcp://127.0.0.1:") for endpoint in internal), internal


def test_crash_looping_child_makes_the_launcher_give_up(herald_factory: Callable[..., HeraldSystem]) -> None:
    """A child that dies at every start is restarted with backoff, then the launcher stops
    everything with a message naming it. The backoff is capped at 0.5 s here (--restart-backoff-max),
    so the give-up comes in seconds rather than after the default's 33 s of waiting."""
    import os
    import shutil

    herald = herald_factory("--restart-backoff-max", "0.5")

    metadata_dir = herald.data_dir / "metadata"
    # Move the store away and leave a file in its place: every restart fails to open it.
    shutil.move(metadata_dir, herald.data_dir / "metadata.moved")
    metadata_dir.write_text("not a database")
    herald.kill_child("metadata")
    assert herald.process is not None
    assert herald.process.wait(90) == 1
    status = herald.status()
    assert [c["restarts"] for c in status["children"] if c["name"] == "metadata"] == [8], status
    assert not any(child["running"] for child in status["children"]), status
    log = herald.log_path.read_text()
    assert "metadata crashed 9 times in 120 s (restarted 8 times" in log and "giving up" in log, herald.log_tail()
    assert "restarting in 0.5 s" in log and "restarting in 0.8 s" not in log, herald.log_tail()
    assert "herald stopped: metadata crashed" in log
    # The data is intact: put the store back and the system starts again.
    metadata_dir.unlink()
    shutil.move(herald.data_dir / "metadata.moved", metadata_dir)
    herald.start()
    assert os.path.exists(herald.data_dir / "herald-status.json")


def test_children_of_a_launcher_killed_outright_stop_and_a_new_launcher_starts(herald: HeraldSystem) -> None:
    """Found by an operator: after a SIGKILL of `herald up` (the OOM killer), its children ran on
    unsupervised, holding the ports and the folder, so a new `herald up` could not start."""
    with Client(herald.endpoint) as client:
        client.create_topic("orphans")
        client.create_subscription("orphans", "orphans-sub")
        acked = client.publish_batch("orphans", [b"before the kill"] * 50)
    children = [child["pid"] for child in herald.status()["children"] if child["pid"]]
    assert herald.process is not None
    herald.process.kill()
    herald.process.wait(10)
    for pid in children:
        wait_for(lambda pid=pid: not process_alive(pid), timeout=20, message=f"child pid {pid} stopped after its launcher was killed")
    assert "the launcher (pid" in herald.log_path.read_text() and "is gone; stopping" in herald.log_path.read_text()
    herald.start()
    with Client(herald.endpoint) as client, client.subscribe("orphans", "orphans-sub") as subscription:
        received = set()
        while len(received) < len(acked) and (message := subscription.receive(timeout=10)) is not None:
            received.add(message.id)
            message.ack()
    assert received == set(acked)
