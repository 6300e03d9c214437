"""``python -m bench.wakeup_cost``: the CPU a bare pyzmq forwarding process spends per message at a fixed rate.

Herald's roles are poll loops in their own processes; at low rates each
message wakes each process it crosses. This measures what one such wake-up
costs on this machine with no Herald code at all: a child process polls a
PULL socket (beside five idle ones, as a frontend polls several), drains it
with NOBLOCK and forwards each message on a PUSH socket. Its user and system
CPU per message, at a few rates, say how much of a Herald role's CPU at that
rate is the machine's price of waking a Python process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import zmq

IDLE_SOCKETS = 5


def _forward(inbound_port: int, outbound_port: int, count: int, report: Connection) -> None:
    context: zmq.Context[Any] = zmq.Context()
    inbound = context.socket(zmq.PULL)
    inbound.connect(f"tcp://127.0.0.1:{inbound_port}")
    outbound = context.socket(zmq.PUSH)
    outbound.connect(f"tcp://127.0.0.1:{outbound_port}")
    poller = zmq.Poller()
    poller.register(inbound, zmq.POLLIN)
    idle = [context.socket(zmq.SUB) for _ in range(IDLE_SOCKETS)]
    for sock in idle:
        poller.register(sock, zmq.POLLIN)
    report.send("ready")
    forwarded = 0
    before = os.times()
    while forwarded < count:
        if inbound in dict(poller.poll(50)):
            while True:
                try:
                    frames = inbound.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                outbound.send_multipart(frames)
                forwarded += 1
    after = os.times()
    report.send((after.user - before.user, after.system - before.system))
    context.destroy(linger=0)


def measure(rate: int, count: int) -> tuple[float, float]:
    """(user, system) CPU microseconds per message of the forwarding process at ``rate`` msg/s."""
    context: zmq.Context[Any] = zmq.Context()
    source = context.socket(zmq.PUSH)
    source_port = source.bind_to_random_port("tcp://127.0.0.1")
    sink = context.socket(zmq.PULL)
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    parent_end, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_forward, args=(source_port, sink_port, count, child_end), daemon=True)
    child.start()
    try:
        parent_end.recv()
        time.sleep(0.2)  # connections up before the clock starts
        start = time.perf_counter()
        received = 0
        for index in range(count):
            # Read what came back as we go: with both queues full the forwarder would block on its send.
            while sink.poll(0):
                sink.recv_multipart()
                received += 1
            wait = start + index / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            source.send_multipart([b"h" * 20, b"x" * 100])
        for _ in range(count - received):
            sink.recv_multipart()
        user_s, system_s = parent_end.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.terminate()
        context.destroy(linger=0)
    return user_s / count * 1e6, system_s / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,2000,20000", help="comma-separated msg/s (default 1000,2000,20000)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per rate (default 4)")
    args = parser.parse_args()
    for rate in (int(part) for part in args.rates.split(",") if part.strip()):
        user_us, system_us = measure(rate, max(1, int(rate * args.seconds)))
        print(f"{rate:>8,} msg/s: forwarder CPU {user_us:6.1f} us user + {system_us:6.1f} us system per message")


if __name__ == "__main__":
    main()
