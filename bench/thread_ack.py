"""How long ``message.ack()`` takes from a worker thread while another thread waits in ``receive()``,
and how much CPU an idle ``receive()`` costs: the sync client's shared-socket lock at work.

    python -m bench.thread_ack --endpoint tcp://127.0.0.1:5555 [--messages 300] [--idle 10]

Against a running Herald (``herald up``); it creates topic ``bench.thread-ack`` and its subscription.
One thread receives and hands each message to a worker thread, which acknowledges it with ``ack()``
(a round trip to the sender) while the receiving thread is back in its wait. Messages are published
every 5 ms, so that wait is idle when each ack starts.
"""

from __future__ import annotations

import argparse
import queue
import resource
import threading
import time

from clients import Client, Message

TOPIC = "bench.thread-ack"
SUBSCRIPTION = "bench.thread-ack.reader"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.thread_ack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="a running Herald's client endpoint")
    parser.add_argument("--messages", type=int, default=300, help="messages acknowledged from the worker thread (default 300)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle receive() to measure the CPU of (default 10)")
    args = parser.parse_args(argv)
    with Client(args.endpoint, timeout=10) as client:
        client.create_topic(TOPIC, exist_ok=True)
        client.create_subscription(TOPIC, SUBSCRIPTION, exist_ok=True)
        with client.subscribe(TOPIC, SUBSCRIPTION) as subscription:
            while subscription.receive(timeout=0.5) is not None:  # a previous run's leftovers
                pass
            handed: queue.Queue[Message | None] = queue.Queue()
            ack_seconds: list[float] = []

            def worker() -> None:
                while (message := handed.get()) is not None:
                    started = time.perf_counter()
                    message.ack()
                    ack_seconds.append(time.perf_counter() - started)

            def publisher() -> None:
                for index in range(args.messages):
                    client.publish(TOPIC, str(index).encode())
                    time.sleep(0.005)

            threads = [threading.Thread(target=worker), threading.Thread(target=publisher)]
            for thread in threads:
                thread.start()
            received = 0
            while received < args.messages and (message := subscription.receive(timeout=10)) is not None:
                handed.put(message)
                received += 1
            handed.put(None)
            for thread in threads:
                thread.join()
            print(
                f"ack() from a worker thread, {len(ack_seconds)} acks: p50 {percentile(ack_seconds, 0.5) * 1000:.2f} ms, "
                f"p90 {percentile(ack_seconds, 0.9) * 1000:.2f} ms, max {max(ack_seconds) * 1000:.2f} ms"
            )
            before_cpu, before = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            subscription.receive(timeout=args.idle)
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(
                f"idle receive() for {args.idle:g} s: {(time.process_time() - before_cpu) * 1000:.1f} ms of CPU "
                f"(heartbeat thread included), {after.ru_nvcsw - before.ru_nvcsw} voluntary context switches"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
