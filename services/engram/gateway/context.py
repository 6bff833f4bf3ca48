"""What every client stream on a gateway shares: settings, the control plane, the shards.

Built once by ``server.py`` (Redis and gRPC implementations) and handed to each
:class:`~engram.gateway.stream.ClientStream`, the public service, the WebSocket endpoint and
the canary; tests build one around in-memory implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engram.common.settings import Settings
from engram.control.store import ControlPlane
from engram.gateway.auth import Authenticator
from engram.gateway.shards import Shards


@dataclass
class GatewayContext:
    settings: Settings
    store: ControlPlane
    shards: Shards
    # API keys (engram.gateway.auth); the default is authentication off
    auth: Authenticator = field(default_factory=Authenticator)
