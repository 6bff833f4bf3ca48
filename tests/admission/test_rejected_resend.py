"""A batch refused by admission control keeps its sequence number and is accepted later.

A raw stream writes NORMAL batches into a shard with a tiny memory budget and a slow index
builder until one is answered REJECTED (with a retry-after and a reason). That number is not
consumed: a later number sent before it is resent is refused too, naming it. Once the retry-after
has passed and the shard has pushed a lower pressure level, the same sequence number is resent
and accepted, with the LSN right after the last stored row: the refused attempt left no trace.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

SPACE = "rejected-resend"
DIM = 128
N = 1000
ENV = {
    "ENGRAM_MEMORY_BUDGET": "8MB",
    "ENGRAM_INDEX_BUILD_CHUNK": "16",
    "ENGRAM_INDEX_BUILD_THREADS": "1",
    "ENGRAM_HNSW_EF_CONSTRUCTION": "200",
}
MAX_BATCHES = 200


def answers(seq: int):  # noqa: ANN201
    return lambda r: r.WhichOneof("result") in ("ack", "error") and r.sequence_number == seq


async def test_rejected_sequence_is_resent_and_accepted_once_pressure_drops(
    make_cluster, raw, scrape
) -> None:
    cluster = make_cluster(shards=1, env=ENV)
    corpus = Corpus(DIM)

    def batch(seq: int) -> pb.ObservationBatch:
        lo = (seq - 1) * N
        return raw.batch(corpus.vectors(lo, N), [f"rr-{lo + i}" for i in range(N)])

    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        call, _ = await raw.open(stub, SPACE)
        statuses: list[pb.ObservationResponse] = []

        # Fill, one batch at a time, until admission refuses one.
        rejected = None
        for seq in range(1, MAX_BATCHES + 1):
            await raw.write_batch(call, seq, batch(seq))
            resp = await raw.read_until(call, answers(seq), seen=statuses)
            assert resp.WhichOneof("result") == "ack", resp
            if resp.ack.status == pb.ObservationAck.REJECTED:
                rejected = resp
                break
            assert resp.ack.status == pb.ObservationAck.ACCEPTED, resp
            assert resp.ack.first_lsn == (seq - 1) * N + 1
        assert rejected is not None, f"{MAX_BATCHES} batches into an 8 MB budget, none refused"
        r = rejected.sequence_number
        refused_at = time.monotonic()
        assert r > 1, "the first batch must fit"
        assert 0 < rejected.ack.retry_after_ms <= 30_000, rejected
        assert rejected.ack.message, rejected
        assert "refused" in rejected.ack.message, rejected
        levels = [s.status.level for s in statuses if s.WhichOneof("result") == "status"]
        assert levels and max(levels) >= pb.LEVEL_CRITICAL, f"pressure pushed before: {levels}"

        # The number was not consumed: r + 1 now is refused, naming r.
        before_behind = len(statuses)
        await raw.write_batch(call, r + 1, batch(r + 1))
        behind = await raw.read_until(call, answers(r + 1), seen=statuses)
        if behind.WhichOneof("result") == "ack":
            assert behind.ack.status == pb.ObservationAck.REJECTED, behind
            assert f"({r})" in behind.ack.message, behind
        else:
            assert behind.error.code == pb.SEQUENCE_GAP, behind
            assert behind.error.expected_sequence == r, behind

        # Wait for the retry-after and for the shard to push a level below CRITICAL.
        await asyncio.sleep(
            max(0.0, refused_at + rejected.ack.retry_after_ms / 1000 - time.monotonic())
        )

        def is_calm(x: pb.ObservationResponse) -> bool:
            return x.WhichOneof("result") == "status" and x.status.level <= pb.LEVEL_WARNING

        early = [x for x in statuses[before_behind:] if is_calm(x)]
        calm = early[-1] if early else await raw.read_until(call, is_calm, timeout=60)
        assert calm.status.state in (pb.StreamStatus.ACTIVE, pb.StreamStatus.BACKPRESSURE)

        # The same number is accepted now, right after the last stored row.
        await raw.write_batch(call, r, batch(r))
        resp = await raw.read_until(call, answers(r))
        assert resp.WhichOneof("result") == "ack", resp
        assert resp.ack.status == pb.ObservationAck.ACCEPTED, resp
        assert resp.ack.duplicate is False
        assert (resp.ack.first_lsn, resp.ack.count) == ((r - 1) * N + 1, N)
        await raw.write_batch(call, r + 1, batch(r + 1))
        resp = await raw.read_until(call, answers(r + 1))
        assert resp.WhichOneof("result") == "ack" and resp.ack.first_lsn == r * N + 1, resp
        call.cancel()

        ids: list[str] = []
        async for chunk in stub.ListObservations(
            pb.ListObservationsRequest(memory_space_id=SPACE), timeout=60
        ):
            ids.extend(chunk.ids)
    assert ids == [f"rr-{i}" for i in range((r + 1) * N)], "stored exactly once, in order"
    gw = await scrape(cluster.http_port)
    refused = gw.by_label("engram_streaming_observations_rejected_total", "reason")
    print(f"\nrefused seq {r} (retry after {rejected.ack.retry_after_ms} ms): {refused}")
    assert sum(v for k, v in refused.items() if k != "behind_rejected") >= N
