"""Fixtures of the control-plane tests: a Redis store of three home shards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engram.control.store import ControlStore


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[ControlStore]:
    """A :class:`ControlStore` with 3 home shards, key prefix ``t``, on a private Redis."""
    store = ControlStore(redis_url, "t", shard_count=3)
    try:
        yield store
    finally:
        await store.close()
