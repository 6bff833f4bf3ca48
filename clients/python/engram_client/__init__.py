"""Python client of Engram Stream.

::

    async with EngramClient("127.0.0.1:50051") as client:
        stream = await client.open_stream("my-space")
        ack = await (await stream.send(vectors, contents=texts))   # durable once it resolves
        hits = await stream.recall(vectors[0], k=5)
        await stream.close()

A stream resumes its session by itself after a dropped connection, resending exactly the
batches that were not acknowledged. Errors are in :mod:`engram_client.errors`. To connect
over TLS or with credentials, build a ``grpc.aio`` channel and pass ``channel=``.
"""

from engram_client.client import (
    Ack,
    EngramClient,
    Hit,
    ObservationStream,
    RecallResult,
    StreamEvent,
)
from engram_client.errors import EngramError

__all__ = [
    "Ack",
    "EngramClient",
    "EngramError",
    "Hit",
    "ObservationStream",
    "RecallResult",
    "StreamEvent",
]
