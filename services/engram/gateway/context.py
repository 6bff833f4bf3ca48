"""What every client stream on a gateway shares: settings, the control plane, the shards.

Built once by ``server.py`` (Redis and gRPC implementations) and handed to each
:class:`~engram.gateway.stream.ClientStream`, the public service, the WebSocket endpoint and
the canary; tests build one around in-memory implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

from engram.common.settings import Settings
from engram.control.store import ControlPlane
from engram.gateway.shards import Shards


@dataclass
class GatewayContext:
    settings: Settings
    store: ControlPlane
    shards: Shards
