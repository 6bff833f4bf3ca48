"""The keys file and the keyring (engram.common.keys), and the gateway's per-key principals and
buckets (engram.gateway.auth), without processes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from engram.common import keys
from engram.common.keys import KeyRejected, KeyRing, KeysFileError
from engram.common.settings import SecuritySettings
from engram.contract.errors import AuthenticationError, PermissionDeniedError
from engram.gateway import auth

NOW = dt.datetime(2026, 12, 5, 21, 0, tzinfo=dt.UTC)


def scopes(*texts: str) -> list[keys.Scope]:
    return [keys.parse_scope(t) for t in texts]


def write(path: Path, *entries: keys.KeyEntry) -> None:
    keys.save_keys(path, {e.id: e for e in entries})


# ------------------------------------------------------------------------------ scopes


def test_scopes_match_by_action_and_pattern() -> None:
    prefix = keys.parse_scope("read:team-a-*")
    assert prefix.covers("read", "team-a-1")
    assert not prefix.covers("read", "team-b-1")
    assert not prefix.covers("write", "team-a-1")
    exact = keys.parse_scope("write:team-a-x")
    assert exact.covers("write", "team-a-x") and not exact.covers("write", "team-a-xy")
    admin = keys.parse_scope("admin:*")
    assert admin.covers("read", "anything") and admin.covers("write", "anything")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("read", "ACTION:PATTERN"),
        ("delete:team-a", "not one of read, write, admin"),
        ("read:Team-A", "not a memory space id"),
        ("read:ab", "not a memory space id"),
        ("read:a*b", "not a memory space id"),
    ],
)
def test_bad_scopes_say_what_is_allowed(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        keys.parse_scope(text)


# ------------------------------------------------------------------------------ the file


def test_created_key_is_stored_hashed_0600_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    plaintext, entry = keys.create_key(scopes("write:team-a-*"), name="ingest")
    assert keys.key_id_of(plaintext) == entry.id
    assert plaintext.startswith(f"ek_{entry.id}_") and len(plaintext) == 3 + 12 + 1 + 43
    write(path, entry)
    text = path.read_text()
    assert plaintext not in text and plaintext.split("_", 2)[2] not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "keys.json"], "a temporary file remains"
    loaded = keys.load_keys(path)
    assert loaded == {entry.id: entry}
    ring = KeyRing(path, 1.0)
    ring.load()
    assert ring.verify(plaintext) == entry


def test_verify_says_why_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    good, entry = keys.create_key(scopes("read:*"))
    old, expired = keys.create_key(scopes("read:*"), expires=NOW - dt.timedelta(days=1))
    gone, revoked = keys.create_key(scopes("read:*"))
    write(path, entry, expired, revoked)
    keys.save_keys(path, keys.revoke(keys.load_keys(path), revoked.id))
    ring = KeyRing(path, 1.0)
    ring.load()

    def reason(presented: str) -> tuple[str, str]:
        with pytest.raises(KeyRejected) as info:
            ring.verify(presented, NOW)
        return info.value.reason, info.value.key_id

    assert reason("not-a-key") == ("malformed", "")
    assert reason(good[:-1] + ("A" if good[-1] != "A" else "B")) == ("unknown", entry.id)
    assert reason("ek_000000000000_" + "A" * 43) == ("unknown", "000000000000")
    assert reason(old) == ("expired", expired.id)
    assert reason(gone) == ("revoked", revoked.id)
    assert ring.verify(good, NOW).id == entry.id


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda d: d.update(version=2), '"version": 1'),
        (lambda d: d["keys"][1].update(id="XYZ"), r"keys\[1\]: 'id' must be 12 lowercase hex"),
        (lambda d: d["keys"][1].update(sha256="00"), r"keys\[1\] \(id [0-9a-f]{12}\): 'sha256'"),
        (lambda d: d["keys"][1].update(scopes=["read:*", "root:*"]), "action 'root'"),
        (lambda d: d["keys"][1].update(scopes=[]), "'scopes' must be a non-empty list"),
        (lambda d: d["keys"][1].update(expires="tomorrow"), "'expires': 'tomorrow' is not"),
        (lambda d: d["keys"][1].update(max_recalls_per_s=-1), "'max_recalls_per_s' must be"),
        (lambda d: d["keys"][1].update(owner="x"), r"unknown field\(s\) owner"),
        (lambda d: d["keys"].append(dict(d["keys"][0])), r"keys\[2\]: id [0-9a-f]{12} appears"),
    ],
)
def test_invalid_files_name_the_entry_and_field(tmp_path: Path, mutate, says: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys.json"
    write(path, keys.create_key(scopes("read:*"))[1], keys.create_key(scopes("read:*"))[1])
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysFileError, match=says):
        keys.load_keys(path)


def test_missing_or_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="does not exist"):
        keys.load_keys(tmp_path / "none.json")
    assert keys.load_keys(tmp_path / "none.json", missing_ok=True) == {}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KeysFileError, match="bad.json is not valid JSON"):
        keys.load_keys(tmp_path / "bad.json")


# ------------------------------------------------------------------------------ reloads


def test_ring_follows_a_secret_mount_symlink_swap_and_keeps_keys_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes updates a Secret volume by pointing ``..data`` at a new directory; the file's
    own mtime may not change in a way that tells, so the ring compares the content."""
    caplog.set_level(logging.INFO, logger="engram.audit")
    first_key, first = keys.create_key(scopes("read:*"))
    second_key, second = keys.create_key(scopes("read:*"))
    v1, v2, v3 = tmp_path / "v1", tmp_path / "v2", tmp_path / "v3"
    for d in (v1, v2, v3):
        d.mkdir()
    write(v1 / "keys.json", first)
    write(v2 / "keys.json", first, second)
    (v3 / "keys.json").write_text('{"version": 1, "keys": [{"id": "oops"}]}')
    for d in (v1, v2, v3):  # same mtime everywhere: only the content differs
        os.utime(d / "keys.json", ns=(1_000_000_000, 1_000_000_000))
    data = tmp_path / "..data"
    data.symlink_to(v1)
    (tmp_path / "keys.json").symlink_to(data / "keys.json")

    seen: list[set[str]] = []
    ring = KeyRing(tmp_path / "keys.json", 1.0, on_reload=lambda k: seen.append(set(k)))
    ring.load()
    assert not ring.check(), "no change, no reload"
    with pytest.raises(KeyRejected):
        ring.verify(second_key)

    def swap(to: Path) -> None:
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to(to)
        os.replace(tmp, data)

    swap(v2)
    assert ring.check()
    assert ring.verify(second_key).id == second.id and seen == [{first.id, second.id}]
    assert "audit event=keys_reloaded" in caplog.text and f"added={second.id}" in caplog.text

    swap(v3)  # a bad file: logged, the keys before it stay in force
    assert not ring.check()
    assert ring.verify(first_key).id == first.id and ring.verify(second_key).id == second.id
    assert "keeping the 2 key(s) loaded before" in caplog.text
    assert first_key not in caplog.text and first.sha256 not in caplog.text


# ------------------------------------------------------------------------------ principals


def test_authenticator_principals_scopes_and_revocation(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, entry = keys.create_key(scopes("write:team-a-*"), max_recalls_per_s=3)
    write(path, entry)
    ring = KeyRing(path, 1.0)
    ring.load()
    gate = auth.Authenticator(SecuritySettings(key_max_observations_per_s=50), ring)
    p = gate.authenticate(key, "grpc", "peer")
    assert gate.authenticate(key, "grpc", "peer") is p, "one principal per key, shared"
    assert p.observations is not None and p.observations.rate == 50  # the default
    assert p.recalls is not None and p.recalls.rate == 3  # the key's own
    auth.require(p, auth.WRITE, "team-a-1")
    with pytest.raises(PermissionDeniedError, match="no 'read' scope for memory space 'team-a-1'"):
        auth.require(p, auth.READ, "team-a-1")
    with pytest.raises(AuthenticationError, match="required"):
        gate.authenticate(None, "grpc", "peer")

    keys.save_keys(path, keys.revoke(keys.load_keys(path), entry.id))
    assert ring.check()
    assert p.problem() == "revoked", "open streams of the key learn it at their next message"
    with pytest.raises(AuthenticationError, match="revoked"):
        gate.authenticate(key, "grpc", "peer")


def test_open_principal_when_auth_is_off() -> None:
    gate = auth.Authenticator()
    assert not gate.enabled and gate.unauthenticated() is auth.OPEN
    auth.require(auth.OPEN, auth.WRITE, "any-space")
    assert auth.take_observations(auth.OPEN, 10**9) is None


def test_rate_bucket_never_waits_and_says_how_long() -> None:
    bucket = auth.RateBucket(100)
    assert bucket.take(100) == 0
    wait_ms = bucket.take(50)
    assert 0 < wait_ms <= 500, wait_ms  # at most 50 tokens missing at 100/s
    big = auth.RateBucket(10)
    assert big.take(25) == 0, "a batch over a second's budget is taken from a full bucket"
    assert big.take(1) > 0
