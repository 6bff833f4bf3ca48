"""The contract between Engram Stream and everything that talks to it.

What a caller may rely on, and the only part of the services that clients, tools and the
operator import (``make lint`` enforces it):

* ``engram.v1`` (generated from ``proto/engram/v1``): the public protocol, ``EngramStream``;
* ``engram.internal.v1`` (generated from ``proto/engram/internal/v1``): the shards' protocol,
  for gateways, the launcher and the operator;
* :mod:`engram.contract.errors`: the error codes' meaning, the error types a caller sees, and
  their mapping to and from the wire (in-band ``StreamError``, gRPC status, WebSocket close).

Nothing here imports another part of ``engram``.
"""
