"""TLS on the gateway's public listeners (gRPC and HTTP/WebSocket), reloaded when the files change.

``ENGRAM_TLS_CERT`` (a PEM chain, leaf first) and ``ENGRAM_TLS_KEY`` (its unencrypted PEM key)
turn TLS on; ``gateway/server.py`` is the caller:

* gRPC: :func:`grpc_server_credentials` gives dynamic credentials whose fetcher gRPC calls at
  every new handshake; it looks at the files at most every ``ENGRAM_TLS_RELOAD_S``.
* HTTP/WebSocket: :func:`server_ssl_context` gives an ``ssl.SSLContext``;
  :func:`keep_reloaded` (a task for the listener's lifetime) loads a changed pair into that
  same context, so new handshakes present the new certificate.

Either way a connection keeps the certificate it was opened with: a reload never cuts a stream.
A pair is taken only whole: both files readable, both PEM, the key matching the certificate.
At start-up a bad pair is a :class:`TlsError` naming the variable; at a reload it is logged and
the previous pair stays (a certificate written before its key is taken at the next look).
Change detection is each file's (mtime, size, inode), as seen through symlinks: a Kubernetes
Secret volume swaps a symlink when it updates.

Also here: :func:`load_pair` (the same checks for the internal mTLS files,
:mod:`engram.common.internal`) and the client side the launcher uses to check a TLS gateway
(:func:`client_credentials`, :func:`client_ssl_context`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
import weakref
from dataclasses import dataclass

import grpc

from engram.common.settings import SecuritySettings, SettingsError

log = logging.getLogger("engram.tls")

CERT_VAR = "ENGRAM_TLS_CERT"
KEY_VAR = "ENGRAM_TLS_KEY"


class TlsError(SettingsError):
    """A certificate or key file is missing, unreadable, not PEM, or the two do not match; the
    message names the variable."""


@dataclass(frozen=True)
class Pair:
    """A certificate chain and its key, as PEM bytes, checked to belong together."""

    cert: bytes
    key: bytes


def read_pem(path: str, var: str) -> bytes:
    """The content of ``path`` (the value of ``var``), or a :class:`TlsError` saying why not."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsError(f"{var}={path}: no such file") from None
    except OSError as exc:
        raise TlsError(f"{var}={path}: cannot read it ({exc.strerror})") from None


def load_pair(cert_path: str, key_path: str, cert_var: str, key_var: str) -> Pair:
    """Reads and checks a certificate and key; raises :class:`TlsError` naming the variable."""
    cert = read_pem(cert_path, cert_var)
    key = read_pem(key_path, key_var)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TlsError(f"{cert_var}={cert_path}: not a PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise TlsError(f"{key_var}={key_path}: not a PEM private key")
    _check_pair(Pair(cert, key), f"{cert_var}={cert_path}", f"{key_var}={key_path}")
    return Pair(cert, key)


def _check_pair(pair: Pair, cert_name: str, key_name: str) -> None:
    """Loads the pair into a throwaway context: OpenSSL parses both and compares the keys."""
    try:
        _load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair, key_name)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsError(f"{key_name} does not match the certificate in {cert_name}") from None
        raise TlsError(f"{cert_name} with {key_name}: {exc.reason or exc}") from None


def _load_into(context: ssl.SSLContext, pair: Pair, key_name: str = KEY_VAR) -> None:
    """``context.load_cert_chain`` of bytes (it reads only files: they go through a private
    temporary directory), never prompting for a password."""

    def no_password() -> str:
        raise TlsError(f"{key_name}: the key is encrypted; give an unencrypted key")

    with tempfile.TemporaryDirectory(prefix="engram-tls-") as tmp:
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_file, pair.cert), (key_file, pair.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_file, key_file, password=no_password)


def _fingerprint(*paths: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, -1, -1))
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class CertificateFiles:
    """A certificate and key file pair, read at start and again when either file changes."""

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        reload_s: float,
        cert_var: str = CERT_VAR,
        key_var: str = KEY_VAR,
    ) -> None:
        self._paths = (cert_path, key_path)
        self._vars = (cert_var, key_var)
        self._reload_s = reload_s
        self._seen = _fingerprint(cert_path, key_path)
        self.pair = load_pair(cert_path, key_path, cert_var, key_var)
        self._checked = time.monotonic()

    def refresh(self, now: float | None = None) -> bool:
        """Whether a new pair was loaded into :attr:`pair`; looks at the files at most every
        ``reload_s`` (a bad new pair is logged and the current one kept)."""
        now = time.monotonic() if now is None else now
        if now - self._checked < self._reload_s:
            return False
        self._checked = now
        seen = _fingerprint(*self._paths)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            self.pair = load_pair(*self._paths, *self._vars)
        except TlsError as exc:
            log.warning("TLS certificate not reloaded, keeping the current one: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self._paths[0])
        return True


def _files(security: SecuritySettings) -> CertificateFiles | None:
    if not security.tls_cert:
        return None
    return CertificateFiles(security.tls_cert, security.tls_key, security.tls_reload_s)


# --------------------------------------------------------------------------- gRPC


def grpc_server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """Credentials for the public gRPC port (None: TLS is off); raises :class:`TlsError`."""
    files = _files(security)
    if files is None:
        return None

    def config(pair: Pair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # called by gRPC at every new handshake; None keeps the current configuration
        try:
            return config(files.pair) if files.refresh() else None
        except Exception:  # an exception here would fail the handshake
            log.exception("TLS certificate check failed")
            return None

    return grpc.dynamic_ssl_server_credentials(config(files.pair), fetch)


# --------------------------------------------------------------------------- HTTP/WebSocket

_CONTEXT_FILES: weakref.WeakKeyDictionary[ssl.SSLContext, CertificateFiles] = (
    weakref.WeakKeyDictionary()
)


def server_ssl_context(security: SecuritySettings) -> ssl.SSLContext | None:
    """A server context for the HTTP/WebSocket port (None: TLS is off); raises
    :class:`TlsError`. Run :func:`keep_reloaded` on it for the listener's lifetime."""
    files = _files(security)
    if files is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_into(context, files.pair)
    _CONTEXT_FILES[context] = files
    return context


async def keep_reloaded(context: ssl.SSLContext, security: SecuritySettings) -> None:
    """Loads a changed certificate and key into ``context`` (made by
    :func:`server_ssl_context`) every ``ENGRAM_TLS_RELOAD_S``; runs until cancelled."""
    files = _CONTEXT_FILES[context]
    while True:
        await asyncio.sleep(security.tls_reload_s)
        if files.refresh():
            try:
                _load_into(context, files.pair)  # checked by refresh(): it loads
            except (OSError, ssl.SSLError, TlsError) as exc:  # e.g. no room for the temp files
                log.warning("TLS certificate not reloaded for HTTP, keeping the current: %s", exc)


# --------------------------------------------------------------------------- clients


def client_credentials(ca_file: str | None = None) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca_file`` (a PEM bundle; None: the system's CAs)."""
    roots = read_pem(ca_file, "the CA file") if ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def client_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context for wss:// trusting ``ca_file`` (None: the system's CAs)."""
    return ssl.create_default_context(cafile=ca_file or None)
