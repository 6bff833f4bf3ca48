"""Coverage-guided fuzzing of the three decoders with atheris (libFuzzer), for ``make fuzz``.

    python tests/fuzz/atheris_targets.py TARGET SECONDS [libFuzzer options]

TARGET is ``grpc`` (``gateway.service.parse`` then the gateway's validation), ``ws``
(``ws_frames.decode_text``; a FrameError must make a sendable error frame) or ``wal`` (the bytes
as a WAL segment after a valid one: ``Wal.replay`` must keep the valid segment, never raise,
and a second replay must change nothing). The same rules as the hypothesis tests beside this
file: the only outcomes are an answer or the documented error. libFuzzer stops an input after
``-timeout`` seconds and the run above ``-rss_limit_mb``; a crash leaves the input in
``.engram/fuzz/crash-*`` and exits non-zero. The corpus grows in ``.engram/fuzz/corpus/TARGET``,
seeded with valid messages, so each run starts where the last one stopped.

Only Engram's own modules are instrumented (coverage of numpy or protobuf would only slow it).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # for tests.fuzz.* when run as a script

with atheris.instrument_imports(include=["engram", "tests.fuzz"]):
    from tests.fuzz.gateway_path import validate_like_gateway

    from engram.contract.errors import EngramError
    from engram.gateway import ws_frames
    from engram.gateway.service import parse
    from engram.shard.wal import Wal, encode_record, segment_name
    from engram.v1 import streaming_pb2 as pb

WORK = ROOT / ".engram" / "fuzz"


def grpc_input(data: bytes) -> None:
    incoming = parse(data)
    if incoming.message is not None:
        try:
            validate_like_gateway(incoming.message)
        except EngramError:  # pragma: no cover - outcome() already catches these
            raise AssertionError("an EngramError escaped validate_like_gateway") from None


def ws_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")  # invalid bytes become lone surrogates
    try:
        kind, req = ws_frames.decode_text(text)
    except ws_frames.FrameError as exc:
        frame = ws_frames.error_frame(
            exc.code, exc.message, sequence_number=exc.sequence_number, request_id=exc.request_id
        )
        frame.encode("utf-8")
        return
    if req is not None:
        validate_like_gateway(req)


_VALID_SEGMENT = encode_record(b"first", 1) + encode_record(b"second", 2)


def wal_input(data: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        directory = Path(tmp)
        (directory / segment_name(1)).write_bytes(_VALID_SEGMENT)
        (directory / segment_name(2)).write_bytes(data)
        first = [(lsn, bytes(p)) for lsn, p in Wal(directory).replay()]
        assert first[:2] == [(1, b"first"), (2, b"second")], first
        assert all(len(p) <= len(data) for _, p in first[2:])
        again = [(lsn, bytes(p)) for lsn, p in Wal(directory).replay()]
        assert again == first


def _seeds(target: str) -> list[bytes]:
    if target == "grpc":
        vectors = bytes(16)
        return [
            pb.ObservationRequest(
                memory_space_id="alpha", init=pb.StreamInit()
            ).SerializeToString(),
            pb.ObservationRequest(
                sequence_number=1, batch=pb.ObservationBatch(dim=4, vectors=vectors, ids=["a"])
            ).SerializeToString(),
            pb.ObservationRequest(
                recall=pb.RecallRequest(k=3, cue=[1.0, 0.5], min_score=0.1)
            ).SerializeToString(),
            pb.ObservationRequest(
                sequence_number=2, observation=pb.Episode(what="x", embedding=[1.0])
            ).SerializeToString(),
        ]
    if target == "ws":
        return [
            b'{"type":"init","memory_space_id":"alpha"}',
            b'{"type":"batch","sequence_number":1,"vectors":[[1,2],[3,4]],"ids":["a","b"]}',
            b'{"type":"batch","sequence_number":2,"dim":2,"vectors_b64":"AACAPwAAAEA="}',
            b'{"type":"recall","request_id":"r","cue":[1,0],"k":5,"consistency":"session"}',
            b'{"type":"observation","sequence_number":3,"episode":{"embedding":[1],'
            b'"when":"2026-01-02T03:04:05Z"}}',
            b'{"type":"flow_control","action":"slow_down","preferred_rate":10}',
        ]
    return [encode_record(b"third", 3), encode_record(b"", 4) + encode_record(b"x" * 40, 9)]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "grpc": grpc_input,
    "ws": ws_input,
    "wal": wal_input,
}


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in TARGETS or not argv[2].isdigit():
        sys.exit(f"usage: {argv[0]} {{{'|'.join(TARGETS)}}} SECONDS [libFuzzer options]")
    target, seconds = argv[1], int(argv[2])
    corpus = WORK / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    options = [
        f"-max_total_time={seconds}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-max_len=65536",
        f"-artifact_prefix={WORK}/crash-{target}-",
        *argv[3:],
        str(corpus),
    ]
    print(f"atheris: {target} for {seconds} s, corpus {corpus}", flush=True)
    atheris.Setup([argv[0], *options], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
