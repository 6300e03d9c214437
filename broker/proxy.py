"""The proxy role: two libzmq proxy devices in one process.

- requests: ROUTER (clients connect) <-> DEALER (frontends connect). libzmq's
  own loop moves the frames and releases the GIL; the DEALER side hands each
  request to the next frontend with room (round robin), and replies find their
  client by the identity frame the ROUTER added.
- live feed: XSUB (frontends' PUB sockets connect) <-> XPUB (native SUB
  sockets connect). Subscriptions flow upstream, so frontends drop messages no
  one listens to.

Each device runs in its own thread with a control socket, so SIGTERM stops
them cleanly.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Any, Final

import zmq

from broker.config import HeraldConfig
from broker.curve import start_curve
from broker.runtime import Hwm, StopFlag, announce_ready, configure_logging, make_socket
from clients.protocol import MAX_CONTROL_FRAME_BYTES, MAX_REQUEST_FRAME_BYTES

log = logging.getLogger("herald.proxy")


# A client may have many more requests in flight than queue in the proxy at once.
REPLY_QUEUE_FACTOR: Final = 16


class ProxyDevice:
    """Run the request proxy and the live-feed proxy until stopped."""

    def __init__(self, config: HeraldConfig) -> None:
        self.config = config
        self.context: zmq.Context[Any] = zmq.Context()
        hwm: Hwm = {"sndhwm": config.sndhwm, "rcvhwm": config.rcvhwm}
        # ROUTER_MANDATORY off (the default): a reply to a client that went
        # away is dropped, which is what a vanished requester needs.
        # Requests queue briefly (request_hwm per client and per frontend). Replies
        # queue up to REPLY_QUEUE_FACTOR times that per client, then are dropped
        # for a client that does not read them (a ROUTER never blocks on a peer).
        curve = start_curve(config, self.context)
        self.authenticator = curve[1] if curve else None
        secure = curve[0].serve if curve else None
        self.clients = make_socket(
            self.context,
            zmq.ROUTER,
            bind=config.client_endpoint,
            sndhwm=config.request_hwm * REPLY_QUEUE_FACTOR,
            rcvhwm=config.request_hwm,
            prepare=secure,
            max_frame_bytes=MAX_REQUEST_FRAME_BYTES,
        )
        self.frontends = make_socket(self.context, zmq.DEALER, bind=config.proxy_backend_endpoint, sndhwm=config.request_hwm, rcvhwm=config.rcvhwm)
        # Off, nothing binds the live ports: the frontends' XPUBs hear no reader, so they publish nothing.
        self.live: tuple[zmq.Socket[Any], zmq.Socket[Any]] | None = None
        if config.live_feed_served:
            live_in = make_socket(self.context, zmq.XSUB, bind=config.live_intake_endpoint, **hwm)
            # Live-feed subscribers send only (un)subscribe frames: a topic prefix each.
            live_out = make_socket(self.context, zmq.XPUB, bind=config.live_endpoint, prepare=secure, max_frame_bytes=MAX_CONTROL_FRAME_BYTES, **hwm)
            self.live = (live_in, live_out)
        self._controls: list[zmq.Socket[Any]] = []
        self._threads: list[threading.Thread] = []

    def _start(self, name: str, frontend: zmq.Socket[Any], backend: zmq.Socket[Any]) -> None:
        address = f"inproc://proxy-control-{name}"
        control_in = self.context.socket(zmq.PAIR)
        control_in.bind(address)
        control_out = self.context.socket(zmq.PAIR)
        control_out.connect(address)
        self._controls.append(control_out)

        def run() -> None:
            try:
                zmq.proxy_steerable(frontend, backend, None, control_in)
            except zmq.ContextTerminated:
                pass
            finally:
                control_in.close(0)

        thread = threading.Thread(target=run, name=f"proxy-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> None:
        stop = StopFlag()
        self._start("requests", self.clients, self.frontends)
        if self.live is not None:
            self._start("live", *self.live)
        announce_ready("proxy", clients=self.config.client_endpoint, live=self.config.live_endpoint if self.live is not None else "off")
        while not stop.stopping and all(t.is_alive() for t in self._threads):
            time.sleep(0.1)
        for control in self._controls:
            control.send(b"TERMINATE")
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in (self.clients, self.frontends, *(self.live or ()), *self._controls):
            sock.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description="Run the Herald proxy (requests and live feed).")
    parser.add_argument("--config", required=True, help="config file (JSON from the launcher, or TOML)")
    args = parser.parse_args(argv)
    configure_logging("proxy")
    ProxyDevice(HeraldConfig.load(args.config)).run()
    return 0
