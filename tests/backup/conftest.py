"""The backup suites reuse the move suites' helpers (``mv``: a writer of unique ids, DIM,
BATCH), loaded from ``tests/moves/conftest.py`` rather than copied."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_NAME = "engram_tests_move_helpers"


def _helpers() -> ModuleType:
    if _NAME not in sys.modules:
        path = Path(__file__).parent.parent / "moves" / "conftest.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


@pytest.fixture
def mv() -> ModuleType:
    return _helpers()
