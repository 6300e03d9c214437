"""Metrics and health: each role writes a snapshot, the launcher serves them.

Every frontend, sender and the metadata process writes its counters to
``<data_dir>/metrics/<role>.json`` once a second (a file, not a socket, so a
process needs no extra port and a snapshot outlives a crash for inspection).
``herald up --metrics-port`` serves, from the launcher:

- ``/metrics``: the Prometheus text format (prometheus-client), one family per
  counter, labelled by role;
- ``/health``: 200 and a JSON body when every role runs and answered within
  its snapshot interval and the data volume has room, else 503 naming what is
  wrong.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("herald.metrics")

METRICS_DIR_NAME: Final = "metrics"
SNAPSHOT_INTERVAL_S: Final = 1.0
STALE_AFTER_S: Final = 5.0  # a snapshot older than this marks its role unhealthy
# RocksDB refuses every write once the volume is full, and resumes only when this
# much is free again (a shard's write buffer: WRITE_BUFFER_BYTES in frontend/store.py).
LOW_SPACE_BYTES: Final = 64 * 2**20
COMMIT_BUCKETS_S: Final = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# Snapshot keys that are gauges (a level), not counters (a running total).
GAUGES: Final = frozenset(
    {
        "subscriptions",
        "topics",
        "consumers",
        "in_flight",
        "deadline_keys",
        "outstanding",
        "subscriptions_dispatching",
        "last_seq",
        "meta_version",
        "lookup_cache_size",
        "purging",
    }
)
# Snapshot keys whose value is a {label: count} map, with the label's name.
LABELLED: Final = {
    "refused": ("reason", "requests refused by authentication, permission or rate limit"),
    "requests_by_command": ("command", "client requests received, by command"),
    "errors_by_code": ("code", "error replies sent, by error code"),
}
# Like LABELLED, but levels (gauges), not running totals.
LABELLED_GAUGES: Final = {
    "backlog": ("subscription", "messages stored and not yet settled, per subscription (in this frontend's shard)"),
}
HELP: Final = {
    "requests": "requests received (frontends: client requests; metadata: also the frontends' heartbeats)",
    "errors": "client requests answered with an error",
    "published": "messages stored (fsync'd) and acknowledged",
    "ids_indexed": "of those, messages whose id (set by the caller) is an index key of its own for the dedup window",
    "ids_in_sequences": "of those, messages whose id a PUBLISH sequence gave (kept as ranges of numbers, far cheaper)",
    "duplicates": "publishes answered as duplicates by message id",
    "forwarded": "publishes forwarded to the frontend owning the topic",
    "dispatched": "deliveries handed from a frontend to a sender, or taken by a sender",
    "dispatches_refused": "deliveries a sender's full intake refused; they stay on disk and are handed out again",
    "completed": "deliveries settled by senders' COMPLETE notices (acknowledged, or filtered out)",
    "dead_lettered": "messages moved to a dead-letter topic",
    "commits": "group commits (one fsync each)",
    "storage_failures": "writes the store refused (group commits, acknowledgements, attempt numbers, retention sweeps, purges)",
    "bad_control_messages": "malformed internal messages dropped by a frontend",
    "bad_dispatches": "malformed DISPATCH messages dropped by a sender",
    "stale_dispatches": "DISPATCH messages a restarted sender dropped because they were queued for its predecessor",
    "unanswered_consumer_errors": "credential errors a sender did not send to a consumer id attached to it (they can only come from another client)",
    "metadata_resyncs": "times a frontend or sender missed metadata change events (metadata restarted): a frontend clears its topic cache and lists the subscriptions again, a sender reads its subscriptions again",
    "unproven_attaches": "ready ATTACHes that started no deliveries because the consumer had not yet shown that its SUB socket hears this sender process",
    "bad_unseen": "DETACH messages whose malformed unseen list was ignored",
    "shed": "publishes refused as overload",
    "purged": "pending entries of deleted subscriptions removed",
    "purging": "deleted subscriptions whose backlog is still being removed",
    "delivered": "messages delivered to consumers (a DELIVER may carry several)",
    "acked": "acknowledgements applied",
    "deadline_keys": "keys in a sender's ack-deadline lists, settled ones included until the next compaction",
    "redelivered": "deliveries sent again after the ack deadline or a NACK",
    "rocksdb_sst_bytes": "bytes of RocksDB table files",
    "rocksdb_memtable_bytes": "bytes of RocksDB memtables",
}


class SnapshotWriter:
    """Writes one role's snapshot atomically; never raises (a full disk only skips it)."""

    def __init__(self, data_dir: str, role: str) -> None:
        self.directory = Path(data_dir) / METRICS_DIR_NAME
        self.path = self.directory / f"{role}.json"
        self._failed = False

    def write(self, snapshot: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({**snapshot, "pid": os.getpid(), "written_at": time.time()}))
            tmp.replace(self.path)
            self._failed = False
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write metrics snapshot %s: %s", self.path, exc)
            self._failed = True


def read_snapshots(data_dir: str) -> dict[str, dict[str, Any]]:
    snapshots: dict[str, dict[str, Any]] = {}
    for path in sorted((Path(data_dir) / METRICS_DIR_NAME).glob("*.json")):
        try:
            snapshots[path.stem] = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # being replaced right now; the next scrape has it
    return snapshots


class SnapshotCollector(Collector):
    """Turns the snapshots and the launcher's process table into metric families."""

    def __init__(self, data_dir: str, processes: Callable[[], list[dict[str, Any]]]) -> None:
        self.data_dir = data_dir
        self.processes = processes

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("herald_process_up", "1 when the role's process runs", labels=["role"])
        restarts = CounterMetricFamily("herald_process_restarts", "restarts of the role's process by the launcher", labels=["role"])
        uptime = GaugeMetricFamily("herald_process_uptime_seconds", "seconds since the role's process started", labels=["role"])
        for child in self.processes():
            up.add_metric([child["name"]], 1.0 if child["running"] else 0.0)
            restarts.add_metric([child["name"]], float(child["restarts"]))
            uptime.add_metric([child["name"]], float(child["uptime_s"]))
        yield from (up, restarts, uptime)
        volume = data_volume(self.data_dir)
        if volume is not None:
            yield GaugeMetricFamily("herald_data_volume_free_bytes", "free bytes on the data folder's volume", value=float(volume["free_bytes"]))
            yield GaugeMetricFamily("herald_data_volume_size_bytes", "size of the data folder's volume", value=float(volume["total_bytes"]))
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for role, snapshot in read_snapshots(self.data_dir).items():
            for key, value in snapshot.items():
                if key == "commit_seconds" and isinstance(value, dict):
                    yield self._histogram(role, value)
                elif key in LABELLED_GAUGES and isinstance(value, dict):
                    label, help_text = LABELLED_GAUGES[key]
                    gauge = families.setdefault(key, GaugeMetricFamily(f"herald_{key}", help_text, labels=["role", label]))
                    for label_value, level in value.items():
                        gauge.add_metric([role, str(label_value)], float(level))
                elif key in LABELLED and isinstance(value, dict):
                    label, help_text = LABELLED[key]
                    family = families.setdefault(key, CounterMetricFamily(f"herald_{key}", help_text, labels=["role", label]))
                    for label_value, count in value.items():
                        family.add_metric([role, str(label_value)], float(count))
                elif key == "topic_cache" and isinstance(value, dict):
                    for part in ("hits", "misses"):
                        name = f"topic_cache_{part}"
                        counter = families.setdefault(
                            name,
                            CounterMetricFamily(
                                f"herald_{name}", f"topic lookups answered {'from' if part == 'hits' else 'outside'} the cache", labels=["role"]
                            ),
                        )
                        counter.add_metric([role], float(value.get(part, 0)))
                elif isinstance(value, int | float) and not isinstance(value, bool) and key not in ("written_at", "frontend", "sender", "pid"):
                    if key not in families:
                        kind = GaugeMetricFamily if key in GAUGES or key.startswith("rocksdb_") else CounterMetricFamily
                        families[key] = kind(f"herald_{key}", HELP.get(key, key.replace("_", " ")), labels=["role"])
                    families[key].add_metric([role], float(value))
        yield from families.values()

    @staticmethod
    def _histogram(role: str, value: dict[str, Any]) -> HistogramMetricFamily:
        family = HistogramMetricFamily("herald_commit_seconds", "time of one group commit (write and fsync)", labels=["role"])
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(COMMIT_BUCKETS_S, value.get("buckets", []), strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", float(value.get("count", 0))))
        family.add_metric([role], buckets, float(value.get("sum", 0.0)))
        return family


class CommitHistogram:
    """Group-commit durations, kept as bucket counts for the snapshot."""

    def __init__(self) -> None:
        self.buckets = [0] * len(COMMIT_BUCKETS_S)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for index, bound in enumerate(COMMIT_BUCKETS_S):
            if seconds <= bound:
                self.buckets[index] += 1
                break

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "count": self.count, "sum": round(self.sum, 6)}


def data_volume(data_dir: str) -> dict[str, int] | None:
    """Free and total bytes of the data folder's volume (None when it cannot be read)."""
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError:
        return None
    return {"free_bytes": usage.free, "total_bytes": usage.total}


def health(data_dir: str, processes: list[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """Whether every role runs and wrote a fresh snapshot (the proxy writes none), and the data volume has room."""
    snapshots = read_snapshots(data_dir)
    now = time.time()
    roles: dict[str, str] = {}
    for child in processes:
        name = child["name"]
        snapshot = snapshots.get(name, {})
        if not child["running"]:
            roles[name] = "not running"
        elif name != "proxy" and now - float(snapshot.get("written_at", 0.0)) > STALE_AFTER_S:
            roles[name] = f"no snapshot for {STALE_AFTER_S:g} s (stopped or stuck)"
        elif name != "proxy" and snapshot.get("pid") not in (None, child.get("pid")):
            # The snapshot is its previous process's: a restarted role is not ok until it has written one.
            roles[name] = "restarted, no snapshot of its own yet"
        else:
            roles[name] = "ok"
    healthy = bool(roles) and all(state == "ok" for state in roles.values())
    body: dict[str, Any] = {"healthy": healthy, "roles": roles}
    volume = data_volume(data_dir)
    if volume is not None:
        # A full volume refuses every publish while each process runs; it also stops the
        # snapshots, so the roles read "stuck": this says why.
        low = volume["free_bytes"] < LOW_SPACE_BYTES
        body["data_volume"] = {
            **volume,
            "state": f"low: {volume['free_bytes'] // 2**20} MiB free, under the {LOW_SPACE_BYTES // 2**20} MiB a shard needs to write" if low else "ok",
        }
        body["healthy"] = healthy = healthy and not low
    return healthy, body


class MetricsServer:
    """``/metrics`` and ``/health`` over HTTP, on a thread of the launcher."""

    def __init__(self, host: str, port: int, data_dir: str, processes: Callable[[], list[dict[str, Any]]]) -> None:
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(data_dir, processes))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(registry))
                elif self.path == "/health":
                    healthy, body = health(data_dir, processes())
                    self._send(200 if healthy else 503, "application/json", orjson.dumps(body))
                else:
                    self._send(404, "text/plain", b"try /metrics or /health\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever, which may never have started
            self.server.shutdown()
        self.server.server_close()
