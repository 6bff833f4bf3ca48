"""Credits: a stream may have at most ``max_in_flight_batches`` unacknowledged batches.

With ``ENGRAM_MAX_IN_FLIGHT_BATCHES=2`` the init ack grants two credits. A raw client that
writes six big batches back to back without reading acks gets an in-band CREDITS_EXCEEDED for
the first batch beyond its credits (that number is not consumed, so the later ones are
sequence gaps naming it); the stream stays open, and once the acks are in, the refused number
is resent and accepted. Whether a batch is still in flight when the next one arrives is a race
(acks take milliseconds), so the burst is repeated a few times; one refusal is required.
"""

from __future__ import annotations

import asyncio

import grpc

from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

SPACE = "credits"
DIM = 384
N = 5000  # 7.7 MB of vectors per batch: acks take a while
BURST = 6
ROUNDS = 5


async def answers_for(raw, call, seqs: set[int]) -> dict[int, pb.ObservationResponse]:  # noqa: ANN001
    """One answer (ack or in-band error) per sequence number in ``seqs``; fails on timeout."""
    out: dict[int, pb.ObservationResponse] = {}
    while len(out) < len(seqs):
        resp = await raw.read(call, 30)
        kind = resp.WhichOneof("result")
        if kind == "status":
            continue
        assert kind in ("ack", "error"), resp
        seq = resp.sequence_number
        assert seq in seqs and seq not in out, f"unexpected or repeated answer {resp}"
        out[seq] = resp
    return out


def accepted(resp: pb.ObservationResponse) -> bool:
    return resp.WhichOneof("result") == "ack" and resp.ack.status == pb.ObservationAck.ACCEPTED


async def test_credits_exceeded_is_in_band_and_the_refused_batch_can_be_resent(
    make_cluster, raw
) -> None:
    cluster = make_cluster(shards=1, env={"ENGRAM_MAX_IN_FLIGHT_BATCHES": "2"})
    corpus = Corpus(DIM)
    batches = [raw.batch(corpus.vectors(i * N, N)) for i in range(BURST)]
    refusals = 0
    next_seq = 1
    async with grpc.aio.insecure_channel(
        cluster.gateway_address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        call, init = await raw.open(stub, SPACE)
        assert init.max_in_flight_batches == 2
        assert init.capabilities.queue_capacity == 2

        for _round in range(ROUNDS):
            seqs = list(range(next_seq, next_seq + BURST))
            for seq, batch in zip(seqs, batches, strict=True):
                await asyncio.wait_for(raw.write_batch(call, seq, batch), 30)
            got = await answers_for(raw, call, set(seqs))
            refused = [
                s
                for s in seqs
                if got[s].WhichOneof("result") == "error"
                and got[s].error.code == pb.CREDITS_EXCEEDED
            ]
            if not refused:
                assert all(accepted(got[s]) for s in seqs), got
                next_seq += BURST
                continue
            refusals += 1
            first = refused[0]
            err = got[first].error
            assert "in flight" in err.message and "2" in err.message, err
            for s in seqs:
                if s < first:
                    assert accepted(got[s]), got[s]
                elif s > first:
                    # the refused number was not consumed: everything after it is a gap naming it
                    assert got[s].WhichOneof("result") == "error", got[s]
                    assert got[s].error.code == pb.SEQUENCE_GAP, got[s]
                    assert got[s].error.expected_sequence == first, got[s]
            # The stream is still usable: resend from the refused number, one at a time.
            for s in range(first, seqs[-1] + 1):
                await raw.write_batch(call, s, batches[s - seqs[0]])
                resp = (await answers_for(raw, call, {s}))[s]
                assert accepted(resp), resp
                assert resp.ack.duplicate is False
            next_seq += BURST
            break  # one refusal (and its resend) is what this test needs

        # BUFFER_STATUS agrees: nothing in flight, all acked.
        await raw.flow(call, pb.FlowControl.BUFFER_STATUS)
        status = await raw.read_until(call, lambda r: r.WhichOneof("result") == "status")
        assert status.status.queue_capacity == 2
        assert status.status.last_acked_sequence == next_seq - 1
        call.cancel()

        ids: list[str] = []
        async for chunk in stub.ListObservations(
            pb.ListObservationsRequest(memory_space_id=SPACE), timeout=60
        ):
            ids.extend(chunk.ids)
    print(f"\nCREDITS_EXCEEDED after {next_seq // BURST} burst(s)")
    assert refusals >= 1, "no burst of 6 batches exceeded 2 credits"
    assert len(ids) == len(set(ids)) == (next_seq - 1) * N
