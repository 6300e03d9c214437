"""Who may do what: tokens, per-topic permissions and publish rate limits.

A request carries its token in the header field ``token``. The frontend (for
client requests) and the sender (for ATTACH) find the credential by the
token's SHA-256, check the permission the command needs, and, for PUBLISH,
charge the credential's token buckets. With no credentials configured the
server is open and every check passes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from broker.config import Credential, hash_token
from clients.protocol import HeraldError

TOKEN_HEADER: Final = "token"  # noqa: S105 - the name of the header field, not a secret


class TokenBucket:
    """``rate`` units per second, up to one second's worth saved up."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = rate
        self.tokens = rate
        self.updated = time.monotonic()

    def take(self, amount: float, now: float) -> float:
        """Take ``amount``; returns 0 on success, else the seconds until it would fit."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        # A request larger than the whole bucket may pass once the bucket is full,
        # so a big batch is slowed down, never refused for ever.
        needed = min(amount, self.capacity)
        if self.tokens >= needed:
            self.tokens -= amount
            return 0.0
        return (needed - self.tokens) / self.rate


class Authorizer:
    """The credentials of one process, with the rate-limit state of each.

    Args:
        credentials: from the config; empty means open.
        share: how many processes split each credential's rates (the proxy
            spreads requests evenly over the frontends, so each one enforces
            ``rate / share``).
    """

    def __init__(self, credentials: tuple[Credential, ...], share: int = 1) -> None:
        self.open = not credentials
        self._by_hash = {credential.token_sha256: credential for credential in credentials}
        # Valid tokens are remembered (there are only as many as credentials), so
        # the hot path hashes a token once per process, not once per request.
        self._known: dict[str, Credential] = {}
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {
            credential.name: (
                TokenBucket(credential.publish_rate / share) if credential.publish_rate else None,
                TokenBucket(credential.publish_bytes_rate / share) if credential.publish_bytes_rate else None,
            )
            for credential in credentials
        }
        self.refused: dict[str, int] = {"unauthenticated": 0, "forbidden": 0, "rate_limited": 0}

    def identify(self, header: Mapping[str, Any]) -> Credential | None:
        """The request's credential (None when open).

        Raises:
            HeraldError: ``unauthenticated`` for a missing or unknown token.
        """
        if self.open:
            return None
        token = header.get(TOKEN_HEADER)
        if not isinstance(token, str) or not token:
            self.refused["unauthenticated"] += 1
            raise HeraldError(
                "unauthenticated", "this server requires a token: the header field 'token' (Python: Client(token=...); herald: --token or $HERALD_TOKEN)"
            )
        credential = self._known.get(token)
        if credential is None:
            credential = self._by_hash.get(hash_token(token))
            if credential is None:
                self.refused["unauthenticated"] += 1
                raise HeraldError("unauthenticated", "the token is not one this server knows")
            self._known[token] = credential
        return credential

    def require(self, credential: Credential | None, action: str, topic: str | None = None) -> None:
        """Raise ``forbidden`` unless ``credential`` may do ``action`` (publish, subscribe, admin) on ``topic``."""
        if credential is None:
            return
        allowed = credential.admin if action == "admin" else topic is not None and credential.may(action, topic)
        if not allowed:
            self.refused["forbidden"] += 1
            what = "create or delete topics and subscriptions" if action == "admin" else f"{action} on topic {topic!r}"
            raise HeraldError("forbidden", f"credential {credential.name!r} may not {what}")

    def charge_publish(self, credential: Credential | None, messages: int, payload_bytes: int) -> None:
        """Take ``messages`` and ``payload_bytes`` from the credential's buckets, or refuse.

        Raises:
            HeraldError: ``rate_limited`` with ``details.retry_after`` (seconds).
        """
        if credential is None:
            return
        by_count, by_bytes = self._buckets[credential.name]
        if by_count is None and by_bytes is None:
            return
        now = time.monotonic()
        wait = by_count.take(messages, now) if by_count is not None else 0.0
        if wait == 0.0 and by_bytes is not None:
            wait = by_bytes.take(payload_bytes, now)
            if wait and by_count is not None:
                by_count.tokens += messages  # refused: give back what the count bucket took
        if wait:
            self.refused["rate_limited"] += 1
            raise HeraldError(
                "rate_limited",
                f"credential {credential.name!r} publishes faster than its limit; retry in {wait:.3f} s",
                {"retry_after": round(wait, 3)},
            )
