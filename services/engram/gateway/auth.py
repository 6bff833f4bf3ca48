"""What the gateway asks about a client: who is it (authentication), may it do this to that
memory space (authorization), and is its key within its rate limits.

Authentication is on when ``ENGRAM_KEYS_FILE`` is set (:class:`Authenticator` over a
:class:`~engram.common.keys.KeyRing`); off, every stream gets :data:`OPEN`, which may do
anything and has no limits, so the rest of the gateway never asks "is auth on?".

A :class:`Principal` is one key as this gateway process sees it, shared by all of the key's
streams: its entry (scopes), its token buckets (observations/s, recalls/s) and whether it has
ended (revoked or removed by a reload). Streams check it once per message with an attribute
read; the keyring is consulted only when a stream opens. Every refusal is an audit line
(``engram.audit``: ``audit event=auth_failed transport=.. peer=.. key_id=.. reason=..``) and a
count in ``engram_auth_failures_total``; the key itself is never logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable

from engram.common import metrics
from engram.common.keys import KeyEntry, KeyRejected, KeyRing
from engram.common.settings import SecuritySettings
from engram.contract.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from engram.v1 import streaming_pb2 as pb

audit = logging.getLogger("engram.audit")

# Which scope action each operation needs (admin: dropping a space, setting its retention).
READ, WRITE, ADMIN = "read", "write", "admin"


class RateBucket:
    """A per-key budget of ``rate`` per second (bursts up to one second's worth) that never
    waits: :meth:`take` says how long until the request would fit instead."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._at = time.monotonic()

    def take(self, n: int) -> int:
        """0 if ``n`` was taken, else the milliseconds until it can be (nothing taken).

        A request larger than a second's budget is taken once the bucket is full (the debt
        is paid before the next one), so no batch size is refused for ever."""
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        need = min(float(n), float(self.rate))
        if self._tokens >= need:
            self._tokens -= n
            return 0
        return max(1, int((need - self._tokens) * 1000 / self.rate + 0.999))


class Principal:
    """One API key on this gateway: what it may do, its budgets, whether it still holds."""

    def __init__(self, entry: KeyEntry | None, max_obs: int = 0, max_recalls: int = 0) -> None:
        self.key_id = entry.id if entry else ""
        self.ended = ""  # why the key stopped being accepted (revoked, removed), "" while ok
        self.entry: KeyEntry | None = None  # None: OPEN (authentication off)
        self._expires: float | None = None
        self.observations: RateBucket | None = None
        self.recalls: RateBucket | None = None
        self.update(entry, max_obs, max_recalls)

    def update(self, entry: KeyEntry | None, max_obs: int, max_recalls: int) -> None:
        """The key's entry as the file now says (a reload); buckets keep their tokens when
        their rate is unchanged."""
        self.entry = entry
        self._expires = entry.expires.timestamp() if entry and entry.expires else None
        self.observations = _rebucket(self.observations, max_obs)
        self.recalls = _rebucket(self.recalls, max_recalls)

    def allows(self, action: str, space: str) -> bool:
        return self.entry is None or self.entry.allows(action, space)

    def problem(self) -> str:
        """Why streams of this key must end now ("" when the key still holds)."""
        if self.ended:
            return self.ended
        if self._expires is not None and time.time() >= self._expires:
            return "expired"
        return ""

    def describe(self) -> str:
        return f"API key {self.key_id}" if self.key_id else "this client"


def _rebucket(bucket: RateBucket | None, rate: int) -> RateBucket | None:
    if rate <= 0:
        return None
    if bucket is not None and bucket.rate == rate:
        return bucket
    return RateBucket(rate)


OPEN = Principal(None)


def require(principal: Principal, action: str, space: str) -> None:
    """PermissionDeniedError naming the space and the action when the key lacks the scope."""
    if not principal.allows(action, space):
        raise PermissionDeniedError(
            f"{principal.describe()} has no '{action}' scope for memory space {space!r}"
        )


def take_observations(principal: Principal, n: int) -> RateLimitedError | None:
    """None if ``n`` observations fit the key's budget now, else the error to answer with."""
    bucket = principal.observations
    if bucket is None:
        return None
    wait_ms = bucket.take(n)
    if not wait_ms:
        return None
    metrics.key_rate_limited_total.labels(principal.key_id, "observations").inc()
    return RateLimitedError(
        f"{principal.describe()} is over its limit of {bucket.rate} observations/s "
        f"on this gateway: resend after {wait_ms} ms",
        retry_after_ms=wait_ms,
    )


def take_recall(principal: Principal) -> None:
    """RateLimitedError when the key is over its recalls/s budget."""
    bucket = principal.recalls
    if bucket is None:
        return
    wait_ms = bucket.take(1)
    if wait_ms:
        metrics.key_rate_limited_total.labels(principal.key_id, "recalls").inc()
        raise RateLimitedError(
            f"{principal.describe()} is over its limit of {bucket.rate} recalls/s "
            f"on this gateway: retry after {wait_ms} ms",
            retry_after_ms=wait_ms,
        )


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an ``authorization`` header or metadata entry: None if there is none, ""
    when it is not ``Bearer <key>`` (refused as malformed)."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, key = text.strip().partition(" ")
        return key.strip() if scheme.lower() == "bearer" else ""
    return None


def audit_failure(transport: str, peer: str, reason: str, key_id: str = "") -> None:
    metrics.auth_failures_total.labels(transport, reason).inc()
    audit.warning(
        "audit event=auth_failed transport=%s peer=%s key_id=%s reason=%s",
        transport,
        peer or "-",
        key_id or "-",
        reason,
    )


class Authenticator:
    """Turns presented keys into principals; off (no keyring) it hands out :data:`OPEN`."""

    def __init__(self, security: SecuritySettings | None = None, ring: KeyRing | None = None):
        self.ring = ring
        self.default_obs = security.key_max_observations_per_s if security else 0
        self.default_recalls = security.key_max_recalls_per_s if security else 0
        self._principals: dict[str, Principal] = {}
        if ring is not None:
            ring.on_reload = self.reloaded

    @property
    def enabled(self) -> bool:
        return self.ring is not None

    def unauthenticated(self) -> Principal | None:
        """A stream's principal before it presents a key: OPEN when auth is off, else None."""
        return None if self.enabled else OPEN

    def authenticate(self, presented: str | None, transport: str, peer: str) -> Principal:
        """The key's principal, or AuthenticationError (audited) saying why not."""
        if self.ring is None:
            return OPEN
        if presented is None:
            audit_failure(transport, peer, "missing")
            raise AuthenticationError(
                "an API key is required: send 'authorization: Bearer <key>' "
                "(or the init message's api_key)"
            )
        try:
            entry = self.ring.verify(presented, dt.datetime.now(dt.UTC))
        except KeyRejected as exc:
            audit_failure(transport, peer, exc.reason, exc.key_id)
            raise AuthenticationError(exc.message) from None
        principal = self._principals.get(entry.id)
        if principal is None:
            principal = Principal(entry, *self._limits(entry))
            self._principals[entry.id] = principal
        return principal

    def first_message(
        self, msg: pb.ObservationRequest | None, size: int, limit: int, transport: str, peer: str
    ) -> Principal:
        """A stream that sent no header key authenticates with its first message, an init
        carrying ``api_key`` of at most ``limit`` bytes (ENGRAM_PREAUTH_MAX_BYTES)."""
        if size > limit:
            audit_failure(transport, peer, "too_large")
            raise AuthenticationError(
                f"a message of {size} bytes arrived before authentication; "
                f"until the stream authenticates the limit is {limit} bytes"
            )
        if msg is None or msg.WhichOneof("operation") != "init":
            audit_failure(transport, peer, "missing")
            raise AuthenticationError(
                "an API key is required: send 'authorization: Bearer <key>', or open the "
                "stream with an init message carrying api_key"
            )
        return self.authenticate(msg.init.api_key or None, transport, peer)

    def _limits(self, entry: KeyEntry) -> tuple[int, int]:
        return (
            entry.max_observations_per_s or self.default_obs,
            entry.max_recalls_per_s or self.default_recalls,
        )

    def reloaded(self, keys: dict[str, KeyEntry]) -> None:
        """The keys file changed: streams of revoked, expired or removed keys end at their next
        message; a changed key's scopes and limits apply at once to its open streams too."""
        for key_id, principal in list(self._principals.items()):
            entry = keys.get(key_id)
            state = "removed" if entry is None else entry.state()
            if entry is None or state != "active":
                principal.ended = state
                del self._principals[key_id]
            elif entry != principal.entry:
                principal.update(entry, *self._limits(entry))
