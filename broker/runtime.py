"""Shared plumbing of the server roles: sockets, readiness, signals, caches.

Every role runs one single-threaded poll loop: it waits on all its sockets at
once, then drains each ready socket with NOBLOCK until it is empty, so the
Python cost is paid per burst rather than per message.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypedDict, TypeVar

import orjson
import zmq

from clients.protocol import NOBLOCK, recv_frames

READY_PREFIX: Final = "READY"
DRAIN_BURST: Final = 5000  # messages taken from one socket before others get a turn

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger("herald")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, role, pid, level, logger, message (and exc when there is one)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "role": self.role,
            "pid": record.process,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(role: str) -> None:
    """Log to stderr: HERALD_LOG_LEVEL (default INFO) and HERALD_LOG_FORMAT (text, or json for one object per line)."""
    level = os.environ.get("HERALD_LOG_LEVEL", "INFO").upper()
    log_format = os.environ.get("HERALD_LOG_FORMAT", "text").lower()
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s"))
    known_level = level in LOG_LEVELS
    logging.basicConfig(level=level if known_level else logging.INFO, handlers=[handler])
    # Said once, not ignored: a typo would otherwise hide the DEBUG lines someone asked for.
    if not known_level:
        log.warning("HERALD_LOG_LEVEL=%r is not one of %s; logging at INFO", level, ", ".join(LOG_LEVELS))
    if log_format not in ("text", "json"):
        log.warning("HERALD_LOG_FORMAT=%r is neither text nor json; logging text", log_format)


class Hwm(TypedDict):
    """High-water marks for make_socket, from the config."""

    sndhwm: int
    rcvhwm: int


def make_socket(
    context: zmq.Context[Any],
    kind: int,
    *,
    bind: str | None = None,
    connect: str | list[str] | tuple[str, ...] | None = None,
    sndhwm: int = 100_000,
    rcvhwm: int = 100_000,
    linger_ms: int = 0,
    subscribe: bytes | None = None,
    identity: bytes | None = None,
    prepare: Callable[[zmq.Socket[Any]], None] | None = None,
    max_frame_bytes: int | None = None,
) -> zmq.Socket[Any]:
    """Create a socket with options set before bind and connect, in one place.

    ``prepare`` sets further options before bind, e.g. CURVE (see broker.curve).
    ``max_frame_bytes``: a peer sending a larger frame is disconnected (for
    sockets that untrusted clients reach; see MAX_REQUEST_FRAME_BYTES).

    Linger defaults to 0: a dying process must not hang on unsent messages,
    since everything that matters is either in RocksDB or will be retried.
    """
    sock: zmq.Socket[Any] = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if max_frame_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe if subscribe is not None else b"")
    if prepare is not None:
        prepare(sock)
    if bind:
        sock.bind(bind)
    if connect:
        for endpoint in [connect] if isinstance(connect, str) else connect:
            sock.connect(endpoint)
    return sock


def drain(sock: zmq.Socket[Any], limit: int = DRAIN_BURST) -> Iterator[list[bytes]]:
    """Yield the multipart messages already queued on ``sock``, without waiting."""
    for _ in range(limit):
        try:
            yield recv_frames(sock, NOBLOCK)
        except zmq.Again:
            return


# The servers allocate a few containers per message and free them at once, yet
# each allocation counts toward the collector's gen-0 threshold (700 by default):
# under load it ran every few requests, about 5% of the frontend's poll loop
# (py-spy). Measured with gc.callbacks over one loaded run, a sender spent 137 ms
# collecting at 700 and 46 ms at 20 000, with the longest pause the same (4.3
# against 4.6 ms): the survivors per collection hardly grow.
GC_GEN0_THRESHOLD: Final = 20_000


def tune_gc() -> None:
    """Call once a server is built: freeze what start-up made (modules, config) out of every collection, and collect less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def announce_ready(role: str, **details: Any) -> None:
    """Print the ready line the launcher and test fixtures wait for."""
    fields = " ".join(f"{key}={value}" for key, value in details.items())
    print(f"{READY_PREFIX} {role} pid={os.getpid()} {fields}".rstrip(), flush=True)


LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Set by the launcher in each child's environment: the pid a child must stay a child of.
LAUNCHER_PID_ENV: Final = "HERALD_LAUNCHER_PID"
LAUNCHER_CHECK_INTERVAL_S: Final = 0.5


class StopFlag:
    """Set by SIGTERM or SIGINT, or (for a child of ``herald up``) once the launcher is gone; the poll loop checks it between bursts."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        launcher = os.environ.get(LAUNCHER_PID_ENV, "")
        if launcher.isdigit():
            threading.Thread(target=self._watch_launcher, args=(int(launcher),), name="launcher-watch", daemon=True).start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def _watch_launcher(self, launcher_pid: int) -> None:
        # A launcher killed outright (SIGKILL, the OOM killer) stops nobody: its
        # children would run on unsupervised, holding the ports and the data
        # folder, so that a new `herald up` could not start. Once the launcher is
        # gone the child is re-parented, and stops as on SIGTERM (drained, in order).
        while not self.stopping:
            if os.getppid() != launcher_pid:
                log.warning("the launcher (pid %d) is gone; stopping", launcher_pid)
                self.stopping = True
                return
            time.sleep(LAUNCHER_CHECK_INTERVAL_S)


class LRUCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"LRU capacity = {capacity} must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        try:
            value = self._entries[key]
        except KeyError:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> dict[str, int]:
        return {"size": len(self._entries), "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class Timer:
    """A periodic action run from the poll loop when its interval has passed."""

    interval_s: float
    action: Callable[[], None]
    due: float = 0.0

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            self.due = now + self.interval_s
            self.action()


def monotonic() -> float:
    return time.monotonic()
