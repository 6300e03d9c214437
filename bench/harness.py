"""Shared pieces of the Herald benchmarks: the system under test, worker processes, results.

- :class:`HeraldServer` runs ``python -m broker.launcher`` on a free port in a
  temporary data folder and always stops it (SIGTERM, then SIGKILL of the
  launcher and every child it lists), also on Ctrl-C, SIGTERM or an exception.
- :class:`Workers` runs benchmark roles (publishers, consumers, raw sockets) in
  ``spawn`` child processes that talk to the parent over a pipe: each child
  reports ``ready``, waits for ``go``, reports ``done`` with its figures. The
  parent never sleeps to synchronise: it waits on the pipes and the process
  sentinels together, so a child that dies is noticed at once.
- :class:`LatencyRecorder` is an HDR-style log-bucketed histogram (nanoseconds,
  0.8% resolution, a few kB whatever the run length) with nearest-rank
  percentiles; :class:`Result` is one figure, printed as a table row and
  written to JSON beside a description of the machine.
- :class:`ProgressLine` keeps one status line on stderr while a figure runs.

Clocks: every timestamp that crosses a process boundary is ``now_ns()``,
CLOCK_MONOTONIC, which on Linux is one clock for all processes of the host
(and, unlike the wall clock, never steps). Figures from two hosts cannot be
mixed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Protocol

import orjson

from broker.config import usable_cpus

PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = PROJECT_ROOT / "bench" / "results"
READY_LINE_PREFIX: Final = "herald ready on "
READY_TIMEOUT_S: Final = 60.0  # the launcher starts six processes; a loaded 2-core machine needs a while
STOP_TIMEOUT_S: Final = 30.0  # the launcher's own grace is 10 s per child; past this we SIGKILL
WORKER_START_TIMEOUT_S: Final = 60.0  # spawn + imports of up to 17 children on 2 cores
WORKER_STOP_TIMEOUT_S: Final = 5.0
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
DISTRIBUTION_PERCENTILES: Final = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0)
DURABILITY_FSYNC: Final = "fsync: acknowledged after the RocksDB WAL is fsync'd (Herald default)"
DURABILITY_NONE: Final = "none: in-memory ZeroMQ queues only"
_PR_SET_PDEATHSIG: Final = 1


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: one clock for every process on this host."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------- latency


class LatencyRecorder:
    """An HDR-style latency histogram in nanoseconds: log-bucketed, mergeable, bounded memory.

    Values below ``2**SUB_BUCKET_BITS`` ns are counted exactly; above that,
    each power of two is split into ``2**(SUB_BUCKET_BITS - 1)`` linear
    sub-buckets, so any value is known to within 1/128 (0.8%) whatever its
    magnitude, and a run of hours at any rate costs the same few kB. A
    percentile is reported as the highest value of its bucket (never
    optimistic) and the maximum is kept exactly. Negative samples (clock
    noise) count as 0; samples past ``MAX_TRACKABLE_NS`` (hours) as that.
    """

    __slots__ = ("_counts", "_max", "_sum", "_total")

    SUB_BUCKET_BITS: Final = 8
    _SUB: Final = 1 << SUB_BUCKET_BITS
    _HALF: Final = _SUB >> 1
    MAX_TRACKABLE_NS: Final = (1 << 43) - 1  # ~2.4 hours
    _BUCKETS: Final = _SUB + (43 - SUB_BUCKET_BITS) * _HALF

    def __init__(self, samples: Iterable[int] = ()) -> None:
        self._counts: array[int] = array("q", bytes(8 * self._BUCKETS))
        self._total = 0
        self._sum = 0
        self._max = 0
        for sample in samples:
            self.record(sample)

    @classmethod
    def _index(cls, value: int) -> int:
        if value < cls._SUB:
            return value
        shift = value.bit_length() - cls.SUB_BUCKET_BITS
        return cls._SUB + (shift - 1) * cls._HALF + (value >> shift) - cls._HALF

    @classmethod
    def _highest_value(cls, index: int) -> int:
        if index < cls._SUB:
            return index
        shift, sub = divmod(index - cls._SUB, cls._HALF)
        return ((sub + cls._HALF + 1) << (shift + 1)) - 1

    def record(self, latency_ns: int) -> None:
        """Add one sample."""
        value = min(max(latency_ns, 0), self.MAX_TRACKABLE_NS)
        self._counts[self._index(value)] += 1
        self._total += 1
        self._sum += value
        if value > self._max:
            self._max = value

    def merge(self, other: LatencyRecorder) -> None:
        """Add every sample of ``other``."""
        counts = self._counts
        for index, count in enumerate(other._counts):
            if count:
                counts[index] += count
        self._total += other._total
        self._sum += other._sum
        self._max = max(self._max, other._max)

    def __len__(self) -> int:
        return self._total

    def to_bytes(self) -> bytes:
        """The histogram, compact (non-empty buckets only), to send to another process."""
        pairs = array("q", [self._total, self._sum, self._max])
        for index, count in enumerate(self._counts):
            if count:
                pairs.extend((index, count))
        return pairs.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LatencyRecorder:
        """The recorder :meth:`to_bytes` described."""
        recorder = cls()
        if not raw:
            return recorder
        pairs = array("q")
        pairs.frombytes(raw)
        recorder._total, recorder._sum, recorder._max = pairs[0], pairs[1], pairs[2]
        for position in range(3, len(pairs), 2):
            recorder._counts[pairs[position]] = pairs[position + 1]
        return recorder

    def value_at(self, p: float) -> int:
        """Nearest-rank percentile ``p`` in ns: the highest value of the bucket holding the sample of rank ceil(p% of count).

        Raises:
            ValueError: when there are no samples or ``p`` is outside (0, 100].
        """
        if not self._total:
            raise ValueError("no latency samples recorded")
        if not 0 < p <= 100:
            raise ValueError(f"percentile p = {p} must be in (0, 100]")
        rank = max(1, math.ceil(p / 100 * self._total))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                return min(self._highest_value(index), self._max)
        return self._max

    def summary(self) -> Percentiles:
        """p50/p90/p99/p99.9/max in microseconds.

        Raises:
            ValueError: when there are no samples.
        """
        p50, p90, p99, p999 = (self.value_at(p) / 1000 for p in PERCENTILES)
        return Percentiles(p50_us=p50, p90_us=p90, p99_us=p99, p999_us=p999, max_us=self._max / 1000, mean_us=self._sum / self._total / 1000)

    def distribution(self, percentiles: Sequence[float] = DISTRIBUTION_PERCENTILES) -> dict[str, float]:
        """Percentile (as text) -> microseconds: the HDR percentile spectrum, for JSON and plots."""
        return {f"{p:g}": self.value_at(p) / 1000 for p in percentiles} if self._total else {}


def percentile(ordered: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of sorted samples: the smallest value with at least p% of samples at or below it."""
    if not ordered:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile p = {p} must be in (0, 100]")
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """A latency distribution, in microseconds."""

    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class Result:
    """One benchmark figure.

    Attributes:
        name: what was measured, e.g. ``"herald publish (AsyncClient, 1000 in flight)"``.
        unit: the unit of ``value``: ``"msg/s"``, ``"deliveries/s"``, ``"us"``.
        value: the headline number (for latency: p50 in microseconds).
        count: messages measured (warm-up excluded).
        seconds: length of the timed window.
        latency: the distribution, for latency figures.
        durability: what an acknowledgement guaranteed during the run.
        ratio: value divided by the same run's raw-ZeroMQ baseline (None for the baseline itself or when not comparable).
        extra: anything else worth keeping (per-subscription rates, errors, settings).
        scenario: the suite scenario the figure belongs to (``"publish"``, ``"latency"``...), empty outside the suite.
        system: the system measured (``"herald"``, ``"redis-always"``, ``"raw-zmq"``...), empty outside the suite.
        params: what distinguishes figures of one scenario and system (rate, subscriptions, topics); pairs for ratios match on it.
    """

    name: str
    unit: str
    value: float
    count: int
    seconds: float
    durability: str
    latency: Percentiles | None = None
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    scenario: str = ""
    system: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        """One line of the results table."""
        ratio = f"{self.ratio:7.3f}x" if self.ratio is not None else "       -"
        line = f"{self.name:<68} {self.value:>12,.1f} {self.unit:<13} {ratio} {self.count:>9} {self.seconds:>8.2f}s  {self.durability.split(':')[0]}"
        if self.latency is not None:
            lat = self.latency
            line += (
                f"\n{'':<4}p50 {lat.p50_us:,.0f} us  p90 {lat.p90_us:,.0f} us  p99 {lat.p99_us:,.0f} us  p99.9 {lat.p999_us:,.0f} us  max {lat.max_us:,.0f} us"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        """The figure as plain JSON-ready data."""
        return asdict(self)


TABLE_HEADER: Final = f"{'figure':<68} {'value':>12} {'unit':<13} {'vs raw':>8} {'count':>9} {'window':>9}  durability"


def print_table(results: Sequence[Result], file: Any = None) -> None:
    """Print results as a table: value, unit, ratio to the raw baseline, count, timed window, durability."""
    out = file or sys.stdout
    print(TABLE_HEADER, file=out)
    print("-" * len(TABLE_HEADER), file=out)
    for result in results:
        print(result.row(), file=out)
    out.flush()


class StealMeter:
    """The share of CPU time the hypervisor gave to other machines (``steal`` in /proc/stat) between marks.

    On a shared virtual machine this moves every figure, Herald's and the
    peers' alike, so each figure carries the share measured while it ran.
    """

    def __init__(self) -> None:
        self._mark = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = stat.readline().split()
        except OSError:
            return None
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        values = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return values[7], sum(values)

    def share_since_mark(self, *, remark: bool = True) -> float | None:
        """Steal / all CPU time since the last mark (None where /proc/stat has no steal); marks now unless told not to."""
        now = self._read()
        start, self._mark = self._mark, (now if remark else self._mark)
        if now is None or start is None or now[1] <= start[1]:
            return None
        return round((now[0] - start[0]) / (now[1] - start[1]), 4)


def machine_description(data_dir: Path | None = None) -> dict[str, Any]:
    """What the figures were measured on: cores, CPU, load, versions, filesystem, commit."""
    import zmq

    description: dict[str, Any] = {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # what herald up's default frontend count is drawn from
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": _git(["rev-parse", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
    }
    for package in ("rocksdict", "orjson", "uvloop"):
        description[package] = _version(package)
    if data_dir is not None:
        description["data_dir_filesystem"] = filesystem_of(data_dir)
    return description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(args: list[str]) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts): fsync on tmpfs costs nothing, so it matters."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def timestamp() -> str:
    """A UTC timestamp for file names: 20250101T120000Z."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def finish(kind: str, results: Sequence[Result], args: Any, machine: dict[str, Any]) -> Path:
    """Write a benchmark's JSON (its CLI arguments as the config) and say where."""
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    path = write_report(kind, results, config, machine, args.json)
    print(f"\nJSON: {path}")
    return path


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark CLI: exit with its code, or 130 on Ctrl-C (every child is stopped on the way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        sys.exit(130)


def write_report(
    kind: str, results: Sequence[Result], config: dict[str, Any], machine: dict[str, Any], path: Path | None = None, command: list[str] | None = None
) -> Path:
    """Write a run's figures as JSON; by default to ``bench/results/<kind>-<timestamp>.json``.

    Returns:
        The path written.
    """
    if path is None:
        path = RESULTS_DIR / f"{kind}-{timestamp()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": kind,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command or [Path(sys.executable).name, "-m", f"bench.{kind}", *sys.argv[1:]],
        "config": config,
        "machine": machine,
        "results": [result.to_dict() for result in results],
    }
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return path


# --------------------------------------------------------------------------- cleanup on every exit

_cleanups: list[Callable[[], object]] = []
_cleanup_lock = threading.Lock()


def _run_cleanups() -> None:
    with _cleanup_lock:
        pending = list(reversed(_cleanups))
        _cleanups.clear()
    for cleanup in pending:
        with contextlib.suppress(Exception):
            cleanup()


atexit.register(_run_cleanups)


def _register_cleanup(cleanup: Callable[[], object]) -> None:
    with _cleanup_lock:
        _cleanups.append(cleanup)


def _unregister_cleanup(cleanup: Callable[[], object]) -> None:
    with _cleanup_lock, contextlib.suppress(ValueError):
        _cleanups.remove(cleanup)


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so ``finally`` blocks stop every child process.

    Ctrl-C already raises KeyboardInterrupt in the parent; children ignore it
    and are stopped by the parent, in order.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _die_with_parent() -> None:
    """In a fresh child (preexec_fn): get SIGTERM if the benchmark process dies, even by SIGKILL (Linux only)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# --------------------------------------------------------------------------- the system under test


class HeraldServer:
    """``herald up`` as a child process in its own temporary data folder.

    Args:
        args: extra launcher flags, e.g. ``["--frontends", "2"]``.
        work_dir: where to create the data folder (default: the system temp folder).
        keep_data: leave the data folder behind for inspection.

    Use as a context manager; :meth:`stop` is also registered to run at exit.
    """

    def __init__(self, args: Sequence[str] = (), *, work_dir: Path | None = None, keep_data: bool = False) -> None:
        self.args = list(args)
        self.work_dir = work_dir
        self.root = Path()
        self.data_dir = Path()
        self.log_path = Path()
        self.keep_data = keep_data
        self.endpoint = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._stdout: list[str] = []

    def __enter__(self) -> HeraldServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, Exception) and not self.keep_data and self.process is not None:
            # A failed run is worth a look: keep the logs of every role.
            self.keep_data = True
            print(f"[bench] run failed; kept {self.root} (herald.log has every role's log)\n{self.log_tail(20)}", file=sys.stderr)
        self.stop()

    def start(self) -> HeraldServer:
        """Start the launcher and wait for its ready line.

        Raises:
            RuntimeError: when it exits or is not ready within READY_TIMEOUT_S; the message carries its log.
        """
        self.root = Path(tempfile.mkdtemp(prefix="herald-bench-", dir=self.work_dir))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "herald.log"
        _register_cleanup(self.stop)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker.launcher", "--data-dir", str(self.data_dir), "--port", "0", *self.args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=PROJECT_ROOT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us, not the launcher: we stop it in order
                preexec_fn=_die_with_parent,  # a prctl only; safe in the forked child
            )
        ready = threading.Event()
        threading.Thread(target=self._read_stdout, args=(self.process, ready), name="herald-stdout", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        # Wake on the ready line, or notice an early exit within a short bound.
        while not ready.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.process.poll() is not None or time.monotonic() >= deadline:
                code = self.process.poll()
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(
                    f"herald did not print {READY_LINE_PREFIX!r} within {READY_TIMEOUT_S:.0f} s (exit code {code})\nstdout: {self._stdout}\nlog tail:\n{tail}"
                )
        return self

    def _read_stdout(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        if process.stdout is None:
            return
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            self._stdout.append(line)
            if line.startswith(READY_LINE_PREFIX):
                self.endpoint = line.removeprefix(READY_LINE_PREFIX)
                ready.set()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the launcher's log (every role logs there)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def children(self) -> dict[str, int]:
        """Role name -> pid, as the launcher last reported in its status file (written every second)."""
        try:
            status = orjson.loads((self.data_dir / "herald-status.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return {child["name"]: child["pid"] for child in status.get("children", []) if child.get("pid")}

    def child_pids(self) -> list[int]:
        """The role processes the launcher last reported in its status file."""
        return list(self.children().values())

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each role process has used so far, by role name."""
        return {name: cpu for name, pid in self.children().items() if (cpu := process_cpu_seconds(pid)) is not None}

    def stop(self) -> int | None:
        """SIGTERM the launcher (it stops its children in order); SIGKILL everything left after STOP_TIMEOUT_S. Idempotent.

        Returns:
            The launcher's exit code, or None when it was never started.
        """
        _unregister_cleanup(self.stop)
        process, self.process = self.process, None
        code: int | None = None
        if process is not None:
            children = self.child_pids()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            # The launcher reaps its children; anything still alive (launcher killed) is killed here.
            for pid in children:
                if _is_running(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            if process.stdout is not None:
                process.stdout.close()
            code = process.returncode
        if not self.keep_data and self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)
        return code


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CpuSource(Protocol):
    """A server under test that can say how much CPU each of its processes has used so far."""

    def cpu_seconds(self) -> dict[str, float]: ...


class CpuMeter:
    """CPU seconds each server process (Herald's roles, or a peer's one process) used between :meth:`start` and :meth:`stop`."""

    def __init__(self, server: CpuSource) -> None:
        self._server = server
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = self._server.cpu_seconds()

    def stop(self) -> dict[str, float]:
        """Role name -> CPU seconds used since :meth:`start` (roles restarted meanwhile are left out)."""
        after = self._server.cpu_seconds()
        return {name: round(after[name] - before, 3) for name, before in self._before.items() if name in after and after[name] >= before}


def _is_running(pid: int) -> bool:
    """Whether ``pid`` is a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------- worker processes


class WorkerError(RuntimeError):
    """A worker process failed, died or missed a handshake deadline."""


class Link:
    """A worker's end of its pipe to the parent: report progress, wait for orders."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self.name = name
        self._parent_pid = os.getppid()

    def send(self, kind: str, payload: Any = None) -> None:
        """Report ``kind`` (``"ready"``, ``"done"``...) with a picklable payload.

        ``"ready"`` also freezes what the worker has built so far (modules, its
        client and connection) out of every garbage collection, as the servers
        do (``broker.runtime.tune_gc``): otherwise a gen-2 pass walks all of it
        in the middle of a measurement, and its pause shows in the tail of
        whichever system is being measured.
        """
        if kind == "ready":
            gc.freeze()
        self._conn.send((kind, payload))

    def wait(self, kind: str, timeout_s: float | None = None) -> Any:
        """Wait for the parent's order ``kind`` and return its payload.

        Raises:
            WorkerError: on another order, a closed pipe (the parent died) or the timeout.
        """
        if not self._conn.poll(timeout_s):
            raise WorkerError(f"{self.name}: no {kind!r} from the parent within {timeout_s} s")
        try:
            got, payload = self._conn.recv()
        except EOFError:
            raise WorkerError(f"{self.name}: the parent went away while waiting for {kind!r}") from None
        if got != kind:
            raise WorkerError(f"{self.name}: expected {kind!r} from the parent, got {got!r}")
        return payload

    def wait_order(self, timeout_s: float | None = None) -> tuple[str, Any]:
        """Wait for the parent's next order, whatever it is: ``(kind, payload)``.

        Raises:
            WorkerError: on a closed pipe (the parent died) or the timeout.
        """
        if not self._conn.poll(timeout_s):
            raise WorkerError(f"{self.name}: no order from the parent within {timeout_s} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise WorkerError(f"{self.name}: the parent went away while waiting for an order") from None
        return str(kind), payload

    def parent_alive(self) -> bool:
        """False once the parent died (this process was re-parented)."""
        return os.getppid() == self._parent_pid


def _worker_entry(conn: Connection, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Body of every worker process: run ``target(link, *args)``; report a failure instead of dying silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _die_with_parent()  # and if it is killed outright, we get SIGTERM instead of blocking forever in recv
    link = Link(conn, name)
    try:
        target(link, *args)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


@dataclass(slots=True)
class Worker:
    """The parent's handle on one worker process."""

    name: str
    process: BaseProcess
    conn: Connection

    def send(self, kind: str, payload: Any = None) -> None:
        """Give the worker the order ``kind``."""
        self.conn.send((kind, payload))


class Workers:
    """Benchmark roles in ``spawn`` processes, each with a pipe for its handshake.

    Use as a context manager: leaving it (normally, on an exception or on
    Ctrl-C) terminates and reaps every worker still running.
    """

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        _register_cleanup(self.close)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> Worker:
        """Start ``target(link, *args)`` in a new process; ``target`` must be a module-level function."""
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_entry, args=(child, name, target, args), name=name, daemon=True)
        process.start()
        child.close()
        worker = Worker(name, process, parent)
        self.workers.append(worker)
        return worker

    def expect(self, workers: Sequence[Worker], kind: str, timeout_s: float, on_progress: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
        """Wait until each of ``workers`` reported ``kind``; return their payloads by name.

        A ``"progress"`` report on the way goes to ``on_progress(worker name, payload)`` (or is dropped).

        Raises:
            WorkerError: a worker reported an error, reported something else,
                died, or ``timeout_s`` passed first; the message names it.
        """
        waiting = {worker.conn: worker for worker in workers}
        sentinels = {worker.process.sentinel: worker for worker in workers}
        payloads: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(sorted(worker.name for worker in waiting.values()))
                raise WorkerError(f"no {kind!r} within {timeout_s:g} s from: {names}")
            ready = multiprocessing.connection.wait([*waiting, *(s for s, w in sentinels.items() if w.conn in waiting)], remaining)
            for item in ready:
                if isinstance(item, int):
                    worker = sentinels[item]
                    if worker.conn in waiting and not worker.conn.poll(0):
                        raise WorkerError(f"{worker.name} exited with code {worker.process.exitcode} before reporting {kind!r}")
                    continue
                assert isinstance(item, Connection)
                worker = waiting[item]
                try:
                    got, payload = item.recv()
                except EOFError:
                    raise WorkerError(f"{worker.name} closed its pipe before reporting {kind!r} (exit code {worker.process.exitcode})") from None
                if got == "error":
                    raise WorkerError(f"{worker.name} failed:\n{payload}")
                if got == "progress":
                    if on_progress is not None:
                        on_progress(worker.name, payload)
                    continue
                if got != kind:
                    raise WorkerError(f"{worker.name} reported {got!r} while {kind!r} was expected")
                payloads[worker.name] = payload
                del waiting[item]
        return payloads

    def join(self, workers: Sequence[Worker], timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        """Wait for workers that finished their work to exit; stop the ones that do not."""
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        self._stop(workers)

    def close(self) -> None:
        """Terminate, then kill, every worker still running, and reap all of them. Idempotent."""
        _unregister_cleanup(self.close)
        self._stop(self.workers)

    def _stop(self, workers: Sequence[Worker]) -> None:
        alive = [worker for worker in workers if worker.process.is_alive()]
        for worker in alive:
            worker.process.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for worker in alive:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        for worker in workers:
            worker.process.join(0)
            with contextlib.suppress(OSError):
                worker.conn.close()
        self.workers = [worker for worker in self.workers if worker not in workers]


def rate(count: int, start_ns: int, end_ns: int) -> float:
    """Messages per second over [start_ns, end_ns]."""
    elapsed = (end_ns - start_ns) / 1e9
    return count / elapsed if elapsed > 0 else math.inf


def parse_int_list(text: str) -> list[int]:
    """``"0,1,4,16"`` -> ``[0, 1, 4, 16]``; for argparse.

    Raises:
        ValueError: for a negative or non-integer entry.
    """
    values = [int(part) for part in text.split(",") if part.strip()]
    if any(value < 0 for value in values):
        raise ValueError(f"counts must be >= 0, got {text!r}")
    return values


@contextlib.contextmanager
def stage(message: str) -> Iterator[None]:
    """Print what is being measured (to stderr, so stdout stays the table) and how long it took."""
    print(f"[bench] {message} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    yield
    print(f"[bench] {message}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


class ProgressLine:
    """One status line on stderr, rewritten in place while a figure runs (plain lines when stderr is not a terminal).

    Args:
        label: what is running, e.g. ``"fanout herald S=10"``.
        expected: the count that means done (messages, deliveries), or 0 when unknown.
    """

    MIN_INTERVAL_S: Final = 0.5  # terminal redraws cost the benchmark CPU; twice a second is enough to watch

    def __init__(self, label: str, expected: int = 0) -> None:
        self.label = label
        self.expected = expected
        self.counts: dict[str, int] = {}
        self._started = time.monotonic()
        self._shown = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, source: str, count: int) -> None:
        """Record ``source``'s running count and redraw at most every MIN_INTERVAL_S."""
        self.counts[source] = count
        now = time.monotonic()
        if now - self._shown < self.MIN_INTERVAL_S:
            return
        self._shown = now
        done = sum(self.counts.values())
        elapsed = now - self._started
        share = f" {100 * done / self.expected:5.1f}%" if self.expected else ""
        line = f"[bench] {self.label}: {done:,}{'/' + format(self.expected, ',') if self.expected else ''}{share} {elapsed:6.1f} s"
        sys.stderr.write(f"\r{line}\x1b[K" if self._tty else line + "\n")
        sys.stderr.flush()

    def on_progress(self, worker: str, payload: Any) -> None:
        """A :meth:`Workers.expect` callback: workers report ``{"count": n}``."""
        if isinstance(payload, dict):
            self.update(worker, int(payload.get("count", 0)))

    def close(self) -> None:
        """End the line, so the next output starts on its own."""
        if self._tty and self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
