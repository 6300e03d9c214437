"""A consumer the fault harness can SIGKILL: ``python -m tests.consumer_process ENDPOINT TOPIC SUBSCRIPTION OUT``.

It writes the id of every delivery to OUT, one per line, before acknowledging
it, so a line exists for every message this process may have acknowledged.
A consumer killed between the write and the ack leaves a line for a message
the server will deliver again: that is a duplicate, never a loss. It keeps
going through server faults by subscribing again when a call fails.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from clients import Client, HeraldError

RECEIVE_TIMEOUT_S = 0.2
RESUBSCRIBE_PAUSE_S = 0.2


def consume(endpoint: str, topic: str, name: str, out_path: str) -> None:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    out = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while not stopping:
        try:
            with Client(endpoint, timeout=3.0) as client, client.subscribe(topic, name) as subscription:
                while not stopping:
                    message = subscription.receive(timeout=RECEIVE_TIMEOUT_S)
                    if message is None:
                        continue
                    # Unbuffered: the line reaches the file before the ack can leave.
                    os.write(out, f"{message.id}\n".encode())
                    message.ack_nowait()
        except HeraldError as error:
            print(f"consumer {name}: {error}; subscribing again", file=sys.stderr, flush=True)
            time.sleep(RESUBSCRIBE_PAUSE_S)
    os.close(out)


if __name__ == "__main__":
    consume(*sys.argv[1:5])
