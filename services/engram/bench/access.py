"""How the benchmark's clients reach the gateway: an API key and TLS (``--auth``, ``--tls``).

With ``--auth`` the cluster the benchmark starts gets a keys file holding one key, with
``write`` and ``read`` on ``bench-*`` (every space the benchmark writes: the load's and the
side-by-side's); with ``--tls`` its gateway gets a certificate for 127.0.0.1 from a CA made
for the run (trustme). Both live in the run's work directory and go with it. Every client of
the run (writers, the recall process, the visibility sampler, recall@10, the side-by-side's
``peer_engram``) then sends the key and trusts only that CA, so alternating runs with and
without the flags measure what authentication and TLS cost at full ingest.

With ``--target`` (a running cluster) ``--api-key`` and ``--ca`` say the same for it.
:class:`Access` crosses process boundaries (pickled into the load processes' specs; as
``ENGRAM_API_KEY`` / ``ENGRAM_CA_FILE`` for ``peer_engram``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engram_client import EngramClient

SCOPES = ("write:bench-*", "read:bench-*")
KEY_ENV = "ENGRAM_API_KEY"
CA_ENV = "ENGRAM_CA_FILE"


@dataclass(frozen=True)
class Access:
    api_key: str = ""  # empty: no key
    ca_file: str = ""  # PEM CA of the gateway's certificate; empty: plaintext

    def client(self, target: str) -> EngramClient:
        from engram_client import TLS, EngramClient

        tls = TLS.from_files(ca_file=self.ca_file) if self.ca_file else False
        return EngramClient(target, api_key=self.api_key or None, tls=tls)

    def describe(self) -> dict[str, bool]:
        return {"auth": bool(self.api_key), "tls": bool(self.ca_file)}

    @contextlib.contextmanager
    def exported(self) -> Iterator[None]:
        """``ENGRAM_API_KEY`` / ``ENGRAM_CA_FILE`` set for child processes started meanwhile
        (``peer_engram``), and only meanwhile: the cluster's services never see the key."""
        values = {KEY_ENV: self.api_key, CA_ENV: self.ca_file}
        saved = {name: os.environ.get(name) for name in values}
        for name, value in values.items():
            if value:
                os.environ[name] = value
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old


NO_ACCESS = Access()  # plaintext, no key


def from_env() -> Access:
    """What :meth:`Access.exported` set (``peer_engram``'s side)."""
    return Access(os.environ.get(KEY_ENV, ""), os.environ.get(CA_ENV, ""))


def own_cluster(auth: bool, tls: bool, root: Path) -> tuple[Access, dict[str, Any]]:
    """The access of the cluster the benchmark starts, and the :class:`LocalCluster` keyword
    arguments that make the cluster ask for it (files under ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    key, kwargs = "", {}
    if auth:
        from engram.common import keys

        key, entry = keys.create_key([keys.parse_scope(s) for s in SCOPES], name="engram bench")
        keys_file = root / "keys.json"
        keys.save_keys(keys_file, {entry.id: entry})
        kwargs["keys_file"] = keys_file
    ca_file = ""
    if tls:
        cert, key_pem, ca = _certificate(root)
        kwargs["tls"] = (cert, key_pem)
        kwargs["tls_ca"] = ca  # the launcher's own health checks trust it too
        ca_file = str(ca)
    return Access(key, ca_file), kwargs


def _certificate(root: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its key, and the CA that signed it."""
    try:
        import trustme
    except ImportError:
        raise SystemExit(
            "engram bench --tls makes its certificate with trustme, a development dependency: "
            "pip install -e '.[dev]'"
        ) from None
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = root / "gateway.crt", root / "gateway.key", root / "ca.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file
