"""The services one ``ehr-worker chaos`` run owns, and the faults it can inflict on them.

- A FHIR server (sekmet) and the fault proxy in front of it (:mod:`workers.chaos_proxy`).
- A Redis of its own (``redis-server`` on a free port, append-only file as docker-compose deploys
  it), so that restarting, flushing or freezing it hurts nobody else's Redis. Everything of the
  run talks to it: the Celery worker, the consumers (subprocesses, whose Celery app reads
  ``EHRW_REDIS_URL`` at import) and the queue sampler.
- A real ``celery worker`` (prefork, tiny real models) on a queue of its own.

Kafka is the caller's (one Tansu for all rows). Only processes started here are ever signalled.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from connectors.embedded import ManagedProcess, ServiceStartError, free_port, redis_answers, start_sekmet
from connectors.fhir import FhirClient
from workers.chaos_proxy import FaultProxy
from workers.settings import Settings


class ChaosLab:
    """A FHIR server behind the fault proxy, a Redis and a Celery worker (see the module docstring)."""

    def __init__(self, workdir: Path, *, kafka_bootstrap: str, registry: Path, concurrency: int = 2) -> None:
        self.workdir = Path(workdir)
        self.kafka_bootstrap = kafka_bootstrap
        self.registry = Path(registry)
        # Consumers and worker share the key of inline orders (workers/payload.py): the lab's own
        # when none is set.
        self.payload_key = os.environ.get("EHRW_PAYLOAD_KEY") or Fernet.generate_key().decode()
        self.concurrency = concurrency
        self.queue = f"chaos-{uuid.uuid4().hex[:8]}"
        self.fhir_port = free_port()
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.sekmet: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.proxy: FaultProxy | None = None
        self.worker: Any = None
        self._frozen = False

    @property
    def worker_env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {
            "EHRW_REDIS_URL": self.redis_url,
            "EHRW_FHIR_BASE_URL": self.proxy.base_url,
            "EHRW_MODEL_REGISTRY": str(self.registry),
            "EHRW_CELERY_QUEUE": self.queue,
            "EHRW_FHIR_MAX_RETRIES": "1",
            "EHRW_FHIR_TIMEOUT_S": str(FHIR_TIMEOUT_S),
            "EHRW_TASK_SOFT_TIME_LIMIT_S": str(TASK_SOFT_LIMIT_S),
            "EHRW_TASK_HARD_TIME_LIMIT_S": str(TASK_HARD_LIMIT_S),
            "EHRW_BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "EHRW_REDIS_SOCKET_TIMEOUT_S": "5",
            "EHRW_PAYLOAD_KEY": self.payload_key,
        }

    def start(self) -> ChaosLab:
        self.start_redis()
        self.sekmet = start_sekmet(self.fhir_port, self.workdir / "fhir")
        self.proxy = FaultProxy(f"http://127.0.0.1:{self.fhir_port}/fhir", free_port()).start()
        self.start_worker()
        return self

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.sekmet is not None:
            self.sekmet.stop()
        if self.redis is not None:
            self.thaw_redis()
            self.redis.stop()

    # -- the worker ----------------------------------------------------------------------------------

    def start_worker(self) -> None:
        from workers.app import app
        from workers.local import start_worker

        # The ping goes through the lab's Redis, which the caller's app does not use.
        pinger = app if app.conf.broker_url == self.redis_url else _app_on(self.redis_url)
        self.worker = start_worker(self.worker_env, self.workdir / "worker.log", app=pinger,
                                   concurrency=self.concurrency, name="chaos")  # fmt: skip

    def kill_worker_child(self) -> bool:
        children = _children(self.worker.pid)
        if not children:
            return False
        os.kill(random.choice(children), signal.SIGKILL)
        return True

    def kill_worker_parent(self, restart_after_s: float) -> None:
        """SIGKILL the worker's main process only (its pool children are orphaned, as when the OOM
        killer picks the parent), then start a new worker. Orphans still alive when it is ready
        are killed: no supervisor would let them run on unseen."""
        old = self.worker
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(timeout=30)
        time.sleep(restart_after_s)
        self.start_worker()
        try:
            os.killpg(old.pid, signal.SIGKILL)  # the orphans kept the old process group
        except ProcessLookupError:
            pass

    # -- Redis ---------------------------------------------------------------------------------------

    def start_redis(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceStartError("ehr-worker chaos needs redis-server: apt-get install redis-server")
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)]  # fmt: skip
        log_path = data / "redis.log"
        proc = subprocess.Popen(cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.redis = ManagedProcess("redis", proc, log_path)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.redis_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceStartError(f"the chaos Redis did not start; see {log_path}")
            time.sleep(0.1)

    def restart_redis(self) -> None:
        """A crash and restart: SIGKILL, then the same port and append-only file (writes of the
        last second may be lost, as ``appendfsync everysec`` allows)."""
        assert self.redis is not None
        os.kill(self.redis.pid, signal.SIGKILL)
        self.redis.popen.wait(timeout=30)
        self.redis.stop()
        self.start_redis()

    def flush_redis(self) -> None:
        """``FLUSHALL``: queue, results, markers and attempt counts gone at once."""
        import redis

        redis.Redis.from_url(self.redis_url, socket_timeout=10).flushall()

    def freeze_redis(self) -> None:
        """Unreachable without refusing: SIGSTOP, so connections hang until timeouts fire."""
        assert self.redis is not None
        os.kill(self.redis.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw_redis(self) -> None:
        if self._frozen and self.redis is not None:
            os.kill(self.redis.pid, signal.SIGCONT)
            self._frozen = False

    # -- FHIR ----------------------------------------------------------------------------------------

    def stop_fhir(self) -> None:
        assert self.sekmet is not None
        self.sekmet.stop()

    def start_fhir(self) -> None:
        self.sekmet = start_sekmet(self.fhir_port, self.workdir / "fhir")

    def fhir(self) -> FhirClient:
        return FhirClient(f"http://127.0.0.1:{self.fhir_port}/fhir", max_pages=1000)

    # -- a row's settings ----------------------------------------------------------------------------

    def settings(self, tag: str, **changes: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_bootstrap, "kafka_topic": f"ev-{tag}", "kafka_group": f"grp-{tag}",
            "kafka_dlq_topic": f"dlq-{tag}", "kafka_result_topic": f"res-{tag}", "redis_url": self.redis_url,
            "celery_queue": self.queue, "event_max_attempts": 3, "retry_backoff_s": 0.2, "retry_backoff_max_s": 2.0,
            "retry_after_max_s": 30.0, "max_in_flight": 64, "max_in_flight_orders": WINDOW, "task_timeout_s": 30.0,
            "payload_key": self.payload_key, "redis_socket_timeout_s": 5.0,
            # The worker's limits (worker_env): the consumer's sent-marker lifetime derives from them.
            "task_soft_time_limit_s": TASK_SOFT_LIMIT_S, "task_hard_time_limit_s": TASK_HARD_LIMIT_S,
            "broker_visibility_timeout_s": VISIBILITY_TIMEOUT_S,
        }  # fmt: skip
        values.update(changes)
        return Settings(**values)

    def consumer_env(self, settings: Settings) -> dict[str, str]:
        """The environment of a consumer subprocess of a row (its settings, the lab's Redis and key)."""
        return {**os.environ, **settings_env(settings), "EHRW_REDIS_URL": self.redis_url,
                "EHRW_PAYLOAD_KEY": self.payload_key}  # fmt: skip


FHIR_TIMEOUT_S = 5.0  # the worker's FHIR client timeout in the lab (a "slow FHIR" answers later)
WINDOW = 32  # orders in flight per consumer (the Redis queue bound the table checks)
# The lab's short limits, shared by its worker and its consumers (the sent-marker lifetime derives from them).
TASK_SOFT_LIMIT_S = 20
TASK_HARD_LIMIT_S = 30
VISIBILITY_TIMEOUT_S = 60


def settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None and not hasattr(value, "get_secret_value"):
            env[f"EHRW_{name.upper()}"] = str(value)
    return env


def _app_on(redis_url: str) -> Any:
    from workers.app import make_app

    return make_app(Settings(redis_url=redis_url))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
