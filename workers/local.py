"""Everything on one machine for the demo, the benchmark and the tests: real ``celery -A workers
worker`` subprocesses, and :class:`LocalStack` (services, settings, worker, topics, events)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from celery import Celery

from connectors.embedded import EmbeddedServices
from connectors.kafka import ensure_topics, make_producer
from workers.settings import Settings


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the worker and its pool children at once (crash simulation)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(
    env: dict[str, str],
    log_path: Path,
    *,
    app: Celery,
    concurrency: int = 2,
    name: str = "ehrw",
    ready_timeout: float = 120.0,
) -> WorkerProcess:
    """Start a worker with ``env`` (EHRW_* settings) and wait until it answers a ping."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    node = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--loglevel", "INFO", "--concurrency", str(concurrency), "--pool", "prefork",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{node}@%h",
    ]  # fmt: skip
    log = log_path.open("ab")
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    worker = WorkerProcess(proc, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {proc.returncode}; its log ({log_path}) ends:\n{worker.log_tail()}")
            replies = app.control.ping(timeout=1.0)
            if any(worker_name.startswith(f"{node}@") for reply in replies for worker_name in reply):
                return worker
            time.sleep(0.5)
        raise RuntimeError(f"celery worker not ready after {ready_timeout:.0f}s; see {log_path}:\n{worker.log_tail()}")
    except BaseException:  # not ready, or interrupted (Ctrl-C, SIGTERM) while waiting: no orphan worker
        worker.stop()
        raise


class LocalStack:
    """Kafka (Tansu), FHIR (sekmet) and Redis on this machine (``connectors.embedded``), the
    ``EHRW_*`` settings that point a worker at them, and real ``celery worker`` processes: what the
    demo, the bench and the tests run on. A context manager; ``stop()`` stops what it started.

    ``settings`` name the topics, the registry and the Redis database; their Kafka and FHIR
    addresses are replaced by the started services' unless ``kafka_port``/``fhir_port`` pin them.
    ``app`` is the Celery app that purges and pings (by default ``workers.app.app``, the one the
    dispatcher sends with): it must already use ``settings.redis_url``.
    """

    def __init__(self, settings: Settings, *, workdir: Path | None = None, kafka_port: int | None = None,
                 fhir_port: int | None = None, app: Celery | None = None,
                 fhir_settings: dict[str, Any] | None = None) -> None:
        redis_port = urlsplit(settings.redis_url).port or 6379
        self.services = EmbeddedServices(workdir, kafka_port=kafka_port, fhir_port=fhir_port, redis_port=redis_port,
                                         fhir_settings=fhir_settings)
        self.settings = settings.model_copy(update={"kafka_bootstrap": self.services.kafka_bootstrap,
                                                    "fhir_base_url": self.services.fhir_base_url})
        if self.settings.payload_key is None:
            # A local stack (demo, bench) makes its own key for the orders its consumer hands its
            # workers; a deployment sets EHRW_PAYLOAD_KEY (docs/security.md).
            from cryptography.fernet import Fernet
            from pydantic import SecretStr

            self.settings.payload_key = SecretStr(Fernet.generate_key().decode())
        self.workdir = self.services.workdir
        self._app = app
        self.workers: list[WorkerProcess] = []

    @property
    def app(self) -> Celery:
        if self._app is None:
            from workers.app import app

            self._app = app
        return self._app

    def env(self, **extra: str) -> dict[str, str]:
        """The ``EHRW_*`` environment of a worker on this stack (``extra``: more ``EHRW_*`` values)."""
        s = self.settings
        return {
            "EHRW_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "EHRW_REDIS_URL": s.redis_url,
            "EHRW_FHIR_BASE_URL": s.fhir_base_url,
            "EHRW_MODEL_REGISTRY": str(Path(s.model_registry).resolve()),
            "EHRW_MODEL_THREADS": str(s.model_threads),
            **({"EHRW_PAYLOAD_KEY": s.payload_key.get_secret_value()} if s.payload_key else {}),
            **extra,
        }

    def start(self) -> Self:
        self.services.start()
        return self

    def purge(self) -> None:
        """Drop the tasks an interrupted earlier run left in the queue."""
        self.app.control.purge()

    def start_worker(self, *, concurrency: int = 2, name: str = "ehrw", **extra_env: str) -> WorkerProcess:
        worker = start_worker(self.env(**extra_env), self.workdir / f"{name}-worker.log", app=self.app,
                              concurrency=concurrency, name=name)
        self.workers.append(worker)
        return worker

    def create_topics(self) -> None:
        """The order, dead-letter and result topics of ``settings``."""
        s = self.settings
        ensure_topics(s.kafka_bootstrap, [s.kafka_topic, s.kafka_dlq_topic, s.kafka_result_topic])

    def publish(self, events: Iterable[tuple[bytes | None, bytes]], topic: str | None = None) -> int:
        """Send ``(key, value)`` events to ``topic`` (default: the order topic) and flush; returns how many."""
        producer = make_producer(self.settings.kafka_bootstrap)
        n = 0
        try:
            for key, value in events:
                producer.send(topic or self.settings.kafka_topic, key=key, value=value)
                n += 1
            producer.flush()
        finally:
            producer.close()
        return n

    def stop(self) -> None:
        while self.workers:
            self.workers.pop().stop()
        self.services.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
