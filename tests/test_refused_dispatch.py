"""A DISPATCH refused while the disk is full (frontend/server.py, ``FrontendServer._send_dispatch``).

When a sender's intake is full, a frontend takes a new message's entries back: one write makes them pending
entries (``_materialize``), and ``store.unattempt`` sets them to attempt 0, since only what a sender took is
an attempt (docs/architecture.md, delivery flow). On a full disk that write fails; the entries are kept for
``_retry_materialize``, which the heartbeat runs until there is room. A refused DISPATCH without a full disk
is tested in tests/test_faults.py (``test_a_refused_dispatch_loses_nothing_and_is_not_an_attempt``).

For the taken-back write to be the one that fails, the disk must have room for the batch and not for that
write, which follows it at once on the poll loop. So the shard alone lives on a small tmpfs (a symlink from the
data folder: nothing else writes there), and the test leaves it just enough free bytes. tmpfs allocates whole
pages: the room is the free pages plus what is left of the last page of the WAL, which the test reads from the
WAL file. The batch's own size in the WAL is measured with an identical batch first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import Client, HeraldError, Subscription
from tests.conftest import HeraldSystem, wait_for

PAGE_BYTES = 4096  # tmpfs hands out whole pages
BATCH = 500  # messages in the batch whose DISPATCH is refused: one DISPATCH, one DELIVER (at most 500), one taken-back write
# What the taken-back write of one entry adds to the WAL, at least: a P key (17 bytes) and its attempt count (4),
# with a type tag and two lengths. The batch's 500 make the write ~12 000 bytes: the room left is the batch's size
# plus half that (give or take half a page), so the batch fits and the taken-back write does not.
TAKEN_BACK_ENTRY_BYTES = 24
FILLER_PAYLOAD = bytes(64 * 1024)  # a few MiB of these fill the stopped sender's intake (its queue and the TCP buffers)


@pytest.fixture
def shard_on_a_small_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A data folder whose ``shard-0`` is on a 24 MiB tmpfs of its own, and that tmpfs; unmounted afterwards.

    Request it before ``herald_factory``, so that the system is stopped before the unmount.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.decode().strip()}")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (mount_point / "shard-0").mkdir()
    (data_dir / "shard-0").symlink_to(mount_point / "shard-0")
    yield data_dir, mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _wal(shard: Path) -> tuple[int, int]:
    """The size of the shard's current WAL file, and the bytes left in its last page."""
    newest = max(shard.glob("*.log"), key=lambda path: int(path.stem))
    stat = newest.stat()
    return stat.st_size, stat.st_blocks * 512 - stat.st_size


def _leave_room(mount_point: Path, shard: Path, room: int) -> int:
    """Fill the tmpfs with a file so that the WAL can grow by ``room`` bytes, give or take half a page; the room left."""
    _, slack = _wal(shard)
    pages = max(0, round((room - slack) / PAGE_BYTES))
    free = os.statvfs(mount_point).f_bavail
    fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, (free - pages) * PAGE_BYTES)
    finally:
        os.close(fd)
    assert os.statvfs(mount_point).f_bavail == pages, "something else wrote to the shard's disk meanwhile"
    return slack + pages * PAGE_BYTES


def _attach(client: Client, topic: str, name: str, **settings: Any) -> Subscription:
    """Create ``topic`` and subscription ``name`` and attach a consumer that has seen a message, so that it is credited.

    At high-water marks of 2 the sender's PUB drops a DELIVER whenever two messages wait for its I/O thread, and
    the WELCOMEs of an attach can be enough: so a warm-up message goes out every 2 s until one arrives.
    """
    client.create_topic(topic)
    client.create_subscription(topic, name, **settings)
    subscription = client.subscribe(topic, name)
    deadline = time.monotonic() + 30
    while True:
        client.publish(topic, b"warm")
        warm = subscription.receive(timeout=2)
        if warm is not None:
            break
        assert time.monotonic() < deadline, f"no warm-up message of {topic!r} arrived in 30 s"
    warm.ack_nowait()
    subscription.receive(timeout=0.1)  # sends the ack
    return subscription


def _drain(subscription: Subscription, ids: set[str], *, ack: bool) -> dict[str, int]:
    """Receive until every id in ``ids`` has arrived (30 s at most); the attempt each id first arrived with."""
    first: dict[str, int] = {}

    def all_arrived() -> bool:
        message = subscription.receive(timeout=0.5)
        while message is not None:
            first.setdefault(message.id, message.attempt)
            if ack:
                message.ack_nowait()
            message = subscription.receive(timeout=0.05)
        return ids <= first.keys()

    with contextlib.suppress(AssertionError):  # what is missing is reported by the caller
        wait_for(all_arrived, timeout=30, interval=0)
    return first


def _fill_intake(client: Client, ids: list[str]) -> None:
    """Publish 64 KiB messages to ``filler`` (adding their ids to ``ids``) until the frontend's DISPATCHes to the stopped
    sender are refused pass after pass: then its intake is full, not just filling while the TCP buffers grow."""
    refusals, streak = client.status()["dispatches_refused"], 0
    while streak < 3:
        assert len(ids) < 250, "250 publishes of 64 KiB did not fill the stopped sender's intake"
        now = client.status()["dispatches_refused"]
        if now > refusals:  # the filler's backlog, handed out again on each pass of the frontend's loop, was refused again
            refusals, streak = now, streak + 1
            time.sleep(0.06)  # a pass at least (the loop polls for 50 ms when idle)
        else:
            streak = 0
            ids.extend(client.publish_batch("filler", [(FILLER_PAYLOAD, None, f"filler-{len(ids):04d}")]))


def _grown(endpoint: str, before: dict[str, Any], counter: str) -> bool:
    """Whether the frontend that answered STATUS with ``before`` has counted more ``counter`` since."""
    status = _status_of(endpoint)
    return status is not None and status["pid"] == before["pid"] and status[counter] > before[counter]


def _log_lines(herald: HeraldSystem, *needles: str) -> str:
    """The first few lines of the system's log that hold one of ``needles``."""
    lines = herald.log_path.read_text(errors="replace").splitlines()
    return "\n".join([line for line in lines if any(needle in line for needle in needles)][:4])


def _status_of(endpoint: str) -> dict[str, Any] | None:
    """The frontend's STATUS, or None if none answers within 2 s."""
    with Client(endpoint, timeout=2.0) as client:
        try:
            return client.status()
        except HeraldError:
            return None


@pytest.mark.parametrize("durability", ["fsync", "async"])
def test_a_dispatch_refused_on_a_full_disk_is_handed_out_once_there_is_room_as_attempt_1(
    shard_on_a_small_disk: tuple[Path, Path], herald_factory: Callable[..., HeraldSystem], tmp_path: Path, durability: str
) -> None:
    """A batch's DISPATCH is refused (the sender is SIGSTOPped, its intake full at high-water marks of 2), and the write
    that takes its entries back fails for lack of space. Once there is room again: every acknowledged message arrives
    (the refused batch, an identical batch handed out before it, and the publishes that filled the intake), no process
    was restarted (docs/architecture.md, failure table: a full disk refuses writes and crashes nothing), and each
    message of the refused batch first arrives as attempt 1, since no sender ever took it.

    One frontend and one sender, so STATUS always comes from the frontend that wrote the batch: its counters show
    that the batch's DISPATCH was refused (``dispatches_refused``) and the taken-back write failed
    (``storage_failures``), or the test fails. Both durability modes: with ``fsync`` the batch's fsync follows the
    failed write. The subscription under test is not acknowledged during the test and has a 60 s ack deadline, so
    nothing is redelivered meanwhile and the first arrival of a message is its first delivery."""
    data_dir, disk = shard_on_a_small_disk
    shard = disk / "shard-0"
    config = tmp_path / "tiny-hwm.toml"
    config.write_text("sndhwm = 2\nrcvhwm = 2\n")
    herald = herald_factory("--config", str(config), "--durability", durability, data_dir=data_dir, env={"HERALD_FRONTENDS": "1", "HERALD_SENDERS": "1"})
    measured = [(b"m", None, f"measure-{i:04d}") for i in range(BATCH)]
    refused = [(b"m", None, f"refused-{i:04d}") for i in range(BATCH)]  # ids of the same length: a batch of the same size
    fillers: list[str] = []
    with Client(herald.endpoint, timeout=5.0) as client:
        # Credit for 500 publishes of 64 KiB: far more than the intake holds, so its DISPATCHes go out until it is full.
        filler = _attach(client, "filler", "filler.sub", ack_deadline=2, backoff=(0, 0), max_attempts=1000, max_unacked=250)
        reader = _attach(client, "refused", "refused.sub", ack_deadline=60, max_unacked=2000)
        client.create_topic("probe")  # no subscription: publishes that only tell whether the shard takes writes
        # The batch as written to the WAL, handed out at once (implicit entries), as the refused one will be.
        size_before, _ = _wal(shard)
        client.publish_batch("refused", measured)
        batch_bytes = _wal(shard)[0] - size_before
        assert batch_bytes > BATCH * TAKEN_BACK_ENTRY_BYTES, f"the measured batch took {batch_bytes} bytes of WAL"
        sender = herald.kill_child("sender-0", signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            _fill_intake(client, fillers)
            room = _leave_room(disk, shard, batch_bytes + BATCH * TAKEN_BACK_ENTRY_BYTES // 2)
            before = client.status()
            # Within the 3 s after which the frontend stops crediting the stopped sender (PEER_EXPIRY_S), so the batch is still handed out at once.
            assert time.monotonic() - stopped_at < 2.5, "filling the intake took too long"
            try:
                with Client(herald.endpoint, timeout=3.0) as publisher:
                    publisher.publish_batch("refused", refused)
                first_answer = "acknowledged"
            except HeraldError as error:
                first_answer = f"{error.code}: {error.message}"
            after = _status_of(herald.endpoint)
        finally:
            os.kill(sender, signal.SIGCONT)
        crashed = after is None or after["pid"] != before["pid"]
        if not crashed:  # else the restart is reported below, once nothing acknowledged is found missing
            assert after is not None
            # Refused before the publish was answered: a DISPATCH goes out as soon as the batch is written.
            assert after["dispatches_refused"] - before["dispatches_refused"] >= BATCH, (
                f"the batch's DISPATCH was not refused ({first_answer}; {before['dispatches_refused']} -> {after['dispatches_refused']} entries refused)"
            )
            wait_for(
                lambda: _grown(herald.endpoint, before, "storage_failures"),
                timeout=10,
                interval=0.1,
                message=f"the write of the taken-back entries refused ({room} bytes of room after a batch of {batch_bytes})",
            )

        # Room again: RocksDB resumes writing by itself once the free space exceeds its write buffer (64 MiB).
        assert subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], capture_output=True, timeout=30).returncode == 0

        def shard_writes() -> bool:
            try:
                client.publish_batch("probe", [b"room again"])
            except HeraldError as error:
                assert error.code in ("storage_failed", "timeout"), error
                return False
            return True

        wait_for(shard_writes, timeout=60, interval=0.5, message="publishing works again once there is room")
        if first_answer != "acknowledged":  # refused as a whole: its retry with the same ids is acknowledged
            client.publish_batch("refused", refused)
        delivered = _drain(reader, {m for _, _, m in measured + refused}, ack=False)
        filled = _drain(filler, set(fillers), ack=True)
        reader.close()
        filler.close()
    missing = sorted({m for _, _, m in measured + refused} - delivered.keys()) + sorted(set(fillers) - filled.keys())
    assert not missing, f"{len(missing)} acknowledged messages never arrived, e.g. {missing[:5]}"
    restarted = {child["name"]: child["restarts"] for child in herald.status()["children"] if child["restarts"]}
    assert not restarted, f"restarted on a full disk: {restarted}; the refused batch was first answered {first_answer!r}\n{_log_lines(herald, 'CRITICAL')}"
    attempts = {m: delivered[m] for _, _, m in refused if delivered[m] != 1}
    assert not attempts, (
        f"{len(attempts)} of {BATCH} messages whose only DISPATCH was refused first arrived as attempt {sorted(set(attempts.values()))}\n"
        + _log_lines(herald, "taken-back entries", "back to attempt 0")
    )
