"""Python client of Engram Stream.

::

    async with EngramClient("127.0.0.1:50051") as client:
        stream = await client.open_stream("my-space")
        ack = await (await stream.send(vectors, contents=texts))   # durable once it resolves
        hits = await stream.recall(vectors[0], k=5)
        await stream.delete(ids=["obs-1"])                          # or client.delete(space, ...)
        await stream.close()

A stream resumes its session by itself after a dropped connection, resending exactly the
batches that were not acknowledged. Errors are in :mod:`engram_client.errors`.

With an API key and TLS (:mod:`engram_client.connection`)::

    tls = TLS.from_files(ca_file="ca.pem")          # or tls=True: the system's CAs
    async with EngramClient("gw.example:50051", api_key="ek_...", tls=tls) as client:
        ...
"""

from engram_client.client import (
    Ack,
    EngramClient,
    Hit,
    ObservationStream,
    RecallResult,
    StreamEvent,
)
from engram_client.connection import CHANNEL_OPTIONS, TLS
from engram_client.errors import (
    AuthenticationError,
    EngramError,
    PermissionDeniedError,
    RateLimitedError,
)
from engram_client.forgetting import DeleteResult, Retention

__all__ = [
    "CHANNEL_OPTIONS",
    "TLS",
    "Ack",
    "AuthenticationError",
    "DeleteResult",
    "EngramClient",
    "EngramError",
    "Hit",
    "ObservationStream",
    "PermissionDeniedError",
    "RateLimitedError",
    "RecallResult",
    "Retention",
    "StreamEvent",
]
