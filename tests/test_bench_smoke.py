"""The benchmark harness still runs: a tiny throughput run end to end, checked for valid JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from bench.floor import measure_store_floor

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    command = [
        sys.executable,
        "-m",
        "bench.throughput",
        "--messages",
        "500",
        "--warmup",
        "100",
        "--raw-messages",
        "20000",
        "--subscriptions",
        "0,1",
        "--work-dir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"

    report = orjson.loads(out.read_bytes())
    assert report["benchmark"] == "throughput"
    assert report["machine"]["nproc"] >= 1 and report["machine"]["libzmq"]
    names = [result["name"] for result in report["results"]]
    assert names[0].startswith("raw pyzmq PUSH->PULL")
    assert any("AsyncClient" in name for name in names)
    assert any("publish_batch" in name for name in names)
    assert any("1 subscription" in name for name in names)
    for result in report["results"]:
        assert result["value"] > 0 and result["count"] > 0, result
        assert result["durability"]
    assert all(result["ratio"] > 0 for result in report["results"][1:])
    # Every child was reaped and the temporary data folder removed.
    assert not list(tmp_path.glob("herald-bench-*"))


def test_store_floor_records_every_due_message_and_cleans_up(tmp_path: Path) -> None:
    floor = measure_store_floor(tmp_path, rate=500, seconds=0.2, warmup_s=0.05, size=100)
    assert len(floor.latency) == 100  # the measured part only, every message once
    summary = floor.latency.summary()
    assert 0 < summary.p50_us <= summary.p99_us <= summary.max_us
    assert 1 <= len(floor.appends) <= 100  # one per group commit
    assert floor.achieved_msg_per_s > 0
    assert not list(tmp_path.iterdir())  # its temporary shard is gone


def test_microbenchmarks_still_run() -> None:
    """bench/test_micro.py is outside the default test paths: run each of its benchmarks once (timing off), so a changed hot path cannot leave it broken."""
    command = [sys.executable, "-m", "pytest", "-q", "bench/test_micro.py", "--benchmark-disable", "-p", "no:cacheprovider"]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, f"exit code {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-2000:]}"
