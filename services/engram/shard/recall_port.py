"""The shard's recall port (``ENGRAM_SHARD_RECALL_LISTEN``): ``Shard.Recall`` served by threads.

On the main port a recall passes the shard's event loop twice (the request in, the chunks out)
and waits there behind whatever the loop is doing, at full ingest mostly receiving megabyte
batches and answering them. Here a synchronous gRPC server (its own completion-queue thread and
handler threads) computes the recall on the handler's thread, at most ``ENGRAM_RECALL_WORKERS``
at a time, without the loop: a thread needs only the interpreter lock, which the loop lets go at
every system call and every few milliseconds (``docs/performance.md``, "The recall port", has
the measurements).

Only ``Recall`` is served (other methods: UNIMPLEMENTED), with the same internal security as the
main port: mTLS when configured (:func:`engram.common.internal.add_port`) and the internal token
(refused UNAUTHENTICATED without it). Gateways find the port in the shard registry
(``recall_address``, from ``ENGRAM_SHARD_RECALL_ADVERTISE``) and fall back on the main port
when a shard has none.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator

import grpc

from engram.common import grpcutil, internal
from engram.common.settings import Settings
from engram.common.threads import name_os_thread
from engram.contract.errors import EngramError, abort_details, grpc_status, retry_after_metadata
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.recall_rpc import RecallRpcs
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.shard")

SERVICE = "engram.internal.v1.Shard"
_MAX_THREADS = 64  # handler threads: the recall queue's bound and a few more, at most this


class RecallPort:
    """The recall port of one shard process; :meth:`start`, then :meth:`stop`."""

    def __init__(self, rpcs: RecallRpcs, settings: Settings) -> None:
        self._rpcs = rpcs
        self._settings = settings
        self._token = internal.token_file(settings.security)
        threads = min(_MAX_THREADS, settings.shard.recall_first.queue + 4)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="recall-port", initializer=name_os_thread
        )
        self._server = grpc.server(self._pool, options=grpcutil.server_options(settings.limits))
        handler = grpc.unary_stream_rpc_method_handler(
            self._recall,
            request_deserializer=ipb.ShardRecallRequest.FromString,
            response_serializer=pb.RecallResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Recall": handler}),)
        )

    def start(self) -> int:
        """Listens on ``ENGRAM_SHARD_RECALL_LISTEN``; returns the port (0: could not)."""
        address = self._settings.shard.recall_listen
        port = internal.add_port(self._server, address, self._settings.security)
        if port:
            self._server.start()
            log.info("recall port on %s", address)
        return port

    def stop(self, grace_s: float) -> None:
        """Stops taking recalls; those in progress get ``grace_s`` (blocking)."""
        self._server.stop(grace_s).wait()
        self._pool.shutdown(wait=False)

    def _recall(
        self, request: ipb.ShardRecallRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RecallResponse]:
        metadata = context.invocation_metadata()
        refused = internal.token_refusal(metadata, self._token)
        if refused is not None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)
        try:
            chunks = self._rpcs.recall_blocking(request, metadata)
        except EngramError as exc:
            context.set_trailing_metadata(retry_after_metadata(exc))
            context.abort(grpc_status(exc), abort_details(exc))
        except concurrent.futures.TimeoutError:  # the loop never answered the snapshot's wait
            context.abort(grpc.StatusCode.UNAVAILABLE, "the shard did not take a snapshot in time")
        yield from chunks
