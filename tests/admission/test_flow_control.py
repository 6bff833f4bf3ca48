"""Client flow control on a raw stream: PAUSE / RESUME / SLOW_DOWN / SPEED_UP / BUFFER_STATUS.

Every action is answered with a StreamStatus describing the stream as the gateway now holds
it. While paused, a batch is refused in-band (STREAM_PAUSED) without consuming its sequence
number; SLOW_DOWN holds the stream to ``preferred_rate`` observations per second until
SPEED_UP lifts it; BUFFER_STATUS reports the credits and the last acknowledged sequence.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

CLUSTER_SHARDS = 1  # shared_cluster: one for this module's tests, a space each
DIM = 32
FC = pb.FlowControl


def is_status(resp: pb.ObservationResponse) -> bool:
    return resp.WhichOneof("result") == "status"


def answers(seq: int):  # noqa: ANN201
    """A response (ack or in-band error) for batch ``seq``."""
    return lambda r: r.WhichOneof("result") in ("ack", "error") and r.sequence_number == seq


def flow_status(action: int):  # noqa: ANN201
    """The status answering a flow action (its message starts with the action's name)."""
    name = FC.Action.Name(action)
    return lambda r: is_status(r) and r.status.message.startswith(name)


async def test_pause_resume_slow_down_speed_up_buffer_status(shared_cluster, raw) -> None:
    cluster = shared_cluster
    corpus = Corpus(DIM)
    ids = iter(range(10**9))

    def batch(n: int) -> pb.ObservationBatch:
        first = next(ids)
        for _ in range(n - 1):
            next(ids)
        return raw.batch(corpus.vectors(first, n), [f"fc-{first + i}" for i in range(n)])

    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        call, init = await raw.open(stub, "flow-control")
        assert init.max_in_flight_batches == 8

        # PAUSE: the stream reports PAUSED; a batch is refused in-band, consuming nothing.
        await raw.flow(call, FC.PAUSE)
        paused = await raw.read_until(call, flow_status(FC.PAUSE))
        assert paused.status.state == pb.StreamStatus.PAUSED, paused
        await raw.write_batch(call, 1, batch(10))
        refused = await raw.read_until(call, answers(1))
        assert refused.WhichOneof("result") == "error", refused
        assert refused.error.code == pb.STREAM_PAUSED, refused
        assert refused.sequence_number == 1

        # RESUME: ACTIVE again; seq 1 is still the next number (2 would be a gap).
        await raw.flow(call, FC.RESUME)
        resumed = await raw.read_until(call, flow_status(FC.RESUME))
        assert resumed.status.state == pb.StreamStatus.ACTIVE, resumed
        await raw.write_batch(call, 2, batch(10))
        gap = await raw.read_until(call, answers(2))
        assert gap.WhichOneof("result") == "error", gap
        assert (gap.error.code, gap.error.expected_sequence) == (pb.SEQUENCE_GAP, 1), gap
        await raw.write_batch(call, 1, batch(10))
        ack = await raw.read_until(call, answers(1))
        assert ack.WhichOneof("result") == "ack", ack
        assert ack.ack.status == pb.ObservationAck.ACCEPTED
        assert (ack.ack.first_lsn, ack.ack.count, ack.ack.duplicate) == (1, 10, False)

        # SLOW_DOWN to 2000 obs/s: 10 batches of 1000 take about 4 s (the bucket starts full
        # with one second's worth), so their acks span at least 3 s.
        await raw.flow(call, FC.SLOW_DOWN, preferred_rate=2000)
        slow = await raw.read_until(call, flow_status(FC.SLOW_DOWN))
        assert slow.status.preferred_rate == 2000, slow
        span = await timed_batches(raw, call, first_seq=2, count=10, make=lambda: batch(1000))
        assert span >= 3.0, f"10 x 1000 observations at 2000/s were acked within {span:.2f} s"

        # SPEED_UP without a rate lifts the limit.
        await raw.flow(call, FC.SPEED_UP)
        fast = await raw.read_until(call, flow_status(FC.SPEED_UP))
        assert fast.status.preferred_rate == 0, fast
        assert fast.status.state == pb.StreamStatus.ACTIVE
        span = await timed_batches(raw, call, first_seq=12, count=10, make=lambda: batch(1000))
        assert span < 3.5, f"after SPEED_UP 10 x 1000 observations still took {span:.2f} s"

        # BUFFER_STATUS: credits and the last acknowledged sequence.
        await raw.flow(call, FC.BUFFER_STATUS)
        buf = await raw.read_until(call, flow_status(FC.BUFFER_STATUS))
        assert buf.status.queue_capacity == init.max_in_flight_batches == 8, buf
        assert buf.status.last_acked_sequence == 21, buf
        assert buf.status.queue_depth == 0, buf
        assert buf.status.state == pb.StreamStatus.ACTIVE
        call.cancel()

        rows = []
        async for chunk in stub.ListObservations(
            pb.ListObservationsRequest(memory_space_id="flow-control"), timeout=30
        ):
            rows.extend(chunk.ids)
        assert len(rows) == len(set(rows)) == 10 + 20 * 1000


async def timed_batches(raw, call, *, first_seq: int, count: int, make) -> float:  # noqa: ANN001
    """Writes ``count`` batches (a writer task, within the stream's 8 credits) while reading
    their acks; returns the time between the first and the last ack."""
    batches = [make() for _ in range(count)]
    credits = asyncio.Semaphore(8)

    async def writer() -> None:
        for i, b in enumerate(batches):
            await credits.acquire()
            await raw.write_batch(call, first_seq + i, b)

    task = asyncio.create_task(writer())
    times: list[float] = []
    try:
        for i in range(count):
            resp = await raw.read_until(call, answers(first_seq + i), timeout=30)
            assert resp.WhichOneof("result") == "ack", resp
            assert resp.ack.status == pb.ObservationAck.ACCEPTED, resp
            times.append(time.monotonic())
            credits.release()
    finally:
        await task
    span = times[-1] - times[0]
    print(f"\n{count} batches acked over {span:.2f} s")
    return span


async def test_speed_up_lifts_the_limit_for_a_batch_already_waiting(shared_cluster, raw) -> None:
    """SLOW_DOWN to 500 obs/s, then a batch of 5000 (a 9 s wait for tokens), then SPEED_UP:
    the SPEED_UP is answered at once and the waiting batch goes through without the limit."""
    async with grpc.aio.insecure_channel(shared_cluster.gateway_address) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        call, _ = await raw.open(stub, "flow-speed-up")
        await raw.flow(call, FC.SLOW_DOWN, preferred_rate=500)
        slow = await raw.read_until(call, flow_status(FC.SLOW_DOWN))
        assert slow.status.preferred_rate == 500
        await raw.write_batch(call, 1, raw.batch(Corpus(DIM).vectors(0, 5000)))
        await asyncio.sleep(0.2)  # the batch is now waiting for tokens
        sent = time.monotonic()
        await raw.flow(call, FC.SPEED_UP)
        try:
            fast = await raw.read_until(call, flow_status(FC.SPEED_UP), timeout=3)
            assert fast.status.preferred_rate == 0
            ack = await raw.read_until(call, answers(1), timeout=3)
            assert ack.WhichOneof("result") == "ack", ack
            assert ack.ack.status == pb.ObservationAck.ACCEPTED
            assert time.monotonic() - sent < 3
        finally:
            call.cancel()
