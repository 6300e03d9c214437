"""A native at-least-once consumer built from plain pyzmq sockets and the
documented wire protocol only: what a client in another language would do."""

from __future__ import annotations

import time
from typing import Any

import zmq

from clients.protocol import ATTACH_RETRY_S, Command, Frames, consumer_topic_frame, decode, encode, encode_acks, encode_attach


class NativeConsumer:
    def __init__(
        self, subscription: dict[str, Any], consumer_id: str, max_unacked: int | None = None, *, packed: bool = False, names_session: bool = True
    ) -> None:
        self.name = subscription["name"]
        self.consumer_id = consumer_id
        self.deliver_endpoint = subscription["endpoints"]["deliver"]
        self.context: zmq.Context[Any] = zmq.Context()
        self.sub = self.connect_sub()
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(subscription["endpoints"]["ack"])
        self.max_unacked = max_unacked
        self.packed = packed  # ask for DELIVERs with packed payloads (ATTACH packed_payloads)
        self.raw_delivers: list[list[bytes]] = []  # every DELIVER as it came off the wire
        self.inbox: list[Frames] = []
        self.last_beat = 0.0
        # ATTACH names the session of the last WELCOME (protocol.md §9); False: a consumer
        # written before that field, which the sender starts delivering to on its second contact.
        self.names_session = names_session
        self.session: int | None = None

    def connect_sub(self) -> zmq.Socket[Any]:
        sub: zmq.Socket[Any] = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, consumer_topic_frame(self.consumer_id))
        sub.connect(self.deliver_endpoint)
        return sub

    def _attach_frames(self, ready: bool) -> list[bytes]:
        session = self.session if self.names_session else None
        return encode_attach(self.name, self.consumer_id, ready=ready, max_unacked=self.max_unacked, packed_payloads=self.packed, session=session)

    def _heard(self, frames: Frames) -> None:
        """Note a WELCOME's session; a new one (sender restart, expiry) is answered with a ready ATTACH at once."""
        if frames.command is not Command.WELCOME:
            return
        session = frames.header.get("session")
        if session != self.session:
            changed = self.session is not None
            self.session = session
            if changed and self.names_session:
                self.beat()

    def attach(self, timeout: float = 10.0) -> Frames:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.push.send_multipart(self._attach_frames(ready=False))
            if self.sub.poll(int(ATTACH_RETRY_S * 1000)):
                frames = decode(self.sub.recv_multipart()[1:])
                if frames.command is Command.WELCOME:
                    self.session = frames.header.get("session")
                    self.beat()
                    return frames
                self.inbox.append(frames)
        raise AssertionError("no WELCOME")

    def beat(self) -> None:
        self.push.send_multipart(self._attach_frames(ready=True))
        self.last_beat = time.monotonic()

    def next_frames(self, timeout: float) -> Frames | None:
        if self.inbox:
            return self.inbox.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() - self.last_beat > 0.5:
                self.beat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self.sub.poll(int(min(remaining, 0.2) * 1000) + 1):
                raw = self.sub.recv_multipart()
                frames = decode(raw[1:])
                self._heard(frames)
                if frames.command is Command.DELIVER:
                    self.raw_delivers.append(raw)
                return frames

    def deliveries(self, count: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], bytes]]:
        """Collect ``count`` messages (or fewer if the timeout passes)."""
        out: list[tuple[dict[str, Any], bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            frames = self.next_frames(deadline - time.monotonic())
            if frames is not None and frames.command is Command.DELIVER:
                out.extend(zip(frames.header["messages"], frames.payloads, strict=True))
        return out

    def ack(self, pairs: list[tuple[str, int]], command: Command = Command.ACK, timeout: float = 10.0) -> list[str]:
        request_id = str(time.monotonic_ns()).encode()
        self.push.send_multipart(encode_acks(command, self.name, self.consumer_id, pairs, request_id))
        deadline = time.monotonic() + timeout
        # What comes meanwhile is kept for later, in order, and not read again while waiting here.
        held, self.inbox = self.inbox, []
        try:
            while time.monotonic() < deadline:
                frames = self.next_frames(deadline - time.monotonic())
                if frames is None:
                    break
                if frames.request_id == request_id and frames.command in (Command.ACK_REPLY, Command.ERROR):
                    if frames.command is Command.ERROR:
                        raise AssertionError(frames.header)
                    return list(frames.header["results"])
                held.append(frames)
        finally:
            self.inbox = held + self.inbox
        raise AssertionError("no ACK_REPLY")

    def send_raw(self, frames: list[bytes]) -> None:
        self.push.send_multipart(frames)

    def detach(self) -> None:
        self.push.send_multipart(encode(Command.DETACH, b"", {"subscription": self.name, "consumer": self.consumer_id}))

    def close(self) -> None:
        self.sub.close(0)
        self.push.close(0)
        self.context.term()
