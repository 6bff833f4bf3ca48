"""An append whose caller went away (its future cancelled: the gateway's stream dropped) is
still published in order, and the failure path still rolls back: nothing else is skipped."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from engram.contract.errors import StorageError
from engram.v1 import streaming_pb2 as pb

DIM = 8


def _batch(n: int, tag: str) -> pb.ObservationBatch:
    vectors = np.random.default_rng(len(tag)).standard_normal((n, DIM)).astype("<f4")
    return pb.ObservationBatch(
        dim=DIM, vectors=vectors.tobytes(), ids=[f"{tag}-{i}" for i in range(n)]
    )


async def test_a_cancelled_append_is_published_and_its_duplicates_answered(
    harness: Any, gated_faults: Any
) -> None:
    space = harness.space(faults=gated_faults)
    await space.open_session("s", create=True)
    gated_faults.arm()
    first = space.begin_append("s", 1, _batch(3, "a"))
    await gated_faults.wait_entered()
    duplicate = space.begin_append("s", 1, _batch(3, "a"))  # a resend while 1 is in flight
    first.cancel()  # the caller went away
    gated_faults.release()
    answer = await asyncio.wait_for(duplicate, 5)
    assert answer.duplicate and space.session_mark("s") == 1 and space.visible == 3
    second = await space.begin_append("s", 2, _batch(2, "b"))
    assert (second.first_lsn, space.visible) == (4, 5)


async def test_a_cancelled_append_that_fails_still_rolls_back(
    harness: Any, gated_faults: Any
) -> None:
    space = harness.space(faults=gated_faults)
    await space.open_session("s", create=True)
    gated_faults.arm()
    first = space.begin_append("s", 1, _batch(3, "a"))
    await gated_faults.wait_entered()
    first.cancel()
    gated_faults.release(fail=True)
    for _ in range(200):  # the WAL recovers and the space takes writes again
        try:
            again = await space.begin_append("s", 1, _batch(3, "a"))
            break
        except StorageError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the space never took writes again after the failure")
    assert (again.first_lsn, space.visible, space.session_mark("s")) == (1, 3, 1)
