"""Fixtures of the admission-control suites that run against real clusters.

* ``scrape``: ``await scrape(port)`` reads a process's ``/metrics`` and returns
  ``{(sample name, ((label, value), ...)): value}`` (labels sorted), so a test can sample the
  shard's memory gauges or the gateway's rejection counters while load is running.
* ``raw``: helpers for the raw ``EngramStream`` protocol (open a session, read with a
  timeout so a missing answer fails the test instead of hanging it).

Clusters come from ``make_cluster`` and ``shared_cluster`` (``tests/conftest.py``): real
processes on free ports, always stopped at teardown.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc


class Samples(dict[tuple[str, tuple[tuple[str, str], ...]], float]):
    """One scrape: ``{(sample name, sorted label pairs): value}``."""

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.items() if n == name and want <= set(lab))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Samples called ``name`` summed per value of ``label``."""
        out: dict[str, float] = {}
        for (n, lab), v in self.items():
            key = dict(lab).get(label)
            if n == name and key is not None:
                out[key] = out.get(key, 0.0) + v
        return out


Scrape = Callable[[int], Awaitable[Samples]]


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def parse_metrics(text: str) -> Samples:
    out = Samples()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def scrape() -> Scrape:
    async def scrape(port: int) -> Samples:
        return parse_metrics(await asyncio.to_thread(_get, port))

    return scrape


@dataclass
class Raw:
    """The raw streaming protocol, with timeouts on every read."""

    timeout_s: float = 15.0

    async def read(self, call: grpc.aio.StreamStreamCall, timeout: float | None = None):  # noqa: ASYNC109
        resp = await asyncio.wait_for(call.read(), timeout or self.timeout_s)
        assert resp is not grpc.aio.EOF, "the gateway ended the stream"
        assert isinstance(resp, pb.ObservationResponse)
        return resp

    async def read_until(
        self,
        call: grpc.aio.StreamStreamCall,
        want: Callable[[pb.ObservationResponse], bool],
        timeout: float | None = None,  # noqa: ASYNC109
        seen: list[pb.ObservationResponse] | None = None,
    ) -> pb.ObservationResponse:
        """Reads until a response satisfies ``want`` (others go to ``seen``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout_s)
        while True:
            left = deadline - loop.time()
            assert left > 0, f"no matching response within the timeout; saw {seen}"
            resp = await self.read(call, left)
            if want(resp):
                return resp
            if seen is not None:
                seen.append(resp)

    async def open(
        self, stub: streaming_pb2_grpc.EngramStreamStub, space: str
    ) -> tuple[grpc.aio.StreamStreamCall, pb.StreamInitAck]:
        call = stub.ObserveStream()
        await call.write(pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()))
        resp = await self.read(call)
        assert resp.WhichOneof("result") == "init_ack", resp
        return call, resp.init_ack

    @staticmethod
    def batch(
        vectors: np.ndarray, ids: list[str] | None = None, priority: int = pb.PRIORITY_NORMAL
    ) -> pb.ObservationBatch:
        arr = np.ascontiguousarray(vectors, "<f4")
        b = pb.ObservationBatch(dim=arr.shape[1], vectors=arr.tobytes(), priority=priority)
        b.ids.extend(ids or [])
        return b

    @staticmethod
    def write_batch(
        call: grpc.aio.StreamStreamCall, seq: int, batch: pb.ObservationBatch
    ) -> Awaitable[None]:
        return call.write(pb.ObservationRequest(sequence_number=seq, batch=batch))

    @staticmethod
    def flow(
        call: grpc.aio.StreamStreamCall, action: int, preferred_rate: int = 0
    ) -> Awaitable[None]:
        return call.write(
            pb.ObservationRequest(flow=pb.FlowControl(action=action, preferred_rate=preferred_rate))
        )


@pytest.fixture
def raw() -> Raw:
    return Raw()
