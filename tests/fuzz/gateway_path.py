"""What the gateway does with a decoded request before a shard sees it, for the fuzz tests:
the validation calls (:func:`validate_like_gateway`) and a whole ``ClientStream`` driven over
the in-memory shard and control plane of tests/gateway (:func:`drive_stream`).

The rule both check: the only outcomes are an answer or an in-band ``EngramError``; any other
exception, a task that fails unobserved, a stream that leaves a message unanswered or does not
end is a bug.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import numpy as np
from tests.gateway.conftest import FakeShard

from engram.common import validation
from engram.common.settings import load
from engram.contract.errors import EngramError
from engram.control.memory import MemoryControlStore
from engram.gateway.context import GatewayContext
from engram.gateway.stream import ClientStream, Incoming, StreamAbort
from engram.v1 import streaming_pb2 as pb

SETTINGS = load({"ENGRAM_MAX_IN_FLIGHT_BATCHES": "4"})
LIMITS = SETTINGS.limits
ERROR_CODES = frozenset(pb.ErrorCode.values())
STREAM_S = 10.0  # a stream's whole script (milliseconds when nothing is wrong)

T = TypeVar("T")


def outcome(call: Callable[[], T]) -> T | EngramError:
    """``call()``'s result, or the EngramError it raised (checked to carry a real code)."""
    try:
        return call()
    except EngramError as exc:
        assert exc.code in ERROR_CODES, exc
        assert exc.message, exc
        exc.to_proto().SerializeToString()  # it can be sent
        return exc


def validate_like_gateway(req: pb.ObservationRequest, space_dim: int = 0) -> None:
    """The checks the gateway runs on one request, in its order; asserts what a success means."""
    if req.memory_space_id or req.HasField("init"):
        space = outcome(lambda: validation.space_id(req.memory_space_id))
        if isinstance(space, str):
            assert 3 <= len(space) <= 64
    op = req.WhichOneof("operation")
    batch: pb.ObservationBatch | EngramError | None = None
    if op == "batch":
        batch = req.batch
    elif op == "observation":
        batch = outcome(lambda: validation.episode_to_batch(req.observation))
    if isinstance(batch, pb.ObservationBatch):
        b = batch
        checked = outcome(lambda: validation.batch(b, LIMITS, space_dim))
        if isinstance(checked, validation.CheckedBatch):
            assert checked.n * checked.dim * 4 == len(b.vectors)
            assert 1 <= checked.n <= LIMITS.max_batch_observations
            assert np.isfinite(checked.vectors).all()
            assert np.isfinite(checked.sq_norms).all() and (checked.sq_norms > 0).all()
    if op == "recall":
        cue = outcome(lambda: validation.recall(req.recall, LIMITS))
        if isinstance(cue, np.ndarray):
            assert 1 <= cue.size <= LIMITS.max_dim and np.isfinite(cue).all()


def _unslowed(incoming: Incoming) -> Incoming:
    """SLOW_DOWN below 1000/s makes the stream wait, as asked (by design, not a hang): held
    at 1000/s so a script of a few small batches runs in milliseconds."""
    msg = incoming.message
    if (
        msg is not None
        and msg.WhichOneof("operation") == "flow"
        and msg.flow.action == pb.FlowControl.SLOW_DOWN
        and 0 < msg.flow.preferred_rate < 1000
    ):
        msg.flow.preferred_rate = 1000
    return incoming


def drive_stream(script: list[Incoming]) -> list[pb.ObservationResponse | StreamAbort]:
    """Runs one ClientStream over ``script`` (then the client stops sending); returns what it
    yielded after checking the rules in the module docstring."""
    return asyncio.run(_drive([_unslowed(item) for item in script]))


async def _drive(script: list[Incoming]) -> list[pb.ObservationResponse | StreamAbort]:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    gw = GatewayContext(SETTINGS, MemoryControlStore(), FakeShard())
    before = asyncio.all_tasks()

    async def requests() -> AsyncIterator[Incoming]:
        for item in script:
            yield item

    out: list[pb.ObservationResponse | StreamAbort] = []

    async def consume() -> None:
        async for item in ClientStream(gw).run(requests()):
            out.append(item)

    try:
        await asyncio.wait_for(consume(), STREAM_S)
    except TimeoutError:
        raise AssertionError(f"the stream did not end within {STREAM_S} s: {out}") from None
    for _ in range(5):
        await asyncio.sleep(0)
    left = asyncio.all_tasks() - before
    assert not left, f"tasks left running: {left}"
    assert not unhandled, f"unhandled in a task: {unhandled}"

    for item in out[:-1]:
        assert not isinstance(item, StreamAbort), "an abort must be the last thing yielded"
    for item in out:
        if isinstance(item, StreamAbort):
            assert item.error.code in ERROR_CODES
        else:
            assert item.WhichOneof("result") is not None
            item.SerializeToString()
    if not (out and isinstance(out[-1], StreamAbort)):
        ops = [i.message.WhichOneof("operation") if i.message else "?" for i in script]
        answered = ops.index("close") if "close" in ops else len(ops)
        assert len(out) >= answered, f"{answered} messages before a close, {len(out)} answers"
    return out
