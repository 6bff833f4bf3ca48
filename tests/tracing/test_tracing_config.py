"""engram.common.tracing without processes: when it is on, how it samples, how it drops.

Spans go to the SDK's in-memory exporter, or to exporters that fail or hang (the SDK's
``SpanExporter`` interface is the seam ``configure`` takes), never to a network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engram.common import metrics, tracing
from engram.common.settings import SettingsError, TracingSettings
from engram.contract.errors import SequenceError

ON = TracingSettings()


@pytest.fixture(autouse=True)
def tracing_off_afterwards() -> Iterator[None]:
    yield
    tracing.shutdown()


def _dropped(reason: str) -> float:
    return metrics.tracing_spans_dropped_total.labels(reason)._value.get()


def test_off_without_an_endpoint() -> None:
    assert tracing.configure("engram-test", ON, env={}) is False
    assert not tracing.active
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", **off}
        assert tracing.configure("engram-test", ON, env=env) is False
        assert not tracing.active


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "a few"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"),
    ],
)
def test_a_bad_variable_is_named(env: dict[str, str], named: str) -> None:
    full = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", **env}
    with pytest.raises(SettingsError, match=named):
        tracing.configure("engram-test", ON, env=full)
    assert not tracing.active


def test_the_default_sampler_is_parent_based_one_percent() -> None:
    described = tracing.sampler_from({}).get_description()
    assert described.startswith("ParentBased{root:TraceIdRatioBased{0.01}")
    assert (
        "TraceIdRatioBased{0.25}"
        in tracing.sampler_from({"OTEL_TRACES_SAMPLER_ARG": "0.25"}).get_description()
    )


def test_sampling_is_decided_once_and_children_follow() -> None:
    sink = InMemorySpanExporter()
    env = {"OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "10"}
    tracing.configure("engram-test", ON, env=env, exporter=sink)
    assert tracing.active
    assert all(tracing.start("engram.test") is None for _ in range(200)), "ratio 0 sampled"

    sampled = tracing.parent_from(f"00-{'1' * 32}-{'2' * 16}-01")
    span = tracing.start("engram.test", sampled)
    assert span is not None
    timeline = tracing.Timeline()
    timeline.end("first")
    timeline.end("second")
    tracing.end_steps(span, timeline, "engram.step.")
    tracing.fail(span, SequenceError("gap", expected=3))
    assert tracing.start("engram.test", tracing.parent_from(f"00-{'1' * 32}-{'2' * 16}-00")) is None
    assert tracing.parent_from("not a traceparent") is None

    tracing.shutdown()
    spans = {s.name: s for s in sink.get_finished_spans()}
    assert set(spans) == {"engram.test", "engram.step.first", "engram.step.second"}
    root = spans["engram.test"]
    assert root.parent is not None and root.parent.span_id == int("2" * 16, 16)
    assert root.attributes["engram.error_code"] == "SEQUENCE_GAP"
    first, second = spans["engram.step.first"], spans["engram.step.second"]
    assert first.parent.span_id == second.parent.span_id == root.context.span_id
    assert first.start_time == timeline.start_ns and first.end_time == second.start_time


class _Stuck(SpanExporter):
    """An exporter whose collector never answers until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


def test_a_stuck_exporter_drops_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = _Stuck()
    env = {
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_MAX_QUEUE_SIZE": "5",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
    }
    full_before, failed_before = _dropped("queue_full"), _dropped("export_failed")
    with caplog.at_level(logging.WARNING, logger="engram.tracing"):
        tracing.configure("engram-test", ON, env=env, exporter=stuck)
        first = tracing.start("engram.test")
        assert first is not None
        first.end()
        assert stuck.entered.wait(10), "the export thread never exported"
        for _ in range(50):  # the thread is stuck: 5 wait in the queue, 45 are dropped
            span = tracing.start("engram.test")
            assert span is not None
            span.end()
        assert _dropped("queue_full") - full_before == 45
        stuck.release.set()
        tracing.shutdown()
    assert _dropped("export_failed") - failed_before == 6  # the first span and the 5 queued
    reports = [r for r in caplog.records if "spans dropped" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
