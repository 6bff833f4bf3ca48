"""Child-process helpers of the launcher: spawn, signal and stop by PID, read log tails.

Children start in their own session, so a Ctrl-C in the terminal reaches only the launcher,
which then stops them in order. On Linux they also get SIGTERM if the thread that started them
dies, so a launcher killed with SIGKILL does not leave them running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from engram.common.threads import libc

_PR_SET_PDEATHSIG = 1


def _can_die_with_parent() -> bool:
    """Whether Linux can SIGTERM a child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    lib = libc()
    return sys.platform.startswith("linux") and lib is not None and hasattr(lib, "prctl")


_DIE_WITH_PARENT = _can_die_with_parent()

# Sets PR_SET_PDEATHSIG in the child itself, then execs the real command (the PID stays).
# Unlike a preexec_fn this keeps subprocess on its vfork/exec path: no atfork handlers run
# in this process (gRPC's and OpenBLAS' are unsafe while other threads use them).
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys;"
    f"ctypes.CDLL(None,use_errno=True).prctl({_PR_SET_PDEATHSIG},signal.SIGTERM);"
    "os.getppid()==int(sys.argv[1]) or os._exit(1);"
    "os.execvp(sys.argv[2],sys.argv[2:])"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding ``host:port`` fails (something listens there already)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` in a new session, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n===== {stamp} starting: {' '.join(argv)}\n".encode())
        log.flush()
        args = list(argv)
        if die_with_parent and _DIE_WITH_PARENT:
            args = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *args]
        return subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def send(proc: subprocess.Popen[bytes], sig: int) -> bool:
    """Sends ``sig`` to the child by PID; False if it had exited already."""
    if proc.poll() is not None:
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code."""
    if send(proc, signal.SIGTERM):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    send(proc, signal.SIGKILL)
    return proc.wait()


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM to all, then waits up to ``timeout`` seconds for each before SIGKILL."""
    for proc in procs:
        send(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(proc, signal.SIGKILL)
            proc.wait()


def log_tail(path: Path, lines: int = 40, max_bytes: int = 16_384) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
