"""The C library, for what Python does not offer: thread names the operating system sees too
(``top -H``, ``ps -L``, ``/proc/<pid>/task``), and handing freed heap memory back to it."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_PR_SET_NAME = 15


def libc() -> ctypes.CDLL | None:
    """The C library, loaded once; None where it cannot be loaded."""
    return _LIBC


def name_os_thread(name: str | None = None) -> None:
    """Names the calling thread at the OS level (Linux keeps 15 bytes); by default, with its
    Python name. Does nothing where prctl is missing."""
    if _LIBC is None or not hasattr(_LIBC, "prctl"):
        return
    raw = (name or threading.current_thread().name).encode("utf-8", "replace")[:15]
    _LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


def trim_heap() -> None:
    """Returns the free memory at the top of every malloc arena to the system (glibc keeps it
    for reuse otherwise). Does nothing on a C library without ``malloc_trim``."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
