"""A whole Engram Stream cluster on one machine: Redis, N shards and one or more gateways.

:class:`LocalCluster` starts every service as a child process on given or free ports, waits
until each is healthy, records the topology in ``<data_dir>/cluster.json``, restarts children
that die (with the same environment and ports, backoff from :mod:`engram.control.restarts`)
and stops them in order: gateways, shards, Redis. ``engram up``, ``engram bench`` and the
integration tests use it::

    with LocalCluster(tmp_path, shards=2) as cluster:
        channel = grpc.insecure_channel(cluster.gateway_address)
        cluster.kill("shard-0", signal.SIGKILL)
        cluster.wait_healthy("shard-0", timeout=30)

Services are configured only through their ``ENGRAM_*`` environment variables. With
``keys_file`` (auth), ``tls`` (the gateway's certificate and key) or ``internal_token`` the
cluster is secured as :mod:`engram.launcher.secure` describes.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path

import engram
from engram.common.settings import default_memory_budget
from engram.control import restarts
from engram.control.restarts import GiveUp, Policy, ProcessState, Restart
from engram.launcher import procs, redis_server, secure
from engram.launcher.procs import free_port
from engram.launcher.secure import grpc_healthy

__all__ = [
    "ClusterError",
    "LocalCluster",
    "PortInUseError",
    "free_port",
    "grpc_healthy",
    "http_healthy",
]

log = logging.getLogger("engram.launcher")

HOST = "127.0.0.1"
CLUSTER_FILE = "cluster.json"
POLL_INTERVAL_S = 0.2
# Signals after which kill() expects a new process (the supervisor restarts it).
_FATAL_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT}
)

DEFAULT_COMMANDS: Mapping[str, Sequence[str]] = {
    "shard": (sys.executable, "-m", "engram.shard"),
    "gateway": (sys.executable, "-m", "engram.gateway"),
}


def http_healthy(address: str, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> bool:
    """Whether ``GET /healthz`` at ``address`` (host:port) answers 200; ``context``: HTTPS."""
    host, port = address.rsplit(":", 1)
    conn = (
        HTTPConnection(host, int(port), timeout=timeout)
        if context is None
        else HTTPSConnection(host, int(port), timeout=timeout, context=context)
    )
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, HTTPException):  # ssl.SSLError is an OSError
        return False
    finally:
        conn.close()


class ClusterError(RuntimeError):
    """A process of the cluster did not start, did not become healthy, or was given up."""


class PortInUseError(ClusterError):
    """A requested port is taken by another process."""


@dataclass
class _Proc:
    name: str
    role: str  # "redis", "shard" or "gateway"
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int  # Redis port or gRPC port
    http_port: int | None
    state: ProcessState
    popen: subprocess.Popen[bytes] | None = None
    # The child that kill() sent a fatal signal to; wait_healthy() waits for its successor.
    killed: subprocess.Popen[bytes] | None = None

    @property
    def grpc(self) -> str | None:
        return None if self.role == "redis" else f"{HOST}:{self.port}"

    @property
    def http(self) -> str | None:
        return None if self.http_port is None else f"{HOST}:{self.http_port}"

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


_LIVE: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


@atexit.register
def _stop_live_clusters() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


class LocalCluster:
    """Redis, ``shards`` shard processes and ``gateways`` gateway processes, supervised.

    Ports left at 0 are picked free. ``env`` adds variables for every service (tunables such
    as ``ENGRAM_CHECKPOINT_EVERY``); the addressing variables are the cluster's own.
    ``shard_env`` adds variables for one shard (by shard id) on top of ``env``, e.g. its own
    ``ENGRAM_FAULT_FILE``. ``shard_advertise`` overrides the address a shard advertises to
    gateways (by shard id; default: its listen address), e.g. a proxy in front of it.
    ``commands`` maps a role ("shard", "gateway") to the command that starts it.
    ``home_shards`` is every service's ``ENGRAM_SHARD_COUNT`` (default: ``shards``): fewer
    make shards ``home_shards``..``shards - 1`` extra shards, which serve only the spaces moved
    to them (a shrink in progress, or shards added without changing where new spaces go).
    ``keys_file`` turns auth on at the gateway, ``tls=(cert, key)`` TLS on its public ports
    (``tls_ca``: the CA the launcher trusts for them; default the system's), ``internal_token``
    the shards' secret (None: on iff auth is); :attr:`security` is what the cluster uses.

    Gateways are stateless, so ``gateways`` > 1 runs that many on the one gRPC port
    (:attr:`gateway_address`; gRPC binds with SO_REUSEPORT, and the kernel spreads the
    connections over them): "gateway", then "gateway-1", "gateway-2"... Each has an HTTP port
    of its own; :attr:`http_port` (cluster.json's "http": WebSocket, /metrics) is the first
    one's, :meth:`gateway_http_port` any one's. Only the first runs the canary
    (``ENGRAM_CANARY_INTERVAL_S=0`` for the others). A gateway's health is its own
    ``/healthz`` (HTTPS with TLS, trusting ``tls_ca``): a probe of the shared gRPC port may
    reach any of them.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        shards: int = 2,
        grpc_port: int = 0,
        http_port: int = 0,
        redis_port: int = 0,
        log_level: str | None = None,
        env: Mapping[str, str] | None = None,
        redis_binary: str | None = None,
        supervise: bool = True,
        policy: Policy | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        commands: Mapping[str, Sequence[str]] | None = None,
        shard_env: Mapping[int, Mapping[str, str]] | None = None,
        shard_advertise: Mapping[int, str] | None = None,
        home_shards: int | None = None,
        keys_file: str | Path | None = None,
        tls: tuple[str | Path, str | Path] | None = None,
        tls_ca: str | Path | None = None,
        internal_token: bool | None = None,
        gateways: int = 1,
    ) -> None:
        if shards < 1:
            raise ValueError("a cluster needs at least one shard")
        if gateways < 1:
            raise ValueError(f"a cluster needs at least one gateway, got gateways={gateways}")
        if home_shards is not None and not 1 <= home_shards <= shards:
            raise ValueError(f"home_shards must be 1..{shards}, got {home_shards}")
        self.data_dir = Path(data_dir).resolve()
        self.logs_dir = self.data_dir / "logs"
        self.shards = shards
        self.gateways = gateways
        self.home_shards = shards if home_shards is None else home_shards
        self.supervise = supervise
        self.policy = policy or Policy()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._commands = {**DEFAULT_COMMANDS, **(commands or {})}
        self._log_level = (log_level or os.environ.get("ENGRAM_LOG_LEVEL") or "INFO").upper()
        self._extra_env = dict(env or {})
        self._shard_env = {int(i): dict(v) for i, v in (shard_env or {}).items()}
        self._shard_advertise = {int(i): a for i, a in (shard_advertise or {}).items()}
        for i in (*self._shard_env, *self._shard_advertise):
            if not 0 <= i < shards:
                raise ValueError(f"shard_env/shard_advertise name shard {i}, not 0..{shards - 1}")
        self._redis_binary = redis_binary
        self.security = secure.choose(
            self.data_dir,
            {**os.environ, **self._extra_env},
            keys_file=keys_file,
            tls=tls,
            tls_ca=tls_ca,
            internal_token=internal_token,
        )
        self._requested = {
            "gateway gRPC": grpc_port,
            "gateway HTTP": http_port,
            "redis": redis_port,
        }
        self._taken: set[int] = set()
        self._redis_port = self._port(redis_port)
        self._grpc_port = self._port(grpc_port)
        self._http_port = self._port(http_port)
        self._gateway_http_ports = {  # gateway name -> its HTTP port
            name: self._port(0) if i else self._http_port
            for i, name in enumerate(self.gateway_names)
        }
        self._shard_ports = [(self._port(0), self._port(0)) for _ in range(shards)]
        self._recall_ports = [self._port(0) for _ in range(shards)]
        self._lock = threading.RLock()
        self._procs: dict[str, _Proc] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # ------------------------------------------------------------------ addresses

    @property
    def redis_url(self) -> str:
        return redis_server.redis_url(self._redis_port)

    @property
    def gateway_address(self) -> str:
        return f"{HOST}:{self._grpc_port}"

    @property
    def http_port(self) -> int:
        """The first gateway's HTTP port (WebSocket, /metrics, /healthz)."""
        return self._http_port

    @property
    def gateway_names(self) -> list[str]:
        """The gateways: "gateway", then "gateway-1".. (all on :attr:`gateway_address`)."""
        return ["gateway", *(f"gateway-{i}" for i in range(1, self.gateways))]

    def gateway_http_port(self, name: str = "gateway") -> int:
        """HTTP port of gateway ``name`` (each gateway has its own)."""
        return self._gateway_http_ports[name]

    @property
    def cluster_file(self) -> Path:
        return self.data_dir / CLUSTER_FILE

    @property
    def names(self) -> list[str]:
        """Process names in start order: "redis", "shard-0".., "gateway", "gateway-1".."""
        return ["redis", *(f"shard-{i}" for i in range(self.shards)), *self.gateway_names]

    def shard_address(self, shard_id: int) -> str:
        """gRPC address of shard ``shard_id`` (the internal Shard service)."""
        return f"{HOST}:{self._shard_ports[shard_id][0]}"

    def shard_recall_address(self, shard_id: int) -> str:
        """Address of shard ``shard_id``'s recall port (``ENGRAM_SHARD_RECALL_LISTEN``; unused
        when the environment given sets that variable itself, empty to turn the port off)."""
        return f"{HOST}:{self._recall_ports[shard_id]}"

    def shard_http_port(self, shard_id: int) -> int:
        """Port of shard ``shard_id``'s /metrics and /healthz."""
        return self._shard_ports[shard_id][1]

    def shard_data_dir(self, shard_id: int) -> Path:
        return self.data_dir / f"shard-{shard_id}"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        return procs.log_tail(self.log_path(name), lines)

    def print_logs(self, lines: int = 30) -> None:
        """Prints the last ``lines`` of every process's log (tests do, when they fail)."""
        for name in self.names:
            tail = self.log_tail(name, lines)
            if tail:
                print(f"\n----- {self.log_path(name)} (last {lines} lines) -----\n{tail}")

    # ------------------------------------------------------------------ processes

    def pid(self, name: str) -> int:
        """PID of the current process called ``name``."""
        proc = self._get(name)
        if proc.popen is None:
            raise ClusterError(f"{name} was never started")
        return proc.popen.pid

    def restarts(self, name: str) -> int:
        return self._get(name).state.restarts

    def state(self, name: str) -> ProcessState:
        return self._get(name).state

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Sends ``sig`` to ``name`` by PID (the supervisor restarts it); returns the PID."""
        with self._lock:
            proc = self._get(name)
            if proc.popen is None:
                raise ClusterError(f"{name} was never started")
            if proc.popen.poll() is None:
                if sig in _FATAL_SIGNALS:
                    proc.killed = proc.popen
                os.kill(proc.popen.pid, sig)
            return proc.popen.pid

    def stop_process(self, name: str, timeout: float | None = None) -> int | None:
        """Stops ``name`` (SIGTERM, then SIGKILL) and keeps it down until start_process()."""
        with self._lock:
            proc = self._get(name)
            proc.state = restarts.hold(proc.state)
            popen = proc.popen
        if popen is None:
            return None
        code = procs.stop(popen, self.stop_timeout if timeout is None else timeout)
        with self._lock:
            proc.state = restarts.record_exit(proc.state, code, time.monotonic())
            self._write_cluster_file()
        return code

    def start_process(self, name: str, timeout: float | None = None) -> None:
        """Starts ``name`` again after stop_process() (or a give-up) and waits until healthy."""
        with self._lock:
            proc = self._get(name)
            if not proc.running():
                self._spawn(proc)
                proc.state = restarts.record_start(proc.state, time.monotonic())
                self._write_cluster_file()
        self.wait_healthy(name, self.startup_timeout if timeout is None else timeout)

    def healthy(self, name: str, timeout: float = 1.0) -> bool:
        """One health probe: PING for Redis, the gRPC health check for a shard, a gateway's
        own ``/healthz`` (its gRPC port is shared: a probe there may reach another gateway)."""
        proc = self._get(name)
        if proc.role == "redis":
            return redis_server.ping(self.redis_url, timeout)
        if proc.role == "shard":
            return secure.shard_healthy(proc.grpc or "", self.security.internal, timeout)
        return proc.http is not None and http_healthy(proc.http, timeout, self._gateway_ssl)

    def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        """Waits until ``name`` is running and healthy.

        After kill() with a fatal signal it waits for the restarted process. Raises
        :class:`ClusterError` (with the tail of the log) on timeout, when the process exited
        and nothing will restart it, or when the supervisor gave up on it.
        """
        proc = self._get(name)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                popen, state, killed = proc.popen, proc.state, proc.killed
                supervised = self.supervise and self._thread is not None
            if state.given_up:
                raise self._error(name, "was given up by the supervisor")
            if popen is None:
                raise self._error(name, "was never started")
            if popen.poll() is None and popen is not killed:
                remaining = max(0.1, deadline - time.monotonic())
                if self.healthy(name, timeout=min(1.0, remaining)):
                    return
            elif popen.poll() is not None and (state.held or not supervised):
                raise self._error(name, f"exited with code {popen.returncode}")
            if time.monotonic() >= deadline:
                tls = proc.role == "gateway" and self.security.tls
                hint = " (its TLS certificate is checked against tls_ca: --tls-ca)" if tls else ""
                raise self._error(name, f"is not healthy after {timeout:g} s{hint}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalCluster:
        """Starts Redis, the shards and the gateways; returns once all are healthy."""
        if self._started:
            return self
        self._check_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        binary = self._redis_binary or redis_server.find_redis_server()
        self.security.write_token()
        self._build(binary)
        self._started = True
        self._stopping.clear()
        _LIVE.add(self)
        try:
            self._start_group(["redis"])
            self._start_group([f"shard-{i}" for i in range(self.shards)])
            self._start_group(self.gateway_names)
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._thread = threading.Thread(
                target=self._supervise, name="engram-supervisor", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the gateways, then the shards, then Redis (SIGTERM, SIGKILL after the timeout)."""
        if not self._started:
            return
        self._stopping.set()
        with self._lock:
            for proc in self._procs.values():
                proc.state = restarts.hold(proc.state)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        groups = [self.gateway_names, [f"shard-{i}" for i in range(self.shards)], ["redis"]]
        for group in groups:
            popens = [p.popen for n in group if (p := self._procs.get(n)) and p.popen is not None]
            procs.stop_all(popens, self.stop_timeout)
        now = time.monotonic()
        with self._lock:
            for proc in self._procs.values():
                if proc.popen is not None:
                    proc.state = restarts.record_exit(proc.state, proc.popen.returncode, now)
        self.cluster_file.unlink(missing_ok=True)
        self._started = False
        _LIVE.discard(self)

    def endpoints(self) -> dict[str, object]:
        """The topology as written to cluster.json."""
        with self._lock:
            processes = [
                {
                    "name": p.name,
                    "role": p.role,
                    "pid": p.popen.pid if p.popen is not None else None,
                    "grpc": p.grpc,
                    "advertise": p.env.get("ENGRAM_SHARD_ADVERTISE", p.grpc)
                    if p.role == "shard"
                    else None,
                    "http": p.http,
                    "port": p.port,
                    "log": str(p.log_path),
                    "restarts": p.state.restarts,
                }
                for p in self._procs.values()
            ]
        return {
            "launcher_pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "logs_dir": str(self.logs_dir),
            "shard_count": self.shards,
            "redis_url": self.redis_url,
            "gateway": self.gateway_address,
            "http": f"{HOST}:{self._http_port}",
            "security": self.security.record(),
            "processes": processes,
        }

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LocalCluster:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------------ internals

    def _get(self, name: str) -> _Proc:
        try:
            return self._procs[name]
        except KeyError:
            known = ", ".join(self.names)
            raise KeyError(
                f"no process {name!r} (not started yet, or not one of {known})"
            ) from None

    @functools.cached_property
    def _gateway_ssl(self) -> ssl.SSLContext | None:
        """The context of the gateways' /healthz probes (made once: probes run often)."""
        return self.security.gateway_ssl_context()

    def _port(self, requested: int) -> int:
        if requested:
            self._taken.add(requested)
            return requested
        for _ in range(50):
            port = free_port(HOST)
            if port not in self._taken:
                self._taken.add(port)
                return port
        raise ClusterError("could not find a free port")

    def _check_ports(self) -> None:
        for what, port in self._requested.items():
            if port and procs.port_in_use(port, HOST):
                raise PortInUseError(
                    f"port {port} ({what}) is already in use on {HOST}: another `engram up` "
                    "running? Stop it, or pick another port (0 picks a free one)"
                )

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._extra_env)
        services_dir = str(Path(engram.__file__).resolve().parent.parent)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = services_dir + (os.pathsep + path if path else "")
        env["PYTHONUNBUFFERED"] = "1"
        env["ENGRAM_REDIS_URL"] = self.redis_url
        env["ENGRAM_SHARD_COUNT"] = str(self.home_shards)
        if self.home_shards < self.shards and "ENGRAM_MEMORY_BUDGET" not in env:
            # the default divides the machine by the count: here every process shares it
            env["ENGRAM_MEMORY_BUDGET"] = str(default_memory_budget(self.shards))
        env["ENGRAM_LOG_LEVEL"] = self._log_level
        env.update(self.security.service_env("shard"))
        return env

    def _build(self, redis_binary: str) -> None:
        base = self._base_env()

        def add(
            name: str, role: str, argv: list[str], env: dict[str, str], port: int, http: int | None
        ) -> None:
            state = ProcessState(name, role, alive=False)
            self._procs[name] = _Proc(name, role, argv, env, self.log_path(name), port, http, state)

        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        add(
            "redis",
            "redis",
            redis_server.redis_argv(redis_binary, self._redis_port, redis_dir),
            dict(os.environ),
            self._redis_port,
            None,
        )
        for i, (port, http) in enumerate(self._shard_ports):
            self.shard_data_dir(i).mkdir(parents=True, exist_ok=True)
            env = {
                **base,
                **self._shard_env.get(i, {}),
                "ENGRAM_SHARD_ID": str(i),
                "ENGRAM_SHARD_LISTEN": f"{HOST}:{port}",
                "ENGRAM_SHARD_ADVERTISE": self._shard_advertise.get(i, f"{HOST}:{port}"),
                "ENGRAM_SHARD_DATA_DIR": str(self.shard_data_dir(i)),
                "ENGRAM_SHARD_HTTP_PORT": str(http),
            }
            given = {**self._extra_env, **self._shard_env.get(i, {})}
            if "ENGRAM_SHARD_RECALL_LISTEN" not in given:
                env["ENGRAM_SHARD_RECALL_LISTEN"] = self.shard_recall_address(i)
            add(f"shard-{i}", "shard", list(self._commands["shard"]), env, port, http)
        for name, http in self._gateway_http_ports.items():
            env = {
                **base,
                **self.security.service_env("gateway"),
                "ENGRAM_GATEWAY_LISTEN": f"{HOST}:{self._grpc_port}",
                "ENGRAM_GATEWAY_HTTP_HOST": HOST,
                "ENGRAM_GATEWAY_HTTP_PORT": str(http),
            }
            if name != "gateway":  # one canary is enough: the first gateway's
                env["ENGRAM_CANARY_INTERVAL_S"] = "0"
            add(name, "gateway", list(self._commands["gateway"]), env, self._grpc_port, http)

    def _spawn(self, proc: _Proc) -> None:
        proc.popen = procs.spawn(proc.argv, env=proc.env, log_path=proc.log_path)
        proc.killed = None
        log.debug("started %s (pid %d)", proc.name, proc.popen.pid)

    def _start_group(self, names: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for name in names:
                proc = self._procs[name]
                self._spawn(proc)
                proc.state = restarts.record_start(proc.state, now)
            self._write_cluster_file()
        deadline = now + self.startup_timeout
        for name in names:
            self.wait_healthy(name, max(0.1, deadline - time.monotonic()))

    def _supervise(self) -> None:
        while not self._stopping.wait(POLL_INTERVAL_S):
            try:
                self.supervise_once()
            except Exception:  # keep supervising whatever one poll ran into
                log.exception("supervisor poll failed")

    def supervise_once(self, now: float | None = None) -> None:
        """One supervisor poll: notes exits, restarts what is due, gives up on crash loops."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._stopping.is_set():
                return
            changed = False
            for proc in self._procs.values():
                if proc.state.alive and proc.popen is not None and proc.popen.poll() is not None:
                    proc.state = restarts.record_exit(proc.state, proc.popen.returncode, now)
                    if not proc.state.held:
                        delay = restarts.backoff_delay(
                            restarts.effective_streak(proc.state, self.policy), self.policy
                        )
                        log.warning(
                            "%s (pid %d) exited with code %s; restarting in %.1f s",
                            proc.name,
                            proc.popen.pid,
                            proc.popen.returncode,
                            delay,
                        )
            for action in restarts.decide(
                [p.state for p in self._procs.values()], now, self.policy
            ):
                proc = self._procs[action.name]
                if isinstance(action, Restart) and action.delay_s <= 0:
                    self._spawn(proc)
                    proc.state = restarts.record_restart(proc.state, now, self.policy)
                    assert proc.popen is not None
                    log.warning("restarted %s (pid %d)", proc.name, proc.popen.pid)
                    changed = True
                elif isinstance(action, GiveUp):
                    proc.state = restarts.give_up(proc.state)
                    log.error(
                        "giving up on %s: %s\n%s",
                        proc.name,
                        action.reason,
                        procs.log_tail(proc.log_path, 20),
                    )
                    changed = True
            if changed:
                self._write_cluster_file()

    def _write_cluster_file(self) -> None:
        tmp = self.cluster_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.endpoints(), indent=2) + "\n")
        os.replace(tmp, self.cluster_file)

    def _error(self, name: str, what: str) -> ClusterError:
        path = self.log_path(name)
        tail = procs.log_tail(path, 40)
        body = f"\n--- last lines of {path} ---\n{tail}" if tail else f" (no output in {path})"
        return ClusterError(f"{name} {what}{body}")
