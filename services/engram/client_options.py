"""The command-line options that say how to reach a gateway, shared by ``engram demo`` and
``engram recall``: ``--target``, ``--api-key`` and ``--ca``.

* ``--target HOST:PORT`` (plaintext), or ``grpcs://HOST:PORT`` for TLS trusting the system's
  CAs (``grpc://HOST:PORT`` is plaintext, spelled out);
* ``--ca FILE`` trusts that PEM CA instead, and turns TLS on by itself;
* ``--api-key KEY``, by default ``$ENGRAM_API_KEY`` (keeps the key out of the shell history and
  the process list); sent on every call.
"""

from __future__ import annotations

import argparse
import os

from engram_client import TLS, EngramClient

KEY_ENV = "ENGRAM_API_KEY"
_SCHEMES = {"grpc://": False, "grpcs://": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="gateway gRPC address: HOST:PORT, or grpcs://HOST:PORT for TLS",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"API key sent on every call (default: ${KEY_ENV}; none when unset)",
    )
    p.add_argument(
        "--ca",
        default=None,
        metavar="FILE",
        help="PEM CA the gateway's certificate must chain to; turns TLS on",
    )


def split_target(target: str) -> tuple[str, bool]:
    """``HOST:PORT`` and whether the target asks for TLS (``grpcs://``)."""
    for scheme, tls in _SCHEMES.items():
        if target.startswith(scheme):
            return target[len(scheme) :].rstrip("/"), tls
    if "://" in target:
        raise ValueError(f"--target {target!r}: the scheme is grpc:// or grpcs:// (or none)")
    return target, False


def connect(args: argparse.Namespace) -> EngramClient:
    """A client as the options say; a bad target or unreadable CA file is a ``ValueError``."""
    address, tls_asked = split_target(args.target)
    api_key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV, "")
    tls: TLS | bool = TLS.from_files(ca_file=args.ca) if args.ca else tls_asked
    return EngramClient(address, api_key=api_key or None, tls=tls)
