"""The metadata role: owner of topics and subscriptions.

It answers requests on a ROUTER socket (frontends connect DEALERs and relay
clients' admin commands; a plain REQ socket works too), keeps an LRU cache in
front of its RocksDB, and publishes a change event for every change. A change
is replied to only after every live frontend has confirmed it applied the
event (or a timeout passed), so a publish that follows a successful
``SUB_CREATE`` on any frontend is fanned out to the new subscription.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import zmq
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from broker.config import HEARTBEAT_INTERVAL_S, METADATA_SYNC_TIMEOUT_S, PEER_EXPIRY_S, HeraldConfig
from broker.metrics import SNAPSHOT_INTERVAL_S, SnapshotWriter
from broker.runtime import LRUCache, StopFlag, Timer, announce_ready, configure_logging, drain, make_socket
from clients.protocol import (
    LIST_LIMIT_MAX,
    LIST_PAGE_BYTES,
    LIST_WHOLE_BYTES,
    RELAY_ONLY_EXISTING_FIELD,
    RELAY_QUOTA_FIELD,
    SERVER_VERSION,
    TOPIC_SETTINGS,
    Command,
    Frames,
    HeraldError,
    ProtocolError,
    check_name,
    check_settings,
    check_subscription_settings,
    dead_letter_topic_of,
    decode,
    encode,
    encode_error,
    encode_ok,
    get_field,
    request_id_of,
    send_frames,
    shard_of,
    split_envelope,
)
from metadata.link import EVENTS_TOPIC

log = logging.getLogger("herald.metadata")

LOOKUP_CACHE_ENTRIES: Final = 100_000  # topic lookups; ~1 KiB each at most
# A topic's lookup (and SUB_LIST of it) carries every subscription record of the topic in one
# header, which may not pass MAX_HEADER_BYTES (4 MiB): past this, SUB_CREATE is refused. About
# 8,000 subscriptions without filters; fewer with large ones. Half the limit leaves room for
# what SUB_LIST adds to each record (endpoints, dead-letter topic).
TOPIC_SUBSCRIPTION_BYTES: Final = 2 * 2**20
CHANGE_COMMANDS: Final = frozenset({Command.TOPIC_CREATE, Command.TOPIC_DELETE, Command.SUB_CREATE, Command.SUB_DELETE})

_TOPIC_PREFIX: Final = b"t/"
_SUB_PREFIX: Final = b"s/"
_TOPIC_SUBS_PREFIX: Final = b"x/"  # x/<topic>\0<subscription> -> b""
_COUNTER_KEY: Final = b"n/id"
_VERSION_KEY: Final = b"n/version"


@dataclass
class PendingChange:
    """A change reply held back until the frontends confirmed the event."""

    envelope: list[bytes]
    reply: list[bytes]
    version: int
    deadline: float


@dataclass
class FrontendPeer:
    index: int
    applied_version: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class MetadataStore:
    """Topics and subscriptions in RocksDB, every change synced before the reply."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)
        self._sync = WriteOptions()
        self._sync.sync = True
        counter = self._db.get(_COUNTER_KEY)
        version = self._db.get(_VERSION_KEY)
        self.next_id = int(counter) if counter else 1
        self.stored_next_id = self.next_id  # as written by the last commit
        self.version = int(version) if version else 0

    def close(self) -> None:
        try:
            self._db.close()
        except Exception as exc:  # rocksdict raises plain Exception
            log.warning("closing the metadata store reported: %s", exc)

    def get_topic(self, name: str) -> dict[str, Any] | None:
        raw = self._db.get(_TOPIC_PREFIX + name.encode())
        return orjson.loads(raw) if raw else None

    def get_subscription(self, name: str) -> dict[str, Any] | None:
        raw = self._db.get(_SUB_PREFIX + name.encode())
        return orjson.loads(raw) if raw else None

    def topics(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for _, v in self._scan(_TOPIC_PREFIX)]

    def subscriptions(self, topic: str | None = None) -> list[dict[str, Any]]:
        if topic is None:
            return [orjson.loads(v) for _, v in self._scan(_SUB_PREFIX)]
        names = [key[len(_TOPIC_SUBS_PREFIX) :].split(b"\0", 1)[1].decode() for key, _ in self._scan(_TOPIC_SUBS_PREFIX + topic.encode() + b"\0")]
        found = (self.get_subscription(name) for name in names)
        return [sub for sub in found if sub is not None]

    def page(
        self, prefix: bytes, start: bytes, limit: int, budget: int, shape: Callable[[bytes, bytes], dict[str, Any] | None]
    ) -> tuple[list[dict[str, Any]], bool]:
        """The records ``shape`` makes of the keys from ``start`` on that begin with ``prefix`` (None: skip one),
        at most ``limit`` of them and about ``budget`` bytes encoded; and whether more keys follow."""
        records: list[dict[str, Any]] = []
        used = 0
        iterator = self._db.iter()
        iterator.seek(start)
        while iterator.valid():
            key = iterator.key()
            if not key.startswith(prefix):
                break
            if len(records) >= limit or used >= budget:
                return records, True
            record = shape(key, iterator.value())
            if record is not None:
                used += len(orjson.dumps(record))
                records.append(record)
            iterator.next()
        return records, False

    def _scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        iterator = self._db.iter()
        iterator.seek(prefix)
        while iterator.valid():
            key = iterator.key()
            if not key.startswith(prefix):
                break
            out.append((key, iterator.value()))
            iterator.next()
        return out

    def _commit(self, batch: WriteBatch) -> int:
        version = self.version + 1
        batch.put(_VERSION_KEY, str(version).encode())
        batch.put(_COUNTER_KEY, str(self.next_id).encode())
        try:
            self._db.write(batch, self._sync)
        except Exception as exc:  # rocksdict raises plain Exception for RocksDB IO errors
            # The version moves only with a stored change, so no event ever names a lost one. Nor does
            # next_id run ahead of the stored counter: after a restart the lost id is given out again,
            # and a SUB_LIST's next_id must bound every id given out after it (see frontends' purge).
            self.next_id = self.stored_next_id
            raise HeraldError("storage_failed", f"the metadata store could not write ({exc}); nothing changed, retry later") from exc
        self.version = version
        self.stored_next_id = self.next_id
        return version

    def _new_id(self) -> int:
        value = self.next_id
        self.next_id += 1
        return value

    def create_topic(self, name: str, settings: dict[str, Any]) -> tuple[dict[str, Any], int]:
        topic = {"id": self._new_id(), "name": name, "settings": settings, "created_at": time.time()}
        batch = WriteBatch(raw_mode=True)
        batch.put(_TOPIC_PREFIX + name.encode(), orjson.dumps(topic))
        return topic, self._commit(batch)

    def delete_topic(self, name: str) -> tuple[list[str], int]:
        subs = self.subscriptions(name)
        batch = WriteBatch(raw_mode=True)
        batch.delete(_TOPIC_PREFIX + name.encode())
        for sub in subs:
            batch.delete(_SUB_PREFIX + sub["name"].encode())
            batch.delete(_TOPIC_SUBS_PREFIX + name.encode() + b"\0" + sub["name"].encode())
        return [sub["name"] for sub in subs], self._commit(batch)

    def create_subscription(self, topic: dict[str, Any], name: str, settings: dict[str, Any]) -> tuple[dict[str, Any], int]:
        sub = {
            "id": self._new_id(),
            "name": name,
            "topic": topic["name"],
            "topic_id": topic["id"],
            "settings": settings,
            "created_at": time.time(),
        }
        batch = WriteBatch(raw_mode=True)
        batch.put(_SUB_PREFIX + name.encode(), orjson.dumps(sub))
        batch.put(_TOPIC_SUBS_PREFIX + topic["name"].encode() + b"\0" + name.encode(), b"")
        return sub, self._commit(batch)

    def update_subscription(self, sub: dict[str, Any]) -> int:
        batch = WriteBatch(raw_mode=True)
        batch.put(_SUB_PREFIX + sub["name"].encode(), orjson.dumps(sub))
        return self._commit(batch)

    def delete_subscription(self, sub: dict[str, Any]) -> int:
        batch = WriteBatch(raw_mode=True)
        batch.delete(_SUB_PREFIX + sub["name"].encode())
        batch.delete(_TOPIC_SUBS_PREFIX + sub["topic"].encode() + b"\0" + sub["name"].encode())
        return self._commit(batch)


class MetadataServer:
    """The metadata role's poll loop and request handlers."""

    def __init__(self, config: HeraldConfig) -> None:
        self.config = config
        self.store = MetadataStore(Path(config.data_dir) / "metadata")
        # Counted once at start, then kept up to date: quotas never scan the store.
        self.topic_count = len(self.store.topics())
        self.subscription_count = len(self.store.subscriptions())
        self.lookups: LRUCache[str, dict[str, Any]] = LRUCache(LOOKUP_CACHE_ENTRIES)
        self.context: zmq.Context[Any] = zmq.Context()
        self.rpc = make_socket(self.context, zmq.ROUTER, bind=config.metadata_rpc_endpoint)
        self.events = make_socket(self.context, zmq.PUB, bind=config.metadata_events_endpoint)
        self.frontends: dict[bytes, FrontendPeer] = {}
        # A restarted metadata knows no frontend yet: those the config names are waited for (see _synced)
        # until they register, or until PEER_EXPIRY_S after the start shows they are down.
        self.started_at = time.monotonic()
        self.pending_changes: list[PendingChange] = []
        self.stop = StopFlag()
        self.requests_handled = 0
        self.snapshots = SnapshotWriter(config.data_dir, "metadata")

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        announce_ready("metadata", rpc=self.config.metadata_rpc_endpoint, events=self.config.metadata_events_endpoint, version=self.store.version)
        heartbeat = Timer(HEARTBEAT_INTERVAL_S, self._publish_heartbeat)
        snapshot = Timer(SNAPSHOT_INTERVAL_S, self._write_snapshot)
        poller = zmq.Poller()
        poller.register(self.rpc, zmq.POLLIN)
        try:
            while not self.stop.stopping:
                ready = dict(poller.poll(timeout=int(HEARTBEAT_INTERVAL_S * 1000 / 2)))
                if self.rpc in ready:
                    for frames in drain(self.rpc):
                        self._on_request(frames)
                now = time.monotonic()
                heartbeat.run_if_due(now)
                snapshot.run_if_due(now)
                self._release_synced_changes(now)
        finally:
            for change in self.pending_changes:
                send_frames(self.rpc, change.envelope + change.reply)
            self.rpc.close(0)
            self.events.close(0)
            self.context.term()
            self.store.close()

    def _write_snapshot(self) -> None:
        self.snapshots.write(
            {
                "requests": self.requests_handled,
                "meta_version": self.store.version,
                "topics": self.topic_count,
                "subscriptions": self.subscription_count,
                "lookup_cache_size": int(self.lookups.statistics()["size"]),
            }
        )

    def _publish_heartbeat(self) -> None:
        send_frames(self.events, [EVENTS_TOPIC, *encode(Command.EVENT, b"", {"kind": "heartbeat", "version": self.store.version})])
        cutoff = time.monotonic() - PEER_EXPIRY_S
        for identity in [i for i, peer in self.frontends.items() if peer.last_seen < cutoff]:
            log.warning("frontend %d stopped answering; changes no longer wait for it", self.frontends[identity].index)
            del self.frontends[identity]

    def _release_synced_changes(self, now: float) -> None:
        if not self.pending_changes:
            return
        waiting: list[PendingChange] = []
        for change in self.pending_changes:
            synced = self._synced(change.version, now)
            if synced or now >= change.deadline:
                if not synced:
                    log.warning("change %d replied before every frontend confirmed it", change.version)
                send_frames(self.rpc, change.envelope + change.reply)
            else:
                waiting.append(change)
        self.pending_changes = waiting

    def _synced(self, version: int, now: float) -> bool:
        """Whether every live frontend has applied ``version``.

        Right after a restart, a frontend not heard from yet counts as behind: its
        SUB socket may not have reconnected, so it would miss this change's event
        and publish from its stale cache (an acknowledged publish missing from a
        subscription just created). Found by fault experiments: SIGKILL metadata,
        create a subscription as soon as it answers, publish.
        """
        if any(peer.applied_version < version for peer in self.frontends.values()):
            return False
        if now - self.started_at < PEER_EXPIRY_S:
            heard = {peer.index for peer in self.frontends.values()}
            return all(index in heard for index in range(self.config.frontends))
        return True

    # ------------------------------------------------------------------ requests

    def _on_request(self, raw: list[bytes]) -> None:
        envelope, body = split_envelope(raw)
        try:
            frames = decode(body)
            reply, version = self._dispatch(envelope, frames)
        except HeraldError as error:
            send_frames(self.rpc, envelope + encode_error(request_id_of(body), error))
            return
        except Exception as exc:  # a handler bug must not take metadata down
            log.exception("internal error handling %r", body[1:2])
            send_frames(self.rpc, envelope + encode_error(request_id_of(body), HeraldError("internal", f"{type(exc).__name__}: {exc}")))
            return
        self.requests_handled += 1
        if reply is None:
            return
        if not version and self.pending_changes and frames.command in CHANGE_COMMANDS:
            # A change that changed nothing (exist_ok on what exists) may be a client's resend of one
            # still waiting for the frontends: answered at once, it would let a publish overtake it.
            version = max(change.version for change in self.pending_changes)
        if version:
            self.pending_changes.append(PendingChange(envelope, reply, version, time.monotonic() + METADATA_SYNC_TIMEOUT_S))
            self._release_synced_changes(time.monotonic())
        else:
            send_frames(self.rpc, envelope + reply)

    def _dispatch(self, envelope: list[bytes], frames: Frames) -> tuple[list[bytes] | None, int]:
        header = frames.header
        rid = frames.request_id
        match frames.command:
            case Command.PING:
                return encode_ok(rid, {"version": self.store.version}), 0
            case Command.REGISTER | Command.EVENT_ACK:
                self._on_frontend_heartbeat(envelope[0], header)
                return None, 0
            case Command.LOOKUP_TOPIC:
                return encode_ok(rid, self._lookup(check_name(get_field(header, "name", str), "topic"))), 0
            case Command.TOPIC_CREATE:
                return self._on_topic_create(rid, header)
            case Command.TOPIC_DELETE:
                return self._on_topic_delete(rid, header)
            case Command.TOPIC_LIST:
                prefix = get_field(header, "prefix", str, required=False, default="")
                after, limit, budget = _page_request(header)
                base = _TOPIC_PREFIX + prefix.encode()
                start = base if after is None else max(base, _TOPIC_PREFIX + after.encode() + b"\0")
                topics, more = _whole_or_page(header, self.store.page(base, start, limit, budget, lambda _key, value: orjson.loads(value)))
                return encode_ok(rid, {"topics": topics, "more": more}), 0
            case Command.TOPIC_DESCRIBE:
                name = check_name(get_field(header, "name", str), "topic")
                found = self._lookup(name)
                if found["topic"] is None:
                    raise HeraldError("topic_not_found", f"topic {name!r} does not exist")
                topic = dict(found["topic"])
                topic["subscriptions"] = [s["name"] for s in found["subscriptions"]]
                return encode_ok(rid, {"topic": topic}), 0
            case Command.SUB_CREATE:
                return self._on_subscription_create(rid, header)
            case Command.SUB_DELETE:
                return self._on_subscription_delete(rid, header)
            case Command.SUB_LIST:
                topic_name = get_field(header, "topic", str, required=False)
                after, limit, budget = _page_request(header)
                # Ids only grow: every subscription created after this page has an id of at least this.
                next_id = self.store.next_id
                if topic_name is None:
                    base = _SUB_PREFIX
                    page = self.store.page(base, base if after is None else base + after.encode() + b"\0", limit, budget, self._listed_record)
                else:
                    base = _TOPIC_SUBS_PREFIX + check_name(topic_name, "topic").encode() + b"\0"
                    start = base if after is None else base + after.encode() + b"\0"
                    page = self.store.page(base, start, limit, budget, lambda key, _value: self._indexed_record(key[len(base) :]))
                subscriptions, more = _whole_or_page(header, page)
                return encode_ok(rid, {"subscriptions": subscriptions, "more": more, "next_id": next_id, "version": self.store.version}), 0
            case Command.SUB_DESCRIBE:
                name = check_name(get_field(header, "name", str), "subscription")
                sub = self.store.get_subscription(name)
                if sub is None:
                    raise HeraldError("subscription_not_found", f"subscription {name!r} does not exist")
                return encode_ok(rid, {"subscription": self._reply_record(sub), "version": self.store.version}), 0
            case _:
                raise ProtocolError("unknown_command", f"metadata does not handle {frames.command.name}")

    def _on_frontend_heartbeat(self, identity: bytes, header: dict[str, Any]) -> None:
        peer = self.frontends.get(identity)
        if peer is None:
            peer = self.frontends[identity] = FrontendPeer(index=int(header.get("frontend", -1)))
            # A restarted frontend comes back under a new socket identity: its old
            # instance is gone, and must not be reported as "stopped answering" later.
            replaced = [other for other, known in self.frontends.items() if known.index == peer.index and other != identity]
            for other in replaced:
                del self.frontends[other]
            log.info("frontend %d registered%s", peer.index, " (a new instance)" if replaced else "")
        peer.last_seen = time.monotonic()
        version = header.get("version")
        if isinstance(version, int):
            peer.applied_version = max(peer.applied_version, version)

    def _lookup(self, name: str) -> dict[str, Any]:
        cached = self.lookups.get(name)
        if cached is not None:
            return cached
        topic = self.store.get_topic(name)
        found = {"topic": topic, "subscriptions": self.store.subscriptions(name) if topic else [], "version": self.store.version}
        self.lookups.put(name, found)
        return found

    def _listed_record(self, _key: bytes, value: bytes) -> dict[str, Any]:
        return self._reply_record(orjson.loads(value))

    def _indexed_record(self, name: bytes) -> dict[str, Any] | None:
        """The reply record of the subscription a topic's index names (None if the index outlived it)."""
        sub = self.store.get_subscription(name.decode())
        return self._reply_record(sub) if sub is not None else None

    def _reply_record(self, sub: dict[str, Any]) -> dict[str, Any]:
        """A stored subscription as clients see it: with its sender's endpoints and its effective dead-letter topic."""
        index = shard_of(sub["name"], self.config.senders)
        return {
            **sub,
            "dead_letter_topic": dead_letter_topic_of(sub["name"], sub["settings"]),
            "endpoints": {"deliver": self.config.sender_deliver_endpoints[index], "ack": self.config.sender_ack_endpoints[index]},
        }

    def _announce(self, version: int, kind: str, name: str, topic: str, **extra: Any) -> None:
        self.lookups.discard(topic)
        event = {"kind": kind, "name": name, "topic": topic, "version": version, **extra}
        send_frames(self.events, [EVENTS_TOPIC, *encode(Command.EVENT, b"", event)])

    def _on_topic_create(self, rid: bytes, header: dict[str, Any]) -> tuple[list[bytes], int]:
        name = check_name(get_field(header, "name", str), "topic")
        settings = check_settings(header.get("settings"), TOPIC_SETTINGS, "topic")
        exist_ok = bool(get_field(header, "exist_ok", bool, required=False, default=False))
        existing = self.store.get_topic(name)
        if existing is not None:
            if exist_ok:
                return encode_ok(rid, {"topic": existing, "created": False}), 0
            raise HeraldError("topic_exists", f"topic {name!r} already exists; delete it first, or pass exist_ok (CLI: --exist-ok) to use it as it is")
        limit = self.config.max_topics
        if limit is not None and header.get(RELAY_QUOTA_FIELD) and self.topic_count >= limit:
            raise HeraldError("quota_exceeded", f"this server holds at most {limit} topics (max_topics); delete one first")
        topic, version = self.store.create_topic(name, settings)
        self.topic_count += 1
        self._announce(version, "topic", name, name)
        log.info("created topic %r", name)
        return encode_ok(rid, {"topic": topic, "created": True}), version

    def _on_topic_delete(self, rid: bytes, header: dict[str, Any]) -> tuple[list[bytes], int]:
        name = check_name(get_field(header, "name", str), "topic")
        if self.store.get_topic(name) is None:
            raise HeraldError("topic_not_found", f"topic {name!r} does not exist")
        doomed = [{"name": s["name"], "id": s["id"]} for s in self.store.subscriptions(name)]
        deleted_subs, version = self.store.delete_topic(name)
        self.topic_count -= 1
        self.subscription_count -= len(deleted_subs)
        self._announce(version, "topic", name, name, deleted_subscriptions=doomed)
        log.info("deleted topic %r and its subscriptions %s", name, deleted_subs)
        return encode_ok(rid, {"deleted": name, "subscriptions": deleted_subs}), version

    def _on_subscription_create(self, rid: bytes, header: dict[str, Any]) -> tuple[list[bytes], int]:
        topic_name = check_name(get_field(header, "topic", str), "topic")
        name = check_name(get_field(header, "name", str), "subscription")
        settings = check_subscription_settings(header.get("settings"))
        exist_ok = bool(get_field(header, "exist_ok", bool, required=False, default=False))
        dead_letter_topic = check_name(dead_letter_topic_of(name, settings), "dead-letter topic (set dead_letter_topic, or shorten the subscription name)")
        topic = self.store.get_topic(topic_name)
        if topic is None:
            raise HeraldError("topic_not_found", f"topic {topic_name!r} does not exist; create it before subscribing")
        existing = self.store.get_subscription(name)
        if existing is not None:
            if existing["topic"] != topic_name:
                raise HeraldError("subscription_exists", f"subscription {name!r} already exists on topic {existing['topic']!r}")
            if not exist_ok:
                raise HeraldError("subscription_exists", f"subscription {name!r} already exists; pass exist_ok (CLI: --exist-ok) to use it")
            if header.get(RELAY_ONLY_EXISTING_FIELD) and header.get("settings") and existing["settings"] != settings:
                raise HeraldError("forbidden", f"changing the settings of subscription {name!r} needs an admin credential")
            if existing["settings"] == settings or not header.get("settings"):
                return encode_ok(rid, {"subscription": self._reply_record(existing), "created": False}), 0
            self._refuse_dead_letter_cycle(topic_name, name, dead_letter_topic)
            # Changed settings (e.g. a new filter) apply at once: same id, new settings.
            self._refuse_crowded_topic(topic_name, name, settings)
            existing = {**existing, "settings": settings}
            version = self.store.update_subscription(existing)
            self._announce(version, "subscription", name, topic_name)
            return encode_ok(rid, {"subscription": self._reply_record(existing), "created": False, "updated": True}), version
        if header.get(RELAY_ONLY_EXISTING_FIELD):
            raise HeraldError("forbidden", f"subscription {name!r} does not exist, and creating one needs an admin credential")
        limit = self.config.max_subscriptions
        if limit is not None and header.get(RELAY_QUOTA_FIELD) and self.subscription_count >= limit:
            raise HeraldError("quota_exceeded", f"this server holds at most {limit} subscriptions (max_subscriptions); delete one first")
        self._refuse_dead_letter_cycle(topic_name, name, dead_letter_topic)
        self._refuse_crowded_topic(topic_name, name, settings)
        sub, version = self.store.create_subscription(topic, name, settings)
        self.subscription_count += 1
        self._announce(version, "subscription", name, topic_name)
        log.info("created subscription %r on %r", name, topic_name)
        return encode_ok(rid, {"subscription": self._reply_record(sub), "created": True}), version

    def _refuse_crowded_topic(self, topic_name: str, name: str, settings: dict[str, Any]) -> None:
        """Refuse a subscription that would make the topic's records pass TOPIC_SUBSCRIPTION_BYTES.

        Raises:
            HeraldError: ``quota_exceeded``, with the sizes.
        """
        others = [sub for sub in self._lookup(topic_name)["subscriptions"] if sub["name"] != name]
        # The new record's other fields (id, topic_id, created_at) are about as long as a stored one's.
        size = len(orjson.dumps(others)) + len(orjson.dumps({"name": name, "topic": topic_name, "settings": settings})) + 100
        if size > TOPIC_SUBSCRIPTION_BYTES:
            raise HeraldError(
                "quota_exceeded",
                f"topic {topic_name!r} cannot take subscription {name!r}: its {len(others) + 1} subscription records would take {size} bytes, "
                f"more than {TOPIC_SUBSCRIPTION_BYTES} (every lookup of the topic carries them all); use smaller filters, or another topic",
            )

    def _refuse_dead_letter_cycle(self, topic_name: str, name: str, dead_letter_topic: str) -> None:
        """Refuse a subscription whose dead-letter copies would come back to its own topic.

        Each dead-letter copy starts again at attempt 1, so a message that fails
        everywhere would go round such a cycle for ever, an fsync'd copy per turn.
        The search follows every subscription's dead-letter topic from
        ``dead_letter_topic``; it reads only the topics on those chains, and
        stops on reaching ``topic_name``, so the old settings of a subscription
        being changed (it lives there) never count.

        Raises:
            HeraldError: ``invalid_setting``, naming the cycle.
        """
        came_from: dict[str, str | None] = {dead_letter_topic: None}
        waiting = deque([dead_letter_topic])
        while waiting:
            current = waiting.popleft()
            if current == topic_name:
                chain = [current]
                while (previous := came_from[chain[-1]]) is not None:
                    chain.append(previous)
                chain.reverse()
                if len(chain) == 1:
                    raise HeraldError(
                        "invalid_setting",
                        f"subscription {name!r} would dead-letter messages of topic {topic_name!r} into that same topic, where they would fail"
                        " again for ever; set dead_letter_topic to another topic",
                    )
                raise HeraldError(
                    "invalid_setting",
                    f"subscription {name!r} would dead-letter messages of topic {topic_name!r} into a cycle that leads back to it"
                    f" ({' -> '.join([topic_name, *chain])}), where they would fail again for ever; set dead_letter_topic to a topic outside it",
                )
            for other in self.store.subscriptions(current):
                following = dead_letter_topic_of(other["name"], other["settings"])
                if following not in came_from:
                    came_from[following] = current
                    waiting.append(following)

    def _on_subscription_delete(self, rid: bytes, header: dict[str, Any]) -> tuple[list[bytes], int]:
        name = check_name(get_field(header, "name", str), "subscription")
        sub = self.store.get_subscription(name)
        if sub is None:
            raise HeraldError("subscription_not_found", f"subscription {name!r} does not exist")
        version = self.store.delete_subscription(sub)
        self.subscription_count -= 1
        self._announce(version, "subscription", name, sub["topic"], deleted_subscriptions=[{"name": name, "id": sub["id"]}])
        log.info("deleted subscription %r", name)
        return encode_ok(rid, {"deleted": name}), version


def _page_request(header: dict[str, Any]) -> tuple[str | None, int, int]:
    """A list request's ``after`` (list the names that sort after it, by their UTF-8 bytes), how many records
    at most, and about how many bytes of them: a page with ``limit`` or ``after``, else the whole list.

    Raises:
        ProtocolError: ``invalid_header`` for a mistyped field or a limit out of range.
    """
    after = get_field(header, "after", str, required=False)
    limit = get_field(header, "limit", int, required=False)
    if limit is not None and not 1 <= limit <= LIST_LIMIT_MAX:
        raise ProtocolError("invalid_header", f"limit must be from 1 to {LIST_LIMIT_MAX}, got {limit}")
    if limit is None and after is None:
        return None, sys.maxsize, LIST_WHOLE_BYTES
    return after, limit or LIST_LIMIT_MAX, LIST_PAGE_BYTES


def _whole_or_page(header: dict[str, Any], page: tuple[list[dict[str, Any]], bool]) -> tuple[list[dict[str, Any]], bool]:
    """``page`` as the reply has it, or ``list_too_large`` for a whole list (no ``limit`` nor ``after``) that did not fit.

    Raises:
        HeraldError: ``list_too_large``.
    """
    records, more = page
    if more and header.get("limit") is None and header.get("after") is None:
        raise HeraldError(
            "list_too_large",
            f"the list has more than the {len(records):,} records one reply holds; ask for it in pages with limit and after (docs/protocol.md)",
        )
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metadata", description="Run the Herald metadata role.")
    parser.add_argument("--config", required=True, help="config file (JSON from the launcher, or TOML)")
    args = parser.parse_args(argv)
    configure_logging("metadata")
    server = MetadataServer(HeraldConfig.load(args.config))
    server.run()
    return 0


__all__ = ["EVENTS_TOPIC", "SERVER_VERSION", "MetadataServer", "MetadataStore", "main"]
