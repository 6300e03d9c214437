"""A role's connection to the metadata process, used by frontends and senders.

Two sockets: a DEALER for requests (many in flight, each answered through a
callback or failed after a deadline) and a SUB for change events and
heartbeats. The roles own what they do with answers; this class owns the
plumbing, so the request-id bookkeeping exists once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import zmq

from broker.config import HeraldConfig
from broker.runtime import Hwm, drain, make_socket
from clients.protocol import NOBLOCK, Command, Frames, HeraldError, decode, encode, send_frames, split_envelope

log = logging.getLogger("herald.metadata.link")

EVENTS_TOPIC: Final = b"meta\x00"
CALL_TIMEOUT_S: Final = 5.0  # a metadata that does not answer in this long is treated as down


@dataclass
class PendingCall:
    on_reply: Callable[[Frames], None]
    on_failure: Callable[[HeraldError], None]
    deadline: float


class MetadataLink:
    """Requests to metadata with callbacks and deadlines, plus its event feed."""

    def __init__(self, context: zmq.Context[Any], config: HeraldConfig, hwm: Hwm) -> None:
        self.rpc = make_socket(context, zmq.DEALER, connect=config.metadata_rpc_endpoint, **hwm)
        self.events = make_socket(context, zmq.SUB, connect=config.metadata_events_endpoint, subscribe=EVENTS_TOPIC)
        self._calls: dict[bytes, PendingCall] = {}
        self._next_id = 0

    @property
    def sockets(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """The sockets a poll loop must watch: replies, then events."""
        return self.rpc, self.events

    def send(self, command: Command, header: dict[str, Any], request_id: bytes = b"") -> None:
        """Send without expecting an answer (heartbeats, acknowledgements of events)."""
        self._send_frames(command, encode(command, request_id, header))

    def _send_frames(self, command: Command, frames: list[bytes]) -> None:
        try:
            send_frames(self.rpc, [b"", *frames], NOBLOCK)
        except zmq.Again:
            log.warning("metadata is not draining its socket; %s not sent", command.name)

    def call(
        self,
        command: Command,
        header: dict[str, Any],
        on_reply: Callable[[Frames], None],
        on_failure: Callable[[HeraldError], None],
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        """Send a request; ``on_reply`` gets the reply (OK or ERROR), ``on_failure`` a timeout."""
        self._next_id += 1
        request_id = self._next_id.to_bytes(8, "big")
        frames = encode(command, request_id, header)  # first: a header that cannot be encoded raises before any call is pending
        self._calls[request_id] = PendingCall(on_reply, on_failure, time.monotonic() + timeout_s)
        self._send_frames(command, frames)

    def on_replies(self) -> None:
        """Hand every reply waiting on the DEALER to its call's callback."""
        for raw in drain(self.rpc):
            _envelope, body = split_envelope(raw)
            try:
                frames = decode(body)
            except HeraldError as error:
                log.error("bad reply from metadata: %s", error)
                continue
            call = self._calls.pop(frames.request_id, None)
            if call is not None:
                call.on_reply(frames)

    def expire(self, now: float) -> None:
        """Fail the calls whose deadline passed."""
        if not self._calls:
            return
        for request_id in [rid for rid, call in self._calls.items() if call.deadline <= now]:
            call = self._calls.pop(request_id)
            call.on_failure(HeraldError("unavailable", "metadata did not answer in time; retry"))

    def fail_all(self, error: HeraldError) -> None:
        """Fail every call in flight (on shutdown)."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.on_failure(error)

    def drain_events(self) -> Iterator[dict[str, Any]]:
        """The headers of the change events and heartbeats that arrived."""
        for raw in drain(self.events):
            try:
                yield decode(raw[1:]).header
            except HeraldError as error:
                log.error("bad event from metadata: %s", error)

    def close(self, linger_ms: int = 0) -> None:
        self.rpc.close(linger=linger_ms)
        self.events.close(linger=linger_ms)
