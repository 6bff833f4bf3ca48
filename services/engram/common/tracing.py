"""OpenTelemetry traces of batches and recalls: set up once per process, off unless configured.

The gateway and shard entry points call :func:`configure` after loading their settings and
:func:`shutdown` when they stop. The write and recall paths (``gateway/stream_*.py``,
``gateway/service.py``, ``shard/service.py``) test :data:`active` first: with tracing off that
one module attribute read is all a batch pays. With it on, :func:`start` asks the sampler once
per batch (or recall); an unsampled one gets ``None`` and nothing else is built for it.

Configuration, standard variables (read here and by the SDK's OTLP exporter):

* ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``: the OTLP/gRPC
  collector; unset, tracing is off. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
  also turn it off. ``OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT,COMPRESSION,INSECURE,CERTIFICATE}``
  go to the exporter as the SDK defines them.
* ``OTEL_TRACES_SAMPLER`` (default ``parentbased_traceidratio``, not the SDK's
  ``parentbased_always_on``: every batch traced would cost more than the data path can spare)
  and ``OTEL_TRACES_SAMPLER_ARG`` (the ratio, default 0.01). Checked here: a bad value stops
  the process with a message naming the variable, where the SDK would sample everything.
* ``OTEL_SERVICE_NAME`` (default ``engram-gateway`` / ``engram-shard``),
  ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_SCHEDULE_DELAY``,
  ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` size the export queue below.
* ``ENGRAM_OTEL_CLIENT_CONTEXT`` (``common/settings.py``): whether a client's ``traceparent``
  is continued.

Context crosses processes as a W3C ``traceparent``: from a client in the gRPC metadata of its
stream (or the WebSocket handshake's headers), applying to every batch and recall of the stream;
from gateway to shard in ``AppendRequest.traceparent`` (one Append stream carries many batches,
so per-call metadata cannot name a batch) and in the gRPC metadata of ``Recall``. The gateway
decides; a shard only continues traces that arrive sampled, it never starts one.

Export never waits on the data path: ended spans go into a bounded queue that one daemon thread
sends to the collector (:class:`_ExportQueue`). A full queue (the collector slow or unreachable
while the thread is stuck in an export) and a failed export drop spans, counted in
``engram_tracing_spans_dropped_total`` by reason and logged at most once a minute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engram.common import metrics
from engram.common.settings import SettingsError, TracingSettings
from engram.contract.errors import EngramError
from engram.v1 import streaming_pb2 as pb

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Tracer

log = logging.getLogger("engram.tracing")

# True once configure() has set up an exporter; the hot paths read it before anything else.
active = False
# Whether a client's traceparent is continued (ENGRAM_OTEL_CLIENT_CONTEXT).
client_context = True

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_DEFAULT_RATIO = 0.01
_DROP_LOG_S = 60.0
_SHUTDOWN_S = 2.0
# The OTLP exporter logs every failed attempt; its records feed the drop log instead.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


# ------------------------------------------------------------------------- configuration


def endpoint(env: Mapping[str, str] | None = None) -> str:
    """The OTLP endpoint traces go to; empty when tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return ""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return (traces or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()


def sampler_from(env: Mapping[str, str]) -> Sampler:
    """The sampler the OTEL_TRACES_SAMPLER variables name; raises SettingsError on a bad one."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_traceidratio"
    if name not in _SAMPLERS:
        raise SettingsError(f"OTEL_TRACES_SAMPLER={name!r} is not one of {', '.join(_SAMPLERS)}")
    root: Sampler
    if name.endswith("traceidratio"):
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(raw) if raw else _DEFAULT_RATIO
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a ratio in 0..1")
        root = sampling.TraceIdRatioBased(ratio)
    else:
        root = sampling.ALWAYS_ON if name.endswith("always_on") else sampling.ALWAYS_OFF
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"{name}={raw!r} is not a positive integer")
    return value


def configure(
    service: str,
    settings: TracingSettings,
    *,
    instance: str = "",
    env: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Sets tracing up for this process; returns whether it is on.

    ``service`` is the default service name (``OTEL_SERVICE_NAME`` wins), ``instance`` names
    this process among its peers. ``exporter`` replaces the OTLP one (a test's in-memory sink).
    Raises SettingsError, naming the variable, for a value that cannot be used.
    """
    global active, client_context, _tracer, _provider
    env = os.environ if env is None else env
    client_context = settings.client_context
    target = endpoint(env)
    if exporter is None and not target:
        return False
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if exporter is None and protocol.strip() != "grpc":
        raise SettingsError(f"OTLP protocol {protocol!r} is not supported here: only grpc")
    sampler = sampler_from(env)
    queue = _ExportQueue(
        exporter or _otlp_exporter(),
        target or "(in-process exporter)",
        max_queue=_int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        batch=_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        delay_s=_int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
    )
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service
    if instance:
        attributes[SERVICE_INSTANCE_ID] = instance
    _provider = TracerProvider(sampler=sampler, resource=Resource.create(attributes))
    _provider.add_span_processor(queue)
    _tracer = _provider.get_tracer("engram")
    active = True
    log.info(
        "tracing on: spans to %s, sampler %s",
        target or "an in-process exporter",
        sampler.get_description(),
    )
    return True


def _otlp_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Sends what is queued (for up to two seconds) and stops the export thread."""
    global active, _tracer, _provider
    provider, _provider = _provider, None
    active, _tracer = False, None
    if provider is not None:
        provider.shutdown()


# --------------------------------------------------------------------------------- spans


def start(name: str, parent: otel_context.Context | None = None) -> Span | None:
    """A new span if the sampler keeps it, else None (call only when :data:`active`)."""
    assert _tracer is not None
    span = _tracer.start_span(name, context=parent)
    return span if span.is_recording() else None


def child(name: str, parent: Span, start_ns: int | None = None) -> Span:
    """A span under ``parent`` (sampled with it), starting now or at ``start_ns``."""
    assert _tracer is not None
    return _tracer.start_span(name, context=set_span_in_context(parent), start_time=start_ns)


def parent_from(traceparent: str) -> otel_context.Context | None:
    """The context a W3C ``traceparent`` value names; None if it is malformed."""
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    return ctx if _remote(ctx) else None


def parent_from_headers(headers: Iterable[tuple[str, Any]] | None) -> otel_context.Context | None:
    """The caller's context from gRPC metadata or HTTP headers (``traceparent``, ``tracestate``)."""
    carrier = {k.lower(): v for k, v in headers or () if k.lower() in ("traceparent", "tracestate")}
    if "traceparent" not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if _remote(ctx) else None


def _remote(ctx: otel_context.Context) -> bool:
    from opentelemetry.trace import get_current_span

    return get_current_span(ctx).get_span_context().is_valid


def traceparent(span: Span) -> str:
    """``span``'s W3C ``traceparent`` value, to make the next process's span its child."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, set_span_in_context(span))
    return carrier.get("traceparent", "")


def fail(span: Span, error: EngramError) -> None:
    """Ends ``span`` as failed with the error's code and message."""
    span.set_attribute("engram.error_code", pb.ErrorCode.Name(error.code))
    span.set_status(Status(StatusCode.ERROR, error.message))
    span.end()


class Timeline:
    """When a sampled operation passed each of its steps (ns since the epoch), recorded by
    code that has no span of its own (the WAL callback, a recall thread); the caller turns it
    into child spans with :func:`end_steps`."""

    __slots__ = ("start_ns", "steps")

    def __init__(self) -> None:
        self.start_ns = time.time_ns()
        self.steps: list[tuple[str, int]] = []

    def end(self, step: str) -> None:
        """Step ``step`` ends now (it began where the previous step ended)."""
        self.steps.append((step, time.time_ns()))


def end_steps(parent: Span, timeline: Timeline, prefix: str) -> None:
    """One child span of ``parent`` per step of ``timeline``, named ``prefix + step``."""
    begun = timeline.start_ns
    for step, ended in timeline.steps:
        child(prefix + step, parent, begun).end(end_time=ended)
        begun = ended


# -------------------------------------------------------------------------------- export


class _DropLog:
    """Counts dropped spans and logs them at most once a minute, with the exporter's last
    complaint (its own log records are held back here: it logs every failed attempt)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._unlogged = 0
        self._last_log = -_DROP_LOG_S
        self.last_error = ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.last_error = record.getMessage()
        return False

    def dropped(self, n: int, reason: str) -> None:
        metrics.tracing_spans_dropped_total.labels(reason).inc(n)
        with self._lock:
            self._unlogged += n
            now = time.monotonic()
            if now - self._last_log < _DROP_LOG_S:
                return
            n, self._unlogged, self._last_log = self._unlogged, 0, now
        log.warning(
            "%d spans dropped since the last report (%s); the OTLP endpoint %s: %s",
            n,
            reason,
            self.target,
            self.last_error or "no answer",
        )


class _ExportQueue:
    """The span processor: ended spans into a bounded deque, sent in batches by one daemon
    thread. Unlike the SDK's BatchSpanProcessor it counts what it drops where Prometheus can
    read it and keeps its complaints to one log line a minute; like it, ``on_end`` (called on
    the thread that ends a span: the event loop) never waits."""

    def __init__(
        self, exporter: SpanExporter, target: str, *, max_queue: int, batch: int, delay_s: float
    ) -> None:
        self._exporter = exporter
        self._queue: deque[ReadableSpan] = deque()
        self._max_queue = max_queue
        self._batch = batch
        self._delay_s = delay_s
        self._wake = threading.Event()
        self._stopping = False
        self.drops = _DropLog(target)
        logging.getLogger(_EXPORTER_LOGGER).addFilter(self.drops)
        self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        pass

    def _on_ending(self, span: Span) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._max_queue:
            self.drops.dropped(1, "queue_full")
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._send_queued()
        self._send_queued()

    def _send_queued(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        while self._queue:
            spans = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            try:
                ok = self._exporter.export(spans) is SpanExportResult.SUCCESS
            except Exception as exc:  # an exporter bug must not end the thread
                self.drops.last_error = repr(exc)
                ok = False
            if ok:
                metrics.tracing_spans_exported_total.inc(len(spans))
            else:
                self.drops.dropped(len(spans), "export_failed")

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(_SHUTDOWN_S)
        self._exporter.shutdown()  # also cuts short an export still waiting on the collector
        logging.getLogger(_EXPORTER_LOGGER).removeFilter(self.drops)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        self._wake.set()
        deadline = time.monotonic() + timeout_millis / 1000
        while self._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue
