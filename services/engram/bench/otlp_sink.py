"""A minimal OTLP/gRPC trace collector: the OTLP ``TraceService`` on a free local port.

``engram bench --trace-ratio`` points its cluster's exporters here (so tracing costs what it
costs against a collector that answers at once), and ``tests/tracing`` reads the spans the
services sent. It keeps every span it receives, flattened to :class:`ReceivedSpan`, or only
counts them (``keep=False``). It runs in threads of its own (a grpc server), so a caller on an
event loop reads :attr:`OtlpSink.spans` without awaiting anything.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    instance: str  # the resource's service.instance.id
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attributes(kvs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpSink(ts_grpc.TraceServiceServicer):
    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.count = 0  # spans received
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def start(self) -> OtlpSink:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp"))
        ts_grpc.add_TraceServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def Export(  # noqa: N802 (gRPC method name)
        self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        n = 0
        for rs in request.resource_spans:
            resource = _attributes(list(rs.resource.attributes))
            for scope in rs.scope_spans:
                n += len(scope.spans)
                if not self.keep:
                    continue
                for s in scope.spans:
                    received.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            instance=str(resource.get("service.instance.id", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            status=s.status.code,
                            attributes=_attributes(list(s.attributes)),
                        )
                    )
        with self._lock:
            self.count += n
            self._spans.extend(received)
        return ts.ExportTraceServiceResponse()
