"""Messages holding a batch, composed from their parts (``engram.common.wire``), are the bytes
protobuf itself gives them: the shard's WAL record of a batch and the gateway's AppendRequest."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.common import wire
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.space import batch_record
from engram.v1 import streaming_pb2 as pb

_text = st.text(max_size=40)


@settings(max_examples=80, deadline=None)
@given(
    session=_text,
    seq=st.integers(0, 2**64 - 1),
    first_lsn=st.integers(0, 2**64 - 1),
    n=st.integers(0, 40),
    dim=st.integers(1, 48),
    with_text=st.booleans(),
    priority=st.sampled_from([0, 1, 3]),
    data=st.data(),
)
def test_composed_messages_are_the_messages_bytes(
    session: str,
    seq: int,
    first_lsn: int,
    n: int,
    dim: int,
    with_text: bool,
    priority: int,
    data: st.DataObject,
) -> None:
    rng = np.random.default_rng(n * 131 + dim)
    batch = pb.ObservationBatch(
        dim=dim,
        vectors=rng.standard_normal((n, dim)).astype("<f4").tobytes(),
        confidences=np.full(n, 0.5, "<f4").tobytes(),
        timestamps_us=np.arange(n, dtype="<i8").tobytes(),
        priority=priority,
    )
    if with_text:
        batch.ids.extend(data.draw(st.lists(_text, min_size=n, max_size=n)))
        batch.contents.extend(data.draw(st.lists(_text, min_size=n, max_size=n)))
    expected = ipb.WalRecord(
        batch=ipb.WalBatch(
            session_id=session, sequence_number=seq, first_lsn=first_lsn, batch=batch
        )
    )
    composed = batch_record(session, seq, first_lsn, batch)
    assert composed == expected.SerializeToString()
    assert ipb.WalRecord.FromString(composed) == expected

    epoch = first_lsn % 5  # 0 (unset) too
    request = ipb.AppendRequest(
        memory_space_id=session[::-1], session_id=session, sequence_number=seq, batch=batch
    )
    request.epoch = epoch
    composed = wire.with_message(
        ipb.AppendRequest(memory_space_id=session[::-1], session_id=session, sequence_number=seq),
        ipb.AppendRequest.BATCH_FIELD_NUMBER,
        batch,
        ipb.AppendRequest(epoch=epoch),
    )
    assert composed == request.SerializeToString()
    assert ipb.AppendRequest.FromString(composed) == request


def test_varints_of_every_width() -> None:
    for value in [0, 1, 127, 128, 300, 16_383, 16_384, 2**35 + 7, 2**64 - 1]:
        encoded = wire.varint(value)
        assert len(encoded) == max(1, (value.bit_length() + 6) // 7)
        assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(encoded)) == value
        assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


def test_a_large_batch_needs_a_multi_byte_length() -> None:
    batch = pb.ObservationBatch(dim=384, vectors=bytes(4 * 384 * 1000))
    record = ipb.WalRecord.FromString(batch_record("s", 7, 1, batch))
    assert record.batch.sequence_number == 7 and record.batch.batch == batch
