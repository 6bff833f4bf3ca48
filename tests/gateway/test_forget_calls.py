"""The public Delete, DropSpace and SetRetention calls, against the in-memory shard: answers,
precise refusals (status and ``CODE: message`` details), and the scopes each call needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from engram.common import keys
from engram.contract.errors import NotOwnerError
from engram.gateway.auth import Authenticator
from engram.gateway.context import GatewayContext
from engram.gateway.service import EngramStreamService
from engram.v1 import streaming_pb2 as pb


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """What the service reads of a unary call's ``grpc.aio.ServicerContext``."""

    def __init__(self, key: str | None = None) -> None:
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def _call(gateway: GatewayContext, name: str, request: Any, key: str | None = None) -> Any:
    service = EngramStreamService(gateway)
    return await getattr(service, name)(request, FakeContext(key))


async def test_delete_by_ids_and_range(gateway, fake_shard):
    fake_shard.store("alpha", ["a", "b", "c", "d"], [10, 20, 30, 40])
    answer = await _call(
        gateway,
        "Delete",
        pb.DeleteRequest(memory_space_id=" alpha ", request_id="q", ids=["a", "zz"], since_us=30),
    )
    assert (answer.request_id, answer.deleted, answer.not_found, answer.lsn) == ("q", 3, 1, 4)
    assert fake_shard.spaces["alpha"].live() == [(1, "b")]
    assert fake_shard.deletes[0][1].memory_space_id == "alpha"  # trimmed before routing


@pytest.mark.parametrize(
    ("request_fields", "status", "words"),
    [
        ({"memory_space_id": "A!"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPACE_ID"),
        ({"memory_space_id": "alpha"}, grpc.StatusCode.INVALID_ARGUMENT, "names nothing"),
        (
            {"memory_space_id": "alpha", "since_us": 9, "until_us": 3},
            grpc.StatusCode.INVALID_ARGUMENT,
            "since_us (9) must be before until_us (3)",
        ),
        (
            {"memory_space_id": "alpha", "ids": ["x"], "request_id": "r" * 129},
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id has 129 characters",
        ),
    ],
)
async def test_bad_deletes_are_refused_before_the_shard(
    gateway, fake_shard, request_fields, status, words
):
    with pytest.raises(Aborted) as refused:
        await _call(gateway, "Delete", pb.DeleteRequest(**request_fields))
    assert refused.value.code == status
    assert words in refused.value.details
    assert fake_shard.deletes == []


async def test_a_delete_follows_a_moving_space(gateway, fake_shard):
    fake_shard.store("alpha", ["a"], [1])
    fake_shard.fail_next_delete(NotOwnerError("memory space 'alpha' is moving"))
    with pytest.raises(Aborted) as refused:  # the fake raises what GrpcShards did not follow
        await _call(gateway, "Delete", pb.DeleteRequest(memory_space_id="alpha", ids=["a"]))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details.startswith("NOT_OWNER: ")


async def test_drop_space_and_retention(gateway, fake_shard):
    fake_shard.store("alpha", ["a", "b"], [1, 2])
    dropped = await _call(gateway, "DropSpace", pb.DropSpaceRequest(memory_space_id="alpha"))
    assert dropped.observations == 2 and "alpha" not in fake_shard.spaces
    again = await _call(gateway, "DropSpace", pb.DropSpaceRequest(memory_space_id="alpha"))
    assert again.observations == 0

    wanted = pb.Retention(max_age_s=86_400, max_rows=1000)
    answer = await _call(
        gateway, "SetRetention", pb.SetRetentionRequest(memory_space_id="beta", retention=wanted)
    )
    assert answer.retention == wanted
    assert fake_shard.spaces["beta"].retention == wanted
    with pytest.raises(Aborted) as refused:
        await _call(
            gateway,
            "SetRetention",
            pb.SetRetentionRequest(
                memory_space_id="beta", retention=pb.Retention(max_age_s=1 << 60)
            ),
        )
    assert "max_age_s must be at most" in refused.value.details


# ------------------------------------------------------------------------------ scopes


@pytest.fixture
def with_keys(gateway: GatewayContext, tmp_path: Path) -> Callable[[str], str]:
    """Turns API keys on; ``make(scope)`` returns a new key holding that one scope."""
    path = tmp_path / "keys.json"
    made: dict[str, keys.KeyEntry] = {}

    def make(scope: str) -> str:
        key, entry = keys.create_key([keys.parse_scope(scope)])
        made[entry.id] = entry
        keys.save_keys(path, made)
        ring.load()
        return key

    keys.save_keys(path, {})
    ring = keys.KeyRing(path, 60.0)
    gateway.auth = Authenticator(None, ring)
    return make


@pytest.mark.parametrize(
    ("scope", "call", "allowed"),
    [
        ("read:alpha", "Delete", False),
        ("write:alpha", "Delete", True),
        ("write:other", "Delete", False),
        ("admin:alpha", "Delete", True),
        ("write:alpha", "DropSpace", False),
        ("admin:al*", "DropSpace", True),
        ("write:alpha", "SetRetention", False),
        ("admin:alpha", "SetRetention", True),
    ],
)
async def test_each_call_needs_its_scope(with_keys, gateway, fake_shard, scope, call, allowed):
    key = with_keys(scope)
    fake_shard.store("alpha", ["a"], [1])
    request = {
        "Delete": pb.DeleteRequest(memory_space_id="alpha", ids=["a"]),
        "DropSpace": pb.DropSpaceRequest(memory_space_id="alpha"),
        "SetRetention": pb.SetRetentionRequest(memory_space_id="alpha"),
    }[call]
    if allowed:
        await _call(gateway, call, request, key)
        return
    with pytest.raises(Aborted) as refused:
        await _call(gateway, call, request, key)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    needed = "write" if call == "Delete" else "admin"
    assert f"has no '{needed}' scope for memory space 'alpha'" in refused.value.details
    assert fake_shard.spaces["alpha"].live() == [(0, "a")]


async def test_calls_without_a_key_are_unauthenticated(with_keys, gateway, fake_shard):
    with_keys("admin:*")
    for call, request in (
        ("Delete", pb.DeleteRequest(memory_space_id="alpha", ids=["a"])),
        ("DropSpace", pb.DropSpaceRequest(memory_space_id="alpha")),
    ):
        with pytest.raises(Aborted) as refused:
            await _call(gateway, call, request)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert fake_shard.deletes == []
