"""A client stream's session handling, against the in-memory shard and control plane: init,
resume, messages before init, a memory space that does not match, malformed messages, a shard
unreachable at init, and recalls on the stream."""

from __future__ import annotations

from typing import Any

from engram.control.store import SessionRecord
from engram.v1 import streaming_pb2 as pb

OpenStream = Any  # the open_stream fixture: () -> StreamDriver


async def test_init_opens_a_new_session(open_stream: OpenStream, fake_shard: Any, control: Any):
    s = open_stream()
    s.init("alpha")
    ack = (await s.response("init_ack")).init_ack
    assert ack.session_id.startswith("s-")
    assert (ack.initial_sequence, ack.resumed, ack.dim) == (0, False, 0)
    assert ack.max_in_flight_batches == 4 and ack.capabilities.queue_capacity == 4
    assert fake_shard.mark("alpha", ack.session_id) == 0
    assert await control.get_session(ack.session_id) == SessionRecord(
        ack.session_id, "alpha", "active", 0
    )

    s.batch(1)
    resp = await s.response("ack")
    assert resp.sequence_number == 1 and resp.session_id == ack.session_id
    assert resp.ack.status == pb.ObservationAck.ACCEPTED
    assert (resp.ack.first_lsn, resp.ack.count, resp.ack.memory_id) == (1, 2, "b1-0")
    assert fake_shard.mark("alpha", ack.session_id) == 1


async def test_resume_starts_after_the_shards_durable_mark(open_stream: OpenStream, fake_shard):
    fake_shard.add_session("alpha", "s-known", mark=5, dim=4)
    s = open_stream()
    s.init("alpha", session_id="s-known")
    ack = (await s.response("init_ack")).init_ack
    assert (ack.session_id, ack.initial_sequence, ack.resumed, ack.dim) == ("s-known", 5, True, 4)

    s.batch(6)
    resp = await s.response("ack")
    assert (resp.sequence_number, resp.ack.duplicate) == (6, False)
    assert fake_shard.writes == [("s-known", 6)]


async def test_resume_finds_the_space_in_the_control_plane(
    open_stream: OpenStream, fake_shard: Any, control: Any
):
    fake_shard.add_session("alpha", "s-known", mark=2)
    await control.put_session(SessionRecord("s-known", "alpha", "detached", 2), ttl_s=60)
    s = open_stream()
    s.init(space="", session_id="s-known")
    ack = (await s.response("init_ack")).init_ack
    assert (ack.initial_sequence, ack.resumed) == (2, True)
    assert s.stream.space == "alpha"


async def test_resume_of_an_unknown_session_is_refused(open_stream: OpenStream, fake_shard: Any):
    s = open_stream()
    s.init(space="", session_id="s-nobody")
    err = (await s.response("error")).error
    assert err.code == pb.UNKNOWN_SESSION and "s-nobody" in err.message

    s.init(space="alpha", session_id="s-nobody")  # the shard does not know it either
    err = (await s.response("error")).error
    assert err.code == pb.UNKNOWN_SESSION and "unknown in memory space 'alpha'" in err.message
    assert "s-nobody" not in fake_shard.spaces["alpha"].sessions


async def test_operations_before_init_are_refused_in_band(open_stream: OpenStream, fake_shard):
    s = open_stream()
    s.batch(1)
    resp = await s.response("error")
    assert (resp.error.code, resp.sequence_number) == (pb.NOT_INITIALIZED, 1)
    s.send(pb.ObservationRequest(recall=pb.RecallRequest(request_id="r1", cue=[1.0], k=1)))
    resp = await s.response("error")
    assert (resp.error.code, resp.error.request_id) == (pb.NOT_INITIALIZED, "r1")
    s.flow(pb.FlowControl.PAUSE)
    assert (await s.response("error")).error.code == pb.NOT_INITIALIZED
    assert fake_shard.writes == []

    s.init("alpha")
    await s.response("init_ack")
    s.init("alpha")
    assert (await s.response("error")).error.code == pb.ALREADY_INITIALIZED


async def test_a_batch_for_another_space_is_refused(open_stream: OpenStream, fake_shard: Any):
    s = open_stream()
    s.init("alpha")
    await s.response("init_ack")
    s.batch(1, space="beta")
    resp = await s.response("error")
    assert (resp.error.code, resp.sequence_number) == (pb.SPACE_MISMATCH, 1)
    assert "'alpha'" in resp.error.message and "'beta'" in resp.error.message
    assert fake_shard.writes == []

    s.batch(1, space="alpha")  # naming its own space is fine, and 1 is still expected
    assert (await s.response("ack")).sequence_number == 1


async def test_resume_naming_another_space_is_refused(
    open_stream: OpenStream, fake_shard: Any, control: Any
):
    fake_shard.add_session("alpha", "s-known", mark=1)
    await control.put_session(SessionRecord("s-known", "alpha", "detached", 1), ttl_s=60)
    s = open_stream()
    s.init("beta", session_id="s-known")
    err = (await s.response("error")).error
    assert err.code == pb.SPACE_MISMATCH and "'alpha'" in err.message
    assert s.stream.session_id == ""

    s.init("alpha", session_id="s-known")
    assert (await s.response("init_ack")).init_ack.initial_sequence == 1


async def test_malformed_messages_are_answered_and_the_stream_stays_usable(
    open_stream: OpenStream, fake_shard: Any
):
    s = open_stream()
    s.send_bytes(b"\x0a\xff")  # field 1, length 255, then nothing
    err = (await s.response("error")).error
    assert err.code == pb.MALFORMED_MESSAGE and "2 bytes" in err.message
    s.send(pb.ObservationRequest(memory_space_id="alpha"))
    assert (await s.response("error")).error.code == pb.MISSING_OPERATION
    s.init("Not A Space!")
    assert (await s.response("error")).error.code == pb.INVALID_SPACE_ID

    s.init("alpha")
    await s.response("init_ack")
    zero = pb.ObservationBatch(dim=2, vectors=bytes(16))
    s.send(pb.ObservationRequest(sequence_number=1, batch=zero))
    resp = await s.response("error")
    assert (resp.error.code, resp.sequence_number) == (pb.ZERO_VECTOR, 1)
    s.send(pb.ObservationRequest(sequence_number=0, batch=zero))
    assert (await s.response("error")).error.code == pb.INVALID_ARGUMENT
    assert fake_shard.writes == []

    s.batch(1)  # a refused message consumed no sequence number
    assert (await s.response("ack")).sequence_number == 1


async def test_an_unreachable_shard_fails_init_in_band(open_stream: OpenStream, fake_shard: Any):
    fake_shard.down = True
    s = open_stream()
    s.init("alpha")
    err = (await s.response("error")).error
    assert (err.code, err.retryable) == (pb.SHARD_UNAVAILABLE, True)

    fake_shard.down = False
    s.init("alpha")
    assert (await s.response("init_ack")).init_ack.initial_sequence == 0


async def test_recall_on_the_stream(open_stream: OpenStream, fake_shard: Any):
    s = open_stream()
    s.init("alpha")
    session = (await s.response("init_ack")).init_ack.session_id
    s.batch(1)
    await s.response("ack")

    recall = pb.RecallRequest(request_id="r1", cue=[1.0, 0.0, 0.0, 0.0], k=1)
    s.send(pb.ObservationRequest(recall=recall))
    resp = (await s.response("recall")).recall
    assert [m.id for m in resp.results] == ["b1-0"]
    assert fake_shard.recalls == [("alpha", session)]

    s.send(pb.ObservationRequest(recall=pb.RecallRequest(request_id="r2", cue=[1.0], k=0)))
    err = (await s.response("error")).error
    assert (err.code, err.request_id) == (pb.K_OUT_OF_RANGE, "r2")
    fake_shard.down = True
    s.send(pb.ObservationRequest(recall=recall))
    err = (await s.response("error")).error
    assert (err.code, err.request_id) == (pb.SHARD_UNAVAILABLE, "r1")
