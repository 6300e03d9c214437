"""``herald up``: run and supervise the whole system on one machine.

Starts metadata, the senders, the frontends and the proxy as child processes
(``python -m ROLE``, so ``ps`` shows which is which), waits until each printed
its ready line and a PING answers through the proxy, prints
``herald ready on tcp://HOST:PORT``, restarts a child that dies (with
exponential backoff, giving up on a crash loop), and on SIGINT/SIGTERM stops
the children in order: the proxy first so no new request arrives, then the
frontends (they commit and acknowledge what they accepted), the senders, and
metadata last.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson
import zmq

from broker.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_SENDERS,
    TUNABLE_KEYS,
    HeraldConfig,
    build_local_config,
    default_frontends,
    load_up_file,
    port_is_free,
)
from broker.curve import ServerKeys
from broker.metrics import METRICS_DIR_NAME, MetricsServer
from broker.runtime import LAUNCHER_PID_ENV, READY_PREFIX, configure_logging
from clients.protocol import Command, HeraldError, decode, encode, split_envelope

log = logging.getLogger("herald.launcher")

CHILD_READY_TIMEOUT_S: Final = 30.0
STOP_GRACE_S: Final = 10.0  # SIGTERM, then SIGKILL after this long
RESTART_BACKOFF_MIN_S: Final = 0.2
RESTART_BACKOFF_MAX_S: Final = 10.0  # the default of --restart-backoff-max
RESTART_BACKOFF_CEILING_S: Final = 600.0
HEALTHY_AFTER_S: Final = 30.0  # a child up this long has its backoff reset
CRASH_LOOP_RESTARTS: Final = 8  # restarts within CRASH_LOOP_WINDOW_S that mean "give up" (backoff allows ~17)
CRASH_LOOP_WINDOW_S: Final = 120.0
SUPERVISE_INTERVAL_S: Final = 0.1
RUNTIME_CONFIG_NAME: Final = "herald-runtime.json"
STATUS_FILE_NAME: Final = "herald-status.json"
FRONTENDS_FILE: Final = "FRONTENDS"  # the frontend count a data folder was created with
MAX_FRONTENDS: Final = 1024
LOCK_FILE_NAME: Final = "LOCK"
PROJECT_ROOT: Final = str(Path(__file__).resolve().parent.parent)


@dataclass
class Child:
    """One supervised role process."""

    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)
    next_start: float = 0.0
    backoff_s: float = RESTART_BACKOFF_MIN_S
    ready: threading.Event = field(default_factory=threading.Event)


class DataDirInUse(Exception):
    """Another launcher holds the data folder's lock."""


class Launcher:
    """Starts, watches and stops the children of one Herald installation."""

    def __init__(
        self, config: HeraldConfig, metrics_port: int | None = None, metrics_host: str | None = None, restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S
    ) -> None:
        self.restart_backoff_max_s = restart_backoff_max_s
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.config_path = self.data_dir / RUNTIME_CONFIG_NAME
        self.children: list[Child] = []
        self.stopping = False
        self.gave_up: str | None = None
        self.status_write_failed = False
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or config.host  # /metrics and /health may listen apart from the clients' address
        self.metrics: MetricsServer | None = None
        self.started_at = time.time()
        self._lock_file: IO[bytes] | None = None

    def metrics_url(self) -> str | None:
        """Where /metrics answers, as this machine reaches it; None when not served."""
        if self.metrics is None:
            return None
        host = "127.0.0.1" if self.metrics_host in WILDCARD_HOSTS else self.metrics_host
        return f"http://{host}:{self.metrics.port}/metrics"

    def lock_data_dir(self) -> None:
        """Take an exclusive lock so a second launcher cannot share the folder."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.data_dir / LOCK_FILE_NAME, "wb")  # noqa: SIM115 - held for the launcher's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DataDirInUse(f"data folder {self.data_dir} is in use by another herald; stop it or pick another --data-dir") from None
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock_file = lock

    def plan(self) -> None:
        # Owner-only: it holds the credentials' token hashes.
        descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as runtime_config:
            runtime_config.write(self.config.to_json())
        os.chmod(self.config_path, 0o600)  # a file left by an older run keeps its mode otherwise
        # Written whole or not at all: a torn file would keep every later start from reading the count.
        staged = self.data_dir / f"{FRONTENDS_FILE}.tmp"
        staged.write_text(str(self.config.frontends))
        staged.replace(self.data_dir / FRONTENDS_FILE)
        # Snapshots of a previous run (perhaps with more senders) must not be served as this run's.
        for stale in (self.data_dir / METRICS_DIR_NAME).glob("*.json"):
            stale.unlink(missing_ok=True)
        config = ["--config", str(self.config_path)]
        self.children = [Child("metadata", ["-m", "metadata", *config])]
        self.children += [Child(f"sender-{i}", ["-m", "sender", *config, "--index", str(i)]) for i in range(self.config.senders)]
        self.children += [Child(f"frontend-{i}", ["-m", "frontend", *config, "--index", str(i)]) for i in range(self.config.frontends)]
        self.children.append(Child("proxy", ["-m", "broker", *config]))

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = PROJECT_ROOT + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else PROJECT_ROOT
        env[LAUNCHER_PID_ENV] = str(os.getpid())  # the child stops once this process is gone (see StopFlag)
        child.ready.clear()
        child.process = subprocess.Popen(
            [sys.executable, *child.args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches the launcher, which stops children in order
        )
        child.started_at = time.monotonic()
        threading.Thread(target=self._watch_stdout, args=(child, child.process), daemon=True).start()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    @staticmethod
    def _watch_stdout(child: Child, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(READY_PREFIX.encode()):
                child.ready.set()

    def start_all(self) -> None:
        """Start the children in order, each once the one before is ready; stop starting on SIGTERM or SIGINT."""
        for child in self.children:
            if self.stopping:
                return
            self._spawn(child)
            deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
            while not child.ready.wait(SUPERVISE_INTERVAL_S):
                if self.stopping:
                    return
                code = child.process.poll() if child.process else None
                if code is not None:
                    raise RuntimeError(f"{child.name} exited with code {code} while starting; its log is above")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not print its ready line within {CHILD_READY_TIMEOUT_S} s")
        self.wait_answering(CHILD_READY_TIMEOUT_S)

    def wait_answering(self, timeout_s: float) -> None:
        """Poll PING through the proxy until a frontend answers, or raise."""
        deadline = time.monotonic() + timeout_s
        context: zmq.Context[Any] = zmq.Context()
        try:
            attempt = 0
            while time.monotonic() < deadline:
                attempt += 1
                sock = context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                if self.config.curve_secret_key_file:
                    ServerKeys(self.config.curve_secret_key_file).connect_as_self(sock)
                sock.connect(self.config.client_endpoint)
                sock.send_multipart([b"", *encode(Command.PING, attempt.to_bytes(4, "big"))])
                if sock.poll(500):
                    _, body = split_envelope(sock.recv_multipart())
                    sock.close()
                    if decode(body).command is Command.OK:
                        return
                sock.close()
            raise RuntimeError(f"no frontend answered PING through {self.config.client_endpoint} within {timeout_s} s")
        finally:
            context.term()

    def supervise_once(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None:
                if now >= child.next_start:
                    self._spawn(child)
                continue
            code = process.poll()
            if code is None:
                if now - child.started_at > HEALTHY_AFTER_S:
                    child.backoff_s = RESTART_BACKOFF_MIN_S
                continue
            child.restart_times = [t for t in child.restart_times if now - t < CRASH_LOOP_WINDOW_S]
            if len(child.restart_times) >= CRASH_LOOP_RESTARTS:
                self.gave_up = (
                    f"{child.name} crashed {len(child.restart_times) + 1} times in {CRASH_LOOP_WINDOW_S:.0f} s"
                    f" (restarted {len(child.restart_times)} times; last exit code {code}); giving up"
                )
                log.error(self.gave_up)
                self.stopping = True
                return
            child.restarts += 1
            child.restart_times.append(now)
            child.process = None
            child.next_start = now + child.backoff_s
            log.warning("%s exited with code %s; restarting in %.1f s", child.name, code, child.backoff_s)
            child.backoff_s = min(child.backoff_s * 2, self.restart_backoff_max_s)

    def processes(self) -> list[dict[str, Any]]:
        """Each child's pid, state, uptime and restarts (for the status file, metrics and health)."""
        rows = []
        for child in self.children:
            process = child.process  # read once: the HTTP thread runs this while supervise_once() replaces it
            rows.append(
                {
                    "name": child.name,
                    "pid": process.pid if process else None,
                    "running": process is not None and process.poll() is None,
                    "uptime_s": round(time.monotonic() - child.started_at, 1) if process else 0.0,
                    "restarts": child.restarts,
                }
            )
        return rows

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "client_endpoint": self.config.client_endpoint,
            "metrics": self.metrics_url(),
            "children": self.processes(),
        }
        tmp = self.data_dir / (STATUS_FILE_NAME + ".tmp")
        try:
            tmp.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))
            tmp.replace(self.data_dir / STATUS_FILE_NAME)
        except OSError as exc:
            # A full disk must not take the supervisor down; the file is only a report.
            if not self.status_write_failed:
                log.warning("cannot write %s (%s); `herald status --data-dir` shows stale process data until it can", STATUS_FILE_NAME, exc)
            self.status_write_failed = True
            return
        if self.status_write_failed:
            log.info("%s is written again", STATUS_FILE_NAME)
        self.status_write_failed = False

    def stop_all(self) -> None:
        """Stop children in the reverse of start order: proxy, frontends, senders, metadata."""
        for child in reversed(self.children):
            process = child.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE_S)
                process.kill()
                process.wait()
            log.info("stopped %s (exit code %s)", child.name, process.returncode)

    def run(self) -> int:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if self.metrics_port is not None:
            # Bound before anything is written to the folder or started, so a taken
            # port fails fast like the client port and leaves the folder as it was.
            try:
                self.metrics = MetricsServer(self.metrics_host, self.metrics_port, str(self.data_dir), self.processes)
            except OSError as exc:
                raise MetricsPortTaken(
                    f"cannot serve metrics on {self.metrics_host}:{self.metrics_port}: {exc.strerror or exc}; pick another --metrics-port or --metrics-host"
                ) from None
        self.lock_data_dir()
        self.plan()
        try:
            self.start_all()
            if self.stopping:
                return 0  # stopped while starting: no ready line for a system that is going away (finally stops what started)
            if self.metrics is not None:
                self.metrics.start()
                log.info("metrics on %s, health on /health", self.metrics_url())
            self.write_status()  # before the ready line, so whoever waits for it can read the pids
            if self.config.host in WILDCARD_HOSTS:
                log.warning(
                    "--host %s listens on every interface, but clients are told to connect to %s, which only this machine can reach; "
                    "pass this machine's address instead",
                    self.config.host,
                    self.config.client_endpoint,
                )
            if self.config.credentials:
                log.info("%d credentials configured; every request but PING needs a token", len(self.config.credentials))
                if self.config.live_feed_served:
                    log.warning("live_feed = true: anyone who can reach %s reads every topic's messages, tokens or not", self.config.live_endpoint)
                else:
                    log.info("the live feed is off: it checks no token (set live_feed = true in the config file to serve it)")
            elif is_loopback(self.config.host):
                log.warning("no credentials configured: anyone on this machine may use Herald (fine for development)")
            else:
                log.warning("no credentials configured: anyone who can reach %s may use Herald", self.config.client_endpoint)
            print(f"herald ready on {self.config.client_endpoint}", flush=True)
            last_status = time.monotonic()
            while not self.stopping:
                self.supervise_once()
                now = time.monotonic()
                if now - last_status > 1.0:
                    self.write_status()
                    last_status = now
                time.sleep(SUPERVISE_INTERVAL_S)
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            self.stop_all()
            self.write_status()
        if self.gave_up:
            print(f"herald stopped: {self.gave_up}", file=sys.stderr, flush=True)
            return 1
        return 0


def _previous_config(path: Path) -> HeraldConfig | None:
    """The config of the last run on this data folder, if it is readable."""
    try:
        return HeraldConfig.load(path)
    except (OSError, ValueError, TypeError):
        return None


ENV_PREFIX: Final = "HERALD_"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags of `herald up`; each defaults to its HERALD_* variable (e.g. HERALD_DATA_DIR), then to the built-in default.

    Precedence: flag, then environment variable, then the config file (for what it
    sets), then the default.
    """

    def env(name: str, default: Any) -> Any:
        return os.environ.get(ENV_PREFIX + name, default)

    def whole_number(low: int, high: int, variable: str) -> Callable[[str], int]:
        # argparse runs this on the $HERALD_* default too, so the message names both sources.
        def parse(text: str) -> int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (from the flag or ${ENV_PREFIX}{variable})") from None
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high} (from the flag or ${ENV_PREFIX}{variable})")
            return value

        return parse

    port = whole_number(0, 65535, "PORT")

    def restart_backoff(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (from the flag or ${ENV_PREFIX}RESTART_BACKOFF_MAX)") from None
        if not RESTART_BACKOFF_MIN_S <= value <= RESTART_BACKOFF_CEILING_S:
            raise argparse.ArgumentTypeError(
                f"{value} is outside {RESTART_BACKOFF_MIN_S}..{RESTART_BACKOFF_CEILING_S:.0f} s (from the flag or ${ENV_PREFIX}RESTART_BACKOFF_MAX)"
            )
        return value

    def durability(text: str) -> str:
        # A type, not choices: argparse checks choices on flags only, never on the $HERALD_* default.
        if text not in ("fsync", "async"):
            raise argparse.ArgumentTypeError(f"{text!r} is neither fsync nor async (from the flag or ${ENV_PREFIX}DURABILITY)")
        return text

    parser = argparse.ArgumentParser(prog="herald up", description="Run the whole Herald system on this machine.")
    parser.add_argument(
        "--data-dir", default=env("DATA_DIR", DEFAULT_DATA_DIR), help=f"where RocksDB keeps everything (default {DEFAULT_DATA_DIR}; $HERALD_DATA_DIR)"
    )
    parser.add_argument("--host", default=env("HOST", DEFAULT_HOST), help=f"address to listen on (default {DEFAULT_HOST}; $HERALD_HOST)")
    parser.add_argument("--port", type=port, default=env("PORT", DEFAULT_PORT), help=f"client port (default {DEFAULT_PORT}; 0 picks a free one; $HERALD_PORT)")
    parser.add_argument(
        "--frontends",
        type=whole_number(1, MAX_FRONTENDS, "FRONTENDS"),
        default=env("FRONTENDS", None),
        help=f"frontend processes, fixed for the life of a data folder (default: the folder's count, else half the usable CPUs, 1 to 8: {default_frontends()} here; $HERALD_FRONTENDS)",
    )
    parser.add_argument(
        "--senders",
        type=whole_number(1, 1024, "SENDERS"),
        default=env("SENDERS", DEFAULT_SENDERS),
        help=f"sender processes (default {DEFAULT_SENDERS}; $HERALD_SENDERS)",
    )
    parser.add_argument(
        "--durability",
        type=durability,
        metavar="{fsync,async}",
        default=env("DURABILITY", "fsync"),
        help="fsync: acknowledge after the WAL is fsync'd (default); async: after the OS has it (survives a process crash, not a power loss); $HERALD_DURABILITY",
    )
    parser.add_argument(
        "--config",
        default=env("CONFIG", None),
        help=f"a TOML file of limits ({', '.join(sorted(TUNABLE_KEYS))}), CURVE keys and [[credentials]]; check it with `herald config check FILE`; $HERALD_CONFIG",
    )
    parser.add_argument(
        "--metrics-port",
        type=whole_number(0, 65535, "METRICS_PORT"),
        default=env("METRICS_PORT", None),
        help="serve Prometheus /metrics and /health on this port of --metrics-host (0 picks a free one; default off; $HERALD_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("METRICS_HOST", None),
        help="address /metrics and /health listen on (default: --host; $HERALD_METRICS_HOST). Set 127.0.0.1 to keep them off a public --host",
    )
    parser.add_argument(
        "--restart-backoff-max",
        type=restart_backoff,
        metavar="SECONDS",
        default=env("RESTART_BACKOFF_MAX", RESTART_BACKOFF_MAX_S),
        help=f"longest wait before restarting a crashed process; the wait starts at {RESTART_BACKOFF_MIN_S} s and doubles per crash "
        f"(default {RESTART_BACKOFF_MAX_S:.0f}; {RESTART_BACKOFF_MIN_S} to {RESTART_BACKOFF_CEILING_S:.0f}; $HERALD_RESTART_BACKOFF_MAX)",
    )
    return parser.parse_args(argv)


class MetricsPortTaken(RuntimeError):
    """The --metrics-port cannot be bound."""


class DataDirUnusable(RuntimeError):
    """The data folder cannot be created or written."""


WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "*", "[::]"})  # noqa: S104 - compared against, never bound


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def check_data_dir(path: Path) -> None:
    """Create ``path`` if needed and prove it takes an fsync'd write, before any child starts.

    Raises:
        DataDirUnusable: naming the folder and the operating system's reason.
    """
    probe = path / ".herald-write-probe"
    try:
        # Messages are stored in the clear: a folder made here is its owner's alone.
        # (mkdir's mode only takes bits away from the umask's, never adds any.)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode applies to the folder itself, not its parents
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("data folder %s is open to other users (mode %o); it holds messages in the clear: chmod 700 it", path, mode)
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, b"herald")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise DataDirUnusable(f"data folder {path} is not usable: {exc.strerror or exc} (errno {exc.errno}); pick a writable --data-dir") from None


def frontends_of_folder(data_dir: Path, previous: HeraldConfig | None) -> int | None:
    """The frontend count a data folder was created with; None for a new folder.

    The ``FRONTENDS`` file says it. A folder without one (removed, or filled
    by roles started by hand) still tells: by ``previous``, the last run's
    config, else by its ``shard-<i>`` folders.

    Raises:
        ValueError: the file cannot be read or holds no count in 1..MAX_FRONTENDS.
    """
    path = data_dir / FRONTENDS_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if previous is not None:
            return previous.frontends
        shards = [child for child in data_dir.glob("shard-*") if child.is_dir()]
        return len(shards) or None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.isdigit() or not 1 <= int(text) <= MAX_FRONTENDS:
        raise ValueError(f"{path} should hold the folder's frontend count, a whole number in 1..{MAX_FRONTENDS}, not {text[:40]!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("launcher")
    data_dir = str(Path(args.data_dir).resolve())
    made = [folder for folder in (Path(data_dir), *Path(data_dir).parents) if not folder.exists()]  # innermost first

    def refuse(message: str) -> int:
        """Print why herald up will not start; folders made for this run are removed again (when still empty)."""
        print(f"error: {message}", file=sys.stderr)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        return 2

    try:
        check_data_dir(Path(data_dir))
    except DataDirUnusable as exc:
        return refuse(str(exc))
    previous = _previous_config(Path(data_dir) / RUNTIME_CONFIG_NAME)
    try:
        folder_frontends = frontends_of_folder(Path(data_dir), previous)
    except ValueError as exc:
        return refuse(str(exc))
    if args.frontends is None:
        # The folder's own count: the default depends on the machine, and a folder may move.
        args.frontends = folder_frontends or default_frontends()
    elif folder_frontends is not None and folder_frontends != args.frontends:
        # Topics are placed by crc32(name) % frontends: changing the count would strand stored messages.
        return refuse(
            f"{data_dir} was created with {folder_frontends} frontends; --frontends (or $HERALD_FRONTENDS) {args.frontends} would strand its messages. "
            "Use the same count, or leave both out to use the folder's."
        )
    overrides: dict[str, Any] = {}
    try:
        if args.config:
            overrides = load_up_file(args.config)
        config = build_local_config(
            data_dir=data_dir,
            host=args.host,
            port=args.port,
            frontends=args.frontends,
            senders=args.senders,
            durability=args.durability,
            previous=previous,
            **overrides,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        return refuse(str(exc))
    if not port_is_free(config.client_endpoint):
        return refuse(f"{config.client_endpoint} is already in use (another herald, or another server); pick another --port")
    launcher = Launcher(config, args.metrics_port, args.metrics_host, args.restart_backoff_max)
    try:
        code = launcher.run()
    except DataDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MetricsPortTaken as exc:
        return refuse(str(exc))
    except (RuntimeError, HeraldError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
