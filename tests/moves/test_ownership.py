"""The shard's ownership file: durable states, legacy directories, atomic rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engram.contract.errors import StorageError
from engram.shard.ownership import FENCED, MOVED, OWNED, Owner, Ownership


def test_legacy_directories_are_owned_at_epoch_zero(tmp_path: Path) -> None:
    own = Ownership(tmp_path)
    own.load(["a-space", "b-space"])
    assert own.get("a-space") == Owner(OWNED, 0)
    assert own.claimed() == {"a-space": 0, "b-space": 0}
    assert json.loads((tmp_path / "owners.json").read_text())["spaces"]["b-space"]["epoch"] == 0


def test_changes_survive_a_reload(tmp_path: Path) -> None:
    own = Ownership(tmp_path)
    own.load(["x-space"])
    own.set("x-space", own.get("x-space").fenced("m1", target=3))  # type: ignore[union-attr]
    own.set("y-space", Owner(OWNED, 4))
    again = Ownership(tmp_path)
    again.load(["x-space", "y-space"])
    assert again.get("x-space") == Owner(FENCED, 0, "m1", 3)
    assert again.get("y-space") == Owner(OWNED, 4)
    assert again.claimed() == {"x-space": 0, "y-space": 4}
    again.set("x-space", Owner(MOVED, 1, peer=3))
    third = Ownership(tmp_path)
    third.load([])
    assert third.get("x-space") == Owner(MOVED, 1, peer=3)
    assert "x-space" not in third.claimed()


def test_a_torn_temporary_file_is_ignored(tmp_path: Path) -> None:
    own = Ownership(tmp_path)
    own.load(["a-space"])
    (tmp_path / "owners.json.tmp").write_text('{"version": 1, "spa')  # a crash mid-write
    again = Ownership(tmp_path)
    again.load([])
    assert again.get("a-space") == Owner(OWNED, 0)


def test_a_corrupt_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "owners.json").write_text("{not json")
    with pytest.raises(StorageError, match="owners.json"):
        Ownership(tmp_path).load([])


def test_bad_states_and_epochs_are_refused() -> None:
    with pytest.raises(ValueError, match="state"):
        Owner("lost", 1)
    with pytest.raises(ValueError, match="epoch"):
        Owner(OWNED, -1)
