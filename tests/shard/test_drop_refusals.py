"""What a shard's drop refuses (engram.shard.drop.Drops), without processes: a space moving in
or out is refused with a retryable error naming the move; a dropped space's sessions are
answered SPACE_DROPPED; a name whose drop is unfinished cannot be created yet."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from engram.contract.errors import SessionError, UnavailableError
from engram.shard.drop import Drops, Marker
from engram.v1 import streaming_pb2 as pb


def _node(tmp_path: Path, **kwargs: object) -> SimpleNamespace:
    base = {"root": tmp_path, "ready": True, "shard_id": 0, "incoming": {}, "outgoing": {}}
    return SimpleNamespace(**{**base, "spaces": {}, **kwargs})


@pytest.mark.parametrize("side", ["outgoing", "incoming"])
async def test_a_moving_space_is_refused_naming_the_move(tmp_path: Path, side: str) -> None:
    move = SimpleNamespace(move_id="move-7", target=1, source=1)
    drops = Drops(_node(tmp_path, **{side: {"alpha": move}}))  # type: ignore[arg-type]
    with pytest.raises(UnavailableError) as caught:
        await drops.drop("alpha")
    assert "move-7" in caught.value.message and caught.value.retryable
    assert not (tmp_path / "drops").exists()  # nothing was started


async def test_a_fenced_space_is_refused(tmp_path: Path) -> None:
    fenced = SimpleNamespace(fenced_why="memory space 'alpha' is moving to shard 1")
    drops = Drops(_node(tmp_path, spaces={"alpha": fenced}))  # type: ignore[arg-type]
    with pytest.raises(UnavailableError, match="moving to shard 1"):
        await drops.drop("alpha")


def test_dropped_sessions_and_unfinished_names(tmp_path: Path) -> None:
    drops = Drops(_node(tmp_path))  # type: ignore[arg-type]
    marker = Marker(space="alpha", epoch=0, keep_route=False, sessions=["s-1"])
    drops._write_marker(marker)
    drops._sessions["alpha"] = {"s-1"}
    drops._pending["alpha"] = marker
    with pytest.raises(SessionError) as caught:
        drops.check("alpha", "s-1")
    assert caught.value.code == pb.SPACE_DROPPED and "alpha" in caught.value.message
    drops.check("alpha", "s-2")  # another session of the name: not this drop's
    with pytest.raises(UnavailableError, match="still being dropped"):
        drops.check("alpha", "", create=True)
    assert [m.space for m in drops._read_markers()] == ["alpha"]
