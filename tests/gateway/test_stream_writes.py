"""A client stream's writes, against the in-memory shard: sequence gaps and duplicates, credits,
pause, admission rejections, pushed status, close, and the loss of the shard stream."""

from __future__ import annotations

from typing import Any

import pytest

from engram.contract.errors import UnavailableError
from engram.gateway.stream import StreamAbort
from engram.v1 import streaming_pb2 as pb

OpenStream = Any  # the open_stream fixture: () -> StreamDriver
ACCEPTED, REJECTED = pb.ObservationAck.ACCEPTED, pb.ObservationAck.REJECTED


async def _started(open_stream: OpenStream, session_id: str = "") -> Any:
    s = open_stream()
    s.init("alpha", session_id=session_id)
    await s.response("init_ack")
    return s


async def test_a_gap_is_answered_in_band_and_nothing_is_forwarded(
    open_stream: OpenStream, fake_shard: Any
):
    s = await _started(open_stream)
    s.batch(3)
    resp = await s.response("error")
    assert (resp.sequence_number, resp.error.code, resp.error.expected_sequence) == (
        3,
        pb.SEQUENCE_GAP,
        1,
    )
    assert "expected 1" in resp.error.message
    assert fake_shard.writes == []

    s.batch(1)
    s.batch(2)
    assert [(await s.response("ack")).sequence_number for _ in range(2)] == [1, 2]


async def test_a_gap_found_by_the_shard_moves_the_expected_number(
    open_stream: OpenStream, fake_shard: Any
):
    s = await _started(open_stream)
    session = s.stream.session_id
    s.batch(1)
    await s.response("ack")
    fake_shard.spaces["alpha"].sessions[session].assigned = 0  # the shard lost batch 1
    s.batch(2)
    resp = await s.response("error")
    assert (resp.sequence_number, resp.error.expected_sequence) == (2, 1)
    assert s.stream.next_expected == 1

    s.batch(1)
    assert (await s.response("ack")).sequence_number == 1


async def test_a_duplicate_is_forwarded_and_acknowledged_again(
    open_stream: OpenStream, fake_shard: Any
):
    fake_shard.add_session("alpha", "s-known", mark=3, dim=4)
    s = await _started(open_stream, "s-known")
    s.batch(2)
    resp = await s.response("ack")
    assert (resp.sequence_number, resp.ack.status, resp.ack.duplicate) == (2, ACCEPTED, True)
    assert fake_shard.writes == [("s-known", 2)]
    assert fake_shard.mark("alpha", "s-known") == 3

    s.batch(4)
    resp = await s.response("ack")
    assert (resp.sequence_number, resp.ack.duplicate, resp.ack.count) == (4, False, 2)


async def test_more_batches_than_credits_are_refused(open_stream: OpenStream, fake_shard: Any):
    s = await _started(open_stream)
    fake_shard.hold()
    for seq in range(1, 5):
        s.batch(seq)
    s.batch(5)
    resp = await s.response("error")
    assert (resp.sequence_number, resp.error.code, resp.error.retryable) == (
        5,
        pb.CREDITS_EXCEEDED,
        True,
    )
    assert "4 batches are already in flight" in resp.error.message
    assert [seq for _, seq in fake_shard.writes] == [1, 2, 3, 4]

    fake_shard.release()
    assert [(await s.response("ack")).sequence_number for _ in range(4)] == [1, 2, 3, 4]
    s.batch(5)
    assert (await s.response("ack")).sequence_number == 5


async def test_batches_are_refused_while_paused(open_stream: OpenStream, fake_shard: Any):
    s = await _started(open_stream)
    s.flow(pb.FlowControl.PAUSE)
    status = (await s.response("status")).status
    assert status.state == pb.StreamStatus.PAUSED and status.message.startswith("PAUSE: ")
    s.batch(1)
    resp = await s.response("error")
    assert (resp.sequence_number, resp.error.code) == (1, pb.STREAM_PAUSED)
    assert "arrived while the stream is paused" in resp.error.message
    assert fake_shard.writes == []

    s.flow(pb.FlowControl.RESUME)
    status = (await s.response("status")).status
    assert (status.state, status.message) == (pb.StreamStatus.ACTIVE, "RESUME")
    s.batch(1)
    assert (await s.response("ack")).sequence_number == 1


async def test_an_admission_rejection_is_acked_with_retry_after(
    open_stream: OpenStream, fake_shard: Any
):
    s = await _started(open_stream)
    fake_shard.reject_next(retry_after_ms=250)
    s.batch(1)
    resp = await s.response("ack")
    assert (resp.sequence_number, resp.ack.status, resp.ack.retry_after_ms) == (1, REJECTED, 250)
    assert resp.ack.message == "over the memory budget"

    s.batch(2)  # sent before the client learnt of the refusal: refused by the gateway
    resp = await s.response("ack")
    assert (resp.sequence_number, resp.ack.status, resp.ack.retry_after_ms) == (2, REJECTED, 250)
    assert "earlier batch (1)" in resp.ack.message
    assert [seq for _, seq in fake_shard.writes] == [1]

    s.batch(1)  # the client resends both, in order
    s.batch(2)
    acks = [(await s.response("ack")).ack for _ in range(2)]
    assert [(a.status, a.first_lsn) for a in acks] == [(ACCEPTED, 1), (ACCEPTED, 3)]


async def test_a_status_pushed_by_the_shard_reaches_the_client(
    open_stream: OpenStream, fake_shard: Any
):
    s = await _started(open_stream)
    s.batch(1)
    await s.response("ack")
    fake_shard.push_status(
        pb.StreamStatus(state=pb.StreamStatus.BACKPRESSURE, level=2, pressure=0.9, message="hot")
    )
    status = (await s.response("status")).status
    assert (status.state, status.level, status.message) == (pb.StreamStatus.BACKPRESSURE, 2, "hot")
    assert (status.last_acked_sequence, status.queue_capacity) == (1, 4)

    s.flow(pb.FlowControl.BUFFER_STATUS)  # the stream's own view keeps the shard's pressure
    status = (await s.response("status")).status
    assert (status.state, status.message) == (pb.StreamStatus.BACKPRESSURE, "BUFFER_STATUS: hot")


async def test_close_answers_every_forwarded_batch_first(
    open_stream: OpenStream, fake_shard: Any, control: Any
):
    s = await _started(open_stream)
    fake_shard.hold()
    s.batch(1)
    s.batch(2)
    s.send(pb.ObservationRequest(close=pb.StreamClose()))
    await s.quiet()
    fake_shard.release()
    assert [(await s.response("ack")).sequence_number for _ in range(2)] == [1, 2]
    await s.finished()
    record = await control.get_session(s.stream.session_id)
    assert (record.state, record.last_acked) == ("detached", 2)


async def test_losing_the_shard_ends_the_stream_and_a_new_one_resumes(
    open_stream: OpenStream, fake_shard: Any, control: Any
):
    s = await _started(open_stream)
    session = s.stream.session_id
    s.batch(1)
    await s.response("ack")
    fake_shard.hold()
    s.batch(2)
    s.batch(3)
    await s.quiet()
    fake_shard.break_streams()
    abort = await s.next()
    assert isinstance(abort, StreamAbort)
    assert isinstance(abort.error, UnavailableError)
    assert (abort.error.code, abort.error.retryable) == (pb.SHARD_UNAVAILABLE, True)
    assert "the shard stream failed" in abort.error.message
    assert abort.error.message.endswith("resume the session")
    await s.finished()
    record = await control.get_session(session)
    assert (record.state, record.last_acked) == ("detached", 1)

    again = open_stream()
    again.init("alpha", session_id=session)
    ack = (await again.response("init_ack")).init_ack
    assert (ack.initial_sequence, ack.resumed) == (1, True)
    again.batch(2)
    again.batch(3)
    acks = [await again.response("ack") for _ in range(2)]
    assert [(r.sequence_number, r.ack.duplicate) for r in acks] == [(2, False), (3, False)]
    assert fake_shard.mark("alpha", session) == 3


async def test_a_moved_space_is_followed_and_unanswered_batches_resent(
    open_stream: OpenStream, fake_shard: Any
):
    s = await _started(open_stream)
    s.batch(1)
    await s.response("ack")
    fake_shard.fence("alpha")  # the space starts moving: its owner answers NOT_OWNER
    s.batch(2)
    s.batch(3)
    await s.quiet()  # no error reaches the client: the stream waits for the new owner
    assert fake_shard.writes.count((s.stream.session_id, 2)) == 1
    fake_shard.moved("alpha")
    acks = [await s.response("ack") for _ in range(2)]
    assert [(r.sequence_number, r.ack.duplicate) for r in acks] == [(2, False), (3, False)]
    # both were written twice: refused by the old owner, then resent to the new one
    session = s.stream.session_id
    assert [w for w in fake_shard.writes if w[0] == session] == [
        (session, 1),
        (session, 2),
        (session, 3),
        (session, 2),
        (session, 3),
    ]
    s.batch(4)
    assert (await s.response("ack")).sequence_number == 4
    assert fake_shard.mark("alpha", session) == 4


async def test_a_move_that_does_not_commit_in_time_ends_the_stream(
    open_stream: OpenStream, fake_shard: Any, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("engram.gateway.stream_move._REROUTE_S", 0.1)
    s = await _started(open_stream)
    fake_shard.fence("alpha")
    s.batch(1)
    abort = await s.next()
    assert isinstance(abort, StreamAbort) and isinstance(abort.error, UnavailableError)
    assert "following memory space 'alpha' to its new owner" in abort.error.message
    await s.finished()
