"""API keys: the keys file, scopes, and the keyring a gateway checks presented keys against.

A key is ``ek_<id>_<secret>``: ``id`` is 12 lowercase hex characters (it names the key in
lists, logs and metrics), ``secret`` 43 characters of URL-safe base64 (32 random bytes). The
plaintext exists once, when :func:`create_key` makes it; the file keeps only the SHA-256 of
the whole key::

    {"version": 1, "keys": [{"id": "3f9a1c0b7d2e", "name": "team-a ingest", "sha256": "<hex>",
      "scopes": ["write:team-a-*", "read:team-a-*"], "created": "2026-12-05T21:00:00Z",
      "expires": null, "revoked": null, "max_observations_per_s": 0, "max_recalls_per_s": 0}]}

A scope is ``ACTION:PATTERN``: ``read`` (recall, list), ``write`` (observations) or ``admin``
(both, and administrative calls); the pattern is a memory space id, a prefix ending in ``*``,
or ``*`` (every space). Limits of 0 mean "the gateway's default" (``ENGRAM_KEY_MAX_*``).

Lifecycle: ``engram keys`` (:mod:`engram.keys_cli`) loads the file with :func:`load_keys`,
changes it and writes it back with :func:`save_keys` (a temporary file renamed over the old
one, mode 0600, so a reader sees the old or the new file, never half of one). A gateway holds a
:class:`KeyRing`: loaded at start (a bad file stops the start), then read again every
``ENGRAM_KEYS_RELOAD_S``. A Kubernetes Secret mount replaces the file by swapping a symlink,
so the ring compares the content, not the modification time; a new file that does not load
is logged and the previous keys stay in force. Checking a presented key costs one dict lookup
by id and one SHA-256, compared in constant time (:meth:`KeyRing.verify`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

audit = logging.getLogger("engram.audit")
log = logging.getLogger("engram.keys")

VERSION = 1
ACTIONS = ("read", "write", "admin")
_KEY = re.compile(r"ek_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[0-9a-f]{12}")
_SPACE = re.compile(r"[a-z0-9_-]{3,64}")
_PREFIX = re.compile(r"[a-z0-9_-]{0,63}\*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset(
    {
        "id",
        "name",
        "sha256",
        "scopes",
        "created",
        "expires",
        "revoked",
        "max_observations_per_s",
        "max_recalls_per_s",
    }
)


class KeysFileError(Exception):
    """The keys file cannot be read or is not valid; the message names the entry and field."""


class KeyRejected(Exception):
    """A presented key is not accepted. ``reason``: malformed, unknown, revoked or expired;
    ``key_id``: the id when the key parsed (for the audit log), else empty."""

    def __init__(self, reason: str, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.key_id = key_id


# ------------------------------------------------------------------------------ scopes


@dataclass(frozen=True)
class Scope:
    action: str  # read | write | admin
    pattern: str  # a space id, a prefix ending in "*", or "*"

    def covers(self, action: str, space: str) -> bool:
        if self.action != action and self.action != "admin":
            return False
        if self.pattern.endswith("*"):
            return space.startswith(self.pattern[:-1])
        return space == self.pattern

    def __str__(self) -> str:
        return f"{self.action}:{self.pattern}"


def parse_scope(text: str) -> Scope:
    """``read:team-a-*`` -> Scope; ValueError says what is wrong and what is allowed."""
    action, sep, pattern = text.strip().partition(":")
    if not sep:
        raise ValueError(f"scope {text!r} is not ACTION:PATTERN (e.g. read:team-a-*)")
    if action not in ACTIONS:
        raise ValueError(f"scope {text!r}: action {action!r} is not one of {', '.join(ACTIONS)}")
    if not (_SPACE.fullmatch(pattern) or _PREFIX.fullmatch(pattern)):
        raise ValueError(
            f"scope {text!r}: pattern {pattern!r} is not a memory space id ([a-z0-9_-]{{3,64}}), "
            "a prefix ending in '*' (team-a-*), or '*'"
        )
    return Scope(action, pattern)


# ------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class KeyEntry:
    """One key of the file (never its plaintext)."""

    id: str
    name: str
    sha256: str
    scopes: tuple[Scope, ...]
    created: dt.datetime
    expires: dt.datetime | None = None
    revoked: dt.datetime | None = None
    max_observations_per_s: int = 0  # 0: the gateway's default
    max_recalls_per_s: int = 0

    def allows(self, action: str, space: str) -> bool:
        return any(s.covers(action, space) for s in self.scopes)

    def state(self, now: dt.datetime | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and (now or _now()) >= self.expires:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "sha256": self.sha256,
            "scopes": [str(s) for s in self.scopes],
            "created": format_time(self.created),
            "expires": format_time(self.expires) if self.expires else None,
            "revoked": format_time(self.revoked) if self.revoked else None,
            "max_observations_per_s": self.max_observations_per_s,
            "max_recalls_per_s": self.max_recalls_per_s,
        }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """RFC 3339 (``2026-12-05T21:00:00Z`` or with an offset) -> an aware UTC datetime."""
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2026-12-05T21:00:00Z)") from None
    if t.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (end it with Z for UTC)")
    return t.astimezone(dt.UTC)


def _entry(raw: object, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where} is not a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    key_id = raw.get("id")
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise KeysFileError(f"{where}: 'id' must be 12 lowercase hex characters, got {key_id!r}")
    where = f"{where} (id {key_id})"
    sha = raw.get("sha256")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise KeysFileError(f"{where}: 'sha256' must be 64 lowercase hex characters")
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise KeysFileError(f"{where}: 'name' must be a string")
    scopes_raw = raw.get("scopes")
    if not isinstance(scopes_raw, list) or not scopes_raw:
        raise KeysFileError(f"{where}: 'scopes' must be a non-empty list of ACTION:PATTERN")
    scopes = []
    for s in scopes_raw:
        if not isinstance(s, str):
            raise KeysFileError(f"{where}: scope {s!r} is not a string")
        try:
            scopes.append(parse_scope(s))
        except ValueError as exc:
            raise KeysFileError(f"{where}: {exc}") from None
    times: dict[str, dt.datetime | None] = {}
    for field in ("created", "expires", "revoked"):
        value = raw.get(field)
        if value is None and field != "created":
            times[field] = None
            continue
        if not isinstance(value, str):
            raise KeysFileError(f"{where}: '{field}' must be an RFC 3339 UTC time or null")
        try:
            times[field] = parse_time(value)
        except ValueError as exc:
            raise KeysFileError(f"{where}: '{field}': {exc}") from None
    limits = {}
    for field in ("max_observations_per_s", "max_recalls_per_s"):
        value = raw.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KeysFileError(f"{where}: '{field}' must be an integer >= 0 (0: the default)")
        limits[field] = value
    created = times["created"]
    assert created is not None
    return KeyEntry(
        key_id,
        name,
        sha,
        tuple(scopes),
        created,
        times["expires"],
        times["revoked"],
        limits["max_observations_per_s"],
        limits["max_recalls_per_s"],
    )


def parse_keys(text: str, source: str = "keys file") -> dict[str, KeyEntry]:
    """The entries of a keys file's text, by id; KeysFileError names what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise KeysFileError(f'{source}: expected {{"version": {VERSION}, "keys": [...]}}')
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise KeysFileError(f"{source}: 'keys' must be a list")
    out: dict[str, KeyEntry] = {}
    for i, raw in enumerate(keys):
        entry = _entry(raw, f"{source}: keys[{i}]")
        if entry.id in out:
            raise KeysFileError(f"{source}: keys[{i}]: id {entry.id} appears twice")
        out[entry.id] = entry
    return out


def load_keys(path: str | Path, *, missing_ok: bool = False) -> dict[str, KeyEntry]:
    """The keys of ``path`` by id (``missing_ok``: an absent file has none)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise KeysFileError(
            f"keys file {p} does not exist (create one: engram keys create)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"keys file {p} cannot be read: {exc}") from None
    return parse_keys(text, f"keys file {p}")


def dump_keys(keys: Iterable[KeyEntry]) -> str:
    doc = {"version": VERSION, "keys": [k.to_json() for k in keys]}
    return json.dumps(doc, indent=2) + "\n"


def save_keys(path: str | Path, keys: Mapping[str, KeyEntry]) -> None:
    """Writes the file atomically (temporary file, fsync, rename), readable by its owner only."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_keys(keys.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dirfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    scopes: Iterable[Scope],
    *,
    name: str = "",
    expires: dt.datetime | None = None,
    max_observations_per_s: int = 0,
    max_recalls_per_s: int = 0,
    taken: Iterable[str] = (),
) -> tuple[str, KeyEntry]:
    """A new key: (the plaintext, shown once; the entry to store). ``taken``: ids in use."""
    scopes = tuple(scopes)
    if not scopes:
        raise ValueError("a key needs at least one scope (e.g. --scope read:team-a-*)")
    used = set(taken)
    key_id = secrets.token_hex(6)
    while key_id in used:
        key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    plaintext = f"ek_{key_id}_{secret}"
    entry = KeyEntry(
        key_id,
        name,
        key_hash(plaintext),
        scopes,
        _now(),
        expires.astimezone(dt.UTC) if expires else None,
        None,
        max_observations_per_s,
        max_recalls_per_s,
    )
    return plaintext, entry


def revoke(keys: Mapping[str, KeyEntry], key_id: str) -> dict[str, KeyEntry]:
    """The keys with ``key_id`` revoked now (KeyError if there is no such key)."""
    entry = keys[key_id]
    out = dict(keys)
    if entry.revoked is None:
        out[key_id] = replace(entry, revoked=_now())
    return out


def key_id_of(presented: str) -> str | None:
    """The id of a well-formed key, else None."""
    m = _KEY.fullmatch(presented)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------ keyring

Reloaded = Callable[[dict[str, KeyEntry]], None]


class KeyRing:
    """The keys a gateway accepts, reloaded from the file when its content changes."""

    def __init__(self, path: str | Path, reload_s: float, on_reload: Reloaded | None = None):
        self.path = Path(path)
        self.reload_s = reload_s
        self.on_reload = on_reload
        self.keys: dict[str, KeyEntry] = {}
        self._digest = b""
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """First load: raises KeysFileError (the caller refuses to start)."""
        data = self._read()
        self.keys = parse_keys(data.decode("utf-8", "replace"), f"keys file {self.path}")
        self._digest = hashlib.sha256(data).digest()
        log.info("loaded %d API key(s) from %s", len(self.keys), self.path)

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise KeysFileError(f"keys file {self.path} cannot be read: {exc}") from None

    def check(self) -> bool:
        """Reads the file again; applies it if its content changed and it is valid (True)."""
        try:
            data = self._read()
        except KeysFileError as exc:
            log.error("%s; keeping the %d key(s) loaded before", exc, len(self.keys))
            return False
        return self._apply(data)

    def _apply(self, data: bytes) -> bool:
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        try:
            keys = parse_keys(data.decode("utf-8", "replace"), f"keys file {self.path}")
        except KeysFileError as exc:
            log.error("%s; keeping the %d key(s) loaded before", exc, len(self.keys))
            self._digest = digest  # reported once, not every poll
            return False
        old, self.keys, self._digest = self.keys, keys, digest
        audit.info("audit event=keys_reloaded path=%s %s", self.path, describe_changes(old, keys))
        if self.on_reload is not None:
            self.on_reload(keys)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.reload_s)
            try:
                data = await asyncio.to_thread(self._read)  # a slow volume must not stall
            except KeysFileError as exc:
                log.error("%s; keeping the %d key(s) loaded before", exc, len(self.keys))
                continue
            try:
                self._apply(data)
            except Exception:
                log.exception("checking keys file %s failed", self.path)

    def verify(self, presented: str, now: dt.datetime | None = None) -> KeyEntry:
        """The entry of an accepted key, else KeyRejected (one lookup, one SHA-256)."""
        m = _KEY.fullmatch(presented)
        if m is None:
            raise KeyRejected("malformed", "the API key is not of the form ek_<id>_<secret>")
        key_id = m.group(1)
        entry = self.keys.get(key_id)
        digest = hashlib.sha256(presented.encode()).hexdigest()
        if entry is None or not hmac.compare_digest(digest, entry.sha256):
            raise KeyRejected("unknown", f"API key {key_id} is not known", key_id)
        state = entry.state(now)
        if state != "active":
            raise KeyRejected(state, f"API key {key_id} is {state}", key_id)
        return entry


def describe_changes(old: Mapping[str, KeyEntry], new: Mapping[str, KeyEntry]) -> str:
    """``keys=N added=a,b removed=c revoked=d changed=e`` (ids only)."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    revoked = sorted(
        i for i in set(old) & set(new) if old[i].revoked is None and new[i].revoked is not None
    )
    changed = sorted(i for i in set(old) & set(new) if old[i] != new[i] and i not in revoked)
    parts = [f"keys={len(new)}"]
    for label, ids in (("added", added), ("removed", removed), ("revoked", revoked)):
        parts.append(f"{label}={','.join(ids) or '-'}")
    parts.append(f"changed={','.join(changed) or '-'}")
    return " ".join(parts)
