"""Fixtures that run the real Herald: `herald up` as a child process, real sockets.

The system binds free loopback ports in a temporary data folder; the fixture
waits for the launcher's ready line (with a deadline) and puts the launcher's
stderr, which carries every child's log, in the failure message.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from clients.protocol import Command, Frames, decode, encode, split_envelope

PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
START_ATTEMPTS = 2
# The suite runs two frontends whatever the machine's default (half its CPUs,
# 1 on a 2-core box), so that every test crosses the forwarding between them.
TEST_FRONTENDS = "2"


def launcher_env(**extra: str) -> dict[str, str]:
    """This environment for a `herald up` child, without an outer $HERALD_FRONTENDS (which would decide its frontend count)."""
    env = {name: value for name, value in os.environ.items() if name != "HERALD_FRONTENDS"}
    env.update(extra)
    return env


_request_ids = itertools.count(1)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout} s; last value: {last!r}")


def health(url: str) -> tuple[int, dict[str, Any]]:
    """The launcher's ``/health``: HTTP status and JSON body (503 included)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


@dataclass
class HeraldSystem:
    """A running `herald up` and the means to hurt it."""

    data_dir: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=lambda: {"HERALD_FRONTENDS": TEST_FRONTENDS})
    process: subprocess.Popen[bytes] | None = None
    endpoint: str = ""
    log_path: Path = field(default_factory=Path)
    _lines: list[str] = field(default_factory=list)

    def start(self) -> HeraldSystem:
        """Start `herald up` and wait for its ready line.

        A launcher that exits while starting is tried once more: on a busy
        machine another process can take a port between the launcher's probe
        and the child's bind, and the second try draws new ports.
        """
        for attempt in range(START_ATTEMPTS):
            if self._start_once():
                return self
            if self.process is not None and self.process.poll() is None:
                break  # still running but never ready: not a port race
            self._lines.append(f"(launcher exited with {self.process.returncode if self.process else None}; attempt {attempt + 1})")
            self.stop()  # reaps it and closes its pipe before the next try
        self.stop()
        raise AssertionError(f"herald did not become ready in {READY_TIMEOUT_S} s\nstdout: {self._lines}\nlog:\n{self.log_tail()}")

    def _start_once(self) -> bool:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-herald.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = launcher_env(**self.env, PYTHONPATH=str(PROJECT_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker.launcher", "--data-dir", str(self.data_dir), "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT,
            env=env,
        )
        log.close()
        ready = threading.Event()
        process = self.process

        def read() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").strip()
                self._lines.append(line)
                if line.startswith("herald ready on "):
                    self.endpoint = line.removeprefix("herald ready on ")
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                return ready.is_set()
        return True

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def config(self) -> dict[str, Any]:
        return orjson.loads((self.data_dir / "herald-runtime.json").read_bytes())

    def status(self) -> dict[str, Any]:
        return orjson.loads((self.data_dir / "herald-status.json").read_bytes())

    def child_pid(self, name: str) -> int | None:
        for child in self.status()["children"]:
            if child["name"] == name:
                return child["pid"] if child["running"] else None
        raise KeyError(name)

    def kill_child(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal one role process; returns the pid that was signalled."""
        pid = wait_for(lambda: self.child_pid(name), message=f"{name} running")
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 30.0) -> int:
        def restarted() -> int | None:
            try:
                pid = self.child_pid(name)
            except (OSError, ValueError):
                return None
            return pid if pid and pid != old_pid else None

        return wait_for(restarted, timeout=timeout, interval=0.05, message=f"{name} restarted")

    def kill_all(self) -> None:
        """SIGKILL the launcher and every child at once: a host-crash-like stop."""
        pids = [child["pid"] for child in self.status()["children"] if child["pid"]]
        if self.process is not None:
            pids.append(self.process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
        for pid in pids:
            wait_for(lambda pid=pid: not process_alive(pid), message=f"pid {pid} gone")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def restart(self) -> HeraldSystem:
        self.stop()
        return self.start()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def herald_factory(tmp_path: Path) -> Iterator[Callable[..., HeraldSystem]]:
    systems: list[HeraldSystem] = []

    def make(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None) -> HeraldSystem:
        """Start ``herald up`` with ``args``; ``env`` replaces the suite's ``HERALD_FRONTENDS=2`` (``{}``: the machine's default)."""
        system = HeraldSystem(data_dir or tmp_path / f"data{len(systems)}", list(args))
        if env is not None:
            system.env = env
        systems.append(system)
        return system.start()

    yield make
    for system in systems:
        system.stop()


@pytest.fixture
def herald(herald_factory: Callable[..., HeraldSystem]) -> HeraldSystem:
    """A running Herald with 2 frontends and 2 senders."""
    return herald_factory()


class RawClient:
    """A bare DEALER socket speaking the wire protocol, as a native client would."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)

    def send_raw(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def receive(self) -> Frames:
        if not self.socket.poll(self.timeout_ms):
            raise AssertionError("no reply within the timeout")
        _, body = split_envelope(self.socket.recv_multipart())
        return decode(body)

    def request(self, command: Command, header: dict[str, Any] | None = None, payloads: list[bytes] | None = None) -> Frames:
        request_id = next(_request_ids).to_bytes(8, "big")
        self.send_raw([b"", *encode(command, request_id, header or {}, payloads or [])])
        reply = self.receive()
        assert reply.request_id == request_id
        return reply

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def raw(herald: HeraldSystem) -> Iterator[RawClient]:
    client = RawClient(herald.endpoint)
    yield client
    client.close()


@pytest.fixture(scope="module")
def herald_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldSystem]:
    """One Herald shared by a module's tests (for tests that do not hurt it)."""
    system = HeraldSystem(tmp_path_factory.mktemp("herald") / "data", []).start()
    yield system
    system.stop()


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `herald` command line (``python -m clients.cli``) from this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        input=stdin,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
    )


def topic_for_shard(prefix: str, shard: int, shards: int = 2) -> str:
    """A topic name that the frontend ``shard`` owns."""
    from clients.protocol import shard_of

    for n in itertools.count():
        name = f"{prefix}{n}"
        if shard_of(name, shards) == shard:
            return name
    raise AssertionError("unreachable")


def stored_messages(data_dir: Path, shards: int = 2) -> list[Any]:
    """Every message in every shard of a stopped system."""
    from frontend.store import ShardStore

    messages = []
    for index in range(shards):
        store = ShardStore(data_dir / f"shard-{index}")
        try:
            messages.extend(store.messages())
        finally:
            store.close()
    return messages


def preload_fsync_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build tests/fail_wal_fsync.c and LD_PRELOAD it into every Herald process started afterwards.

    The shim acts on a frontend's WAL fsyncs as its environment variables say
    (``HERALD_TEST_FSYNC_FAIL_TRIGGER``, ``HERALD_TEST_FSYNC_HOLD``,
    ``HERALD_TEST_FSYNC_DELAY_US``: see the file). Skips the test where gcc is missing.
    """
    library = tmp_path / "fail_wal_fsync.so"
    try:
        built = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(PROJECT_ROOT / "tests" / "fail_wal_fsync.c"), "-ldl"], capture_output=True, timeout=60
        )
    except FileNotFoundError:
        pytest.skip("gcc is not installed: cannot build the fsync shim")
    if built.returncode != 0:
        pytest.skip(f"cannot build the fsync shim: {built.stderr.decode().strip()}")
    monkeypatch.setenv("LD_PRELOAD", str(library))
