"""A real Prometheus (Debian's ``prometheus`` binary) scraping a local cluster.

:func:`cluster_targets` turns a cluster's process list (``cluster.json``, as ``engram up``
writes it and ``engram status --json`` shows it) into scrape targets under the job names
the alerts and dashboards select (``engram-shard``, ``engram-gateway``).
:class:`Prometheus` writes its configuration, runs it on 127.0.0.1 as a child process
(stopped by PID), reloads it with new targets and answers queries through the HTTP API.
Used by ``make observe``, the plots and the tests.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engram.launcher import procs

JOBS = {"shard": "engram-shard", "gateway": "engram-gateway"}
HOST = "127.0.0.1"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def binary() -> str:
    """Path of the prometheus binary (``make prometheus-deps`` installs it)."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise PrometheusError("prometheus not found: run `make prometheus-deps`")
    return found


def cluster_targets(cluster: Mapping[str, Any]) -> dict[str, list[str]]:
    """job -> ``host:port`` of the HTTP (``/metrics``) endpoint of every gateway and shard."""
    targets: dict[str, list[str]] = {job: [] for job in JOBS.values()}
    for proc in cluster["processes"]:
        job = JOBS.get(proc["role"])
        if job is not None and proc.get("http"):
            targets[job].append(proc["http"])
    return targets


def rules_with_for(source: Path, target: Path, duration: str) -> Path:
    """A copy of a rule file whose every alert waits ``duration`` (tests: the shipped rules
    keep their real ``for:``)."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = duration
    target.write_text(yaml.safe_dump(rules, sort_keys=False))
    return target


class Prometheus:
    """One Prometheus server on 127.0.0.1, its data and configuration under ``directory``."""

    def __init__(
        self,
        directory: Path,
        targets: Mapping[str, Sequence[str]],
        *,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        port: int = 0,
    ) -> None:
        self.directory = directory
        self.targets = {job: list(t) for job, t in targets.items()}
        self.rule_files = [p.resolve() for p in rule_files]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.port = port or procs.free_port(HOST)
        self.config = directory / "prometheus.yml"
        self.log_path = directory / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def write_config(self) -> None:
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in self.targets.items()
            ],
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config)

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.write_config()
        argv = [
            binary(),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        self._proc = procs.spawn(argv, env={"PATH": "/usr/bin:/bin"}, log_path=self.log_path)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(
                    f"prometheus did not become ready:\n{procs.log_tail(self.log_path, 20)}"
                )
            time.sleep(0.1)
        return self

    def reload(self, targets: Mapping[str, Sequence[str]]) -> None:
        """New targets: rewrites the configuration and tells Prometheus (SIGHUP)."""
        self.targets = {job: list(t) for job, t in targets.items()}
        self.write_config()
        if self._proc is not None:
            procs.send(self._proc, signal.SIGHUP)

    def stop(self) -> int | None:
        """Stops the server by PID (SIGTERM, then SIGKILL); returns its exit code."""
        if self._proc is None:
            return None
        code = procs.stop(self._proc, timeout=10)
        self._proc = None
        return code

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP API

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str | float) -> Any:
        """``GET /api/v1/<path>``'s ``data``; raises PrometheusError on an error answer."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api(
            "query_range", query=expr, start=start, end=end, step=step
        )["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets
