"""The few Kubernetes API calls the operator makes itself, over kopf's own credentials.

kopf watches the ``EngramCluster`` and posts Events; reading pods and the StatefulSet, deleting
a stuck pod, setting replicas and patching status from the operator's loop go through this
client. It is built from the :class:`kopf.ConnectionInfo` the login handler returns (a
service account in a pod, else the kubeconfig), so both talk to the same server as the same
user. Only merge patches are sent (no strategic merge, no PUT). Never a delete of anything but
a pod: the operator never deletes a volume.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

MERGE = "application/merge-patch+json"


class KubeError(RuntimeError):
    """The API answered with an error other than 404."""


class Kube:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.use(info)

    def use(self, info: kopf.ConnectionInfo) -> None:
        """Sends the next requests with ``info``'s server and credentials (kopf logs in again
        when a token rotates): one client session for the operator's life, never one per login."""
        self._server = info.server.rstrip("/")
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            pair = f"{info.username}:{info.password}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        self._headers = headers
        self._ssl = _ssl_context(info)

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:  # a handler still running at shutdown must not open a new session
            raise KubeError("the Kubernetes API client is closed: the operator is stopping")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any] | None:
        data = None if body is None else json.dumps(body)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = content_type
        async with self._client().request(
            method, self._server + path, data=data, headers=headers, ssl=self._ssl
        ) as rsp:
            if rsp.status == 404:
                return None
            if rsp.status >= 400:
                raise KubeError(f"{method} {path}: {rsp.status} {await rsp.text()}")
            result: dict[str, Any] = await rsp.json(content_type=None)
            return result

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self._call("GET", path)

    async def list(self, path: str) -> list[dict[str, Any]]:
        result = await self._call("GET", path)
        return list((result or {}).get("items") or [])

    async def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self._call("PATCH", path, dict(body), MERGE)

    async def delete_pod(self, namespace: str, name: str) -> bool:
        """Deletes a pod (its StatefulSet makes a new one); False if it was gone already."""
        return await self._call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}") is not None


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if not info.server.startswith("https"):
        return True
    context = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        context.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context
