"""Configuration: the one typed home of every endpoint, path and limit.

The launcher builds a :class:`HeraldConfig`, writes it as JSON next to the data
and starts each role with ``--config FILE``; a role started by hand reads the
same file (JSON or TOML), so the roles can run on different hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from clients.protocol import DEFAULT_MAX_PAYLOAD_BYTES, MAX_PAYLOAD_CEILING

DEFAULT_HOST: Final = "127.0.0.1"
LOOPBACK_HOST: Final = "127.0.0.1"  # where `herald up` binds every internal endpoint
DEFAULT_PORT: Final = 5555
DEFAULT_DATA_DIR: Final = "./herald-data"
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


MAX_DEFAULT_FRONTENDS: Final = 8  # the default's ceiling: each frontend may hold 160 MiB of RocksDB write buffers and block cache


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, bounded by a cgroup v2 CPU quota (a container's ``--cpus``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return cpus


def default_frontends() -> int:
    """Half the usable CPUs, at least 1 and at most MAX_DEFAULT_FRONTENDS: the frontend count of a new data folder without a flag.

    Every message crosses the proxy, its topic's owning frontend, a sender and
    two clients; the other cores go to those. On the 2-core reference machine
    one frontend beat two on one-topic latency and throughput (no request is
    forwarded between frontends) and tied on many topics: see docs/operations.md.
    """
    return max(1, min(MAX_DEFAULT_FRONTENDS, usable_cpus() // 2))


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token is kept: configs and logs never hold the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Credential:
    """A named client credential: what it may do, on which topics, how fast.

    ``publish`` and ``subscribe`` are topic-name prefixes (``""`` allows every
    topic); ``admin`` allows creating and deleting topics and subscriptions.
    Rates are for the whole system, in messages (and payload bytes) per second;
    None means no limit. A burst of one second's worth is allowed.
    """

    name: str
    token_sha256: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    publish_rate: float | None = None
    publish_bytes_rate: float | None = None

    def may(self, action: str, topic: str) -> bool:
        prefixes = self.publish if action == "publish" else self.subscribe
        return self.admin or any(topic.startswith(prefix) for prefix in prefixes)


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
    # No credentials: open, for development on loopback (the launcher says so).
    credentials: tuple[Credential, ...] = ()
    max_topics: int | None = None
    max_subscriptions: int | None = None
    # CURVE on the endpoints clients reach (broker/curve.py): the server's secret
    # certificate file, and a folder of allowed clients' public certificates.
    curve_secret_key_file: str | None = None
    curve_clients_dir: str | None = None
    # The live feed checks no token (a SUB socket cannot send one): None serves it
    # only while no credentials are configured (see live_feed_served).
    live_feed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def live_feed_served(self) -> bool:
        """Whether the proxy serves the live feed: as ``live_feed`` says, else only on an open server."""
        return self.live_feed if self.live_feed is not None else not self.credentials

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
        if not 0 < self.max_payload_bytes <= MAX_PAYLOAD_CEILING:
            raise ValueError(f"max_payload_bytes = {self.max_payload_bytes} must be positive and at most {MAX_PAYLOAD_CEILING} (64 MiB)")

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> HeraldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        values["credentials"] = tuple(c if isinstance(c, Credential) else _credential_from_json(c) for c in values.get("credentials", ()))
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeraldConfig:
        """Read a config written by the launcher (JSON) or by a person (TOML)."""
        data = Path(path).read_bytes()
        raw = tomllib.loads(data.decode()) if str(path).endswith(".toml") else orjson.loads(data)
        return cls.from_mapping(raw)


def _credential_from_json(raw: Any) -> Credential:
    """A credential of a role's config file (JSON from the launcher, or TOML by hand), checked like `herald up`'s."""

    def fail(key: str, what: str, _table: int | None = None) -> ValueError:
        return ValueError(f"credentials: {what}")

    if not isinstance(raw, dict):
        raise ValueError(f"credentials: each entry must be a table, got {type(raw).__name__}")
    return _credential({k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}, 0, fail)


# ---------------------------------------------------------------------------- the `herald up --config` file

# Keys of the file `herald up --config` reads; endpoints always come from flags.
TUNABLE_KEYS: Final = frozenset({"max_payload_bytes", "drain_burst_requests", "sndhwm", "rcvhwm", "request_hwm", "max_topics", "max_subscriptions"})
PATH_KEYS: Final = frozenset({"curve_secret_key_file", "curve_clients_dir"})
SWITCH_KEYS: Final = frozenset({"live_feed"})
TUNABLE_MAXIMUM: Final = 2**31 - 1  # a ZeroMQ high-water mark is a C int
CREDENTIAL_KEYS: Final = frozenset({"name", "token", "token_sha256", "publish", "subscribe", "admin", "publish_rate", "publish_bytes_rate"})
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigFileError(ValueError):
    """A problem in a config file, as ``FILE:LINE: what is wrong``."""


def load_up_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the TOML file of `herald up --config`: the overrides it sets.

    Raises:
        ConfigFileError: naming the file, the line (when it can be found) and the problem.
    """
    name = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{name}: cannot read it: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigFileError(f"{name}:{line.group(1) if line else '?'}: not valid TOML: {exc}") from None
    lines = text.splitlines()

    def fail(key: str, what: str, table: int | None = None) -> ConfigFileError:
        return ConfigFileError(f"{name}:{_line_of(lines, key, table)}: {what}")

    overrides: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "credentials":
            continue
        if key in PATH_KEYS:
            overrides[key] = _checked_path(key, value, Path(name).parent, fail)
            continue
        if key in SWITCH_KEYS:
            if not isinstance(value, bool):
                raise fail(key, f"{key} = {value!r} must be true or false")
            overrides[key] = value
            continue
        if key not in TUNABLE_KEYS:
            return_keys = ", ".join(sorted(TUNABLE_KEYS | PATH_KEYS | SWITCH_KEYS | {"credentials"}))
            raise fail(key, f"unknown key {key!r}; the file may set {return_keys}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(key, f"{key} = {value!r} must be a positive integer")
        if key == "max_payload_bytes" and value > MAX_PAYLOAD_CEILING:
            raise fail(key, f"{key} = {value!r} exceeds {MAX_PAYLOAD_CEILING} (64 MiB), the most a payload may be")
        if value > TUNABLE_MAXIMUM:
            raise fail(key, f"{key} = {value!r} exceeds {TUNABLE_MAXIMUM}, the largest value ZeroMQ and the roles take")
        overrides[key] = value
    if "curve_clients_dir" in overrides and "curve_secret_key_file" not in overrides:
        # CURVE is on only with the server's secret key: an allow-list alone would leave the server open.
        raise fail("curve_clients_dir", "curve_clients_dir needs curve_secret_key_file too: without the server's secret key CURVE is off")
    credentials = raw.get("credentials", [])
    if not isinstance(credentials, list) or not all(isinstance(c, dict) for c in credentials):
        raise fail("credentials", "credentials must be an array of tables: [[credentials]]")
    parsed: list[Credential] = []
    for index, entry in enumerate(credentials):
        parsed.append(_credential(entry, index, fail))
    names = [c.name for c in parsed]
    for index, credential in enumerate(parsed):
        if names.index(credential.name) != index:
            raise fail("name", f"credential name {credential.name!r} is used twice", index)
    hashes = [c.token_sha256 for c in parsed]
    for index, credential in enumerate(parsed):
        if hashes.index(credential.token_sha256) != index:
            raise fail("token", f"credential {credential.name!r} has the same token as {parsed[hashes.index(credential.token_sha256)].name!r}", index)
    if parsed:
        overrides["credentials"] = tuple(parsed)
    return overrides


def _checked_path(key: str, value: Any, base: Path, fail: Any) -> str:
    """An absolute path for ``key`` (relative ones are relative to the config file), checked to exist."""
    if not isinstance(value, str) or not value:
        raise fail(key, f"{key} must be a path (a string)")
    path = (base / value).resolve()
    if key == "curve_clients_dir":
        if not path.is_dir():
            raise fail(key, f"{key} = {value!r}: {path} is not a folder")
        return str(path)
    if not path.is_file():
        raise fail(key, f"{key} = {value!r} does not exist: no file at {path} (`herald keys generate DIR` writes server.key_secret there)")
    try:
        import zmq.auth

        _, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise fail(key, f"{key} = {value!r}: cannot read a certificate from {path}: {exc}") from None
    if not secret:
        raise fail(key, f"{key} = {value!r}: {path} holds no secret key; name the .key_secret file `herald keys generate` wrote")
    return str(path)


def _credential(entry: dict[str, Any], index: int, fail: Any) -> Credential:
    unknown = sorted(set(entry) - CREDENTIAL_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown credential key {unknown[0]!r}; a credential may set {', '.join(sorted(CREDENTIAL_KEYS))}", index)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", f"credential {index + 1} needs a name (a non-empty string)", index)
    if ("token" in entry) == ("token_sha256" in entry):
        raise fail("token", f"credential {name!r} needs exactly one of token or token_sha256", index)
    if "token" in entry:
        token = entry["token"]
        if not isinstance(token, str) or len(token) < 16:
            raise fail(
                "token",
                f"credential {name!r}: token must be a string of at least 16 characters (try `python -c 'import secrets; print(secrets.token_urlsafe())'`)",
                index,
            )
        token_sha256 = hash_token(token)
    else:
        token_sha256 = entry["token_sha256"]
        if not isinstance(token_sha256, str) or not _SHA256_HEX.match(token_sha256):
            raise fail("token_sha256", f"credential {name!r}: token_sha256 must be 64 lowercase hex digits", index)
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("publish", "subscribe"):
        value = entry.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(key, f'credential {name!r}: {key} must be a list of topic-name prefixes ("" for every topic)', index)
        lists[key] = tuple(value)
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise fail("admin", f"credential {name!r}: admin must be true or false", index)
    rates: dict[str, float | None] = {}
    for key in ("publish_rate", "publish_bytes_rate"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise fail(key, f"credential {name!r}: {key} = {value!r} must be a positive number", index)
        rates[key] = float(value) if value is not None else None
    return Credential(
        name=name,
        token_sha256=token_sha256,
        publish=lists["publish"],
        subscribe=lists["subscribe"],
        admin=admin,
        publish_rate=rates["publish_rate"],
        publish_bytes_rate=rates["publish_bytes_rate"],
    )


def _line_of(lines: list[str], key: str, table: int | None) -> int | str:
    """The 1-based line that sets ``key`` (in the ``table``-th [[credentials]] when given), or '?'."""
    start = 0
    if table is not None:
        headers = [n for n, line in enumerate(lines) if line.strip().startswith("[[credentials]]")]
        if table < len(headers):
            start = headers[table]
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number in range(start, len(lines)):
        if pattern.match(lines[number]):
            return number + 1
        if table is not None and number > start and lines[number].strip().startswith("["):
            break
    return start + 1 if table is not None else "?"


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
    frontends: int | None = None,
    senders: int = DEFAULT_SENDERS,
    previous: HeraldConfig | None = None,
    **overrides: Any,
) -> HeraldConfig:
    """A config for the whole system on one machine, internal ports picked free.

    ``port=0`` picks a free client port too (tests use it); ``frontends=None``
    means :func:`default_frontends`. With ``previous``
    (the config of the last run on this data folder), every endpoint that is
    still free is kept, so consumers and live-feed readers reconnect to a
    restarted system where they left it.
    """

    if frontends is None:
        frontends = default_frontends()
    taken: set[str] = set() if port == 0 else {f"tcp://{host}:{port}"}

    def keep(old: str | None, *, internal: bool = False) -> str:
        # Internal endpoints listen on loopback only: nothing off this machine may
        # pose as a frontend or talk to metadata, whatever --host is. Every endpoint
        # of one config must differ: a port kept from the last run must not also
        # be drawn fresh for another role, and vice versa.
        on = LOOPBACK_HOST if internal else host
        if old and old.startswith(f"tcp://{on}:") and old not in taken and port_is_free(old):
            chosen = old
        else:
            chosen = free_tcp_endpoint(on)
            while chosen in taken:
                chosen = free_tcp_endpoint(on)
        taken.add(chosen)
        return chosen

    def keep_all(old: tuple[str, ...] | None, count: int, *, internal: bool = False) -> tuple[str, ...]:
        old = old if old and len(old) == count else (None,) * count  # type: ignore[assignment]
        return tuple(keep(endpoint, internal=internal) for endpoint in old)  # type: ignore[union-attr]

    if port == 0:
        client = keep(previous.client_endpoint if previous else None)
    else:
        client = f"tcp://{host}:{port}"
    config = HeraldConfig(
        data_dir=data_dir,
        host=host,
        client_endpoint=client,
        live_endpoint=keep(previous.live_endpoint if previous else None),
        live_intake_endpoint=keep(previous.live_intake_endpoint if previous else None, internal=True),
        proxy_backend_endpoint=keep(previous.proxy_backend_endpoint if previous else None, internal=True),
        metadata_rpc_endpoint=keep(previous.metadata_rpc_endpoint if previous else None, internal=True),
        metadata_events_endpoint=keep(previous.metadata_events_endpoint if previous else None, internal=True),
        frontend_control_endpoints=keep_all(previous.frontend_control_endpoints if previous else None, frontends, internal=True),
        sender_intake_endpoints=keep_all(previous.sender_intake_endpoints if previous else None, senders, internal=True),
        sender_deliver_endpoints=keep_all(previous.sender_deliver_endpoints if previous else None, senders),
        sender_ack_endpoints=keep_all(previous.sender_ack_endpoints if previous else None, senders),
        **overrides,
    )
    config.validate()
    return config
