"""Configuration: the one typed home of every endpoint, path and limit.

The launcher builds a :class:`HeraldConfig`, writes it as JSON next to the data
and starts each role with ``--config FILE``; a role started by hand reads the
same file (JSON or TOML), so the roles can run on different hosts.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from clients.protocol import DEFAULT_MAX_PAYLOAD_BYTES

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 5555
DEFAULT_DATA_DIR: Final = "./herald-data"
DEFAULT_FRONTENDS: Final = 2  # one per core on the reference 2-core machine
DEFAULT_SENDERS: Final = 2
# Group commit: a frontend writes whatever arrived while the last fsync ran in
# one WriteBatch. It takes at most this many requests from its socket per pass,
# which bounds one pass's latency (each request carries up to MAX_BATCH_MESSAGES).
DEFAULT_DRAIN_BURST_REQUESTS: Final = 2_000
# ZeroMQ high-water marks. Internal PUSH sockets block (never drop) at the HWM,
# so a slow peer applies back-pressure; PUB sockets drop at the HWM, which is
# why the at-least-once path never relies on PUB alone (acks + redelivery).
DEFAULT_SNDHWM: Final = 100_000
DEFAULT_RCVHWM: Final = 100_000
# The request path (client -> proxy -> frontend, and frontend -> owning frontend)
# queues at most this many requests per connection and direction. Short on
# purpose: the proxy's ROUTER reads clients in turn, so a short queue behind it
# means one flooding client delays another by a few hundred requests, not by
# 100,000; and a queue of requests of up to max_payload_bytes each must stay
# small to bound memory. Overflow blocks the sender (TCP back-pressure to the
# flooding client), or, for a forward to the owning frontend, is refused with
# the retriable error `unavailable`.
DEFAULT_REQUEST_HWM: Final = 64
HEARTBEAT_INTERVAL_S: Final = 0.5
HEARTBEAT_LIVENESS: Final = 6  # missed beats before a peer is presumed dead
PEER_EXPIRY_S: Final = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
METADATA_SYNC_TIMEOUT_S: Final = 2.0  # how long a change waits for frontends to apply it
REQUEST_TIMEOUT_S: Final = 10.0

Durability = Literal["fsync", "async"]


@dataclass(frozen=True, kw_only=True)
class HeraldConfig:
    """Every endpoint, path and limit of one Herald installation.

    ``durability="fsync"`` (the default) acknowledges a publish only after the
    write-ahead log is fsync'd; ``"async"`` acknowledges after the write reached
    the operating system, which survives a process crash but not a power loss.
    """

    data_dir: str = DEFAULT_DATA_DIR
    host: str = DEFAULT_HOST
    client_endpoint: str = f"tcp://{DEFAULT_HOST}:{DEFAULT_PORT}"
    live_endpoint: str = ""
    live_intake_endpoint: str = ""
    proxy_backend_endpoint: str = ""
    metadata_rpc_endpoint: str = ""
    metadata_events_endpoint: str = ""
    frontend_control_endpoints: tuple[str, ...] = ()
    sender_intake_endpoints: tuple[str, ...] = ()
    sender_deliver_endpoints: tuple[str, ...] = ()
    sender_ack_endpoints: tuple[str, ...] = ()
    durability: Durability = "fsync"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    drain_burst_requests: int = DEFAULT_DRAIN_BURST_REQUESTS
    sndhwm: int = DEFAULT_SNDHWM
    rcvhwm: int = DEFAULT_RCVHWM
    request_hwm: int = DEFAULT_REQUEST_HWM
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def frontends(self) -> int:
        return len(self.frontend_control_endpoints)

    @property
    def senders(self) -> int:
        return len(self.sender_intake_endpoints)

    def validate(self) -> None:
        """Check cross-field rules; raise ValueError naming both values."""
        if self.durability not in ("fsync", "async"):
            raise ValueError(f"durability = {self.durability!r}; must be 'fsync' or 'async'")
        if self.frontends < 1:
            raise ValueError("at least one frontend control endpoint is required")
        if self.senders < 1:
            raise ValueError("at least one sender is required")
        lengths = {len(self.sender_intake_endpoints), len(self.sender_deliver_endpoints), len(self.sender_ack_endpoints)}
        if len(lengths) != 1:
            raise ValueError(
                f"sender endpoint lists differ in length: intake {len(self.sender_intake_endpoints)}, "
                f"deliver {len(self.sender_deliver_endpoints)}, ack {len(self.sender_ack_endpoints)}"
            )
        if self.max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes = {self.max_payload_bytes} must be positive")

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> HeraldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeraldConfig:
        """Read a config written by the launcher (JSON) or by a person (TOML)."""
        data = Path(path).read_bytes()
        raw = tomllib.loads(data.decode()) if str(path).endswith(".toml") else orjson.loads(data)
        return cls.from_mapping(raw)


# Internal ports are drawn below Linux's ephemeral range (32768-60999 by
# default), so an outgoing connection's source port cannot take one between
# the moment it is chosen and the moment its process binds it.
INTERNAL_PORT_RANGE: Final = (20000, 32000)
_port_picker = random.SystemRandom()


def free_tcp_endpoint(host: str = DEFAULT_HOST) -> str:
    """An endpoint on a port that is free right now, outside the ephemeral range.

    Ports are chosen once by the launcher and kept across child restarts, so
    clients and peers find a restarted process where it was.
    """
    for _ in range(200):
        port = _port_picker.randrange(*INTERNAL_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return f"tcp://{host}:{port}"
    raise RuntimeError(f"no free port in {INTERNAL_PORT_RANGE} on {host}")


def port_is_free(endpoint: str) -> bool:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except (OSError, ValueError):
            return False
    return True


def build_local_config(
    *,
    data_dir: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    frontends: int = DEFAULT_FRONTENDS,
    senders: int = DEFAULT_SENDERS,
    previous: HeraldConfig | None = None,
    **overrides: Any,
) -> HeraldConfig:
    """A config for the whole system on one machine, internal ports picked free.

    ``port=0`` picks a free client port too (tests use it). With ``previous``
    (the config of the last run on this data folder), every endpoint that is
    still free is kept, so consumers and live-feed readers reconnect to a
    restarted system where they left it.
    """

    taken: set[str] = set() if port == 0 else {f"tcp://{host}:{port}"}

    def keep(old: str | None) -> str:
        # Every endpoint of one config must differ: a port kept from the last
        # run must not also be drawn fresh for another role, and vice versa.
        if old and old.startswith(f"tcp://{host}:") and old not in taken and port_is_free(old):
            chosen = old
        else:
            chosen = free_tcp_endpoint(host)
            while chosen in taken:
                chosen = free_tcp_endpoint(host)
        taken.add(chosen)
        return chosen

    def keep_all(old: tuple[str, ...] | None, count: int) -> tuple[str, ...]:
        old = old if old and len(old) == count else (None,) * count  # type: ignore[assignment]
        return tuple(keep(endpoint) for endpoint in old)  # type: ignore[union-attr]

    if port == 0:
        client = keep(previous.client_endpoint if previous else None)
    else:
        client = f"tcp://{host}:{port}"
    config = HeraldConfig(
        data_dir=data_dir,
        host=host,
        client_endpoint=client,
        live_endpoint=keep(previous.live_endpoint if previous else None),
        live_intake_endpoint=keep(previous.live_intake_endpoint if previous else None),
        proxy_backend_endpoint=keep(previous.proxy_backend_endpoint if previous else None),
        metadata_rpc_endpoint=keep(previous.metadata_rpc_endpoint if previous else None),
        metadata_events_endpoint=keep(previous.metadata_events_endpoint if previous else None),
        frontend_control_endpoints=keep_all(previous.frontend_control_endpoints if previous else None, frontends),
        sender_intake_endpoints=keep_all(previous.sender_intake_endpoints if previous else None, senders),
        sender_deliver_endpoints=keep_all(previous.sender_deliver_endpoints if previous else None, senders),
        sender_ack_endpoints=keep_all(previous.sender_ack_endpoints if previous else None, senders),
        **overrides,
    )
    config.validate()
    return config
