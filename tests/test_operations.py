"""Operating Herald: Prometheus metrics that match a known workload, health, JSON logs."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Callable

import orjson
import pytest

from clients import Client, HeraldError
from tests.conftest import HeraldSystem, health, run_cli, wait_for


def scrape(url: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, summed over roles by name in ``total``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


@pytest.fixture
def observed(herald_factory: Callable[..., HeraldSystem], monkeypatch: pytest.MonkeyPatch) -> HeraldSystem:
    monkeypatch.setenv("HERALD_LOG_FORMAT", "json")
    return herald_factory("--metrics-port", "0")


def test_metrics_count_a_known_workload(observed: HeraldSystem) -> None:
    metrics_url = observed.status()["metrics"]
    with Client(observed.endpoint) as client:
        client.create_topic("counted")
        client.create_subscription("counted", "counted-a")
        client.create_subscription("counted", "counted-b")
        client.publish_batch("counted", [b"m"] * 100)
        # Errors of admin commands come from metadata through a frontend, and are counted there.
        for refused in (lambda: client.describe_topic("not-there"), lambda: client.create_topic("counted")):
            with pytest.raises(HeraldError):
                refused()
        with client.subscribe("counted", "counted-a") as subscription:
            for _ in range(100):
                message = subscription.receive(timeout=10)
                assert message is not None
                assert message.ack()

    def settled() -> dict[str, float] | None:
        samples = scrape(metrics_url)
        # Each role writes its snapshot once a second, each on its own clock: wait for all of them.
        caught_up = (
            total(samples, "herald_acked_total") >= 100
            and total(samples, "herald_published_total") >= 100
            and samples.get('herald_topics{role="metadata"}', 0.0) >= 1
            and total(samples, "herald_backlog") >= 100
            and sum(value for key, value in samples.items() if key.startswith("herald_requests_by_command_total{") and 'command="PUBLISH"' in key) >= 1
            and total(samples, "herald_errors_total") >= 2
        )
        return samples if caught_up else None

    samples = wait_for(settled, timeout=15, interval=0.5, message="metrics caught up with the workload")
    assert total(samples, "herald_published_total") == 100
    assert total(samples, "herald_acked_total") == 100
    assert total(samples, "herald_delivered_total") >= 100
    assert total(samples, "herald_commit_seconds_count") >= 1
    assert samples['herald_process_up{role="proxy"}'] == 1.0
    assert samples['herald_process_restarts_total{role="sender-0"}'] == 0.0
    assert samples['herald_topics{role="metadata"}'] == 1.0
    assert total(samples, "herald_rocksdb_memtable_bytes") > 0
    assert 0 < samples["herald_data_volume_free_bytes"] <= samples["herald_data_volume_size_bytes"]
    # counted-a acknowledged all 100; counted-b never read any.
    assert (
        samples.get('herald_backlog{role="frontend-0",subscription="counted-b"}', 0)
        + samples.get('herald_backlog{role="frontend-1",subscription="counted-b"}', 0)
        == 100
    )
    assert total(samples, "herald_backlog") == 100
    assert total(samples, "herald_errors_total") == 2
    by_code = {key: value for key, value in samples.items() if key.startswith("herald_errors_by_code_total{")}
    assert sum(value for key, value in by_code.items() if 'code="topic_not_found"' in key) == 1
    assert sum(value for key, value in by_code.items() if 'code="topic_exists"' in key) == 1
    by_command = {key: value for key, value in samples.items() if key.startswith("herald_requests_by_command_total{")}
    assert sum(value for key, value in by_command.items() if 'command="PUBLISH"' in key) == 1  # one publish_batch

    # The backlog is counted again from disk after a restart, and `herald status` shows it.
    observed.restart()

    def backlog_after_restart() -> bool:
        samples = scrape(observed.status()["metrics"])
        return sum(value for key, value in samples.items() if key.startswith("herald_backlog{") and 'subscription="counted-b"' in key) == 100

    wait_for(backlog_after_restart, timeout=15, interval=0.5, message="the backlog counted from disk")
    result = run_cli("--endpoint", observed.endpoint, "status", "--data-dir", str(observed.data_dir))
    assert result.returncode == 0, result.stderr
    assert "counted-b" in result.stdout and " 100" in result.stdout, result.stdout


def test_health_reports_a_stuck_role(observed: HeraldSystem) -> None:
    health_url = observed.status()["metrics"].replace("/metrics", "/health")
    _, body = wait_for(lambda: (result := health(health_url))[0] == 200 and result, timeout=15, interval=0.5, message="healthy")
    assert body["healthy"] is True
    assert body["data_volume"]["state"] == "ok" and body["data_volume"]["free_bytes"] > 0
    pid = observed.kill_child("sender-1", signal.SIGSTOP)
    try:
        _, body = wait_for(lambda: (result := health(health_url))[0] == 503 and result, timeout=20, interval=0.5, message="unhealthy")
        roles = body["roles"]
        assert isinstance(roles, dict) and "stuck" in roles["sender-1"] and roles["sender-0"] == "ok"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: health(health_url)[0] == 200, timeout=15, interval=0.5, message="healthy again")
    # A killed role is restarted within a second; until the new process writes its own snapshot the
    # one on disk is its predecessor's, and must not make the new one "ok" (found by an operator).
    new_pid = observed.wait_restarted("sender-0", observed.kill_child("sender-0"))

    def ok_on_its_own_snapshot() -> bool:
        if health(health_url)[1]["roles"]["sender-0"] != "ok":
            return False
        snapshot = orjson.loads((observed.data_dir / "metrics" / "sender-0.json").read_bytes())
        assert snapshot["pid"] == new_pid, f"/health said ok on the snapshot of pid {snapshot['pid']}, not of the new sender {new_pid}"
        return True

    wait_for(ok_on_its_own_snapshot, timeout=15, interval=0.05, message="the restarted sender ok on its own snapshot")


def test_json_logs(observed: HeraldSystem) -> None:
    from clients.protocol import shard_of

    with Client(observed.endpoint) as client:
        client.create_topic("logged")
        with client.subscribe("logged", "logged-sub"):
            pass  # the sender logs the consumer's attach and departure
    sender = f"sender-{shard_of('logged-sub', 2)}"

    def parsed() -> list[dict[str, object]]:
        lines = [line for line in observed.log_path.read_text().splitlines() if line.strip()]
        return [orjson.loads(line) for line in lines]  # every line is one JSON object

    wait_for(lambda: any(entry["role"] == sender for entry in parsed()), timeout=10, message=f"a JSON line from {sender}")
    entries = parsed()
    assert {entry["role"] for entry in entries} >= {"launcher", "metadata", sender}
    assert all({"ts", "role", "pid", "level", "logger", "msg"} <= entry.keys() for entry in entries)


def test_metrics_can_listen_apart_from_the_client_address(herald_factory: Callable[..., HeraldSystem]) -> None:
    """`--metrics-host`: /metrics and /health need no credentials, so they may be kept off the clients' address.
    127.0.0.2 is loopback too (Linux routes 127/8 to lo), so both listen on this machine apart."""
    system = herald_factory("--metrics-port", "0", "--metrics-host", "127.0.0.2")
    url = system.status()["metrics"]
    assert url.startswith("http://127.0.0.2:"), url
    assert health(url.replace("/metrics", "/health"))[0] == 200
    assert total(scrape(url), "herald_process_up") >= 1
    with pytest.raises(OSError):
        urllib.request.urlopen(url.replace("127.0.0.2", "127.0.0.1"), timeout=5)
    with Client(system.endpoint, timeout=10) as client:
        assert client.ping() >= 0  # the clients' address is --host's, as before
