"""`herald bench` still runs end to end: a tiny publish-only comparison, its JSON, its report, nothing left behind.

The peers (NATS JetStream, Redis Streams) join when installed and are skipped
with a message when not; the test checks whichever happened. It never needs
them, and needs matplotlib only to check the plots.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import orjson

from bench.harness import LatencyRecorder
from bench.peers import check_peers
from bench.suite import build_parser, plan_of

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_latency_recorder_is_within_its_resolution() -> None:
    recorder = LatencyRecorder()
    samples = [1_000 * value for value in range(1, 10_001)]  # 1 us .. 10 ms, uniform
    for sample in samples:
        recorder.record(sample)
    recorder.record(-5)  # clock noise counts as 0, never as a huge unsigned value
    copy = LatencyRecorder.from_bytes(recorder.to_bytes())
    summary = copy.summary()
    assert len(copy) == len(samples) + 1
    assert summary.max_us == 10_000
    for measured, exact in ((summary.p50_us, 5_000), (summary.p99_us, 9_900), (summary.p999_us, 9_990)):
        assert exact <= measured <= exact * 1.008, (measured, exact)  # never optimistic, within one bucket (1/128)


def test_messages_sets_the_headline_round_size() -> None:
    """``--messages N`` makes each headline round (fan-out to one subscription) N messages, above the fan-out cap
    too: a sustained run is ``--messages 2000000``. Larger fan-outs stay capped at their deliveries."""
    default = plan_of(build_parser().parse_args([]))
    plan = plan_of(build_parser().parse_args(["--messages", str(10 * default.fanout_deliveries)]))
    assert plan.headline_messages == plan.messages == 10 * default.fanout_deliveries
    assert plan.fanout_deliveries == default.fanout_deliveries
    longer = plan_of(build_parser().parse_args(["--messages", "200000", "--fanout-deliveries", "2000000"]))
    assert longer.fanout_deliveries == 2_000_000 and longer.messages == 200_000


def test_bench_compare_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    markdown = tmp_path / "BENCHMARKS.md"
    plots = tmp_path / "plots"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--compare",
        "--quick",
        "--scenarios",
        "publish",
        "--messages",
        "500",
        "--work-dir",
        str(tmp_path),
        "--json",
        str(out),
        "--markdown",
        str(markdown),
        "--plots-dir",
        str(plots),
    ]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"

    report = orjson.loads(out.read_bytes())
    assert report["benchmark"] == "suite"
    assert report["machine"]["nproc"] >= 1 and report["machine"]["libzmq"]
    systems = {result["system"]: result for result in report["results"]}
    assert {"herald", "raw-zmq"} <= set(systems)
    for result in report["results"]:
        assert result["scenario"] == "publish" and result["value"] > 0 and result["count"] > 0, result
        assert result["durability"], result
        assert 0 <= result["extra"]["cpu_steal_share"] <= 1, result  # Linux has steal in /proc/stat
    assert 0 <= report["machine"]["cpu_steal_share"] <= 1
    assert "CPU steal (time the hypervisor gave these CPUs to other machines)" in markdown.read_text()
    assert systems["herald"]["ratio"] > 0  # over the raw ceiling of this run

    available = check_peers(["nats", "redis"])
    if available.redis is not None:
        assert {"redis-always", "redis-everysec"} <= set(systems)
    else:
        assert "skipping redis" in done.stderr
    if available.nats is not None:
        assert "nats" in systems
    else:
        assert "skipping nats" in done.stderr

    text = markdown.read_text()
    assert "Durable publish throughput" in text and "Herald / row" in text
    assert " ".join(report["command"]) in text
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plots" in done.stdout
    # Every server and worker was stopped and every temporary data folder removed.
    assert not list(tmp_path.glob("herald-bench-*"))
