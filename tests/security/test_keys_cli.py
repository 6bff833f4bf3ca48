"""``engram keys create|list|revoke`` (engram.keys_cli), run in-process."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from engram.cli import main as engram_main
from engram.common import keys
from engram.common.keys import KeyRing


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = engram_main(["keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engram.audit")
    path = tmp_path / "secrets" / "keys.json"
    code, out, err = run(
        capsys,
        "create",
        "--keys-file",
        str(path),
        "--scope",
        "read:team-a-*",
        "--scope",
        "write:team-a-ingest",
        "--name",
        "team-a ingest",
        "--expires-in",
        "30d",
        "--max-observations-per-s",
        "5000",
    )
    assert code == 0, err
    key = out.strip()
    assert out.count("\n") == 1 and key.startswith("ek_"), "stdout holds the key and only it"
    assert "authorization: Bearer" in err and "only time" in err
    key_id = keys.key_id_of(key)
    assert key_id is not None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key not in path.read_text()
    ring = KeyRing(path, 1.0)
    ring.load()
    entry = ring.verify(key)
    assert entry.name == "team-a ingest" and entry.max_observations_per_s == 5000
    assert entry.allows("write", "team-a-ingest") and not entry.allows("write", "team-a-other")
    assert entry.expires is not None
    assert f"audit event=key_created key_id={key_id}" in caplog.text
    assert key not in caplog.text and entry.sha256 not in caplog.text

    # a second key goes into the same file
    code, out2, _ = run(capsys, "create", "--keys-file", str(path), "--scope", "admin:*")
    assert code == 0 and len(keys.load_keys(path)) == 2

    code, out, _ = run(capsys, "list", "--keys-file", str(path), "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows[key_id]["state"] == "active" and rows[key_id]["scopes"] == [
        "read:team-a-*",
        "write:team-a-ingest",
    ]
    assert all("sha256" not in r for r in rows.values())
    code, out, _ = run(capsys, "list", "--keys-file", str(path))
    assert code == 0 and key_id in out and "team-a ingest" in out and entry.sha256 not in out

    code, _, err = run(capsys, "revoke", "--keys-file", str(path), key_id)
    assert code == 0 and "revoked" in err
    assert f"audit event=key_revoked key_id={key_id}" in caplog.text
    code, out, _ = run(capsys, "list", "--keys-file", str(path), "--json")
    assert {r["id"]: r["state"] for r in json.loads(out)}[key_id] == "revoked"
    ring.check()
    with pytest.raises(keys.KeyRejected, match="revoked"):
        ring.verify(key)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["create", "--scope", "read"], "is not ACTION:PATTERN"),
        (["create", "--scope", "delete:team-a"], "action 'delete' is not one of"),
        (["create", "--scope", "read:Team_A"], "is not a memory space id"),
        (["create", "--scope", "read:*", "--expires-in", "soon"], "--expires-in 'soon'"),
        (["create", "--scope", "read:*", "--expires", "2001-01-01T00:00:00Z"], "in the past"),
        (["create", "--scope", "read:*", "--expires", "yesterday"], "not an RFC 3339 time"),
        (["create", "--scope", "read:*", "--max-recalls-per-s", "-1"], "must be >= 0"),
        (["revoke", "0123456789ab"], "no key '0123456789ab'"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    path = tmp_path / "keys.json"
    keys.save_keys(path, {})
    before = path.read_bytes()
    code, out, err = run(capsys, *argv[:1], "--keys-file", str(path), *argv[1:])
    assert code == 2 and says in err, err
    assert out == "" and path.read_bytes() == before, "nothing was written"


def test_a_broken_keys_file_is_named_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"version": 1, "keys": [{"id": "nothex"}]}')
    for argv in (["list"], ["create", "--scope", "read:*"], ["revoke", "0123456789ab"]):
        code, out, err = run(capsys, argv[0], "--keys-file", str(path), *argv[1:])
        assert code == 2 and "keys[0]: 'id' must be 12 lowercase hex" in err and out == ""
    assert "nothex" in path.read_text()
    code, _, err = run(capsys, "list", "--keys-file", str(tmp_path / "absent.json"))
    assert code == 2 and "does not exist" in err
