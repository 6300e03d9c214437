"""The ``herald`` command: run the server, manage topics and subscriptions, publish, consume.

Examples::

    herald up --data-dir ./herald-data
    herald topic create orders --retention 86400
    herald publish orders '{"id": 1}' --attr region=eu
    seq 1000 | herald publish orders
    herald subscription create orders billing --ack-deadline 10
    herald subscribe orders billing --count 10
    herald status

Expected failures (server down, bad name, missing topic...) print
``error: <code>: <message>`` on stderr and exit with status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

import orjson

from clients._core import DEFAULT_ENDPOINT, DEFAULT_TIMEOUT_S, BacklogTally, CurveKeys
from clients.client import Client
from clients.protocol import HeraldError

ENDPOINT_ENV: Final = "HERALD_ENDPOINT"
CURVE_SERVER_KEY_ENV: Final = "HERALD_CURVE_SERVER_KEY"
CURVE_KEY_ENV: Final = "HERALD_CURVE_KEY"
TOKEN_ENV: Final = "HERALD_TOKEN"  # noqa: S105 - the variable's name, not a secret
STDIN_BATCH: Final = 500  # lines per PUBLISH when reading stdin: one fsync per batch, bounded memory
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
_GLOBAL_OPTIONS_WITH_VALUE: Final = frozenset({"--endpoint", "--timeout", "--token", "--curve-server-key", "--curve-key"})


# --------------------------------------------------------------------------- parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``herald`` command."""
    parser = argparse.ArgumentParser(prog="herald", description="Herald: durable publish/subscribe over ZeroMQ.")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT,
        help=f"request endpoint of the server (default ${ENDPOINT_ENV} or {DEFAULT_ENDPOINT})",
    )
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, help=f"seconds to wait for each reply (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"the credential's token, for a server configured with credentials (default ${TOKEN_ENV}; prefer the variable: a flag shows in `ps`)",
    )
    parser.add_argument(
        "--curve-server-key",
        default=os.environ.get(CURVE_SERVER_KEY_ENV),
        metavar="FILE",
        help=f"the server's public certificate (.key), for a server that runs CURVE (default ${CURVE_SERVER_KEY_ENV})",
    )
    parser.add_argument(
        "--curve-key",
        default=os.environ.get(CURVE_KEY_ENV),
        metavar="FILE",
        help=f"this client's secret certificate (.key_secret) (default ${CURVE_KEY_ENV})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole Herald system on this machine (see `herald up --help`)", add_help=False)
    up.add_argument("args", nargs=argparse.REMAINDER)
    bench = commands.add_parser("bench", help="run the benchmark suite, against peers with --compare (see `herald bench --help`)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)

    topic = commands.add_parser("topic", help="create, delete, list and describe topics")
    topic_commands = topic.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", help="create a topic")
    create.add_argument("name")
    create.add_argument("--retention", type=float, metavar="S", help="seconds an unacknowledged message is kept")
    create.add_argument("--dedup-window", type=float, metavar="S", help="seconds a message id is remembered for de-duplication")
    create.add_argument("--max-payload", type=int, metavar="N", help="largest payload in bytes")
    create.add_argument("--exist-ok", action="store_true", help="succeed when the topic already exists; its settings stay as they are (a warning says so)")
    topic_commands.add_parser("delete", help="delete a topic and its subscriptions").add_argument("name")
    listing = topic_commands.add_parser("list", help="list topics")
    listing.add_argument("--prefix", default="", help="only topics whose name starts with this")
    topic_commands.add_parser("describe", help="print a topic as JSON").add_argument("name")

    publish = commands.add_parser("publish", help="publish DATA, or each line of stdin")
    publish.add_argument("topic")
    publish.add_argument("data", nargs="?", help="the payload; without it, every stdin line is one message")
    publish.add_argument("--attr", action="append", type=_key_value, default=[], metavar="KEY=VALUE", help="an attribute (repeatable)")
    publish.add_argument("--id", dest="message_id", help="message id for de-duplication (with DATA only)")

    sub = commands.add_parser("subscription", help="create, delete, list and describe subscriptions")
    sub_commands = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub_commands.add_parser("create", help="create a durable subscription")
    create.add_argument("topic")
    create.add_argument("name")
    create.add_argument("--ack-deadline", type=float, metavar="S", help="seconds before an unacknowledged message is redelivered")
    create.add_argument("--max-attempts", type=int, metavar="N", help="deliveries before a message goes to the dead-letter topic")
    create.add_argument("--backoff-min", type=float, metavar="S", help="first redelivery delay")
    create.add_argument("--backoff-max", type=float, metavar="S", help="largest redelivery delay")
    create.add_argument("--max-unacked", type=int, metavar="N", help="unacknowledged messages one consumer may hold")
    create.add_argument(
        "--dead-letter-topic", metavar="T", help="where exhausted messages go (default: the subscription's name + '.dead'; it must not lead back to TOPIC)"
    )
    create.add_argument(
        "--filter", action="append", type=_key_value, default=[], metavar="KEY=VALUE", help="deliver only messages with this attribute (repeatable)"
    )
    create.add_argument(
        "--exist-ok",
        action="store_true",
        help="succeed when the subscription already exists; settings given replace its settings, the others go back to their defaults",
    )
    sub_commands.add_parser("delete", help="delete a subscription and its backlog").add_argument("name")
    listing = sub_commands.add_parser("list", help="list subscriptions")
    listing.add_argument("--topic", help="only subscriptions of this topic")
    sub_commands.add_parser("describe", help="print a subscription as JSON").add_argument("name")

    subscribe = commands.add_parser(
        "subscribe", help="print messages as JSON lines (data, or data_base64 for a payload that is not UTF-8) and acknowledge them"
    )
    subscribe.add_argument("topic")
    subscribe.add_argument("name", help="subscription name (created when absent)")
    subscribe.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    # --idle, not --timeout: `herald --timeout` is the reply timeout. --timeout here still works (the older name).
    subscribe.add_argument(
        "--idle", "--timeout", dest="idle_s", type=_positive_float, metavar="S", help="stop when no message came for S seconds (--timeout: an older name)"
    )

    keys = commands.add_parser("keys", help="make CURVE key pairs (ZeroMQ certificate files)")
    keys_commands = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = keys_commands.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 600) in DIR")
    generate.add_argument("dir", metavar="DIR")
    generate.add_argument("--name", default="server", help="the certificate name (default server; use one per client)")

    config = commands.add_parser("config", help="check a `herald up --config` file")
    config_commands = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = config_commands.add_parser("check", help="exit 0 when FILE is valid; else print FILE:LINE: what is wrong and exit 1")
    check.add_argument("file", metavar="FILE")

    status = commands.add_parser("status", help="check that the server answers and print its state")
    status.add_argument(
        "--data-dir",
        default=None,
        help="the data folder of a local `herald up`; its herald-status.json adds processes, uptimes and restarts (default $HERALD_DATA_DIR, else ./herald-data)",
    )
    # Also after the command, where a newcomer types it; the global flag's value stands otherwise.
    status.add_argument("--timeout", type=_positive_float, default=argparse.SUPPRESS, help="seconds to wait for each reply (as the global --timeout)")
    return parser


def _up_arguments(argv: Sequence[str], command: str = "up") -> list[str] | None:
    """The arguments after ``command`` when the command line is ``herald [global options] <command> ...``, else None.

    They are handed to the launcher (``up``) or the benchmark suite (``bench``)
    untouched: argparse would try to read them.
    """
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
        elif arg.startswith("--") and arg.split("=", 1)[0] in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 1
        elif arg == command:
            return list(argv[index + 1 :])
        else:
            return None
    return None


# --------------------------------------------------------------------------- output


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _setting(settings: dict[str, Any], key: str) -> str:
    value = settings.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _print_topics(topics: list[dict[str, Any]], out: TextIO) -> None:
    if not topics:
        out.write("no topics\n")
        return
    rows = [["NAME", "RETENTION_S", "DEDUP_WINDOW_S", "MAX_PAYLOAD", "CREATED"]]
    for topic in sorted(topics, key=lambda t: str(t.get("name"))):
        settings = topic.get("settings") or {}
        rows.append(
            [
                str(topic.get("name")),
                _setting(settings, "retention"),
                _setting(settings, "dedup_window"),
                _setting(settings, "max_payload"),
                _when(topic.get("created_at")),
            ]
        )
    _table(rows, out)


def _print_subscriptions(subscriptions: list[dict[str, Any]], out: TextIO) -> None:
    if not subscriptions:
        out.write("no subscriptions\n")
        return
    rows = [["NAME", "TOPIC", "ACK_DEADLINE_S", "MAX_ATTEMPTS", "MAX_UNACKED", "DEAD_LETTER", "FILTER"]]
    for sub in sorted(subscriptions, key=lambda s: str(s.get("name"))):
        settings = sub.get("settings") or {}
        rows.append(
            [
                str(sub.get("name")),
                str(sub.get("topic")),
                _setting(settings, "ack_deadline"),
                _setting(settings, "max_attempts"),
                _setting(settings, "max_unacked"),
                _setting(settings, "dead_letter_topic"),
                _setting(settings, "filter"),
            ]
        )
    _table(rows, out)


def _print_id(message_id: Any, out: TextIO) -> None:
    out.write(f"{message_id}{' (duplicate)' if getattr(message_id, 'duplicate', False) else ''}\n")


# --------------------------------------------------------------------------- commands


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    for line in stream:
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        yield line


def _batches(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _publish(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: BinaryIO) -> int:
    attributes = dict(args.attr) or None
    if args.data is not None:
        _print_id(client.publish(args.topic, os.fsencode(args.data), attributes, message_id=args.message_id), out)
        return EXIT_OK
    if args.message_id is not None:
        raise _UsageError("--id needs DATA: each stdin line gets its own generated id")
    first_line = 1
    for batch in _batches(_lines(stdin), STDIN_BATCH):
        try:
            message_ids = client.publish_batch(args.topic, [(line, attributes) for line in batch])
        except HeraldError as error:
            # A batch that publish_batch split may have been stored in part: print those ids first.
            stored = error.details.get("published") or []
            for message_id in stored:
                _print_id(message_id, out)
            out.flush()
            _report_refused_lines(error, first_line + len(stored), first_line + len(batch) - 1, err)
            return EXIT_ERROR
        for message_id in message_ids:
            _print_id(message_id, out)
        out.flush()
        first_line += len(batch)
    return EXIT_OK


def _report_refused_lines(error: HeraldError, first: int, last: int, err: TextIO) -> None:
    """Say which stdin lines a refused PUBLISH held: its errors count messages from 0 within that one request."""
    message = re.sub(r"messages\[(\d+)\]", lambda match: f"line {first + int(match.group(1))}", error.message)
    index = error.details.get("index")
    if isinstance(index, int) and "line " not in message:
        message += f" (line {first + index})"
    err.write(f"error: {error.code}: {message}\n")
    before = f"lines 1-{first - 1} were stored (their ids are above); " if first > 1 else ""
    if error.retriable:
        err.write(f"{before}lines {first}-{last} may or may not be stored, and no line after them was sent\n")
    else:
        err.write(f"{before}lines {first}-{last} were not stored, nor any line after them\n")


def _subscribe(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.count is not None and args.count < 1:
        raise _UsageError(f"--count must be at least 1, got {args.count}")
    received = 0
    with client.subscribe(args.topic, args.name) as subscription:
        while args.count is None or received < args.count:
            message = subscription.receive(timeout=args.idle_s)
            if message is None:
                break
            record: dict[str, Any] = {"id": message.id, "topic": message.topic, "attempt": message.attempt, "attributes": message.attributes}
            try:
                record["data"] = message.data.decode()
            except UnicodeDecodeError:
                # Never print a lossy copy of a payload that is then acknowledged.
                record["data_base64"] = base64.b64encode(message.data).decode()
            out.write(orjson.dumps(record).decode() + "\n")
            out.flush()
            try:
                message.ack()
            except HeraldError as error:
                if error.code != "unknown_delivery":
                    raise
                # The sender restarted since it handed this out: it comes again (at least once).
                err.write(f"warning: {error.code}: {error.message}\n")
            received += 1
    if args.count is not None and received < args.count:
        err.write(f"received {received} of {args.count} messages before {args.idle_s:g} s passed without one\n")
        return EXIT_ERROR
    return EXIT_OK


def _status(client: Client, out: TextIO, err: TextIO) -> int:
    try:
        rtt = client.ping()
    except HeraldError as error:
        err.write(f"error: herald at {client.endpoint} is not answering: {error.code}: {error.message}\n")
        return EXIT_ERROR
    try:
        info = client.info()
        stats = client.status()
    except HeraldError as error:
        if error.code not in ("unauthenticated", "forbidden"):
            err.write(f"error: herald at {client.endpoint} answered PING but not INFO/STATUS: {error.code}: {error.message}\n")
            return EXIT_ERROR
        # PING stays open on a server with credentials (for health checks); the rest needs a token.
        out.write(f"herald at {client.endpoint}: up, ping {rtt * 1000:.2f} ms\n")
        out.write(f"  (details need a token: {error.code}; pass --token or set HERALD_TOKEN)\n")
        return EXIT_OK
    endpoints = info.get("endpoints") or {}
    senders = endpoints.get("senders") or []
    max_payload = info.get("max_payload")
    out.write(f"herald {info.get('version', '?')} (protocol {info.get('protocol', '?')}) at {client.endpoint}: up, ping {rtt * 1000:.2f} ms\n")
    out.write(f"  durability   {info.get('durability', '?')}\n")
    out.write(f"  frontends    {info.get('frontends', '?')}\n")
    out.write(f"  senders      {len(senders)}\n")
    out.write(f"  max payload  {max_payload if max_payload is not None else '?'} bytes\n")
    out.write(f"  live feed    {info.get('live') or endpoints.get('live') or '-'}\n")
    for index, sender in enumerate(senders):
        if isinstance(sender, dict):
            out.write(f"  sender {index}     deliver {sender.get('deliver')}  ack {sender.get('ack')}\n")
    out.write(f"statistics of the frontend that answered ({stats.get('frontend', info.get('frontend', '?'))}):\n")
    for key in sorted(stats):
        value = stats[key]
        shown = (" ".join(f"{k}={v}" for k, v in value.items()) or "none") if isinstance(value, dict) else str(value)
        out.write(f"  {key:<26} {shown}\n")
    frontends = info.get("frontends")
    if isinstance(frontends, int) and frontends > 1:
        _all_backlogs(client, stats, frontends, out)
    return EXIT_OK


def _all_backlogs(client: Client, first: dict[str, Any], frontends: int, out: TextIO) -> None:
    """Each frontend counts only its own shard's backlog: ask again until every one has answered, and sum them."""
    tally = BacklogTally(frontends)
    tally.add(first)
    for _ in range(tally.requests):
        if tally.complete:
            break
        try:
            tally.add(client.status())
        except HeraldError:
            break
    shown = " ".join(f"{name}={count}" for name, count in tally.totals().items()) or "none"
    missing = "" if tally.complete else f" (only {tally.answered} of {frontends} frontends answered)"
    out.write(f"backlog of every frontend{missing}: {shown}\n")


def _local_processes(data_dir: Path, endpoint: str, out: TextIO, *, data_dir_given: bool = False) -> None:
    """Print the launcher's view of its children, when a local data folder has one for this endpoint."""
    try:
        status = orjson.loads((data_dir / "herald-status.json").read_bytes())
    except (OSError, ValueError):
        return
    children = status.get("children") if isinstance(status, dict) else None
    if not isinstance(children, list):
        return
    served = status.get("client_endpoint")
    if not isinstance(served, str) or _server_key(served) != _server_key(endpoint):
        # Another Herald's folder (the default ./herald-data): its processes would mislead.
        advice = f"not the one at {endpoint}" if data_dir_given else "pass --data-dir"
        out.write(f"(not showing the processes in {data_dir}: that folder belongs to the herald at {served}; {advice})\n")
        return
    launcher = status.get("pid")
    if not (isinstance(launcher, int) and _process_exists(launcher)):
        out.write(f"the launcher (pid {launcher}) of {data_dir} is not running; its last report:\n")
    out.write(f"processes of the launcher (pid {launcher}) in {data_dir}:\n")
    for child in children:
        if isinstance(child, dict):
            state = "running" if child.get("running") else "DOWN"
            out.write(
                f"  {child.get('name', '?'):<12} {state:<8} pid {child.get('pid')}  up {child.get('uptime_s', 0)} s  restarts {child.get('restarts', 0)}\n"
            )
    _local_volume(data_dir, out)
    _local_backlog(data_dir, out)


def _local_volume(data_dir: Path, out: TextIO) -> None:
    """Print the data folder's free space, as /health judges it."""
    from broker.metrics import LOW_SPACE_BYTES, data_volume

    volume = data_volume(str(data_dir))
    if volume is None:
        return
    free_mib, total_mib = volume["free_bytes"] // 2**20, volume["total_bytes"] // 2**20
    low = f"  LOW: a shard needs {LOW_SPACE_BYTES // 2**20} MiB free to write" if volume["free_bytes"] < LOW_SPACE_BYTES else ""
    out.write(f"data volume of {data_dir}: {free_mib} MiB free of {total_mib} MiB{low}\n")


def _server_key(endpoint: str) -> tuple[str, str]:
    """(host, port) of a tcp endpoint, with every spelling of this machine as one host."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    if host in ("localhost", "0.0.0.0", "::", "::1", "*") or host.startswith("127."):  # noqa: S104 - compared, not bound
        host = "this machine"
    return host, port


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _local_backlog(data_dir: Path, out: TextIO) -> None:
    """Print the backlog per subscription, summed over the frontends' metric snapshots."""
    backlog: dict[str, int] = {}
    for path in sorted((data_dir / "metrics").glob("frontend-*.json")):
        try:
            snapshot = orjson.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        for name, count in (snapshot.get("backlog") or {}).items():
            backlog[name] = backlog.get(name, 0) + int(count)
    out.write("backlog per subscription (stored, not yet settled):" + ("" if backlog else " none") + "\n")
    for name, count in sorted(backlog.items()):
        out.write(f"  {name:<40} {count}\n")


def _topic(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    match args.action:
        case "create":
            given = {"retention": args.retention, "dedup_window": args.dedup_window, "max_payload": args.max_payload}
            topic = client.create_topic(args.name, exist_ok=args.exist_ok, **given)
            kept = {key: value for key, value in given.items() if value is not None and topic["settings"].get(key) != value}
            if kept:
                differences = ", ".join(f"{key} {_setting(topic['settings'], key)} (not {_setting(given, key)})" for key in kept)
                err.write(f"warning: topic {args.name} already exists and keeps its settings: {differences}; a topic's settings never change\n")
            out.write(_json(topic) + "\n")
        case "delete":
            deleted = client.delete_topic(args.name)
            out.write(f"deleted topic {args.name}" + (f" and its subscriptions {', '.join(deleted)}" if deleted else "") + "\n")
        case "list":
            _print_topics(client.list_topics(args.prefix), out)
        case "describe":
            out.write(_json(client.describe_topic(args.name)) + "\n")
        case _:
            raise _UsageError(f"unknown topic action {args.action!r}")
    return EXIT_OK


def _subscription(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    match args.action:
        case "create":
            before: dict[str, Any] | None = None
            if args.exist_ok:
                # Listed rather than described: a describe of a new name would count as an error reply.
                before = next((sub for sub in client.list_subscriptions(args.topic) if sub.get("name") == args.name), None)
            sub = client.create_subscription(
                args.topic,
                args.name,
                exist_ok=args.exist_ok,
                ack_deadline=args.ack_deadline,
                max_attempts=args.max_attempts,
                backoff_min=args.backoff_min,
                backoff_max=args.backoff_max,
                max_unacked=args.max_unacked,
                dead_letter_topic=args.dead_letter_topic,
                filter=dict(args.filter) or None,
            )
            if before is not None:
                old, new = before.get("settings") or {}, sub.get("settings") or {}
                changes = [f"{key} {_setting(old, key)} -> {_setting(new, key)}" for key in sorted(new) if old.get(key) != new.get(key)]
                if changes:
                    # Settings replace the old ones as a whole (docs/protocol.md, SUB_CREATE): say what moved.
                    err.write(f"updated subscription {args.name}: {', '.join(changes)} (settings not given are back to their defaults)\n")
            out.write(_json(sub) + "\n")
        case "delete":
            client.delete_subscription(args.name)
            out.write(f"deleted subscription {args.name}\n")
        case "list":
            _print_subscriptions(client.list_subscriptions(args.topic), out)
        case "describe":
            described = client.describe_subscription(args.name)
            # Not part of the record: each frontend counts its own shard, so every one is asked.
            try:
                described["backlog"] = client.backlogs().get(args.name, 0)
            except HeraldError as error:
                described["backlog"] = None
                err.write(f"warning: backlog unknown: {error.code}: {error.message}\n")
            out.write(_json(described) + "\n")
        case _:
            raise _UsageError(f"unknown subscription action {args.action!r}")
    return EXIT_OK


class _UsageError(Exception):
    """A command line that parsed but makes no sense; exits with status 2."""


def _config_check(path: str, out: TextIO, err: TextIO) -> int:
    try:
        from broker.config import ConfigFileError, load_up_file
    except ImportError as exc:
        err.write(f"error: unavailable: `herald config check` needs the Herald server package (broker): {exc}\n")
        return EXIT_ERROR
    try:
        settings = load_up_file(path)
    except ConfigFileError as exc:
        err.write(f"{exc}\n")
        return EXIT_ERROR
    credentials = settings.pop("credentials", ())
    live = settings.pop("live_feed", None)
    limits = ", ".join(f"{key} = {value}" for key, value in sorted(settings.items())) or "defaults"
    names = ", ".join(credential.name for credential in credentials) or "none: the server is open"
    served = live if live is not None else not credentials
    out.write(f"{path}: valid; limits: {limits}; credentials: {names}; live feed: {'served, to anyone who can reach it' if served else 'off'}\n")
    return EXIT_OK


def _keys_generate(directory: str, name: str, out: TextIO) -> int:
    from broker.curve import generate_keys

    public, secret = generate_keys(directory, name)
    out.write(f"public key: {public}\nsecret key: {secret} (keep it private)\n")
    return EXIT_OK


def _curve_keys(args: argparse.Namespace) -> CurveKeys | None:
    if not args.curve_server_key and not args.curve_key:
        return None
    if not (args.curve_server_key and args.curve_key):
        raise _UsageError("CURVE needs both --curve-server-key and --curve-key")
    try:
        return CurveKeys.from_files(args.curve_server_key, args.curve_key)
    except OSError as exc:
        raise _UsageError(f"cannot read a CURVE certificate: {exc}") from None


def _run(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: BinaryIO) -> int:
    if args.command == "config":
        return _config_check(args.file, out, err)
    if args.command == "keys":
        return _keys_generate(args.dir, args.name, out)
    with Client(args.endpoint, timeout=args.timeout, token=args.token, curve=_curve_keys(args)) as client:
        match args.command:
            case "topic":
                return _topic(client, args, out, err)
            case "publish":
                return _publish(client, args, out, err, stdin)
            case "subscription":
                return _subscription(client, args, out, err)
            case "subscribe":
                return _subscribe(client, args, out, err)
            case "status":
                code = _status(client, out, err)
                from broker.config import DEFAULT_DATA_DIR  # herald up's default folder

                data_dir = args.data_dir or os.environ.get("HERALD_DATA_DIR")  # as herald up reads it
                _local_processes(Path(data_dir or DEFAULT_DATA_DIR), client.endpoint, out, data_dir_given=data_dir is not None)
                return code
            case _:
                raise _UsageError(f"unknown command {args.command!r}")


def _launch(rest: list[str]) -> int:
    try:
        from broker.launcher import main as up_main
    except ImportError as exc:
        sys.stderr.write(f"error: unavailable: `herald up` needs the Herald server package (broker), which failed to import: {exc}\n")
        return EXIT_ERROR
    return up_main(rest)


def _bench(rest: list[str]) -> int:
    try:
        from bench.suite import main as bench_main
    except ImportError as exc:
        sys.stderr.write(f"error: unavailable: `herald bench` needs the bench package and its extra (pip install -e '.[bench]'): {exc}\n")
        return EXIT_ERROR
    try:
        return bench_main(rest)
    except KeyboardInterrupt:
        sys.stderr.write("[bench] interrupted\n")
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``herald`` command.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 on success, 1 on a Herald error, 2 on a usage error,
        130 when interrupted.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    up_arguments = _up_arguments(arguments)
    if up_arguments is not None:
        return _launch(up_arguments)
    bench_arguments = _up_arguments(arguments, "bench")
    if bench_arguments is not None:
        return _bench(bench_arguments)
    parser = build_parser()
    args = parser.parse_args(arguments)
    out, err = sys.stdout, sys.stderr
    try:
        return _run(args, out, err, sys.stdin.buffer)
    except HeraldError as error:
        err.write(f"error: {error.code}: {error.message}\n")
        return EXIT_ERROR
    except (_UsageError, ValueError) as error:
        parser.print_usage(err)
        err.write(f"herald: error: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
