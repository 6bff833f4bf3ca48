"""Fixtures of the integration suites: the real services as processes, spoken to as a client.

Clusters come from the kit of ``tests/conftest.py``: ``shared_cluster`` (one per module,
configured by the module's ``CLUSTER_SHARDS`` / ``CLUSTER_ENV``; tests write to spaces of
their own, named by ``space_id``) and ``make_cluster`` (per test, for destructive tests).

* ``gateway_channel``: an asyncio gRPC channel to the shared cluster's gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from engram.launcher.cluster import LocalCluster


@pytest.fixture
async def gateway_channel(shared_cluster: LocalCluster) -> AsyncIterator[grpc.aio.Channel]:
    """An asyncio gRPC channel to the shared cluster's gateway, closed after the test."""
    async with grpc.aio.insecure_channel(shared_cluster.gateway_address) as channel:
        yield channel
