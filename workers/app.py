"""The Celery application: ``celery -A workers worker`` finds ``workers.app``.

Configuration lives here and only here. JSON is the only serializer accepted in either
direction (a pickle payload from a compromised broker cannot execute code), and tasks are
acknowledged late so a worker that dies mid-order leaves the message for another worker. Every
task has soft and hard time limits.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals

from schemas.tasks import TASKS
from workers.settings import Settings, get_settings


def make_app(settings: Settings) -> Celery:
    """The ehr-worker Celery app on ``settings.redis_url`` (broker and result backend)."""
    app = Celery("ehr-worker", broker=settings.redis_url, backend=settings.redis_url,
                 include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One order at a time per child: with acks_late a prefetched order would wait behind a slow one.
        worker_prefetch_multiplier=1,
        task_track_started=False,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        # Tasks never retry themselves (the consumer owns retrying), so an unacknowledged task only
        # needs to outlive the hard time limit before Redis hands it to another worker.
        broker_transport_options={
            "visibility_timeout": max(settings.broker_visibility_timeout_s, int(settings.task_hard_time_limit_s) + 30),
            # kombu re-delivers unacknowledged tasks under a Redis lock (SET NX, 300 s by default). A
            # lock request that timed out while Redis was frozen still runs when Redis wakes up, and
            # then holds the lock for nobody: re-delivery stopped for 5 minutes (the fault suite's
            # Redis-unreachable row). A restore takes milliseconds; a stale lock now lapses in 30 s.
            "unacked_mutex_expire": 30,
        },
        # A stuck order cannot hold a child for ever: the soft limit reports task_timeout, the hard
        # one kills and replaces the child.
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=max(settings.task_hard_time_limit_s, settings.task_soft_time_limit_s + 5),
        # A pool child replacing a killed one loads the models before it reports up; Celery's 4 s
        # default killed slow starters (a busy host) and retried for ever, so the worker took no
        # more orders (found by the fault suite's worker-child row, issue 8).
        worker_proc_alive_timeout=120.0,
        task_default_queue=settings.celery_queue,  # Operations (issue 9): EHRW_CELERY_QUEUE
        worker_hijack_root_logger=False,
        timezone="UTC",
    )
    # rel-b: broker/backend password, rediss:// TLS and socket timeouts, keeping visibility_timeout.
    from workers.clients import configure_celery_connection

    configure_celery_connection(app, settings)
    return app


app = make_app(get_settings())


@signals.worker_init.connect
def verify_registry_before_forking(**_: Any) -> None:
    """Refuse to start on a missing or corrupt model, or without ``EHRW_PAYLOAD_KEY``, before any
    pool process exists.

    Celery logs and swallows exceptions from signal handlers, so this exits explicitly: a worker
    that cannot load its models must not take orders off the queue.
    """
    from models.registry import ModelIntegrityError, ModelNotFoundError, ModelRegistry
    from workers.payload import PayloadError, payload_cipher

    registry = ModelRegistry(get_settings().model_registry)
    try:
        for task in TASKS:
            registry.verify(task)
        payload_cipher(get_settings().payload_key)  # the consumer's key for orders carried inline
    except (ModelIntegrityError, ModelNotFoundError, PayloadError) as exc:
        logging.getLogger("workers").critical("refusing to start: %s", exc)
        print(f"ehr-worker: refusing to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


# Operations (issue 9): logs, metrics, /readyz and traces through Celery signals (they need ``app``).
from workers import observability  # noqa: E402, F401
