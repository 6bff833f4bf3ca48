"""docs/websocket.md stays true: its JSON Schemas accept its examples, the client examples are
accepted by the server, and every kind of frame a live server sends matches its schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")

CLUSTER_ENV = {"ENGRAM_WS_HEARTBEAT_S": "0.3"}
CLUSTER_SHARDS = 1

DOC = Path(__file__).resolve().parents[2] / "docs" / "websocket.md"
_BLOCK = re.compile(r"<!-- (schema|example): (\w+/\w+) -->\s*```json\n(.*?)```", re.S)


def _blocks() -> tuple[dict[str, dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    schemas: dict[str, dict[str, Any]] = {}
    examples: list[tuple[str, dict[str, Any]]] = []
    for kind, name, body in _BLOCK.findall(DOC.read_text()):
        value = json.loads(body)
        if kind == "schema":
            schemas[name] = value
        else:
            examples.append((name, value))
    return schemas, examples


SCHEMAS, EXAMPLES = _blocks()
CLIENT = ["init", "batch", "observation", "recall", "delete", "flow_control", "close", "heartbeat"]
SERVER = ["init_ack", "ack", "status", "recall_result", "deleted", "error", "heartbeat"]


def validate(name: str, frame: dict[str, Any]) -> None:
    jsonschema.validate(
        frame, SCHEMAS[name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_every_frame_has_a_schema_and_an_example():
    expected = [f"client/{c}" for c in CLIENT] + [f"server/{s}" for s in SERVER]
    assert sorted(SCHEMAS) == sorted(expected)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert {name for name, _ in EXAMPLES} == set(SCHEMAS)


@pytest.mark.parametrize(("name", "example"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_examples_match_their_schema(name, example):
    validate(name, example)
    assert example["type"] == name.split("/")[1]


def test_schemas_reject_what_the_server_refuses():
    with pytest.raises(jsonschema.ValidationError):
        validate("client/init", {"type": "init"})  # neither space nor session
    with pytest.raises(jsonschema.ValidationError):
        validate("client/batch", {"type": "batch", "sequence_number": 1, "vectors_b64": "AAAA"})
    with pytest.raises(jsonschema.ValidationError):
        validate("client/recall", {"type": "recall", "cue": [1.0]})  # no k
    with pytest.raises(jsonschema.ValidationError):
        validate("client/delete", {"type": "delete", "request_id": "d"})  # names nothing
    with pytest.raises(jsonschema.ValidationError):
        validate(
            "client/delete", {"type": "delete", "since": "2026-01-01T00:00:00Z", "since_us": 1}
        )


async def test_live_frames_match_the_schemas(shared_cluster, ws_connect, space_id):
    """A session through every kind of server frame, each validated against the doc."""
    ws = await ws_connect(shared_cluster)
    validate("server/heartbeat", await ws.expect("heartbeat"))  # this module's 0.3 s interval
    init = await ws.init(space_id)
    validate("server/init_ack", init)
    v = np.eye(3, dtype="<f4")[:2] + 0.1
    await ws.send(
        {"type": "batch", "sequence_number": 1, "vectors": v.tolist(), "ids": ["obs-1", "obs-2"]}
    )
    validate("server/ack", await ws.expect("ack"))
    await ws.send({"type": "recall", "request_id": "r1", "cue": v[0].tolist(), "k": 2})
    validate("server/recall_result", await ws.expect("recall_result"))
    await ws.send({"type": "delete", "request_id": "d1", "ids": ["obs-2"]})
    deleted = await ws.expect("deleted")
    validate("server/deleted", deleted)
    assert (deleted["request_id"], deleted["deleted"]) == ("d1", 1)
    await ws.send({"type": "flow_control", "action": "buffer_status"})
    validate("server/status", await ws.expect("status"))
    await ws.send({"type": "batch", "sequence_number": 9, "vectors": v.tolist()})
    validate("server/error", await ws.expect("error"))
    validate("server/heartbeat", await ws.expect("heartbeat"))


async def test_client_examples_are_accepted_by_the_server(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    replies: dict[str, str] = {}
    session = ""
    for name, example in EXAMPLES:
        if not name.startswith("client/") or example["type"] in ("close", "heartbeat"):
            continue
        frame = dict(example)
        if frame["type"] == "init":
            frame["memory_space_id"] = space_id
        if "session_id" in frame:
            frame["session_id"] = session
        await ws.send(frame)
        if frame["type"] == "heartbeat":
            continue
        reply = await ws.recv()
        replies[frame["type"]] = reply["type"]
        assert reply["type"] != "error", (example, reply)
        session = session or reply["session_id"]
    assert replies == {
        "init": "init_ack",
        "batch": "ack",
        "observation": "ack",
        "recall": "recall_result",
        "delete": "deleted",
        "flow_control": "status",
    }
