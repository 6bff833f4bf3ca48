"""Which memory spaces this shard owns, at which epoch: durable, beside the spaces.

The file ``<data_dir>/owners.json`` is the shard's own record of ownership; Redis only holds a
copy for routing, which shards publish again after Redis lost it. Each space this shard has
ever held has one entry::

    OWNED     epoch              serves reads and writes
    INCOMING  epoch, move, peer  a copy a move is filling (peer: the source); serves nothing.
                                 A shard that restarts discards it: the move did not commit
    FENCED    epoch, move, peer  moving out to peer: no write is acknowledged, reads are served.
                                 The move commits on the target (which then owns the space at
                                 epoch + 1) or is aborted; a restarted shard asks the target
    MOVED     epoch, peer        moved out; peer owns the space since ``epoch``. Kept for good
                                 (a few bytes), so that a Redis restarted empty, which routes by
                                 the default hash, cannot make this shard create the space again

An epoch only grows: the target of a move owns the space at the source's epoch + 1. Where two
shards claim a space, the higher epoch wins. A directory with no entry (a data directory from
before ownership was recorded) is OWNED at epoch 0.

Every change is written to a temporary file, fsynced and renamed over the old one, then the
directory is fsynced: a crash leaves the old or the new file, never a mix. The shard's event
loop reads it; changes go through :meth:`Ownership.set` (blocking: call it in a thread).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from engram.contract.errors import StorageError

FILE = "owners.json"
VERSION = 1

OWNED = "owned"
INCOMING = "incoming"
FENCED = "fenced"
MOVED = "moved"
STATES = (OWNED, INCOMING, FENCED, MOVED)


@dataclass(frozen=True)
class Owner:
    state: str
    epoch: int
    # The move in progress (INCOMING, FENCED).
    move_id: str = ""
    # INCOMING: the source; FENCED: the target; MOVED: the new owner.
    peer: int = -1

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown ownership state {self.state!r}")
        if self.epoch < 0:
            raise ValueError(f"epoch must not be negative, got {self.epoch}")

    @property
    def holds_data(self) -> bool:
        """Whether the space's directory here is (or may be) in use."""
        return self.state in (OWNED, FENCED, INCOMING)

    @property
    def claims(self) -> bool:
        """Whether this shard is the owner of record (OWNED, or FENCED until the move ends)."""
        return self.state in (OWNED, FENCED)

    def fenced(self, move_id: str, target: int) -> Owner:
        return replace(self, state=FENCED, move_id=move_id, peer=target)

    def unfenced(self) -> Owner:
        return Owner(OWNED, self.epoch)


class Ownership:
    """The shard's ownership file, loaded once and rewritten whole on every change."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE
        self._owners: dict[str, Owner] = {}
        self._lock = threading.Lock()  # writers: one change at a time, in order

    def load(self, directories: Iterable[str] = ()) -> None:
        """Reads the file; each of ``directories`` (spaces found on disk) with no entry is
        recorded as OWNED at epoch 0."""
        owners: dict[str, Owner] = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {"version": VERSION, "spaces": {}}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from exc
        if data.get("version") != VERSION:
            raise StorageError(f"{self.path}: unknown version {data.get('version')!r}")
        for name, entry in data.get("spaces", {}).items():
            owners[name] = Owner(**entry)
        missing = [d for d in directories if d not in owners]
        for name in missing:
            owners[name] = Owner(OWNED, 0)
        self._owners = owners
        if missing or not self.path.exists():
            self._write(owners)

    def get(self, name: str) -> Owner | None:
        return self._owners.get(name)

    def items(self) -> list[tuple[str, Owner]]:
        return sorted(self._owners.items())

    def claimed(self) -> dict[str, int]:
        """Spaces this shard is the owner of record for, with their epochs (for routing)."""
        return {name: o.epoch for name, o in self._owners.items() if o.claims}

    def set(self, name: str, owner: Owner | None) -> None:
        """Records ``owner`` for ``name`` (None: forget it) durably; blocking."""
        with self._lock:
            owners = dict(self._owners)
            if owner is None:
                owners.pop(name, None)
            else:
                owners[name] = owner
            self._write(owners)
            self._owners = owners

    def _write(self, owners: dict[str, Owner]) -> None:
        data = {"version": VERSION, "spaces": {n: asdict(o) for n, o in sorted(owners.items())}}
        tmp = self.path.with_suffix(".json.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot record ownership in {self.path}: {exc}") from exc
