"""kopf's entry points: settings, login, the per-resource daemon, validation and deletion.

Started as (the chart's operator Deployment; ``docs/operator.md``)::

    kopf run --namespace=$(POD_NAMESPACE) --peering=engram-stream \\
        --liveness=http://0.0.0.0:8080/healthz -m engram_operator

With more than one replica, kopf's peering (the ``KopfPeering`` named on the command line)
lets only the replica of the highest priority act: the others' daemons stay stopped. kopf
keeps its own bookkeeping in annotations, so the status holds only what the operator reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from engram_operator.act import TICK_S, ClusterLoop
from engram_operator.kube import Kube
from engram_operator.spec import GROUP, PLURAL, VERSION, SpecError, parse

log = logging.getLogger("engram_operator")

FINALIZER = f"{GROUP}/operator"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events come from the operator's own decisions, not from every log line.
    settings.posting.level = logging.WARNING


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, else the kubeconfig ($KUBECONFIG); the operator's own API
    client uses the same credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        if memo.get("kube") is None:
            memo["kube"] = Kube(info)
        else:
            memo["kube"].use(info)
    return info


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def validate(spec: kopf.Spec, body: kopf.Body, **_: Any) -> None:
    """Says at once, as an Event, when a spec cannot be acted on (the daemon's Degraded
    condition says it too, for as long as it lasts)."""
    try:
        parse(dict(spec), os.environ.get("ENGRAM_REDIS_URL"))
    except SpecError as exc:
        kopf.warn(body, reason="InvalidSpec", message=str(exc))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def run(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """The loop of one EngramCluster (:class:`~engram_operator.act.ClusterLoop`)."""

    def event(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])

    loop = ClusterLoop(
        memo["kube"],
        namespace,
        name,
        dict(body.get("status") or {}),
        event,
        os.environ.get("ENGRAM_REDIS_URL"),
    )
    try:
        while not stopped:
            try:
                await loop.tick(dict(body.get("spec") or {}), int(meta.get("generation") or 0))
            except Exception:  # a failed loop is retried at the next tick
                log.exception("EngramCluster %s/%s: loop failed", namespace, name)
            await stopped.wait(TICK_S)
    finally:
        await asyncio.shield(loop.close())


@kopf.on.delete(GROUP, VERSION, PLURAL)
def deleted(body: kopf.Body, **_: Any) -> None:
    """Lets the resource go. The operator deletes nothing: the chart owns the workloads, and
    the shards' volumes (their WALs) stay until someone deletes them on purpose. A move in
    progress finishes or aborts on the shards by itself."""
    kopf.event(
        body,
        type="Normal",
        reason="Released",
        message="the operator no longer manages this cluster",
    )
