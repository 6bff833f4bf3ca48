"""A client stream's delete op, against the in-memory shard: it waits for the batches the
stream sent before it, is answered ``deleted`` with its request_id, and every refusal (bad
request, another space, the shard's error, a key without write) is in-band and leaves the
stream usable."""

from __future__ import annotations

from typing import Any

import numpy as np

from engram.common import keys
from engram.contract.errors import UnavailableError
from engram.gateway.auth import Principal
from engram.v1 import streaming_pb2 as pb

OpenStream = Any  # the open_stream fixture: () -> StreamDriver


async def _started(open_stream: OpenStream) -> Any:
    s = open_stream()
    s.init("alpha")
    await s.response("init_ack")
    return s


def _delete(s: Any, request_id: str, *ids: str, space: str = "", **bounds: int) -> None:
    req = pb.DeleteRequest(request_id=request_id, ids=ids, memory_space_id=space, **bounds)
    s.send(pb.ObservationRequest(delete=req))


async def test_a_delete_waits_for_the_batches_sent_before_it(open_stream: OpenStream, fake_shard):
    s = await _started(open_stream)
    fake_shard.hold()
    s.batch(1)  # ids b1-0, b1-1: not yet durable
    _delete(s, "d1", "b1-0")
    await s.quiet()
    assert fake_shard.deletes == [], "the delete reached the shard before batch 1 was answered"

    fake_shard.release()
    assert (await s.response("ack")).sequence_number == 1
    deleted = (await s.response("deleted")).deleted
    assert (deleted.request_id, deleted.deleted, deleted.not_found) == ("d1", 1, 0)
    assert fake_shard.spaces["alpha"].live() == [(1, "b1-1")]


async def test_a_delete_with_nothing_in_flight_is_answered_at_once(
    open_stream: OpenStream, fake_shard
):
    s = await _started(open_stream)
    s.batch(1)
    await s.response("ack")
    fake_shard.hold()  # later batches wait; the delete does not wait for them
    _delete(s, "d1", "b1-0", "nope")
    deleted = (await s.response("deleted")).deleted
    assert (deleted.deleted, deleted.already_deleted, deleted.not_found) == (1, 0, 1)
    _delete(s, "d2", "b1-0")
    deleted = (await s.response("deleted")).deleted
    assert (deleted.deleted, deleted.already_deleted, deleted.not_found) == (0, 1, 0)
    fake_shard.release()


async def test_a_delete_does_not_wait_for_batches_sent_after_it(
    open_stream: OpenStream, fake_shard
):
    s = await _started(open_stream)
    s.batch(1)
    await s.response("ack")
    fake_shard.hold()
    _delete(s, "d1", "b1-1")
    s.batch(2)
    assert (await s.response("deleted")).deleted.deleted == 1
    await s.quiet()  # batch 2 is still held
    fake_shard.release()
    assert (await s.response("ack")).sequence_number == 2


async def test_a_time_range_deletes_what_falls_in_it(open_stream: OpenStream, fake_shard):
    s = await _started(open_stream)
    times = np.array([100, 200, 300], dtype="<i8").tobytes()
    batch = pb.ObservationBatch(
        dim=2,
        vectors=np.ones(6, dtype="<f4").tobytes(),
        ids=["t1", "t2", "t3"],
        timestamps_us=times,
    )
    s.send(pb.ObservationRequest(sequence_number=1, batch=batch))
    _delete(s, "range", since_us=150, until_us=300)
    await s.response("ack")
    assert (await s.response("deleted")).deleted.deleted == 1
    assert [i for _, i in fake_shard.spaces["alpha"].live()] == ["t1", "t3"]


async def test_bad_deletes_are_refused_in_band_with_their_request_id(
    open_stream: OpenStream, fake_shard
):
    s = await _started(open_stream)
    refusals = [
        ("nothing", {}, pb.INVALID_ARGUMENT, "names nothing"),
        ("empty-range", {"since_us": 5, "until_us": 5}, pb.INVALID_ARGUMENT, "holds no time"),
        ("other", {"space": "beta", "ids": ["x"]}, pb.SPACE_MISMATCH, "'beta'"),
        ("blank-id", {"ids": ["ok", ""]}, pb.INVALID_ARGUMENT, "ids[1] is empty"),
    ]
    for rid, fields, code, words in refusals:
        ids = fields.pop("ids", [])
        _delete(s, rid, *ids, **fields)
        err = (await s.response("error")).error
        assert (err.request_id, err.code) == (rid, code), err
        assert words in err.message
    assert fake_shard.deletes == []
    s.batch(1)
    assert (await s.response("ack")).sequence_number == 1


async def test_too_many_ids_are_refused(open_stream: OpenStream, gateway):
    s = await _started(open_stream)
    limit = gateway.settings.limits.max_batch_observations
    _delete(s, "big", *(f"id-{i}" for i in range(limit + 1)))
    err = (await s.response("error")).error
    assert err.code == pb.BATCH_TOO_LARGE and "split it" in err.message


async def test_the_shards_error_answers_the_delete_and_the_stream_goes_on(
    open_stream: OpenStream, fake_shard
):
    s = await _started(open_stream)
    fake_shard.fail_next_delete(UnavailableError("the shard of memory space 'alpha' is down"))
    _delete(s, "d1", "x")
    err = (await s.response("error")).error
    assert (err.request_id, err.code, err.retryable) == ("d1", pb.SHARD_UNAVAILABLE, True)
    _delete(s, "d2", "x")
    assert (await s.response("deleted")).deleted.request_id == "d2"


async def test_a_delete_before_init_is_refused(open_stream: OpenStream):
    s = open_stream()
    _delete(s, "early", "x")
    err = (await s.response("error")).error
    assert (err.code, err.request_id) == (pb.NOT_INITIALIZED, "early")


async def test_a_key_without_write_cannot_delete_on_its_stream(open_stream: OpenStream, fake_shard):
    s = open_stream()
    _, entry = keys.create_key([keys.parse_scope("read:alpha")])
    s.stream.principal = Principal(entry)
    s.init("alpha")
    await s.response("init_ack")
    _delete(s, "d1", "x")
    err = (await s.response("error")).error
    assert (err.code, err.request_id) == (pb.PERMISSION_DENIED, "d1")
    assert "'write'" in err.message
    assert fake_shard.deletes == []


async def test_a_closing_stream_answers_its_delete_first(open_stream: OpenStream, fake_shard):
    s = await _started(open_stream)
    fake_shard.hold()
    s.batch(1)
    _delete(s, "d1", "b1-0")
    s.send(pb.ObservationRequest(close=pb.StreamClose(drain_queue=True)))
    await s.quiet()
    fake_shard.release()
    assert (await s.response("ack")).sequence_number == 1
    assert (await s.response("deleted")).deleted.deleted == 1
    await s.finished()
