"""The container image: a shard and a gateway run from it as a cluster runs them, and drain.

``make image`` builds the image (podman's layer cache makes that quick when nothing changed)
and writes the engine, its settings and the image's name to ``.engram/image/build.env``; these
tests read that file and run containers the way Kubernetes would: as the image's user, with a
read-only root filesystem, every capability dropped, no new privileges, the shard's data on a
mounted volume and a tmpfs ``/tmp``. Redis is the machine's (the ``redis_server`` fixture),
reached over the host network. Every container a test starts has a name unique to the run and
is removed at teardown, whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engram.launcher.cluster import grpc_healthy
from engram.launcher.procs import free_port
from engram.launcher.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "Containerfile"
BUILD_ENV = REPO / ".engram" / "image" / "build.env"
APP_UID = 10001
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 30  # what `stop -t` allows before SIGKILL; a clean drain takes well under it

# The first build compiles hnswlib and may make the Debian base: minutes, not the default 300 s.
BUILD_TIMEOUT = pytest.mark.timeout(900)

# Run inside the container as its user: what it may write to, whether the root filesystem is
# mounted read-only, and which compilers and entry points are on it.
INSPECT = r"""
import glob, importlib.util, json, os, shutil
writable = []
for top in sorted(os.listdir("/")):
    if top in ("proc", "sys", "dev"):
        continue
    for root, dirs, _ in os.walk("/" + top):
        if os.access(root, os.W_OK):
            writable.append(root)
            dirs.clear()
mounts = {line.split()[1]: line.split()[3].split(",") for line in open("/proc/mounts")}
compilers = [p for name in ("cc", "gcc", "g++", "c++", "cpp", "clang", "ld", "as")
             if (p := shutil.which(name))]
compilers += glob.glob("/usr/lib/gcc/*/*/cc1*") + glob.glob("/usr/bin/*-linux-gnu-g*")
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "writable": writable,
    "root_options": mounts["/"], "compilers": compilers,
    "tools": {name: shutil.which(name) for name in ("python", "engram", "kopf", "tini")},
    "operator": importlib.util.find_spec("engram_operator") is not None,
    "build_only": [m for m in ("grpc_tools",) if importlib.util.find_spec(m)],
}))
"""


@dataclass(frozen=True)
class Engine:
    """The container engine ``make image`` used, with its settings and the image it built."""

    command: str
    env: dict[str, str]
    image: str

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.command, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            pytest.fail(f"{self.command} {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done


@dataclass
class Containers:
    """Containers a test starts, named ``engram-test-<run>-<role>``; all removed at the end."""

    engine: Engine
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    names: list[str] = field(default_factory=list)

    def start(
        self, role: str, env: dict[str, str], volumes: Sequence[str] = (), *command: str
    ) -> str:
        """Starts the image as a cluster would (hardened, host network) and returns its name."""
        name = f"engram-test-{self.run_id}-{role}"
        self.names.append(name)
        args = ["run", "--detach", "--name", name, "--network", "host", "--read-only"]
        if self.engine.command == "podman":
            args.append("--read-only-tmpfs=false")  # else podman adds writable /run, /var/tmp
        args += ["--cap-drop=ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]
        for volume in volumes:
            args += ["--volume", volume]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        self.engine(*args, self.engine.image, *command)
        return name

    def logs(self, name: str) -> str:
        done = self.engine("logs", name, check=False)
        return done.stdout + done.stderr

    def remove_all(self) -> None:
        for name in self.names:
            print(f"--- logs of {name}\n{self.logs(name)}")  # shown when the test failed
        if self.names:
            force = ["-f", "-t", "0"] if self.engine.command == "podman" else ["-f"]
            self.engine("rm", *force, *self.names, check=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    """Builds the image with ``make image`` (quick when current) and reads what it used."""
    done = subprocess.run(
        ["make", "--no-print-directory", "image"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"make image failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    settings = dict(
        line.split("=", 1) for line in BUILD_ENV.read_text().splitlines() if "=" in line
    )
    env = dict(os.environ)
    if "CONTAINERS_CONF" in settings:
        env["CONTAINERS_CONF"] = settings["CONTAINERS_CONF"]
    return Engine(settings["ENGINE"], env, settings["IMAGE"])


@pytest.fixture
def containers(engine: Engine) -> Iterator[Containers]:
    made = Containers(engine)
    try:
        yield made
    finally:
        made.remove_all()


def _http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _wait_serving(containers: Containers, name: str, grpc_port: int) -> None:
    """Waits until the container answers gRPC health with SERVING (fails if it exits first)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not grpc_healthy(f"{HOST}:{grpc_port}", timeout=1.0):
        state = containers.engine("inspect", "--format", "{{.State.Status}}", name).stdout
        if state.strip() not in ("running", "created", "configured"):
            pytest.fail(f"{name} is {state.strip()}:\n{containers.logs(name)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not SERVING after {STARTUP_TIMEOUT_S} s:\n{containers.logs(name)}")
        time.sleep(0.2)


def _stop_and_check_drain(containers: Containers, name: str, messages: Sequence[str]) -> None:
    """SIGTERM (``stop``), then: exit code 0 and the service's drain messages in its log."""
    containers.engine("stop", "-t", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
    code = containers.engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = containers.logs(name)
    assert code == "0", f"{name} exited {code} after SIGTERM:\n{logs}"
    for message in messages:
        assert message in logs, f"{name}: {message!r} not in its log:\n{logs}"


def _service_env(redis: RedisServer, prefix: str) -> dict[str, str]:
    return {
        "ENGRAM_REDIS_URL": redis.url,
        "ENGRAM_KEY_PREFIX": prefix,
        "ENGRAM_SHARD_COUNT": "1",
    }


@BUILD_TIMEOUT
def test_shard_and_gateway_from_the_image_stream_verify_and_drain(
    containers: Containers, redis_server: RedisServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:
        os.chown(data, APP_UID, APP_UID)
        volume = f"{data}:/data"
    else:  # rootless podman maps the directory to the container's user itself
        volume = f"{data}:/data:U"
    shard_grpc, shard_http, gateway_grpc, gateway_http = (free_port() for _ in range(4))
    env = _service_env(redis_server, f"image-{containers.run_id}")
    shard_env = env | {
        "ENGRAM_SHARD_ID": "0",
        "ENGRAM_SHARD_LISTEN": f"{HOST}:{shard_grpc}",
        "ENGRAM_SHARD_HTTP_HOST": HOST,
        "ENGRAM_SHARD_HTTP_PORT": str(shard_http),
        "ENGRAM_MEMORY_BUDGET": "256MB",
    }
    shard_command = ("python", "-m", "engram.shard")
    shard = containers.start("shard", shard_env, [volume], *shard_command)
    _wait_serving(containers, shard, shard_grpc)
    # The gateway runs the image's default command.
    gateway = containers.start(
        "gateway",
        env
        | {
            "ENGRAM_GATEWAY_LISTEN": f"{HOST}:{gateway_grpc}",
            "ENGRAM_GATEWAY_HTTP_HOST": HOST,
            "ENGRAM_GATEWAY_HTTP_PORT": str(gateway_http),
        },
    )
    _wait_serving(containers, gateway, gateway_grpc)
    status, body = _http_get(gateway_http, "/healthz")
    assert (status, "redis reachable" in body) == (200, True), body
    status, body = _http_get(shard_http, "/healthz")
    assert status == 200, body

    demo = subprocess.run(
        [str(REPO / ".venv" / "bin" / "engram"), "demo", "--target", f"{HOST}:{gateway_grpc}"]
        + ["--spaces", "2", "--count", "4000", "--dim", "32", "--batch", "500", "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0 and "verify OK" in demo.stdout, demo.stdout + demo.stderr

    inside = json.loads(containers.engine("exec", shard, "python", "-c", INSPECT).stdout)
    assert (inside["uid"], inside["gid"]) == (APP_UID, APP_UID)
    assert "ro" in inside["root_options"], inside["root_options"]
    assert sorted(inside["writable"]) == ["/data", "/tmp"], inside["writable"]
    assert inside["compilers"] == []
    assert all(inside["tools"].values()), inside["tools"]
    assert inside["operator"] and inside["build_only"] == [], inside
    # The shard wrote its spaces to the volume, as the image's user.
    assert {p.stat().st_uid for p in data.rglob("*")} == {APP_UID}
    assert len(list((data / "spaces").iterdir())) == 2

    _stop_and_check_drain(containers, gateway, ["gateway stopping", "gateway stopped"])
    _stop_and_check_drain(containers, shard, ["shard 0 stopping", "shard 0 stopped"])

    # A new shard container on the same volume recovers both spaces before it reports SERVING.
    again = containers.start("shard-again", shard_env, [volume], *shard_command)
    _wait_serving(containers, again, shard_grpc)
    status, body = _http_get(shard_http, "/healthz")
    assert (status, body.strip()) == (200, "shard 0: 2 spaces")
    logs = containers.logs(again)
    assert logs.index("space demo-1 recovered") < logs.index("shard 0 serving"), logs
    _stop_and_check_drain(containers, again, ["shard 0 stopped"])


@BUILD_TIMEOUT
@pytest.mark.cluster
def test_hnswlib_in_the_image_is_built_for_any_x86_64(engine: Engine, tmp_path: Path) -> None:
    """No AVX/AVX-512 code in hnswlib: it was built without ``-march=native``.

    A ``-march=native`` build on a machine with AVX uses ymm/zmm registers throughout its
    distance functions, and the image would die with SIGILL on an older CPU.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    where = engine(
        "run", "--rm", engine.image, "python", "-c", "import hnswlib; print(hnswlib.__file__)"
    )
    name = f"engram-test-{uuid.uuid4().hex[:10]}-copy"
    engine("create", "--name", name, engine.image)
    try:
        engine("cp", f"{name}:{where.stdout.strip()}", str(tmp_path / "hnswlib.so"))
    finally:
        engine("rm", "-f", name, check=False)
    code = subprocess.run(
        [objdump, "-d", str(tmp_path / "hnswlib.so")], capture_output=True, text=True, check=True
    ).stdout
    assert "add" in code  # the disassembly is real
    assert not re.search(r"%[yz]mm\d", code), "hnswlib in the image uses AVX registers"


@pytest.mark.cluster
def test_containerfile_passes_hadolint_and_each_ignored_rule_is_explained() -> None:
    hadolint = REPO / ".venv" / "bin" / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint missing: make image-deps installs it (the dev extra)")
    done = subprocess.run([str(hadolint), str(CONTAINERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = CONTAINERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.startswith("# hadolint ignore="):
            continue
        comment = []
        for above in reversed(lines[:number]):
            if not above.startswith("#"):
                break
            comment.append(above)
        for rule in line.removeprefix("# hadolint ignore=").split(","):
            assert rule in " ".join(comment), f"line {number + 1}: {rule} ignored without a reason"


def test_containerfile_builds_the_hnswlib_that_pyproject_pins() -> None:
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = re.findall(r"^ARG HNSWLIB_VERSION=(\S+)$", CONTAINERFILE.read_text(), re.M)
    assert f"hnswlib=={version}" in pinned
