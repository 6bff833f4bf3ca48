"""Settings are declared once: load(), the docs table and the code's variables agree.

* the table in ``docs/settings.md`` is exactly what the declarations generate;
* every ``ENGRAM_*`` variable named anywhere in the services is declared (or is one of the
  tools' own variables the docs list apart);
* for every declared setting, ``load()`` reads its variable into its field, and refuses a value
  outside its range (or choices) with a message naming the variable;
* defaults computed from other settings, and the rules across settings.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from engram.common import settings
from engram.common.settings import Entry, SettingsError, catalog, load

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "settings.md"
TOOL_VARIABLES = {"ENGRAM_REDIS_SERVER", "ENGRAM_API_KEY", "ENGRAM_CA_FILE"}


def _at(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_docs_table_is_generated_from_the_declarations() -> None:
    text = DOCS.read_text()
    assert settings.render_docs(text) == text, (
        "docs/settings.md is stale: run `python -m engram.common.settings --write-docs`"
    )


def test_every_variable_the_code_names_is_declared() -> None:
    declared = {e.env for e in catalog()}
    prefixes = {"ENGRAM_LANE_HIGH_", "ENGRAM_LANE_NORMAL_", "ENGRAM_LANE_LOW_", "ENGRAM_KEY_MAX_"}
    named: dict[str, Path] = {}
    for path in (ROOT / "services" / "engram").rglob("*.py"):
        for name in re.findall(r"ENGRAM_[A-Z0-9_]*[A-Z0-9]_?", path.read_text()):
            named.setdefault(name, path)
    unknown = {
        n: str(p.relative_to(ROOT))
        for n, p in named.items()
        if n not in declared and n not in TOOL_VARIABLES and n not in prefixes
    }
    assert not unknown, f"variables read but not declared in common/settings.py: {unknown}"
    documented = set(re.findall(r"`(ENGRAM_[A-Z0-9_]+)`", DOCS.read_text()))
    assert TOOL_VARIABLES <= documented


def test_names_are_unique_and_documented() -> None:
    entries = catalog()
    names = [e.env for e in entries]
    assert len(names) == len(set(names)), "two settings share a variable"
    for e in entries:
        assert e.setting.doc.strip(), f"{e.env} has no doc"
        assert e.env.startswith("ENGRAM_"), e.env


def _valid(e: Entry) -> str:
    """A value inside the setting's range that differs from its default where possible."""
    s = e.setting
    if s.kind == "choice":
        return next(c for c in s.choices if c != e.default)
    if s.kind == "bool":
        return "0" if e.default else "1"
    if s.kind == "str":
        return "127.0.0.1:1" if "LISTEN" in e.env or "ADVERTISE" in e.env else "/x/y"
    lo = s.lo if s.lo is not None else 0
    hi = s.hi if s.hi is not None else lo + 10
    if s.kind == "float":
        return repr((lo + min(hi, lo + 1)) / 2)
    return str(int(lo) + 1 if int(lo) + 1 <= hi else int(lo))


def _parsed(e: Entry, raw: str) -> Any:
    if e.setting.kind == "bool":
        return raw == "1"
    if e.setting.kind in ("int", "size"):
        return int(raw)
    if e.setting.kind == "float":
        return float(raw)
    return raw


# Settings whose value constrains another: a test value of theirs needs its partner.
_PARTNERS = {
    "ENGRAM_WS_HEARTBEAT_S": {"ENGRAM_WS_IDLE_TIMEOUT_S": "86400"},
    "ENGRAM_WS_IDLE_TIMEOUT_S": {"ENGRAM_WS_HEARTBEAT_S": "0.05"},
    "ENGRAM_GRPC_MAX_MESSAGE_BYTES": {"ENGRAM_MAX_BATCH_BYTES": "1024"},
    "ENGRAM_TLS_CERT": {"ENGRAM_TLS_KEY": "/k"},
    "ENGRAM_TLS_KEY": {"ENGRAM_TLS_CERT": "/c"},
    "ENGRAM_INTERNAL_TLS_CA": {"ENGRAM_INTERNAL_TLS_CERT": "/c", "ENGRAM_INTERNAL_TLS_KEY": "/k"},
    "ENGRAM_INTERNAL_TLS_CERT": {"ENGRAM_INTERNAL_TLS_CA": "/a", "ENGRAM_INTERNAL_TLS_KEY": "/k"},
    "ENGRAM_INTERNAL_TLS_KEY": {"ENGRAM_INTERNAL_TLS_CA": "/a", "ENGRAM_INTERNAL_TLS_CERT": "/c"},
}


@pytest.mark.parametrize("entry", catalog(), ids=lambda e: e.env)
def test_load_reads_each_variable_into_its_field(entry: Entry) -> None:
    raw = _valid(entry)
    loaded = load({entry.env: raw, **_PARTNERS.get(entry.env, {})})
    assert _at(loaded, entry.path) == _parsed(entry, raw)


@pytest.mark.parametrize(
    "entry",
    [e for e in catalog() if e.setting.kind in ("int", "float", "size", "bool", "choice")],
    ids=lambda e: e.env,
)
def test_load_refuses_values_out_of_range(entry: Entry) -> None:
    s = entry.setting
    bad = {
        "choice": "nonsense",
        "bool": "2",
        "int": str(int(s.hi or 0) + 1),
        "size": str(int(s.hi or 0) + 1),
        "float": repr(float(s.hi or 0) * 2 + 1),
    }[s.kind]
    with pytest.raises(SettingsError, match=entry.env):
        load({entry.env: bad})
    if s.kind in ("int", "float", "size"):
        with pytest.raises(SettingsError, match=entry.env):
            load({entry.env: "twelve"})


@pytest.mark.parametrize(
    "env",
    [
        {"ENGRAM_TLS_CERT": "/c"},
        {"ENGRAM_TLS_KEY": "/k"},
        {"ENGRAM_INTERNAL_TLS_CA": "/a"},
        {"ENGRAM_INTERNAL_TLS_CERT": "/c", "ENGRAM_INTERNAL_TLS_KEY": "/k"},
    ],
)
def test_tls_files_come_together(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="together"):
        load(env)


def test_defaults_are_the_declared_ones() -> None:
    loaded = load({})
    for e in catalog():
        if not e.setting.derived:
            assert _at(loaded, e.path) == e.default, e.env


def test_derived_defaults() -> None:
    loaded = load({"ENGRAM_SHARD_ID": "1", "ENGRAM_SHARD_LISTEN": "10.0.0.5:7000"})
    assert loaded.shard.data_dir == "./data/shard-1"
    assert loaded.shard.advertise == "10.0.0.5:7000"
    one = load({"ENGRAM_SHARD_COUNT": "1"}).shard.admission.memory_budget_bytes
    four = load({"ENGRAM_SHARD_COUNT": "4"}).shard.admission.memory_budget_bytes
    assert one >= four >= 64 << 20
    assert load({"ENGRAM_MEMORY_BUDGET": "64MB"}).shard.admission.memory_budget_bytes == 64 << 20


def test_lane_limits_are_read_per_lane() -> None:
    loaded = load({"ENGRAM_LANE_LOW_HARD_BYTES": "1GB", "ENGRAM_LANE_HIGH_SOFT_OBSERVATIONS": "7"})
    adm = loaded.shard.admission
    assert adm.low.hard_bytes == 1 << 30 and adm.high.soft_observations == 7
    assert adm.normal == settings.AdmissionSettings().normal


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (
            {"ENGRAM_MAX_BATCH_BYTES": str(1 << 28), "ENGRAM_GRPC_MAX_MESSAGE_BYTES": "4096"},
            "ENGRAM_MAX_BATCH_BYTES",
        ),
        ({"ENGRAM_WS_HEARTBEAT_S": "10", "ENGRAM_WS_IDLE_TIMEOUT_S": "5"}, "ENGRAM_WS_IDLE"),
    ],
)
def test_rules_across_settings(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        load(env)


def test_a_shard_id_beyond_the_count_is_an_extra_shard() -> None:
    loaded = load({"ENGRAM_SHARD_COUNT": "2", "ENGRAM_SHARD_ID": "5"})
    assert (loaded.shard.shard_id, loaded.cluster.shard_count) == (5, 2)
    with pytest.raises(SettingsError, match="ENGRAM_SHARD_ID"):
        load({"ENGRAM_SHARD_ID": "-1"})


def test_settings_are_frozen() -> None:
    loaded = load({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.shard.listen = "x"  # type: ignore[misc]


def test_every_default_described_in_words_is_computed_and_no_other() -> None:
    described = {e.path for e in catalog() if e.setting.derived}
    assert described == set(settings._DERIVED), "a `derived` doc without its function, or back"
